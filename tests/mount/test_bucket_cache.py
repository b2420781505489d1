"""The channel bucket as a managed cache, end to end: files written through a real mount
fill the allocation, the least recently demanded are evicted from the local bucket, and an
evicted file is read again through the request flow.

The policy itself is tested in process in tests/inproc/test_bucket_cache.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import ExitStack

from ..util import kfs, make_cluster, mounted, require_fuse, wait_for, xattr

MiB = 1 << 20


def test_eviction_through_mounts_and_the_evicted_file_read_again(tmp_path):
    require_fuse()
    c = make_cluster(tmp_path, channel="cache.test", create_args=("--allocation", "3M"))
    hub = ("--hub", c.hub.url)
    with ExitStack() as stack:
        stack.callback(c.hub.stop)
        stack.enter_context(mounted(c.a, c.mnt_a))
        data = [os.urandom(MiB) for _ in range(4)]
        hashes = [hashlib.sha1(d).hexdigest() for d in data]
        for i in range(3):
            path = c.mnt_a / c.channel / f"f{i}"
            path.write_bytes(data[i])
            wait_for(lambda p=path: xattr(p, "user.kachery.status") == "in bucket",
                     timeout=30, what=f"{path.name} in the bucket")
        # B reads f0 from the bucket; its report at unmount makes f0 the most in demand.
        with mounted(c.b, c.mnt_b):
            assert (c.mnt_b / c.channel / "sha1" / hashes[0]).read_bytes() == data[0]
        (c.mnt_a / c.channel / "f3").write_bytes(data[3])

        def stats():
            out = kfs(c.a, "hub", "channel", "stats", c.channel, "--json", *hub).stdout
            return json.loads(out)

        wait_for(lambda: stats()["evictions"]["count"] == 2, timeout=30,
                 what="two evictions")
        s = stats()
        assert s["downloads"]["count"] == 1 and s["storedObjects"] == 2
        objects = c.hub.bucket_dir() / c.channel / "sha1"
        kept = {p.name for p in objects.rglob("*") if p.is_file()}
        assert kept == {hashes[0], hashes[3]}
        # f1 is gone from the bucket but stays readable: B's read goes through A.
        with mounted(c.b, c.mnt_b):
            assert (c.mnt_b / c.channel / "sha1" / hashes[1]).read_bytes() == data[1]
        s = stats()
        assert s["reuploads"] == {"count": 1, "bytes": MiB}
        text = kfs(c.a, "hub", "channel", "stats", c.channel, *hub).stdout.decode()
        assert "re-uploads" in text and "allocation   3 MiB" in text and "total" in text


def test_a_file_evicted_after_its_lookup_is_read_through_a_request(tmp_path):
    """B learns a file's size (a lookup), then the hub evicts it: B's read finds the bucket
    object gone and asks A for it, instead of failing."""
    require_fuse()
    c = make_cluster(tmp_path, channel="evict.test", create_args=("--allocation", "2M"))
    with ExitStack() as stack:
        stack.callback(c.hub.stop)
        stack.enter_context(mounted(c.a, c.mnt_a))
        stack.enter_context(mounted(c.b, c.mnt_b))
        data = [os.urandom(MiB) for _ in range(3)]
        hashes = [hashlib.sha1(d).hexdigest() for d in data]
        objects = c.hub.bucket_dir() / c.channel / "sha1"

        def in_bucket():
            return {p.name for p in objects.rglob("*") if p.is_file()}

        for i in range(2):
            path = c.mnt_a / c.channel / f"f{i}"
            path.write_bytes(data[i])
            wait_for(lambda p=path: xattr(p, "user.kachery.status") == "in bucket",
                     timeout=30, what=f"{path.name} in the bucket")
        assert (c.mnt_b / c.channel / "sha1" / hashes[0]).stat().st_size == MiB
        (c.mnt_a / c.channel / "f2").write_bytes(data[2])
        wait_for(lambda: in_bucket() == {hashes[2]}, timeout=30, what="f0 and f1 evicted")
        assert (c.mnt_b / c.channel / "sha1" / hashes[0]).read_bytes() == data[0]
        assert hashes[0] in in_bucket()  # uploaded again by A, on B's request
