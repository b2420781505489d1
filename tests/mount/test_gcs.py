"""gs:// channels against fake-gcs-server, the whole cycle through real mounts, eviction
from the bucket included. The emulator is a real Go server on loopback, set with the
standard ``STORAGE_EMULATOR_HOST`` in the hub's environment only: nodes learn everything
from the hub. The hub signs with a service-account key made here (signing is local).

The hub's GCS backend and nodes' uploads and reads, without mounts, are tested in
tests/inproc/test_gcs.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from kachery_fs.protocol import object_key

from ..gcs import BUCKET, random_file, service_account_key
from ..util import (
    PERMS_ALL,
    FakeGcsServer,
    HubProcess,
    kfs,
    mounted,
    require_fuse,
    uri_of,
    wait_for,
    xattr,
)

CH = "gcs.test"
MiB = 1 << 20


@dataclass
class GcsCluster:
    """A hub whose channel CH is on the emulator's bucket; node A (every permission) and
    node B (requests only) mounted. The steps below use it; each test strings some."""

    base: Path
    fake: FakeGcsServer
    hub: HubProcess
    a: Path
    b: Path
    mnt_a: Path
    mnt_b: Path

    def in_bucket(self, sha1: str) -> bytes | None:
        return self.fake.read(BUCKET, object_key(CH, sha1))

    def in_store(self, node: Path, sha1: str) -> Path:
        return node / "sha1" / sha1[:2] / sha1[2:4] / sha1[4:6] / sha1

    def stored_on_a(self, size: int) -> tuple[str, bytes]:
        """A random file in A's local store only (in no bucket)."""
        src = self.base / f"src-{os.urandom(4).hex()}"
        data, sha1 = random_file(src, size)
        kfs(self.a, "store", "add", str(src))
        src.unlink()
        return sha1, data


@pytest.fixture
def gcs_cluster(tmp_path, fake_gcs):
    yield from _cluster(tmp_path, fake_gcs)


@pytest.fixture
def private_gcs_cluster(tmp_path, fake_gcs):
    """As :func:`gcs_cluster`, its channel private."""
    yield from _cluster(tmp_path, fake_gcs, private=True)


def _cluster(tmp_path, fake_gcs, *, private: bool = False):
    require_fuse()
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    ids = {n: kfs(n, "init").stdout.decode().strip() for n in (a, b)}
    key_file = service_account_key(tmp_path / "hub-key.json")
    # The emulator is set for the hub alone: the nodes get everything from it.
    hub = HubProcess(a, tmp_path / "hub", args=("--gcs-credentials", str(key_file)),
                     env={"STORAGE_EMULATOR_HOST": fake_gcs.url}).start()
    try:
        created = kfs(a, "hub", "channel", "create", CH, "--bucket", f"gs://{BUCKET}",
                      "--hub", hub.url, *(["--private"] if private else []))
        assert f"bucket gs://{BUCKET}" in created.stdout.decode()
        # The emulator lets anyone read (it checks no signature): the hub says so.
        warned = "lets anyone read its objects" in created.stderr.decode()
        assert warned == private, created.stderr.decode()
        for node, perms in ((a, PERMS_ALL), (b, "requestFiles,requestFeeds")):
            kfs(a, "hub", "channel", "authorize", CH, ids[node], "--permissions", perms,
                "--hub", hub.url)
            kfs(node, "join", hub.url, CH)
        mnt_a, mnt_b = tmp_path / "mnt-a", tmp_path / "mnt-b"
        with mounted(a, mnt_a), mounted(b, mnt_b):
            yield GcsCluster(tmp_path, fake_gcs, hub, a, b, mnt_a, mnt_b)
    finally:
        hub.stop()


def written_on_a(c: GcsCluster, size: int) -> tuple[str, bytes]:
    """Write a file through A's mount and wait until it is in the bucket."""
    src = c.base / "written.bin"
    data, sha1 = random_file(src, size)
    target = c.mnt_a / CH / f"file-{sha1[:8]}.bin"
    shutil.copyfile(src, target)
    assert xattr(target, "user.kachery.uri") == uri_of(data, target.name)
    wait_for(lambda: xattr(target, "user.kachery.status") == "in bucket", timeout=60,
             what="A's upload to the emulator")
    assert c.in_bucket(sha1) == data
    return sha1, data


def written_on_a_read_on_b(c: GcsCluster, size: int) -> tuple[str, bytes]:
    """Write a file through A's mount; read it by hash through B's mount (verified, cached)."""
    sha1, data = written_on_a(c, size)
    assert (c.mnt_b / CH / "sha1" / sha1).read_bytes() == data
    wait_for(c.in_store(c.b, sha1).exists, timeout=30, what="B to cache the file")
    assert c.in_store(c.b, sha1).read_bytes() == data  # cached, verified
    return sha1, data


def requested_through_b(c: GcsCluster, size: int) -> tuple[str, bytes]:
    """A file only in A's store is read through B's mount: B asks the hub, A's mount
    uploads it to the emulator, B downloads it. Returns its hash and bytes."""
    sha1, data = c.stored_on_a(size)
    assert c.in_bucket(sha1) is None
    assert (c.mnt_b / CH / "sha1" / sha1).read_bytes() == data
    assert c.in_bucket(sha1) == data
    return sha1, data


