"""The foreground mount under systemd (contrib/systemd/kachery-fs-mount@.service): READY=1
once the mount is live, and ``systemctl stop``'s SIGTERM unmounts, says STOPPING=1 and exits
0, leaving no mount; a mount whose process was killed is detached by the unit's
ExecStopPost= (``kachery-fs umount --lazy``)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from .. import util
from ..util import (
    KFS,
    in_mount_table,
    lazy_unmount,
    next_datagram,
    node_env,
    offline_node,
    require_fuse,
    run_cli,
    stop_process,
)


def mount_types(path: Path) -> list[str]:
    target = str(path).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        return [fields[fields.index("-") + 1] for fields in map(str.split, f)
                if fields[4] == target]


def foreground_mount(node_dir: Path, mountpoint: Path, notify: Path) -> tuple:
    """``kachery-fs mount --foreground``, as the unit's ExecStart= runs it (its log, -vv,
    recorded in util.MOUNT_LOGS): the process and its log."""
    log = node_dir / "mount-test.log"
    util.MOUNT_LOGS.append((log, log.stat().st_size if log.exists() else 0))
    proc = subprocess.Popen([*KFS, "-vv", "mount", "--foreground", "--log-file", str(log),
                             str(mountpoint)],
                            env={**node_env(node_dir), "NOTIFY_SOCKET": str(notify)},
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, log


def test_ready_once_mounted_and_sigterm_unmounts(tmp_path, notify_socket):
    require_fuse()
    sock, path = notify_socket
    node, mnt = offline_node(tmp_path / "node"), tmp_path / "mnt"
    mnt.mkdir()
    proc, log = foreground_mount(node, mnt, path)
    try:
        assert next_datagram(sock, proc, log) == b"READY=1"
        # at that moment: mounted, and answering
        assert mount_types(mnt)[-1:] == ["fuse.kachery-fs"]
        assert os.listdir(mnt) == ["chan"]
        (mnt / "chan" / "ready.txt").write_bytes(b"ready\n")
        assert (mnt / "chan" / "ready.txt").read_bytes() == b"ready\n"

        proc.send_signal(signal.SIGTERM)  # systemctl stop (KillSignal=SIGTERM)
        assert next_datagram(sock, proc, log) == b"STOPPING=1"
        assert proc.wait(timeout=30) == 0
        assert mount_types(mnt) == [] and not in_mount_table(mnt)
        assert "received SIGTERM; unmounting" in log.read_text()
    finally:
        lazy_unmount(mnt)
        stop_process(proc)


def test_exec_stop_post_detaches_the_mount_of_a_killed_process(tmp_path, notify_socket):
    require_fuse()
    sock, path = notify_socket
    node, mnt = offline_node(tmp_path / "node"), tmp_path / "mnt"
    mnt.mkdir()
    proc, log = foreground_mount(node, mnt, path)
    try:
        assert next_datagram(sock, proc, log) == b"READY=1"
        proc.kill()  # the process this test started, by its PID
        proc.wait(timeout=30)
        assert mount_types(mnt) == ["fuse.kachery-fs"]  # left behind, dead
        # ExecStopPost=-+/usr/local/bin/kachery-fs umount --lazy /mnt/kachery/%i
        result = run_cli(node, "umount", "--lazy", str(mnt))
        assert result.returncode == 0, result.stderr
        assert mount_types(mnt) == [] and not in_mount_table(mnt)
        # and with nothing left, it fails (which the unit's "-" ignores), in one line
        again = run_cli(node, "umount", "--lazy", str(mnt))
        assert again.returncode == 1 and again.stderr == f"kachery-fs: {mnt} is not mounted\n"
    finally:
        lazy_unmount(mnt)
        stop_process(proc)
