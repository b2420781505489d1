"""What a crash leaves (see kachery_fs.fs.durability): ``kill -9`` of the mount, and a
power cut.

A power cut is simulated with the node directory on an ext4 file system in a loop
device, mounted with ``commit=600`` so that the kernel writes nothing to it on a timer.
After ``kill -9`` of the mount, the image file is copied: the copy is the disk as the
machine would find it after a power cut at that instant, without what the kernel still
held in memory (file data not yet written back, directory changes not yet journaled).
Before the copy, the test forces the worst ordering a kernel may choose: the node
database's log written back before the content it names (an ``fsync`` of
``node.db-wal``, which commits ext4's journal but leaves delayed-allocation data of other
files unwritten). The copy is then mounted as ext4 (the journal is replayed) and the
node mounted from it."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from ..clusters import in_store
from ..util import mounted, offline_node, require_fuse

CHANNEL = "chan"  # offline_node's


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def write(path: Path, data: bytes, *, fsync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def kill_9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def mount_log(node: Path) -> str:
    return (node / "mount-test.log").read_text(errors="replace")


def require_loop_devices() -> None:
    """Skip loudly where loop devices cannot be made; fail where they are required."""
    reason = None
    if os.geteuid() != 0:
        reason = "loop devices need root"
    elif not Path("/dev/loop-control").exists() or shutil.which("losetup") is None:
        reason = "no loop devices (/dev/loop-control, losetup)"
    elif shutil.which("mkfs.ext4") is None:
        reason = "mkfs.ext4 is missing (e2fsprogs)"
    if reason is None:
        return
    if os.environ.get("KACHERY_FS_REQUIRE_MOUNT") == "1":
        pytest.fail(f"the power-cut test is required here but cannot run: {reason}")
    pytest.skip(f"POWER-CUT TEST SKIPPED: {reason}")


@contextmanager
def ext4_on_loop(image: Path, mountpoint: Path):
    """``image`` mounted at ``mountpoint`` through a loop device, with no timed journal
    commits (``commit=600``), for the block; always unmounted."""
    mountpoint.mkdir(exist_ok=True)
    subprocess.run(["mount", "-o", "loop,commit=600", str(image), str(mountpoint)],
                   check=True, capture_output=True)
    try:
        yield mountpoint
    finally:
        r = subprocess.run(["umount", str(mountpoint)], capture_output=True)
        if r.returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)


def new_ext4_image(path: Path) -> Path:
    subprocess.run(["truncate", "-s", "256M", str(path)], check=True)
    # Initialised now, not by a kernel thread in the background: nothing else may write
    # to the device while the test copies it.
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                    str(path)], check=True, capture_output=True)
    return path


def damaged_pending(node: Path) -> list[str]:
    """Files in the store's pending/ that do not hold their hash's bytes."""
    bad = []
    for path in (node / "pending").iterdir():
        if sha1(path.read_bytes()) != path.name:
            bad.append(path.name)
    return bad


def test_kill_9_keeps_what_close_committed_and_drops_a_file_never_closed(tmp_path):
    require_fuse()
    node = offline_node(tmp_path / "node")
    mnt = tmp_path / "mnt"
    opened = []
    try:
        with mounted(node, mnt) as proc:
            ch = mnt / CHANNEL
            write(ch / "closed.txt", b"committed at close\n")
            write(ch / "rewritten.txt", b"the old content\n")
            # Open when the mount dies: one new, one being rewritten in place.
            new = os.open(ch / "never-closed.txt", os.O_WRONLY | os.O_CREAT, 0o644)
            opened.append(new)
            os.write(new, b"x" * 100_000)
            again = os.open(ch / "rewritten.txt", os.O_WRONLY | os.O_TRUNC)
            opened.append(again)
            os.write(again, b"half of the new")
            kill_9(proc)
            # Committed, not yet synced (a sync is 5 s away): the next mount checks it.
            assert sha1(b"committed at close\n") in os.listdir(node / "pending")
    finally:
        for fd in opened:
            try:
                os.close(fd)
            except OSError:
                pass  # the mount is gone: ENOTCONN
    with mounted(node, mnt):
        ch = mnt / CHANNEL
        assert (ch / "closed.txt").read_bytes() == b"committed at close\n"
        assert (ch / "rewritten.txt").read_bytes() == b"the old content\n"
        assert not (ch / "never-closed.txt").exists()
        assert sorted(os.listdir(ch)) == ["closed.txt", "feeds", "rewritten.txt", "sha1"]
    assert "chan/never-closed.txt was being created and never closed" in mount_log(node)
    # Checked again, on the disk, and in sha1/: nothing is left pending.
    assert not os.listdir(node / "pending")
    assert in_store(node, sha1(b"committed at close\n")).read_bytes() == b"committed at close\n"


def test_a_power_cut_shows_each_name_with_committed_content_or_not_at_all(tmp_path):
    require_fuse()
    require_loop_devices()
    image = new_ext4_image(tmp_path / "disk.img")
    snapshot = tmp_path / "after-the-power-cut.img"
    mnt = tmp_path / "mnt"
    synced, first, second = os.urandom(300_000), os.urandom(200_000), os.urandom(200_000)
    unsynced = os.urandom(1 << 20)
    with ext4_on_loop(image, tmp_path / "disk") as disk:
        node = offline_node(disk / "node")
        opened = []
        try:
            with mounted(node, mnt) as proc:
                ch = mnt / CHANNEL
                write(ch / "synced.bin", synced, fsync=True)
                write(ch / "replaced.bin", first, fsync=True)
                write(ch / "edited.txt", b"the old text\n", fsync=True)
                # Committed at close, but no sync since:
                write(ch / "replaced.bin", second)
                write(ch / "unsynced.bin", unsynced)
                # An editor's save: a new file, renamed over the old one.
                write(ch / ".edited.txt.swp", b"the new text\n")
                os.rename(ch / ".edited.txt.swp", ch / "edited.txt")
                fd = os.open(ch / "open.bin", os.O_WRONLY | os.O_CREAT, 0o644)
                opened.append(fd)
                os.write(fd, b"never closed")
                kill_9(proc)
                wal = os.open(node / "node.db-wal", os.O_RDONLY)
                try:
                    os.fsync(wal)  # the names reach the disk before the content
                finally:
                    os.close(wal)
                shutil.copyfile(image, snapshot)  # the power cut
        finally:
            for fd in opened:
                try:
                    os.close(fd)
                except OSError:
                    pass

    with ext4_on_loop(snapshot, tmp_path / "after") as disk:
        node = disk / "node"
        # The simulation lost what a power cut loses: content committed since the last
        # sync is not on the disk whole, though the database names it.
        assert damaged_pending(node), sorted(os.listdir(node / "pending"))
        # A mountpoint of its own: the killed mount's may still be detaching (lazily).
        mnt = tmp_path / "mnt-after"
        with mounted(node, mnt):
            ch = mnt / CHANNEL
            assert (ch / "synced.bin").read_bytes() == synced  # fsync(2) returned
            assert (ch / "replaced.bin").read_bytes() in (first, second)
            names = set(os.listdir(ch))
            assert "open.bin" not in names
            # The old text or the new, never neither (the new was put on the disk before
            # the rename, as ext4 does).
            assert (ch / "edited.txt").read_bytes() in (b"the old text\n", b"the new text\n")
            assert ".edited.txt.swp" not in names
            if "unsynced.bin" in names:
                assert (ch / "unsynced.bin").read_bytes() == unsynced
            for name in names - {"sha1", "feeds"}:  # and by hash, what each name says
                uri = os.getxattr(ch / name, "user.kachery.uri").decode()
                h = uri.removeprefix("sha1://").split("/")[0].split("?")[0]
                assert sha1((ch / "sha1" / h).read_bytes()) == h
        log = mount_log(node)
        assert "did not reach the disk whole" in log
        assert not os.listdir(node / "pending")