def test_written_through_a_mount_read_through_b_mount(gcs_cluster):
    c = gcs_cluster
    # 20 MiB: two upload chunks (16 MiB), three parallel 8 MiB ranged GETs.
    sha1, data = written_on_a_read_on_b(c, 20 * MiB + 5)
    assert kfs(c.b, "cat", f"sha1://{sha1}").stdout == data
    # Feeds: signed single PUTs to the emulator, read back by B.
    feed = kfs(c.a, "feed", "create").stdout.decode().strip()
    kfs(c.a, "feed", "append", feed, "notes", '{"n": 1}')
    kfs(c.a, "feed", "append", feed, "notes", '{"n": 2}')
    lines = kfs(c.b, "feed", "read", feed, "notes").stdout.decode().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2]


def test_files_only_in_a_store_are_requested_through_b(gcs_cluster):
    c = gcs_cluster
    requested_through_b(c, 3 * MiB + 7)
    sha1, data = c.stored_on_a(70_000)
    assert kfs(c.b, "cat", f"sha1://{sha1}?label=x.bin").stdout == data
    assert c.in_bucket(sha1) == data


def test_bad_and_missing_objects(gcs_cluster):
    c = gcs_cluster
    good = b"the real content " * 1000
    sha1 = hashlib.sha1(good).hexdigest()
    c.fake.write(BUCKET, object_key(CH, sha1), good[:-1] + b"X")  # right size, one byte off
    path = c.mnt_b / CH / "sha1" / sha1
    with pytest.raises(OSError) as info:
        path.read_bytes()
    assert info.value.errno == errno.EIO
    # The reader told the hub, which read the object, found it bad and deleted it; no
    # node holds the file, so there is nothing to serve.
    assert object_key(CH, sha1) not in c.fake.objects(BUCKET)
    assert "hashes to" in c.hub.log.read_text()
    r = kfs(c.b, "cat", sha1, check=False, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 1 and r.stdout == b"" and "no node could provide" in err, err
    assert not c.in_store(c.b, sha1).exists()
    # A hash that no node holds and no bucket has: a clear refusal, nothing served.
    missing = hashlib.sha1(os.urandom(8)).hexdigest()
    with pytest.raises(OSError):
        (c.mnt_b / CH / "sha1" / missing).read_bytes()
    r = kfs(c.b, "cat", missing, check=False, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 1 and "no node could provide" in err and "Traceback" not in err, err


def test_eviction_from_the_emulator_and_the_evicted_file_read_again(gcs_cluster):
    c = gcs_cluster
    hub = ("--hub", c.hub.url)
    kfs(c.a, "hub", "channel", "set", CH, "--allocation", "3M", *hub)
    files = [written_on_a(c, MiB) for _ in range(4)]  # 4 MiB stored: 1 MiB too many

    def stats() -> dict:
        return json.loads(kfs(c.a, "hub", "channel", "stats", CH, "--json", *hub).stdout)

    # Down to the low watermark (90 % of 3 MiB): the two least recently demanded go.
    wait_for(lambda: stats()["evictions"]["count"] == 2, timeout=30, what="two evictions")
    assert c.fake.objects(BUCKET, f"{CH}/sha1/") == {
        object_key(CH, sha1): MiB for sha1, _ in files[2:]}
    # The oldest is gone from the bucket, not from the channel: B's read asks A for it.
    sha1, data = files[0]
    assert (c.mnt_b / CH / "sha1" / sha1).read_bytes() == data
    assert c.in_bucket(sha1) == data
    assert stats()["reuploads"] == {"count": 1, "bytes": MiB}


def test_the_whole_cycle_on_a_private_channel(private_gcs_cluster):
    c = private_gcs_cluster
    assert "private: its bucket is read through URLs the hub signs" in kfs(
        c.b, "status").stdout.decode()
    sha1, data = written_on_a_read_on_b(c, 20 * MiB + 5)
    assert kfs(c.b, "cat", f"sha1://{sha1}").stdout == data
    requested_through_b(c, 3 * MiB + 7)
    feed = kfs(c.a, "feed", "create").stdout.decode().strip()
    kfs(c.a, "feed", "append", feed, "notes", '{"n": 1}')
    lines = kfs(c.b, "feed", "read", feed, "notes").stdout.decode().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1]
    # B reads through URLs the hub signs: without its permission it reads nothing new,
    # though the emulator would serve anyone who asked.
    sha1, data = written_on_a(c, 70_000)
    b_id = kfs(c.b, "node-id").stdout.decode().strip()
    kfs(c.a, "hub", "channel", "authorize", CH, b_id, "--remove", "requestFiles",
        "--hub", c.hub.url)
    with pytest.raises(OSError) as info:
        (c.mnt_b / CH / "sha1" / sha1).read_bytes()
    assert info.value.errno == errno.EACCES
    log = (c.b / "mount-test.log").read_text()
    assert "refuses this node signed reads" in log
    # B's mount logged at -vv while it read through signed URLs, and named none of them.
    assert "X-Goog-Signature" not in log
    assert "X-Goog-Signature" not in kfs(c.b, "status", "--json").stdout.decode()
