"""End to end through real FUSE mounts: a hub with its local bucket and two nodes, on loopback.

Node A owns the hub and may request and provide; node B may only request files.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import os
import shutil
import sqlite3
import subprocess
import threading
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from kachery_fs.protocol import object_key
from kachery_fs.state import NodeDB

from ..clusters import stored_bytes
from ..util import kfs, make_cluster, mounted, require_fuse, uri_of, wait_for, xattr

CHANNEL = "ch1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require_fuse()
    c = make_cluster(tmp_path_factory.mktemp("cluster"), channel=CHANNEL)
    with ExitStack() as stack:
        stack.callback(c.hub.stop)
        stack.enter_context(mounted(c.a, c.mnt_a))
        stack.enter_context(mounted(c.b, c.mnt_b))
        yield c


def wait_in_bucket(path: Path, timeout: float = 30) -> None:
    wait_for(lambda: xattr(path, "user.kachery.status") == "in bucket", timeout=timeout,
             what=f"{path} to be in the bucket (status: {xattr(path, 'user.kachery.status')})")


def write_random(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def test_cp_on_a_read_by_hash_on_b(cluster, tmp_path):
    src = tmp_path / "data.bin"
    data = write_random(src, 3 * 1024 * 1024 + 17)
    sha1 = hashlib.sha1(data).hexdigest()
    dest = cluster.mnt_a / CHANNEL / "data.bin"
    subprocess.run(["cp", str(src), str(dest)], check=True)
    assert xattr(dest, "user.kachery.uri") == f"sha1://{sha1}?label=data.bin"
    assert dest.read_bytes() == data
    # committed to A's local store on close, under its hash
    assert (cluster.mnt_a / CHANNEL / "sha1" / sha1).read_bytes() == data
    wait_in_bucket(dest)
    got = (cluster.mnt_b / CHANNEL / "sha1" / sha1).read_bytes()
    assert got == data
    # B caches it into its own store, verified (made durable just after it is served)
    cached = cluster.b / "sha1" / sha1[:2] / sha1[2:4] / sha1[4:6] / sha1
    wait_for(cached.exists, timeout=30, what="the download to be installed in B's store")
    assert cached.read_bytes() == data
    # getfattr, as a user would run it
    out = subprocess.run(["getfattr", "--only-values", "-n", "user.kachery.uri", str(dest)],
                         capture_output=True, check=True).stdout.decode()
    assert out == f"sha1://{sha1}?label=data.bin"


def test_cp_p_keeps_the_modification_time(cluster, tmp_path):
    """`cp -p` sets the time after writing, before close(2): it stays set, in the node's
    database too (what the next mount shows)."""
    src = tmp_path / "dated.txt"
    src.write_bytes(b"written long ago")
    then = 1_500_000_000_123_456_789
    os.utime(src, ns=(then, then))
    dest = cluster.mnt_a / CHANNEL / "dated.txt"
    subprocess.run(["cp", "-p", str(src), str(dest)], check=True)
    assert dest.stat().st_mtime_ns == then
    db = sqlite3.connect(f"file:{cluster.a / 'node.db'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT i.mtime_ns FROM inodes i JOIN names n ON n.inode = i.id"
                          " WHERE n.name = CAST('dated.txt' AS BLOB)").fetchone() == (then,)
    finally:
        db.close()


def test_kachery_fs_cat_on_b(cluster, tmp_path):
    dest = cluster.mnt_a / CHANNEL / "for-cat.txt"
    dest.write_bytes(b"hello from A\n")
    wait_in_bucket(dest)
    uri = xattr(dest, "user.kachery.uri")
    assert kfs(cluster.b, "cat", uri).stdout == b"hello from A\n"


def test_node_without_provide_gets_eacces(cluster):
    with pytest.raises(PermissionError):
        (cluster.mnt_b / CHANNEL / "nope.txt").write_bytes(b"x")
    assert not (cluster.mnt_b / CHANNEL / "nope.txt").exists()
    log = (cluster.b / "mount-test.log").read_text()
    assert "lacks the provideFiles permission" in log


def test_invalid_names_give_enoent(cluster):
    sha1dir = cluster.mnt_b / CHANNEL / "sha1"
    for name in ["xyz", "0" * 39, "g" * 40, "A" * 40, "0" * 41,
                 hashlib.sha1(b"never stored anywhere").hexdigest()]:
        with pytest.raises(FileNotFoundError):
            os.stat(sha1dir / name)
    with pytest.raises(FileNotFoundError):
        os.stat(cluster.mnt_b / "no-such-channel")


def test_a_name_over_255_bytes_is_enametoolong(cluster):
    channel = cluster.mnt_a / CHANNEL
    long_name = "é" * 128  # 256 bytes
    for call in (lambda: open(channel / long_name, "wb"), lambda: os.stat(channel / long_name),
                 lambda: os.mkdir(channel / long_name),
                 lambda: os.stat(channel / "sha1" / long_name)):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.ENAMETOOLONG
    (channel / ("x" * 255)).write_bytes(b"at the limit")
    assert (channel / ("x" * 255)).read_bytes() == b"at the limit"
    (channel / ("x" * 255)).unlink()


def test_sha1_dir_is_read_only(cluster):
    with pytest.raises(OSError) as info:
        (cluster.mnt_a / CHANNEL / "sha1" / "new").write_bytes(b"x")
    assert info.value.errno in (errno.EROFS, errno.EACCES)


def test_corrupted_bucket_object_gives_eio_and_is_not_cached(cluster):
    good = b"the real content " * 1000
    sha1 = hashlib.sha1(good).hexdigest()
    obj = cluster.hub.bucket_dir() / object_key(CHANNEL, sha1)
    obj.parent.mkdir(parents=True, exist_ok=True)
    obj.write_bytes(good[:-1] + b"X")  # same size, one byte wrong
    path = cluster.mnt_b / CHANNEL / "sha1" / sha1
    assert path.stat().st_size == len(good)
    with pytest.raises(OSError) as info:
        with open(path, "rb") as f:
            f.read(16)  # not even the first bytes of a bad object are served
    assert info.value.errno == errno.EIO
    # B told the hub, which checked the object and deleted it; no node holds the file, so
    # the next open finds nothing (and downloads no bad bytes again)
    assert not obj.exists()
    assert f"the object of sha1://{sha1} is bad" in cluster.hub.log.read_text()
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno in (errno.EIO, errno.ENOENT)
    assert not list((cluster.b / "sha1").rglob(sha1))
    assert not any((cluster.b / "tmp").iterdir())
    # the mount survived, and still serves good content
    assert (cluster.mnt_b / CHANNEL).is_dir()


def test_mkdir_rename_unlink(cluster):
    root = cluster.mnt_a / CHANNEL
    (root / "d1").mkdir()
    (root / "d1" / "f.txt").write_bytes(b"one")
    (root / "d1" / "f.txt").rename(root / "d1" / "g.txt")
    assert sorted(os.listdir(root / "d1")) == ["g.txt"]
    (root / "d1").rename(root / "d2")
    assert (root / "d2" / "g.txt").read_bytes() == b"one"
    with pytest.raises(OSError) as info:
        (root / "d2").rmdir()
    assert info.value.errno == errno.ENOTEMPTY
    (root / "d2" / "g.txt").unlink()
    (root / "d2").rmdir()
    assert "d2" not in os.listdir(root)
    assert {"sha1", "feeds"} <= set(os.listdir(root))


def test_overwrite_and_append_make_new_versions(cluster):
    path = cluster.mnt_a / CHANNEL / "log.txt"
    path.write_bytes(b"first\n")
    uri1 = xattr(path, "user.kachery.uri")
    with open(path, "ab") as f:
        f.write(b"second\n")
    assert path.read_bytes() == b"first\nsecond\n"
    uri2 = xattr(path, "user.kachery.uri")
    assert uri1 != uri2
    assert hashlib.sha1(b"first\nsecond\n").hexdigest() in uri2
    # the old version is still readable by hash
    old = uri1.split("://")[1].split("?")[0]
    assert (cluster.mnt_a / CHANNEL / "sha1" / old).read_bytes() == b"first\n"


class _IgnoresRange(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_HEAD(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self):
        self.send_response(200)  # a full body, whatever Range asked for
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_server_answering_200_to_range_gives_eio(tmp_path):
    require_fuse()
    body = b"full body, not a range " * 500
    sha1 = hashlib.sha1(body).hexdigest()
    handler = type("H", (_IgnoresRange,), {"body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        node = tmp_path / "node-c"
        kfs(node, "init")
        db = NodeDB(node / "node.db")
        db.add_channel(CHANNEL, "http://127.0.0.1:9", f"http://127.0.0.1:{server.server_port}/b",
                       {"requestFiles"})
        db.close()
        mnt = tmp_path / "mnt"
        with mounted(node, mnt):
            with pytest.raises(OSError) as info:
                (mnt / CHANNEL / "sha1" / sha1).read_bytes()
            assert info.value.errno == errno.EIO
            assert not list((node / "sha1").rglob(sha1))
            log = (node / "mount-test.log").read_text()
            assert "answered 200 to a Range request" in log
    finally:
        server.shutdown()
        server.server_close()


def test_remount_resumes_pending_upload(tmp_path):
    """Hub down while a file is written; the mount is stopped; both come back; it uploads."""
    require_fuse()
    c = make_cluster(tmp_path, channel=CHANNEL)
    try:
        data = os.urandom(2 * 1024 * 1024)
        sha1 = hashlib.sha1(data).hexdigest()
        c.hub.stop()
        with mounted(c.a, c.mnt_a):
            dest = c.mnt_a / CHANNEL / "pending.bin"
            dest.write_bytes(data)  # the write itself works with the hub down
            wait_for(lambda: "retrying" in xattr(dest, "user.kachery.status"), timeout=20,
                     what="the upload to be retrying")
        assert not (c.hub.bucket_dir() / object_key(CHANNEL, sha1)).exists()
        c.hub.start()
        with mounted(c.a, c.mnt_a):
            dest = c.mnt_a / CHANNEL / "pending.bin"
            assert dest.read_bytes() == data  # the name persisted
            wait_in_bucket(dest, timeout=60)
        assert (c.hub.bucket_dir() / object_key(CHANNEL, sha1)).read_bytes() == data
        with mounted(c.b, c.mnt_b):
            assert (c.mnt_b / CHANNEL / "sha1" / sha1).read_bytes() == data
    finally:
        c.hub.stop()


def test_tampered_or_expired_signed_url_is_refused(cluster):
    """Against the running hub's local bucket, over real HTTP."""
    import trio

    from kachery_fs.hub_client import HubClient
    from kachery_fs.identity import NodeKey

    data = b"signed upload test"
    sha1 = hashlib.sha1(data).hexdigest()

    async def main():
        async with httpx.AsyncClient(trust_env=False) as client:
            hub = HubClient(cluster.hub.url, NodeKey.load(cluster.a), client)
            signed = await hub.initiate_upload(CHANNEL, sha1, len(data))
            assert signed is not None
            other = hashlib.sha1(b"other").hexdigest()
            repointed = signed.url.replace(sha1, other)
            r = await client.post(repointed, headers=signed.headers)
            assert r.status_code == 403
            flipped = signed.url[:-1] + ("0" if signed.url[-1] != "0" else "1")
            r = await client.post(flipped, headers=signed.headers)
            assert r.status_code == 403
            bigger = dict(signed.headers)
            bigger["x-goog-content-length-range"] = "0,99999999"
            r = await client.post(signed.url, headers=bigger)
            assert r.status_code == 403
            # a longer life breaks the signature (a shorter one may be refused as expired
            # first, on a slow machine)
            extended = signed.url.replace("X-Goog-Expires=600", "X-Goog-Expires=604800")
            r = await client.post(extended, headers=signed.headers)
            assert r.status_code == 403
            r = await client.post(signed.url, headers=signed.headers)
            assert r.status_code == 201

    trio.run(main)


