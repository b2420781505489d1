"""Kachery manifests of large files written through a real mount (kachery.md §1.4): the
mount hashes each 20,000,000-byte chunk as the writes pass it, and ``user.kachery.uri``
is then kachery's ``sha1://<hash>/<name>?manifest=<manifest hash>``. The mount runs in a
subprocess, so the chunk size is the real one. The node's hub is not running: nothing
here needs it (the uploads stay queued)."""

from __future__ import annotations

import hashlib
import subprocess

from kachery_fs.manifest import CHUNK_SIZE, Manifest, manifest_of

from ..util import mounted, offline_node, require_fuse, xattr

#: kachery.md §1.4: 45,000,000 zero bytes.
ZEROS = 45_000_000
WHOLE = "bae479b185f44d623de8c7ee6e9a41961fd411f9"
MANIFEST = "16c2995c8d00a8861fdd81187e2fb231240d5083"


def test_a_large_file_written_through_the_mount_has_kacherys_uri(tmp_path):
    require_fuse()
    node_dir = offline_node(tmp_path / "node")
    mnt = tmp_path / "mnt"
    with mounted(node_dir, mnt):
        path = mnt / "chan" / "zeros.bin"
        block = bytes(1 << 20)
        with open(path, "wb") as f:
            for _ in range(ZEROS // len(block)):
                f.write(block)
            f.write(bytes(ZEROS % len(block)))
        assert xattr(path, "user.kachery.uri") == f"sha1://{WHOLE}/zeros.bin?manifest={MANIFEST}"
        out = subprocess.run(["getfattr", "--only-values", "-n", "user.kachery.uri",
                              str(path)], capture_output=True, check=True).stdout.decode()
        assert out.endswith(f"?manifest={MANIFEST}")
        # The manifest is content of its own, in the node's store: read by hash.
        manifest = Manifest.parse((mnt / "chan" / "sha1" / MANIFEST).read_bytes(), sha1=WHOLE)
        assert manifest.hash == MANIFEST and len(manifest.chunks) == 3

        # Rewritten in the middle of its second chunk, after that chunk was hashed.
        with open(path, "r+b") as f:
            f.seek(30_000_000)
            f.write(b"rewritten")
        data = bytearray(ZEROS)
        data[30_000_000:30_000_009] = b"rewritten"
        sha1, expected = manifest_of([bytes(data)])
        assert expected is not None and expected.hash != MANIFEST
        assert xattr(path, "user.kachery.uri") == (
            f"sha1://{sha1}/zeros.bin?manifest={expected.hash}")
        assert (mnt / "chan" / "sha1" / expected.hash).read_bytes() == expected.to_bytes()

        # One chunk exactly: no manifest.
        one = mnt / "chan" / "one-chunk.bin"
        one.write_bytes(bytes(CHUNK_SIZE))
        assert xattr(one, "user.kachery.uri") == (
            f"sha1://{hashlib.sha1(bytes(CHUNK_SIZE)).hexdigest()}?label=one-chunk.bin")
