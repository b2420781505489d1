"""Large files read by chunk through real mounts, two nodes: A puts a file of 2.5 chunks
(kachery's 20,000,000 bytes each: the mount is a subprocess), B reads it cold through
``sha1/<hash>?manifest=<hash>``. The reads themselves are tested in process in
tests/inproc/test_chunks.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kachery_fs.manifest import CHUNK_SIZE

from ..util import kfs, make_cluster, mounted, require_fuse

SIZE = CHUNK_SIZE * 5 // 2


def put_large_file(c, tmp_path) -> tuple[bytes, str, str]:
    data = os.urandom(SIZE)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = kfs(c.a, "put", "-q", str(src)).stdout.decode().strip()
    sha1 = hashlib.sha1(data).hexdigest()
    assert uri.startswith(f"sha1://{sha1}/big.bin?manifest=")
    return data, sha1, uri.rpartition("=")[2]


@pytest.fixture
def large(tmp_path):
    """A hub, nodes A and B on one channel, and a file of 2.5 chunks A put:
    ``(cluster, data, sha1, manifest sha1)``; the hub stopped at the end."""
    require_fuse()
    c = make_cluster(tmp_path, channel="chunks.test")
    try:
        yield (c, *put_large_file(c, tmp_path))
    finally:
        c.hub.stop()


def manifest_size(c, manifest: str) -> int:
    return len(kfs(c.a, "cat", f"sha1://{manifest}").stdout)  # A has it: no download


def downloaded_bytes(c) -> int:
    out = kfs(c.a, "hub", "channel", "stats", c.channel, "--json", "--hub", c.hub.url).stdout
    return json.loads(out)["downloads"]["bytes"]


def test_random_reads_of_a_cold_large_file_match_and_fetch_only_their_chunks(large):
    c, data, sha1, manifest = large
    name = f"{sha1}?manifest={manifest}"
    with mounted(c.b, c.mnt_b):
        path = c.mnt_b / c.channel / "sha1" / name
        assert path.stat().st_size == SIZE  # from the manifest
        with open(path, "rb") as f:  # one 4 KiB read inside the second chunk
            f.seek(CHUNK_SIZE + 12_345)
            assert f.read(4096) == data[CHUNK_SIZE + 12_345:CHUNK_SIZE + 16_441]
    # B reported what it fetched when it unmounted: the manifest and that one chunk.
    assert downloaded_bytes(c) == manifest_size(c, manifest) + CHUNK_SIZE

    with mounted(c.b, c.mnt_b):
        fd = os.open(c.mnt_b / c.channel / "sha1" / name, os.O_RDONLY)
        try:
            @settings(max_examples=60, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
            @given(st.one_of(
                st.integers(0, SIZE),  # anywhere
                st.sampled_from([CHUNK_SIZE, 2 * CHUNK_SIZE]).flatmap(  # at a boundary
                    lambda b: st.integers(b - 5000, b + 5000)),
                st.integers(SIZE - 5000, SIZE)),  # in the last partial chunk, the end
                st.integers(1, 300_000))
            def read_matches(offset, length):
                assert os.pread(fd, length, offset) == data[offset:offset + length]

            read_matches()
        finally:
            os.close(fd)


def test_a_sequential_read_is_verified_whole_and_kept(large):
    c, data, sha1, manifest = large
    with mounted(c.b, c.mnt_b):
        path = c.mnt_b / c.channel / "sha1" / f"{sha1}?manifest={manifest}"
        assert hashlib.sha1(path.read_bytes()).hexdigest() == sha1
        # Read in order, it was checked whole and kept: the bare hash is local now.
        bare = c.mnt_b / c.channel / "sha1" / sha1
        assert os.getxattr(bare, "user.kachery.status") == b"local"
    assert downloaded_bytes(c) == manifest_size(c, manifest) + SIZE  # each chunk once


def test_a_remount_reads_the_chunks_it_kept_and_strict_mode_reads_whole(large, tmp_path):
    c, data, sha1, manifest = large
    before = manifest_size(c, manifest)
    name = f"{sha1}?manifest={manifest}"

    def read_at(offset: int) -> bytes:
        with open(c.mnt_b / c.channel / "sha1" / name, "rb") as f:
            f.seek(offset)
            return f.read(4096)

    with mounted(c.b, c.mnt_b):
        assert read_at(10) == data[10:4106]
    assert downloaded_bytes(c) == before + CHUNK_SIZE
    with mounted(c.b, c.mnt_b):  # chunk 0 is in B's partial file: not fetched again
        assert read_at(20) == data[20:4116]
        assert read_at(CHUNK_SIZE + 5) == data[CHUNK_SIZE + 5:CHUNK_SIZE + 4101]
    # Chunk 1 came from the bucket, chunk 0 did not come again. Chunk 2 may have: when the
    # kernel splits its read-ahead into two requests, the second starts where the first
    # ended, which is a sequential reader (chunks.READ_AHEAD).
    after_b = downloaded_bytes(c)
    assert after_b in (before + 2 * CHUNK_SIZE, before + SIZE)

    # Strict: the same 4 KiB read waits for the whole file, verified, in the store.
    strict = tmp_path / "node-c"
    c_id = kfs(strict, "init").stdout.decode().strip()
    kfs(c.a, "hub", "channel", "authorize", c.channel, c_id, "--permissions",
        "requestFiles", "--hub", c.hub.url)
    kfs(strict, "join", c.hub.url, c.channel)
    mnt_c = tmp_path / "mnt-c"
    with mounted(strict, mnt_c, "--strict"):
        path = mnt_c / c.channel / "sha1" / name
        with open(path, "rb") as f:
            f.seek(2 * CHUNK_SIZE + 7)
            assert f.read(4096) == data[2 * CHUNK_SIZE + 7:2 * CHUNK_SIZE + 4103]
        assert os.getxattr(mnt_c / c.channel / "sha1" / sha1,
                           "user.kachery.status") == b"local"
    assert downloaded_bytes(c) == after_b + before + SIZE  # C: its manifest, the whole file
