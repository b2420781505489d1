"""A private channel through real mounts, on the local bucket (which checks signatures as
GCS does): node B reads a large file by chunk for longer than several lifetimes of its
read URLs; once its permission is revoked, a new read fails at once with EACCES, and a
stream it had started stops within a URL lifetime. The hub signs URLs that live
``LIFETIME_S`` seconds (``hub serve --read-url-lifetime``).

The signing, caching and renewal of read URLs are tested in process in
tests/inproc/test_private_channels.py; the hub's and the bucket's refusals in
tests/inproc/test_private_reads.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time

import pytest

from kachery_fs.manifest import CHUNK_SIZE

from ..util import kfs, make_cluster, mounted, require_fuse

LIFETIME_S = 2
CH = "private.test"


def put(c, tmp_path, size: int) -> tuple[bytes, str]:
    """A file of ``size`` random bytes put by A (its store and the bucket): its bytes and
    its path under B's mount (with its manifest, for a large one: read by chunk)."""
    data = os.urandom(size)
    src = tmp_path / f"src-{os.urandom(4).hex()}.bin"
    src.write_bytes(data)
    uri = kfs(c.a, "put", "-q", str(src)).stdout.decode().strip()
    src.unlink()
    sha1 = hashlib.sha1(data).hexdigest()
    name = sha1 + (f"?manifest={uri.rpartition('=')[2]}" if "?manifest=" in uri else "")
    return data, name


@pytest.fixture
def cluster(tmp_path):
    require_fuse()
    c = make_cluster(tmp_path, channel=CH, create_args=("--private",),
                     hub_args=("--read-url-lifetime", str(LIFETIME_S)))
    try:
        yield c
    finally:
        c.hub.stop()


def test_reads_outlive_url_lifetimes_and_stop_when_the_permission_goes(cluster, tmp_path):
    c = cluster
    long_data, long_name = put(c, tmp_path, 3 * CHUNK_SIZE)
    streamed, streamed_name = put(c, tmp_path, 4 * CHUNK_SIZE)
    small, small_name = put(c, tmp_path, 100_000)
    sha1_dir = c.mnt_b / CH / "sha1"
    with mounted(c.b, c.mnt_b):
        # A slow reader: a chunk every 2 s, so the file's URL is renewed as it goes.
        started = time.monotonic()
        got = []
        with open(sha1_dir / long_name, "rb") as f:
            for _ in range(3):
                got.append(f.read(CHUNK_SIZE))
                time.sleep(2)
        assert time.monotonic() - started > 2 * LIFETIME_S  # the test means something
        assert b"".join(got) == long_data

        with open(sha1_dir / streamed_name, "rb") as f:
            assert f.read(1 << 20) == streamed[:1 << 20]  # a stream begins
            kfs(c.a, "hub", "channel", "authorize", CH, c.b_id, "--remove", "requestFiles",
                "--hub", c.hub.url)
            # A new read fails at once.
            asked = time.monotonic()
            with pytest.raises(OSError) as info:
                (sha1_dir / small_name).read_bytes()
            assert info.value.errno == errno.EACCES
            assert time.monotonic() - asked < LIFETIME_S
            # The stream stops once the URL it holds has expired. (A read of the first
            # chunk fetches the next two ahead, not the last.)
            time.sleep(LIFETIME_S + 0.5)
            f.seek(3 * CHUNK_SIZE)
            with pytest.raises(OSError) as info:
                f.read(1 << 20)
            assert info.value.errno == errno.EACCES
    log = (c.b / "mount-test.log").read_text()
    assert "refuses this node signed reads" in log
    assert "X-Goog-Signature" not in log
