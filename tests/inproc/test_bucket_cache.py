"""The channel bucket as a managed cache: accounting, eviction under an allocation, stats.

In process (the hub's real ASGI app over httpx.ASGITransport) for the policy; its parts
alone in tests/unit/test_bucket_cache.py; end to end, through real mounts, in
tests/mount/test_bucket_cache.py.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from kachery_fs import resumable
from kachery_fs.errors import InvalidInput, PermissionDenied
from kachery_fs.hub_client import HubClient
from kachery_fs.protocol import object_key

from ..util import hub_in_process

#: The hub suite: each test on a hub whose state is in SQLite, and in PostgreSQL.
HUB_DATABASES = ("sqlite", "postgresql")

MiB = 1 << 20


@pytest.fixture
async def env(tmp_path, hub_database):
    async with hub_in_process(tmp_path / "hub", hub_database) as (server, hub, other, client):
        await hub.create_channel("chan", allocation=3 * MiB)
        await hub.authorize_node("chan", hub.key.node_id, ["provideFiles", "requestFiles"])
        yield server, hub, other, client


async def upload(server, hub: HubClient, client, data: bytes) -> str:
    sha1 = hashlib.sha1(data).hexdigest()
    signed = await hub.initiate_upload("chan", sha1, len(data))
    if signed is not None:
        session = await resumable.start_session(client, signed)
        path = server.directory / f"payload-{sha1}"
        path.write_bytes(data)
        await resumable.upload(client, session, path, len(data))
        await hub.finalize_upload("chan", sha1, len(data))
    return sha1


def in_bucket(server, sha1: str) -> bool:
    return server.local.stat("kachery", object_key("chan", sha1)) is not None


async def test_least_recently_demanded_are_evicted_down_to_the_low_watermark(env):
    server, hub, _, client = env
    cache = server.hub.cache
    a, b, c = [await upload(server, hub, client, os.urandom(MiB)) for _ in range(3)]
    assert await cache.evict("chan") == 0  # exactly at the allocation: nothing to do
    await hub.call("reportDownloads", channel="chan", downloads=[[a, MiB]])  # a is in demand
    d = await upload(server, hub, client, os.urandom(MiB))
    # 4 MiB > 3 MiB: evict down to 90 % (2.7 MiB): b then c, the least recently demanded.
    assert await cache.evict("chan") == 2
    assert [in_bucket(server, h) for h in (a, b, c, d)] == [True, False, False, True]
    stats = await hub.call("channelStats", channel="chan")
    assert stats["storedBytes"] == 2 * MiB and stats["storedObjects"] == 2
    assert stats["evictions"] == {"count": 2, "bytes": 2 * MiB}
    assert stats["uploads"]["count"] == 4 and stats["downloads"] == {"count": 1, "bytes": MiB}
    # The hub no longer counts an evicted object as present: its upload is signed again.
    assert await hub.initiate_upload("chan", b, MiB) is not None


async def test_reupload_of_an_evicted_file_is_counted(env):
    server, hub, _, client = env
    data = [os.urandom(MiB) for _ in range(4)]
    hashes = [await upload(server, hub, client, d) for d in data]
    await server.hub.cache.evict("chan")
    assert not in_bucket(server, hashes[0])
    await upload(server, hub, client, data[0])
    stats = await hub.call("channelStats", channel="chan")
    assert stats["reuploads"] == {"count": 1, "bytes": MiB}
    assert in_bucket(server, hashes[0])


async def test_requested_objects_are_not_evicted(env):
    server, hub, _, client = env
    wanted = os.urandom(MiB)
    sha1 = hashlib.sha1(wanted).hexdigest()
    # A request for a file in no bucket; a provider uploads it, which finishes the request.
    assert (await hub.request_file("chan", sha1))["state"] in ("pending", "offered")
    await upload(server, hub, client, wanted)
    assert (await hub.request_file("chan", sha1))["state"] == "finished"
    others = [await upload(server, hub, client, os.urandom(MiB)) for _ in range(3)]
    # The finished request holds the object while its requesters fetch it. Make it the
    # least recently demanded by hand, to show that the hold, not the demand, keeps it.
    server.hub.cache._db.execute("UPDATE objects SET last_demand = 0 WHERE sha1 = ?", (sha1,))
    assert await server.hub.cache.evict("chan") == 2
    assert in_bucket(server, sha1)
    assert [in_bucket(server, h) for h in others] == [False, False, True]


async def test_allocation_settings_and_who_may_see_them(env):
    server, hub, other, _ = env
    r = await hub.call("setChannel", channel="chan", allocation=10 * MiB, lowWatermark=0.5)
    assert r == {"channel": "chan", "allocation": 10 * MiB, "lowWatermark": 0.5,
                 "private": False}
    r = await hub.call("setChannel", channel="chan", allocation=None)
    assert r["allocation"] is None and r["lowWatermark"] == 0.5
    with pytest.raises(InvalidInput):
        await hub.call("setChannel", channel="chan", allocation=-5)
    with pytest.raises(InvalidInput):
        await hub.call("setChannel", channel="chan", lowWatermark=2)
    with pytest.raises(PermissionDenied):
        await other.call("setChannel", channel="chan", allocation=MiB)
    with pytest.raises(PermissionDenied):
        await other.call("channelStats", channel="chan")
    with pytest.raises(PermissionDenied, match="lacks the requestFiles"):
        await other.call("reportDownloads", channel="chan", downloads=[])
    with pytest.raises(InvalidInput):
        await hub.call("reportDownloads", channel="chan", downloads=[["nothex", 5]])
