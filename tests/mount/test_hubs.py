"""Two `hub serve` processes on one PostgreSQL database, through real mounts: fake-gcs-server
is the bucket, a throwaway PostgreSQL cluster the hubs' state.

* Node A talks to hub 1 and node B to hub 0: B's read of a file only A holds is a request
  made through hub 0, offered to A's provider listening on hub 1, whose progress and
  upload reach B through hub 0.
* Both nodes talk to the hubs through one address (a round-robin load balancer): one hub
  process is killed (SIGKILL) while a request and an upload are under way; the nodes go
  on through the other, and nothing is lost.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from kachery_fs.protocol import object_key

from ..gcs import BUCKET, random_file, service_account_key
from ..proxy import RoundRobinProxy
from ..util import (
    PERMS_ALL,
    FakeGcsServer,
    HubProcess,
    kfs,
    mounted,
    require_fuse,
    wait_for,
    xattr,
)

CH = "two.hubs"
MiB = 1 << 20


@dataclass
class Hubs:
    base: Path
    fake: FakeGcsServer
    hubs: list[HubProcess]
    a: Path
    b: Path

    def in_bucket(self, sha1: str) -> bytes | None:
        return self.fake.read(BUCKET, object_key(CH, sha1))

    def stored_on_a(self, size: int) -> tuple[str, bytes]:
        src = self.base / f"src-{os.urandom(4).hex()}"
        data, sha1 = random_file(src, size)
        kfs(self.a, "store", "add", str(src))
        src.unlink()
        return sha1, data


def _hubs(tmp_path: Path, fake_gcs, database: str, *, proxy: bool):
    require_fuse()
    a, b = tmp_path / "node-a", tmp_path / "node-b"
    ids = {n: kfs(n, "init").stdout.decode().strip() for n in (a, b)}
    key_file = service_account_key(tmp_path / "hub-key.json")
    hubs = [HubProcess(a, tmp_path / f"hub{i}",
                       args=("--database", database, "--gcs-credentials", str(key_file),
                             "--no-local-bucket"),
                       env={"STORAGE_EMULATOR_HOST": fake_gcs.url}) for i in range(2)]
    balancer = RoundRobinProxy([("127.0.0.1", h.port) for h in hubs]) if proxy else None
    try:
        for hub in hubs:
            hub.start()
        admin = ("--hub", hubs[0].url)
        kfs(a, "hub", "channel", "create", CH, "--bucket", f"gs://{BUCKET}", *admin)
        for node, perms in ((a, PERMS_ALL), (b, "requestFiles,requestFeeds")):
            kfs(a, "hub", "channel", "authorize", CH, ids[node], "--permissions", perms,
                *admin)
        if balancer is not None:
            kfs(a, "join", balancer.url, CH)
            kfs(b, "join", balancer.url, CH)
        else:
            kfs(a, "join", hubs[1].url, CH)
            kfs(b, "join", hubs[0].url, CH)
        yield Hubs(tmp_path, fake_gcs, hubs, a, b)
    finally:
        for hub in hubs:
            hub.stop()
        if balancer is not None:
            balancer.stop()


@pytest.fixture
def hubs_apart(tmp_path, fake_gcs, postgres_cluster):
    yield from _hubs(tmp_path, fake_gcs, postgres_cluster.database(), proxy=False)


@pytest.fixture
def hubs_balanced(tmp_path, fake_gcs, postgres_cluster):
    yield from _hubs(tmp_path, fake_gcs, postgres_cluster.database(), proxy=True)


def test_a_request_through_one_hub_is_provided_through_the_other(hubs_apart):
    c = hubs_apart
    mnt_a, mnt_b = c.base / "mnt-a", c.base / "mnt-b"
    with mounted(c.a, mnt_a), mounted(c.b, mnt_b):
        sha1, data = c.stored_on_a(3 * MiB + 11)
        assert c.in_bucket(sha1) is None
        assert (mnt_b / CH / "sha1" / sha1).read_bytes() == data
        assert c.in_bucket(sha1) == data
    requested = c.hubs[0].log.read_text()
    provided = c.hubs[1].log.read_text()
    assert f"request {CH}/{sha1[:12]} from" in requested  # B asked hub 0
    assert f"request {CH}/{sha1[:12]} accepted by" in provided  # A answered hub 1


def test_killing_one_of_two_hubs_mid_request_and_mid_upload_loses_nothing(hubs_balanced):
    c = hubs_balanced
    mnt_a, mnt_b = c.base / "mnt-a", c.base / "mnt-b"
    # A's uploads at 16 MB/s: both are surely under way when the hub process dies
    with mounted(c.a, mnt_a, "--bwlimit", "16M"), mounted(c.b, mnt_b):
        wanted, wanted_data = c.stored_on_a(48 * MiB + 3)
        read: dict = {}

        def read_on_b():
            try:
                read["data"] = (mnt_b / CH / "sha1" / wanted).read_bytes()
            except OSError as exc:
                read["error"] = exc

        reader = threading.Thread(target=read_on_b)
        reader.start()
        src = c.base / "written.bin"
        written_data, written = random_file(src, 48 * MiB + 5)
        target = mnt_a / CH / "written.bin"
        shutil.copyfile(src, target)

        def logs() -> str:
            return "".join(h.log.read_text() for h in c.hubs)

        wait_for(lambda: f"request {CH}/{wanted[:12]} accepted by" in logs(), timeout=60,
                 what="A to accept B's request")
        assert c.in_bucket(wanted) is None and c.in_bucket(written) is None
        c.hubs[0].proc.kill()  # SIGKILL: no goodbye to anyone
        c.hubs[0].proc.wait()
        reader.join(timeout=120)
        assert not reader.is_alive()
        assert "error" not in read, read
        assert read["data"] == wanted_data
        wait_for(lambda: xattr(target, "user.kachery.status") == "in bucket", timeout=120,
                 what="A's upload to reach the bucket through the hub that is left")
        assert c.in_bucket(written) == written_data
        # B read the file by its chunks as they came; the whole object follows them
        wait_for(lambda: object_key(CH, wanted) in c.fake.objects(BUCKET, f"{CH}/sha1/"),
                 timeout=120, what="A's upload of the whole requested file")
        assert c.in_bucket(wanted) == wanted_data
        # and what hub 0 knew, hub 1 knows: the upload and the request are on record
        assert kfs(c.b, "cat", f"sha1://{written}").stdout == written_data
