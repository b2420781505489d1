"""``mount --read-only`` through a real mount: the kernel mount is ``ro``, every change
gets EROFS, reads work, and nothing leaves the node: a queued upload and a queued feed
message stay queued until a mount that may write."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest

from kachery_fs.feeds import subfeed_hash
from kachery_fs.protocol import feed_prefix, object_key

from ..util import kfs, make_cluster, mounted, require_fuse, run_cli, wait_for

CH = "ro.data"


def _mount_options(mountpoint) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return fields[5].split(",")
    raise AssertionError(f"{mountpoint} is not mounted")


def test_a_read_only_mount_changes_nothing_and_sends_nothing(tmp_path):
    require_fuse()
    c = make_cluster(tmp_path, channel=CH)
    try:
        data = os.urandom(300_000)
        src = tmp_path / "up.bin"
        src.write_bytes(data)
        uri = kfs(c.a, "put", "-q", str(src)).stdout.decode().strip()
        sha1 = uri.split("//")[1].split("?")[0]
        with mounted(c.a, c.mnt_a):  # a file of A's own, before
            (c.mnt_a / CH / "made.txt").write_bytes(b"made")
            made = c.hub.bucket_dir() / object_key(CH, hashlib.sha1(b"made").hexdigest())
            wait_for(made.exists, timeout=30, what="made.txt to be uploaded")
        # Queued while the hub is down: an upload and a feed message.
        queued = os.urandom(100_000)
        queued_sha1 = hashlib.sha1(queued).hexdigest()
        (tmp_path / "queued.bin").write_bytes(queued)
        feed_id = kfs(c.a, "feed", "create").stdout.decode().strip()
        c.hub.stop()
        assert run_cli(c.a, "put", "-q", str(tmp_path / "queued.bin")).returncode == 1
        assert "stays queued" in run_cli(c.a, "feed", "append", feed_id, "log",
                                         '{"x": 1}').stderr
        c.hub.start()
        in_bucket = c.hub.bucket_dir() / object_key(CH, queued_sha1)
        index = (c.hub.bucket_dir() / feed_prefix(CH, feed_id, subfeed_hash("log"))
                 / "subfeed.json")

        with mounted(c.a, c.mnt_a, "--read-only"):
            assert "ro" in _mount_options(c.mnt_a)
            channel = c.mnt_a / CH
            assert (channel / "made.txt").read_bytes() == b"made"
            assert (channel / "sha1" / sha1).read_bytes() == data
            for change in (lambda: (channel / "new.txt").write_bytes(b"x"),
                           lambda: (channel / "made.txt").write_bytes(b"x"),
                           lambda: open(channel / "made.txt", "ab").close(),
                           lambda: (channel / "dir").mkdir(),
                           lambda: (channel / "made.txt").unlink(),
                           lambda: (channel / "made.txt").rename(channel / "moved.txt"),
                           lambda: os.utime(channel / "made.txt", (0, 0)),
                           lambda: os.chmod(channel / "made.txt", 0o600),
                           lambda: os.symlink("made.txt", channel / "link"),
                           lambda: open(channel / "feeds" / feed_id / "log", "ab").close()):
                with pytest.raises(OSError) as caught:
                    change()
                assert caught.value.errno == errno.EROFS
            assert (channel / "made.txt").read_bytes() == b"made"
            wait_for(lambda: "mounting read-only" in (c.a / "mount-test.log").read_text(),
                     timeout=10, what="the mount to say it is read-only")
            log = (c.a / "mount-test.log").read_text()
            assert "1 queued wait for a mount that may write" in log, log
            # A few seconds of a mount that would have sent both by now.
            with pytest.raises(AssertionError):
                wait_for(lambda: in_bucket.exists() or index.exists(), timeout=5,
                         what="anything to leave the node")
        assert not in_bucket.exists() and not index.exists()

        with mounted(c.a, c.mnt_a):  # one that may write sends both
            assert "ro" not in _mount_options(c.mnt_a)
            wait_for(in_bucket.exists, timeout=60, what="the queued upload")
            wait_for(index.exists, timeout=60, what="the queued feed message")
    finally:
        c.hub.stop()


def test_read_only_is_passed_to_the_background_mount(tmp_path):
    """Without -f too: the option reaches the mount's process (MOUNT_OPTIONS)."""
    require_fuse()
    c = make_cluster(tmp_path, channel=CH)
    try:
        c.mnt_a.mkdir()
        kfs(c.a, "mount", "--read-only", str(c.mnt_a))
        try:
            assert "ro" in _mount_options(c.mnt_a)
            with pytest.raises(OSError) as caught:
                (c.mnt_a / CH / "x").write_bytes(b"x")
            assert caught.value.errno == errno.EROFS
        finally:
            kfs(c.a, "umount", str(c.mnt_a))
            wait_for(lambda: not os.path.ismount(c.mnt_a), timeout=20, what="the unmount")
    finally:
        c.hub.stop()
