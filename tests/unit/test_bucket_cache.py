"""The channel bucket as a managed cache, its parts alone: the monthly cost from the stats,
sizes as typed and printed, an eviction pass racing a request, and readers of a download
whose object was evicted. The hub's policy through its API is in
tests/inproc/test_bucket_cache.py."""

from __future__ import annotations

import sqlite3

import pytest
import trio

from kachery_fs.cli.hub import _percent
from kachery_fs.errors import InvalidInput, NotFound
from kachery_fs.hub.cache import DEFAULT_PRICES, BucketCache, monthly_cost
from kachery_fs.resolver import DownloadContent
from kachery_fs.units import format_size, parse_size

MiB = 1 << 20


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
