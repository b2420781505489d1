"""File requests end to end: files in no bucket, asked for through the hub and uploaded by
provider nodes. Real processes on loopback: a hub with its local bucket, providers running
``kachery-fs serve``, a requester's mount and ``kachery-fs cat``."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..util import (
    KFS,
    PERMS_ALL,
    HubProcess,
    kfs,
    mounted,
    node_env,
    require_fuse,
    stop_process,
    wait_for,
    xattr,
)

pytestmark = pytest.mark.mount

CH = "req.test"


@dataclass
class Nodes:
    base: Path
    hub: HubProcess
    a: Path  # provider
    c: Path  # second provider
    b: Path  # requester
    ids: dict


def _authorize(nodes: Nodes, node: Path, perms: str) -> None:
    kfs(nodes.a, "hub", "channel", "authorize", CH, nodes.ids[node], "--permissions", perms,
        "--hub", nodes.hub.url)


@pytest.fixture
def nodes(tmp_path):
    require_fuse()
    a, b, c = tmp_path / "node-a", tmp_path / "node-b", tmp_path / "node-c"
    ids = {n: kfs(n, "init").stdout.decode().strip() for n in (a, b, c)}
    hub = HubProcess(a, tmp_path / "hub").start()
    try:
        n = Nodes(tmp_path, hub, a, c, b, ids)
        kfs(a, "hub", "channel", "create", CH, "--hub", hub.url)
        _authorize(n, a, PERMS_ALL)
        _authorize(n, c, PERMS_ALL)
        _authorize(n, b, "requestFiles")
        for node in (a, b, c):
            kfs(node, "join", hub.url, CH)
        yield n
    finally:
        hub.stop()


@contextmanager
def serving(node: Path, *extra: str):
    """``kachery-fs serve`` for ``node`` until the block ends (or it is killed)."""
    log = node / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*KFS, "-vv", "serve", *extra], env=node_env(node),
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "listening for file requests" in log.read_text()
                 or proc.poll() is not None, timeout=30, what=f"{node.name} to listen")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        stop_process(proc)


def stored(node: Path, size: int, seed: bytes = b"") -> tuple[str, bytes]:
    """A random file added to ``node``'s local store only (in no bucket)."""
    data = seed + os.urandom(size - len(seed))
    src = node.parent / f"src-{os.urandom(4).hex()}"
    src.write_bytes(data)
    kfs(node, "store", "add", str(src))
    src.unlink()
    return hashlib.sha1(data).hexdigest(), data


def in_store(node: Path, sha1: str) -> Path:
    return node / "sha1" / sha1[:2] / sha1[2:4] / sha1[4:6] / sha1


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


def test_file_only_in_a_kachery_store_of_the_provider_is_provided(nodes):
    """A holds the file only in a kachery store on its machine: it copies it in, verified,
    and provides it."""
    data = os.urandom(2 * 1024 * 1024 + 3)
    h = hashlib.sha1(data).hexdigest()
    legacy = nodes.base / "kachery-cloud"
    path = legacy / "sha1" / h[:2] / h[2:4] / h[4:6] / h
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    kfs(nodes.a, "store", "add-source", str(legacy))
    with serving(nodes.a):
        assert kfs(nodes.b, "cat", h, timeout=60).stdout == data
    assert in_store(nodes.a, h).read_bytes() == data
    assert path.read_bytes() == data  # the source is only read


def test_no_provide_permission_fails_fast_then_a_grant_applies_at_once(nodes):
    h, data = stored(nodes.a, 5000)
    _authorize(nodes, nodes.a, "requestFiles")
    _authorize(nodes, nodes.c, "requestFiles")
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
        _authorize(nodes, nodes.a, PERMS_ALL)
        assert (mnt / CH / "sha1" / h).read_bytes() == data
    # Without the request permission, B is told why.
    _authorize(nodes, nodes.b, "provideFiles")
    kfs(nodes.b, "join", nodes.hub.url, CH)
    h2, _ = stored(nodes.a, 100)
    r = kfs(nodes.b, "cat", h2, check=False, timeout=30)
    assert r.returncode == 1 and "requestFiles" in r.stderr.decode()


def test_provider_killed_mid_upload_another_takes_over(nodes):
    size = 12 * 1024 * 1024
    h, data = stored(nodes.a, size, seed=b"shared")
    src = nodes.base / "same"
    src.write_bytes(data)
    kfs(nodes.c, "store", "add", str(src))
    out = nodes.base / "out.bin"
    # A slow link (3 MiB/s) so that the first provider is caught mid-upload.
    with serving(nodes.a, "--bwlimit", "3M") as pa, serving(nodes.c, "--bwlimit", "3M") as pc:
        with open(out, "wb") as f:
            cat = subprocess.Popen([*KFS, "cat", h], env=node_env(nodes.b), stdout=f,
                                   stderr=subprocess.PIPE)
        try:
            logs = {pa: nodes.a / "serve.log", pc: nodes.c / "serve.log"}
            first = wait_for(lambda: next((p for p, log in logs.items()
                                           if f"providing sha1://{h}" in log.read_text()), None),
                             timeout=30, what="a provider to start uploading")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = pc if first is pa else pa
            assert cat.wait(timeout=120) == 0, cat.stderr.read().decode()
        finally:
            if cat.poll() is None:
                cat.kill()
    assert out.read_bytes() == data
    assert f"providing sha1://{h}" in logs[second].read_text()


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


def test_hub_restarted_during_a_request(nodes):
    h, data = stored(nodes.a, 10 * 1024 * 1024)
    out = nodes.base / "out.bin"
    with serving(nodes.a, "--bwlimit", "3M"):
        with open(out, "wb") as f:
            cat = subprocess.Popen([*KFS, "-v", "cat", h], env=node_env(nodes.b), stdout=f,
                                   stderr=subprocess.PIPE)
        try:
            wait_for(lambda: f"providing sha1://{h}" in (nodes.a / "serve.log").read_text(),
                     timeout=30, what="the upload to start")
            nodes.hub.stop()
            nodes.hub.start()  # same port, same state directory
            assert cat.wait(timeout=120) == 0, cat.stderr.read().decode()
        finally:
            if cat.poll() is None:
                cat.kill()
    assert out.read_bytes() == data


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
