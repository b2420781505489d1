"""The channel bucket as a managed cache: accounting, eviction under an allocation, stats.

In process (the hub's real ASGI app over httpx.ASGITransport) for the policy; end to end,
through real mounts, in tests/mount/test_bucket_cache.py.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3

import pytest
import trio

from kachery_fs import resumable
from kachery_fs.cli.hub import _percent
from kachery_fs.errors import InvalidInput, NotFound, PermissionDenied
from kachery_fs.hub.cache import DEFAULT_PRICES, BucketCache, monthly_cost
from kachery_fs.hub_client import HubClient
from kachery_fs.protocol import object_key
from kachery_fs.resolver import DownloadContent
from kachery_fs.units import format_size, parse_size

from ..util import hub_in_process

MiB = 1 << 20


@pytest.fixture
async def env(tmp_path):
    async with hub_in_process(tmp_path / "hub") as (server, hub, other, client):
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
    assert r == {"channel": "chan", "allocation": 10 * MiB, "lowWatermark": 0.5}
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


def test_monthly_cost_from_stats():
    day = 86400
    stats = {"storedBytes": 100 * 1024**3, "now": 30 * day, "since": 0,
             "uploads": {"count": 0, "bytes": 0},
             "downloads": {"count": 1000, "bytes": 50 * 1024**3}}
    cost = monthly_cost(stats, DEFAULT_PRICES)
    assert cost["storage"] == pytest.approx(2.0)  # 100 GiB at $0.020
    assert cost["egress"] == pytest.approx(6.0)  # 50 GiB at $0.12
    assert cost["class_a"] == 0
    # 1,000 GETs plus one per 8 MiB range: 7,400 in all at $0.0004 per 1,000.
    assert cost["class_b"] == pytest.approx((1000 + 50 * 128) / 1000 * 0.0004)
    assert cost["total"] == pytest.approx(sum(v for k, v in cost.items() if k != "total"))
    # Half the time for the same traffic: twice the monthly rate.
    assert monthly_cost({**stats, "now": 15 * day}, DEFAULT_PRICES)["egress"] == \
        pytest.approx(12.0)


def test_sizes_parse_and_print():
    assert parse_size("3M") == parse_size("3MiB") == parse_size("3 mb") == 3 * MiB
    assert parse_size("1.5G") == 3 * 512 * MiB and parse_size("123") == 123
    for bad in ("", "ten", "-1G", "0", "5X"):
        with pytest.raises(InvalidInput):
            parse_size(bad)
    assert format_size(1536) == "1.5 KiB" and format_size(3 * MiB) == "3 MiB"
    assert format_size(12) == "12 B" and format_size(250 * 1024**3) == "250 GiB"
    # Low watermarks as typed for `hub channel set`.
    assert _percent("90%") == _percent("90") == _percent("0.9") == 0.9
    assert _percent("1%") == 0.01 and _percent(" 50% ") == 0.5
    with pytest.raises(InvalidInput):
        _percent("most")


async def test_an_object_requested_during_an_eviction_pass_is_kept():
    """The pass awaits each deletion; a request that arrives meanwhile must be seen."""
    db = sqlite3.connect(":memory:", isolation_level=None)
    db.execute("CREATE TABLE objects (channel TEXT NOT NULL, sha1 TEXT NOT NULL, size INTEGER"
               " NOT NULL, finalized_at REAL NOT NULL, finalized_by TEXT NOT NULL,"
               " PRIMARY KEY (channel, sha1))")
    deleted = []
    deleting = trio.Event()

    class Backend:
        async def delete(self, key):
            deleting.set()
            await trio.sleep(0.2)
            deleted.append(key.rsplit("/", 1)[1][0])

    clock = [0.0]
    cache = BucketCache(db, backend_of=lambda c: Backend(), held=lambda c: set(),
                        clock=lambda: clock[0])
    for i, c in enumerate("abcd"):
        clock[0] = i
        cache.record("ch", c * 40, 100, "node", uploaded=True)
    cache.configure("ch", allocation=250, low_watermark=0.5)  # evict down to 125: 3 of 4
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.evict, "ch")
        await deleting.wait()  # 'a' is being deleted
        clock[0] = 100
        cache.requested("ch", "b" * 40)
    assert deleted == ["a", "c", "d"]
    assert cache.size_of("ch", "b" * 40) == 100


async def test_concurrent_reads_of_a_download_that_lost_its_object_reopen_once():
    class Gone:  # a download whose bucket object was evicted
        size, readers, done = 10, 0, trio.Event()

        async def wait_readable(self, end, stall_timeout):
            raise NotFound("gone from the bucket")

        def close_fd(self):
            pass

    class Refetched:
        size = 10

        async def read(self, offset, size):
            return b"x" * size

        def close(self):
            pass

    reopened = []

    async def reopen():
        reopened.append(1)
        await trio.sleep(0.2)  # a request through the hub takes a while
        return Refetched()

    content = DownloadContent(Gone(), reopen=reopen)
    results = []

    async def read():
        results.append(await content.read(0, 4))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await trio.sleep(0.05)
        nursery.start_soon(read)
    assert results == [b"xxxx", b"xxxx"] and reopened == [1]
    content.close()