def test_names_persist_across_remount(tmp_path):
    require_fuse()
    c = make_cluster(tmp_path, channel=CHANNEL)
    try:
        with mounted(c.a, c.mnt_a):
            (c.mnt_a / CHANNEL / "keep").mkdir()
            (c.mnt_a / CHANNEL / "keep" / "x.txt").write_bytes(b"persisted")
            ino = os.stat(c.mnt_a / CHANNEL / "keep" / "x.txt").st_ino
        with mounted(c.a, c.mnt_a):
            path = c.mnt_a / CHANNEL / "keep" / "x.txt"
            assert path.read_bytes() == b"persisted"
            assert os.stat(path).st_ino == ino
            assert shutil.which("ls")
    finally:
        c.hub.stop()


def _uploads_of(node_dir: Path) -> set[str]:
    db = NodeDB(node_dir / "node.db")
    try:
        return {u.sha1 for u in db.uploads()}
    finally:
        db.close()


def test_concurrent_writes_to_an_existing_file_are_all_kept(cluster, tmp_path):
    """Writes at far-apart offsets reach the mount concurrently (writeback cache); none
    may be lost to a second staging copy."""
    path = cluster.mnt_a / CHANNEL / "patched.bin"
    base = write_random(tmp_path / "base", 48 * 1024 * 1024)
    subprocess.run(["cp", str(tmp_path / "base"), str(path)], check=True)
    for attempt in range(3):
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"A" * 4096, 0)
            os.pwrite(fd, b"B" * 4096, 24 * 1024 * 1024)
            os.pwrite(fd, b"C" * 4096, 40 * 1024 * 1024 + 5)
        finally:
            os.close(fd)
        expected = bytearray(base)
        expected[0:4096] = b"A" * 4096
        expected[24 * 1024 * 1024:24 * 1024 * 1024 + 4096] = b"B" * 4096
        expected[40 * 1024 * 1024 + 5:40 * 1024 * 1024 + 4101] = b"C" * 4096
        sha1 = hashlib.sha1(expected).hexdigest()
        assert xattr(path, "user.kachery.uri") == uri_of(bytes(expected), "patched.bin"), \
            attempt
        assert stored_bytes(cluster.a, sha1) == expected
        base = bytes(expected)
        base = base[:1] + bytes([attempt]) + base[2:]
        subprocess.run(["dd", f"of={path}", "bs=1", "seek=1", "count=1", "conv=notrunc",
                        "status=none"], input=bytes([attempt]), check=True)
    leftovers = [p for p in (cluster.a / "tmp").iterdir()]
    assert not leftovers, leftovers


