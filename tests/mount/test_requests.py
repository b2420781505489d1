"""File requests end to end: files in no bucket, asked for through the hub and uploaded by
provider nodes. Real processes on loopback: a hub with its local bucket, providers running
``kachery-fs serve``, a requester's mount and ``kachery-fs cat``. What needs no mount is in
tests/inproc/test_requests.py."""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack

import pytest

from kachery_fs.manifest import CHUNK_SIZE, manifest_of
from kachery_fs.protocol import object_key

from ..clusters import REQUESTS_CH as CH
from ..clusters import authorize, in_store, request_nodes, serving, stored
from ..util import PERMS_ALL, kfs, mounted, require_fuse, wait_for, xattr


@pytest.fixture
def nodes(tmp_path):
    require_fuse()
    yield from request_nodes(tmp_path)


def test_file_only_in_a_store_is_read_through_b_mount_and_cat(nodes):
    h1, d1 = stored(nodes.a, 3 * 1024 * 1024 + 5)
    h2, d2 = stored(nodes.a, 1000)
    mnt = nodes.base / "mnt-b"
    with serving(nodes.a), mounted(nodes.b, mnt):
        assert (mnt / CH / "sha1" / h1).read_bytes() == d1
        wait_for(in_store(nodes.b, h1).exists, timeout=30, what="B to cache the file")
        assert in_store(nodes.b, h1).read_bytes() == d1  # cached, verified
        assert kfs(nodes.b, "cat", f"sha1://{h2}?label=x.bin").stdout == d2
        # The channel directory says what the node is doing.
        status = xattr(mnt / CH, "user.kachery.status")
        assert "connected" in status and "requests waiting: 0" in status
        # `kachery-fs status` reads what the mount writes about once a second
        wait_for(lambda: f"channel {CH}: hub {nodes.hub.url} connected"
                 in kfs(nodes.b, "status").stdout.decode(), timeout=10,
                 what="kachery-fs status to show the connection")
    assert "providing sha1://" + h1 in (nodes.a / "serve.log").read_text()


def test_no_provide_permission_fails_fast_then_a_grant_applies_at_once(nodes):
    h, data = stored(nodes.a, 5000)
    authorize(nodes, nodes.a, "requestFiles")
    authorize(nodes, nodes.c, "requestFiles")
    mnt = nodes.base / "mnt-b"
    with serving(nodes.a), mounted(nodes.b, mnt):
        r = kfs(nodes.b, "cat", h, check=False, timeout=30)
        assert r.returncode == 1 and r.stdout == b""
        err = r.stderr.decode()
        assert "no node may provide files on channel" in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / CH / "sha1" / h)
        assert "no node may provide files" in (nodes.b / "mount-test.log").read_text()
        # The owner grants A the permission while everything runs: no restart needed.
        authorize(nodes, nodes.a, PERMS_ALL)
        assert (mnt / CH / "sha1" / h).read_bytes() == data
    # Without the request permission, B is told why.
    authorize(nodes, nodes.b, "provideFiles")
    kfs(nodes.b, "join", nodes.hub.url, CH)
    h2, _ = stored(nodes.a, 100)
    r = kfs(nodes.b, "cat", h2, check=False, timeout=30)
    assert r.returncode == 1 and "requestFiles" in r.stderr.decode()


