"""What a new user runs into with `mount`, `umount` and `up`: a mistake refused with a
one-line message naming what to do, and a failed unmount said so (the mount tier: these
mount FUSE or run `mount`/`up` in a subprocess)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from ..util import (
    KFS,
    HubProcess,
    assert_one_line_error,
    kfs,
    lazy_unmount,
    mounted,
    node_env,
    offline_node,
    require_fuse,
    run_cli,
    stop_process,
    wait_for,
)


def test_umount_of_a_kachery_fs_mount(tmp_path):
    require_fuse()
    node_dir = offline_node(tmp_path / "node")
    mnt = tmp_path / "mnt"
    with mounted(node_dir, mnt) as proc:
        result = run_cli(node_dir, "umount", str(mnt))
        assert result.returncode == 0, result.stderr
        assert not os.path.ismount(mnt)
        proc.wait(timeout=30)


def test_a_queued_feed_message_is_published_by_the_next_mount(tmp_path):
    from kachery_fs.feeds import subfeed_hash
    from kachery_fs.protocol import feed_prefix

    require_fuse()
    node_dir = tmp_path / "node"
    node_id = kfs(node_dir, "init").stdout.decode().strip()
    hub = HubProcess(node_dir, tmp_path / "hub").start()
    try:
        kfs(node_dir, "hub", "channel", "create", "chan", "--hub", hub.url)
        kfs(node_dir, "hub", "channel", "authorize", "chan", node_id, "--permissions", "all",
            "--hub", hub.url)
        kfs(node_dir, "join", hub.url, "chan")
        feed_id = kfs(node_dir, "feed", "create").stdout.decode().strip()
        hub.stop()
        result = run_cli(node_dir, "feed", "append", feed_id, "log", '{"x": 1}')
        assert result.returncode == 0 and "stays queued" in result.stderr, result.stderr
        hub.start()
        index = (hub.bucket_dir() / feed_prefix("chan", feed_id, subfeed_hash("log"))
                 / "subfeed.json")
        assert not index.exists()
        with mounted(node_dir, tmp_path / "mnt"):
            wait_for(lambda: index.exists() and b'"messageCount":1' in index.read_bytes(),
                     timeout=30, what="the mount to publish the queued message")
            single = index.parent / "0"
            wait_for(single.exists, timeout=30, what="its single-message object")
    finally:
        hub.stop()


def test_mount_refuses_a_node_without_channels_and_a_nonempty_directory(tmp_path):
    require_fuse()
    lonely = tmp_path / "lonely"
    run_cli(lonely, "init")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        for flags in ((), ("--foreground",)):
            result = run_cli(lonely, "mount", *flags, str(mnt))
            assert_one_line_error(result, "this node has joined no channel; run kachery-fs"
                                  " join HUB_URL CHANNEL first")
            assert not os.path.ismount(mnt)

        node_dir = offline_node(tmp_path / "node")
        (mnt / "notes.txt").write_text("mine")
        for flags in ((), ("--foreground",)):
            result = run_cli(node_dir, "mount", *flags, str(mnt))
            assert_one_line_error(result, f"mount point {mnt} is not empty", "--nonempty")
            assert not os.path.ismount(mnt)
        result = run_cli(tmp_path / "up-node", "up", str(mnt), "--port", "0")
        assert_one_line_error(result, f"mount point {mnt} is not empty", "--nonempty")
    finally:
        lazy_unmount(mnt)


def test_mount_nonempty_when_asked(tmp_path):
    require_fuse()
    node_dir = offline_node(tmp_path / "node")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "notes.txt").write_text("mine")
    try:
        result = run_cli(node_dir, "mount", "--nonempty", str(mnt))
        assert result.returncode == 0, result.stderr
        assert os.path.ismount(mnt) and (mnt / "chan").is_dir()
        assert run_cli(node_dir, "umount", str(mnt)).returncode == 0
    finally:
        lazy_unmount(mnt)
    wait_for(lambda: not os.path.ismount(mnt), timeout=10, what="the unmount")
    assert (mnt / "notes.txt").read_text() == "mine"


def test_background_mount_passes_debug_fuse_on_and_logs_it(tmp_path):
    """The background mount re-executes itself with every option: --debug-fuse reaches
    the child, and libfuse's output (on stderr) lands in the mount's log."""
    require_fuse()
    node_dir = offline_node(tmp_path / "node")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "mount.log"
    try:
        result = run_cli(node_dir, "mount", "--debug-fuse", "--log-file", str(log), str(mnt))
        assert result.returncode == 0, result.stderr
        assert (mnt / "chan").is_dir()
        assert run_cli(node_dir, "umount", str(mnt)).returncode == 0
    finally:
        lazy_unmount(mnt)
    wait_for(lambda: not os.path.ismount(mnt), timeout=10, what="the unmount")
    assert "LOOKUP" in log.read_text(errors="replace")  # a libfuse debug line


def test_up_reports_an_unmount_that_failed(tmp_path):
    """Ctrl-C on `up` with a tmpfs mounted over the mount point: the unmount detaches the
    tmpfs, the kachery-fs mount stays, and `up` says so (exit 1), then `umount` detaches
    the dead mount."""
    require_fuse()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    node_dir, mnt = tmp_path / "node", tmp_path / "mnt"
    proc = subprocess.Popen([*KFS, "up", str(mnt), "--port", "0"], env=node_env(node_dir),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or os.path.ismount(mnt), timeout=30,
                 what="up to mount")
        assert proc.poll() is None, proc.stderr.read()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "kfs-test", str(mnt)],
                       check=True)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1, (out, err)
        assert "unmounted" not in out
        assert_one_line_error(subprocess.CompletedProcess([], 1, out, err),
                              f"could not unmount {mnt}", "kachery-fs umount --lazy")
        result = run_cli(node_dir, "umount", "--lazy", str(mnt))
        assert result.returncode == 0, result.stderr
        assert not _mounted_at(mnt)
    finally:
        stop_process(proc)
        for _ in range(5):  # the tmpfs and the kachery-fs mount, whichever are left
            if not _mounted_at(mnt):
                break
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    assert not _mounted_at(mnt)


def _mounted_at(path: Path) -> bool:
    """Whether anything is mounted at ``path``, dead FUSE mounts included (which
    os.path.ismount takes for directories)."""
    target = os.path.realpath(path).replace(" ", "\\040")
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)