def test_shared_descriptor_is_uploaded_once(cluster):
    """Five processes writing through one inherited descriptor: five closes, one upload."""
    path = cluster.mnt_a / CHANNEL / "lines.txt"
    subprocess.run(["sh", "-c", f'for i in 1 2 3 4 5; do /bin/echo line$i; done > "{path}"'],
                   check=True)
    data = b"".join(b"line%d\n" % i for i in range(1, 6))
    assert path.read_bytes() == data
    queued = _uploads_of(cluster.a)
    assert hashlib.sha1(data).hexdigest() in queued
    for i in range(1, 5):
        partial = b"".join(b"line%d\n" % j for j in range(1, i + 1))
        assert hashlib.sha1(partial).hexdigest() not in queued


def test_a_reader_does_not_hold_back_the_commit(cluster):
    path = cluster.mnt_a / CHANNEL / "watched.txt"
    with open(path, "wb") as writer:
        writer.write(b"first\n")
        writer.flush()
        with open(path, "rb") as reader:
            assert reader.read() == b"first\n"  # what is written so far
            writer.write(b"second\n")
            writer.close()
            sha1 = hashlib.sha1(b"first\nsecond\n").hexdigest()
            # committed at the writer's close although the reader is still open
            assert xattr(path, "user.kachery.uri") == f"sha1://{sha1}?label=watched.txt"
            assert xattr(path, "user.kachery.status") != "writing"
            reader.seek(0)
            assert reader.read() == b"first\nsecond\n"


def test_overwrite_with_a_shorter_file(cluster, tmp_path):
    path = cluster.mnt_a / CHANNEL / "replaced.bin"
    write_random(tmp_path / "old", 8 * 1024 * 1024)
    new = write_random(tmp_path / "new", 1000)
    subprocess.run(["cp", str(tmp_path / "old"), str(path)], check=True)
    subprocess.run(["cp", str(tmp_path / "new"), str(path)], check=True)
    assert path.read_bytes() == new
    assert os.stat(path).st_size == 1000
    log = (cluster.a / "mount-test.log").read_text()
    assert f"replaced.bin committed as sha1://{hashlib.sha1(new).hexdigest()} (1000 bytes)" in log