def test_twenty_readers_of_one_missing_hash_make_one_request_and_upload(nodes):
    h, data = stored(nodes.a, 2 * 1024 * 1024)
    mnt = nodes.base / "mnt-b"
    results: list = []

    def read():
        try:
            results.append((mnt / CH / "sha1" / h).read_bytes() == data)
        except OSError as exc:
            results.append(exc)

    with serving(nodes.a), mounted(nodes.b, mnt):
        threads = [threading.Thread(target=read) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert results == [True] * 20
    assert (nodes.a / "serve.log").read_text().count(f"providing sha1://{h}") == 1
    hub_log = nodes.hub.log.read_text()
    assert hub_log.count(f"request {CH}/{h[:12]} from") == 1


def test_hub_down_local_reads_work_and_requests_fail_fast(nodes, tmp_path):
    h_local, d_local = stored(nodes.b, 4000)
    h_missing, _ = stored(nodes.a, 4000)
    mnt = nodes.base / "mnt-b"
    with ExitStack() as stack:
        stack.enter_context(mounted(nodes.b, mnt))
        nodes.hub.stop()
        assert (mnt / CH / "sha1" / h_local).read_bytes() == d_local
        with pytest.raises(OSError):
            (mnt / CH / "sha1" / h_missing).read_bytes()
        r = kfs(nodes.b, "cat", h_missing, check=False, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr.decode()
        status = xattr(mnt / CH, "user.kachery.status")
        assert "unreachable" in status or "connecting" in status
        # The hub comes back: the mount reconnects by itself.
        nodes.hub.start()
        wait_for(lambda: "connected" in xattr(mnt / CH, "user.kachery.status"), timeout=30,
                 what="the mount to reconnect")


def test_a_bad_object_left_in_the_bucket_is_checked_deleted_and_provided_again(nodes):
    """A member uploads junk under a hash and never finalizes it: the first reader that
    finds it bad tells the hub, which checks it, deletes it and asks the providers."""
    size = 256 * 1024
    h, data = stored(nodes.a, size)
    junk = nodes.hub.bucket_dir() / CH / "sha1" / h[:2] / h[2:4] / h[4:6] / h
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(os.urandom(size))  # the right size, the wrong bytes
    mnt = nodes.base / "mnt-b"
    with serving(nodes.a), mounted(nodes.b, mnt):
        assert (mnt / CH / "sha1" / h).read_bytes() == data
    assert junk.read_bytes() == data  # provided again, in place of the junk
    log = (nodes.hub.log).read_text()
    assert f"the object of sha1://{h} is bad (it hashes to" in log and "deleting it" in log
    assert "providing sha1://" + h in (nodes.a / "serve.log").read_text()


def test_a_bad_object_of_another_size_is_refused_once_then_the_file_reads_whole(nodes):
    """The kernel keeps the size it first heard: a read of junk of another size fails
    (never a file cut to the junk's size), and the next read has the true size."""
    h, data = stored(nodes.a, 256 * 1024)
    junk = nodes.hub.bucket_dir() / CH / "sha1" / h[:2] / h[2:4] / h[4:6] / h
    junk.parent.mkdir(parents=True, exist_ok=True)
    junk.write_bytes(b"x")
    mnt = nodes.base / "mnt-b"
    path = mnt / CH / "sha1" / h
    with serving(nodes.a), mounted(nodes.b, mnt):
        with pytest.raises(OSError) as info:
            path.read_bytes()
        assert info.value.errno == 5
        wait_for(lambda: path.stat().st_size == len(data), timeout=20,
                 what="the true size to be seen")
        assert path.read_bytes() == data


def test_a_large_file_requested_is_read_by_chunk_while_its_provider_uploads_it(nodes):
    """A streams a file of 2.5 chunks (kachery's 20,000,000 bytes: the nodes are
    subprocesses) on a slow link: B's mount reads its first chunk, verified, before A has
    uploaded the rest (the whole object comes last), then reads it all."""
    h, data = stored(nodes.a, CHUNK_SIZE * 5 // 2)
    _, manifest = manifest_of([data])
    assert manifest is not None
    bucket = nodes.hub.bucket_dir()
    mnt = nodes.base / "mnt-b"
    # 20 MB/s: each chunk takes a second to go up, and the whole object 2.5 s more.
    with serving(nodes.a, "--bwlimit", "20M"), mounted(nodes.b, mnt):
        with open(mnt / CH / "sha1" / h, "rb") as f:
            assert f.read(1 << 20) == data[:1 << 20]
            assert not (bucket / object_key(CH, manifest.chunks[2].sha1)).exists()
            assert not (bucket / object_key(CH, h)).exists()
            assert f.read() == data[1 << 20:]
        wait_for(in_store(nodes.b, h).exists, timeout=30, what="B to keep the file")
        wait_for((bucket / object_key(CH, h)).exists, timeout=60,
                 what="A to upload the whole object after its chunks")
    for chunk in manifest.chunks:
        assert (bucket / object_key(CH, chunk.sha1)).stat().st_size == chunk.size
    assert (bucket / object_key(CH, manifest.hash)).read_bytes() == manifest.to_bytes()
    assert "streaming its 3 chunks" in (nodes.a / "serve.log").read_text()
    assert in_store(nodes.b, h).read_bytes() == data
