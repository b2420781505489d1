"""The channel bucket as a managed cache: accounting, least-recently-demanded eviction, stats.

kachery's design asks for a bucket "large enough to store several of the largest files
expected … without needing to evict the highest-demand files … significantly smaller than
the total amount of data"; no kachery generation ever evicted anything. Here each channel
may have an *allocation* in bytes. The hub accounts:

* **usage**: the sizes of the content objects (``<channel>/sha1/...``) it has finalized and
  not deleted since. Feed objects are small, signed history and are never evicted, so they
  are not counted;
* **demand**: every object's last use, from finalized uploads, file requests, and the
  bucket downloads that nodes report in batches (``reportDownloads``). Reads by programs
  other than kachery-fs nodes straight from the public URL are not seen.

When usage passes the allocation, the least recently demanded objects are deleted from
the bucket until usage is at the low watermark. Never deleted: an object with an upload in
flight (signed and not yet finalized) or a file request that is live or finished in the last
minutes (its requesters are about to download it). An evicted file stays reachable: the
next read misses the bucket and goes through the request flow, and its upload is counted as
a re-upload, the figure that tells an owner the allocation is too small.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import trio

from ..bucket import CHUNK_SIZE as DOWNLOAD_RANGE
from ..errors import InvalidInput, NotFound, Unavailable
from ..protocol import object_key
from ..resumable import DEFAULT_CHUNK_SIZE as UPLOAD_CHUNK
from . import storage

if TYPE_CHECKING:
    from .backends import BucketBackend
    from .database import Database

log = logging.getLogger(__name__)

#: Eviction brings usage down to this fraction of the allocation, so that every upload
#: past the allocation does not trigger a deletion of its own.
DEFAULT_LOW_WATERMARK = 0.9

#: An upload signed this long ago and never finalized no longer protects its object.
UPLOAD_IN_FLIGHT_S = 24 * 3600
#: Uploads one node may have signed and not finalized at once (it initiates one when it
#: starts sending a file; an interrupted one stays until it lapses).
MAX_UPLOADS_IN_FLIGHT = 10_000
#: A requested object is kept this long, for its requesters to download it (as long as the
#: hub keeps a finished request's record for them).
REQUEST_HOLD_S = 120.0

COUNTERS = ("uploads", "reuploads", "evictions", "downloads", "requests")


def parse_allocation(value) -> int | None:
    """An allocation from the API: a positive byte count, or None for no limit."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 2**62:
        raise InvalidInput("allocation must be a positive number of bytes (up to 4 EiB),"
                           " or none")
    return value


class BucketCache:
    """Accounting and eviction for every channel of one hub.

    ``backend_of(channel)`` gives the channel's bucket backend (for deletions);
    ``held(channel)`` the hashes that file requests hold. ``run`` must be running for
    evictions to happen; accounting works without it.
    """

    def __init__(self, db: Database | sqlite3.Connection, *, backend_of: Callable[[str], BucketBackend],
                 held: Callable[[str], set[str]], clock=time.time):
        self._db = storage.as_database(db)
        self._backend_of = backend_of
        self._held = held
        self._clock = clock
        # Uploads signed and not yet finalized are the rows of ``uploads`` (how many each
        # node has is bounded: MAX_UPLOADS_IN_FLIGHT); requested objects kept for their
        # requesters, those of ``holds``: shared by every hub process on the database.
        self._pruned_at = 0.0
        self._due: set[str] = set()
        self._wake = trio.Event()

    # -- settings -------------------------------------------------------------------------

    def settings(self, channel: str) -> tuple[int | None, float]:
        row = self._db.execute("SELECT allocation, low_watermark FROM cache_settings"
                               " WHERE channel = ?", (channel,)).fetchone()
        return (row[0], row[1]) if row else (None, DEFAULT_LOW_WATERMARK)

    def configure(self, channel: str, *, allocation=..., low_watermark=...) -> None:
        """Change a channel's allocation (bytes or None) and/or low watermark (0.1-1)."""
        old_allocation, old_low = self.settings(channel)
        allocation = old_allocation if allocation is ... else parse_allocation(allocation)
        if low_watermark is ...:
            low_watermark = old_low
        elif not isinstance(low_watermark, int | float) or not 0.1 <= low_watermark <= 1:
            raise InvalidInput("the low watermark is a fraction of the allocation, 0.1 to 1")
        self._db.execute(
            "INSERT INTO cache_settings (channel, allocation, low_watermark) VALUES (?, ?, ?)"
            " ON CONFLICT(channel) DO UPDATE SET allocation = excluded.allocation,"
            " low_watermark = excluded.low_watermark", (channel, allocation, low_watermark))
        self._start_counting(channel)
        self._schedule(channel)

    # -- objects ----------------------------------------------------------------------------

    def size_of(self, channel: str, sha1: str) -> int | None:
        """The size of a verified object the bucket holds, or None."""
        row = self._db.execute("SELECT size FROM objects WHERE channel = ? AND sha1 = ?"
                               " AND stored = 1", (channel, sha1)).fetchone()
        return row[0] if row else None

    def record(self, channel: str, sha1: str, size: int, node_id: str, *,
               uploaded: bool) -> None:
        """A verified object is in the bucket. ``uploaded``: a node just finalized its upload
        (counted, and a re-upload if the object had been evicted before)."""
        now = self._clock()
        prior = self._db.execute("SELECT stored, evicted_at FROM objects"
                                 " WHERE channel = ? AND sha1 = ?", (channel, sha1)).fetchone()
        self._db.execute(
            "INSERT INTO objects (channel, sha1, size, finalized_at, finalized_by, stored,"
            " last_demand) VALUES (?, ?, ?, ?, ?, 1, ?)"
            " ON CONFLICT (channel, sha1) DO UPDATE SET size = excluded.size,"
            " finalized_at = excluded.finalized_at, finalized_by = excluded.finalized_by,"
            " stored = 1, last_demand = excluded.last_demand, evicted_at = NULL",
            (channel, sha1, size, now, node_id, now))
        self._drop_in_flight(channel, sha1)
        if uploaded:
            self._count(channel, "uploads", size)
            if prior is not None and prior[1] is not None and not prior[0]:
                self._count(channel, "reuploads", size)
                log.info("channel %s: sha1://%s uploaded again after its eviction",
                         channel, sha1)
        self._schedule(channel)

    def forget(self, channel: str, sha1: str) -> None:
        """The object is gone from the bucket, or was bad and deleted (not an eviction)."""
        self._db.execute("UPDATE objects SET stored = 0 WHERE channel = ? AND sha1 = ?",
                         (channel, sha1))

    def upload_signed(self, channel: str, sha1: str, node_id: str) -> None:
        """An upload URL is to be signed for ``node_id``: the object is in flight until
        finalized. Unavailable when the node has :data:`MAX_UPLOADS_IN_FLIGHT` already
        (uploads it started and never finished), so that no node makes the hub remember
        without bound."""
        self._prune()
        now = self._clock()
        if self.uploading_node(channel, sha1) != node_id:
            (started,) = self._db.execute(
                "SELECT COUNT(*) FROM uploads WHERE node_id = ? AND signed_at >= ?",
                (node_id, now - UPLOAD_IN_FLIGHT_S)).fetchone()
            if started >= MAX_UPLOADS_IN_FLIGHT:
                raise Unavailable(
                    f"node {node_id[:12]}… has {MAX_UPLOADS_IN_FLIGHT} uploads started and not"
                    " finished on this hub; finish some (or wait a day for them to lapse)",
                    retry_after=60)
        self._db.execute(
            "INSERT INTO uploads (channel, sha1, node_id, signed_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (channel, sha1) DO UPDATE SET node_id = excluded.node_id,"
            " signed_at = excluded.signed_at", (channel, sha1, node_id, now))
        self._demand(channel, [sha1])

    def _drop_in_flight(self, channel: str, sha1: str) -> None:
        self._db.execute("DELETE FROM uploads WHERE channel = ? AND sha1 = ?", (channel, sha1))

    def upload_in_flight(self, channel: str, sha1: str) -> bool:
        """Whether this hub signed an upload of the object that was not finalized (in the
        last :data:`UPLOAD_IN_FLIGHT_S`, since it started): an object found in the bucket
        then is that unfinished upload, not one this hub has checked."""
        return self.uploading_node(channel, sha1) is not None

    def finalized_by(self, channel: str, sha1: str) -> str | None:
        """The node whose finalize put the verified object on record, or None."""
        row = self._db.execute("SELECT finalized_by FROM objects WHERE channel = ? AND"
                               " sha1 = ? AND stored = 1", (channel, sha1)).fetchone()
        return row[0] if row else None

    def uploading_node(self, channel: str, sha1: str) -> str | None:
        """The node this hub signed the unfinished upload of the object for, if any (see
        :meth:`upload_in_flight`)."""
        row = self._db.execute("SELECT node_id FROM uploads WHERE channel = ? AND sha1 = ?"
                               " AND signed_at >= ?",
                               (channel, sha1, self._clock() - UPLOAD_IN_FLIGHT_S)).fetchone()
        return row[0] if row else None

    def requested(self, channel: str, sha1: str) -> None:
        """A node asked for the object: its requesters are about to download it, whether it
        is in the bucket already or a provider is about to upload it."""
        self._count(channel, "requests", 0)
        self._prune()
        self._db.execute("INSERT INTO holds (channel, sha1, until) VALUES (?, ?, ?)"
                         " ON CONFLICT (channel, sha1) DO UPDATE SET until = excluded.until",
                         (channel, sha1, self._clock() + REQUEST_HOLD_S))
        self._demand(channel, [sha1])

    def downloaded(self, channel: str, downloads: Iterable[tuple[str, int]]) -> None:
        """Nodes report whole or partial downloads of objects from the bucket."""
        downloads = list(downloads)
        now = self._clock()
        self._db.executemany(
            "UPDATE objects SET downloads = downloads + 1, last_demand = ?"
            " WHERE channel = ? AND sha1 = ?", [(now, channel, s) for s, _ in downloads])
        for _, nbytes in downloads:
            self._count(channel, "downloads", nbytes)

    def _demand(self, channel: str, sha1s: Iterable[str]) -> None:
        now = self._clock()
        self._db.executemany("UPDATE objects SET last_demand = ? WHERE channel = ? AND sha1 = ?",
                             [(now, channel, s) for s in sha1s])

    def _count(self, channel: str, name: str, nbytes: int) -> None:
        self._db.execute(
            "INSERT INTO cache_counters (channel, name, count, bytes) VALUES (?, ?, 1, ?)"
            " ON CONFLICT (channel, name) DO UPDATE SET count = cache_counters.count + 1,"
            " bytes = cache_counters.bytes + excluded.bytes", (channel, name, nbytes))
        self._start_counting(channel)

    def _start_counting(self, channel: str) -> None:
        """The counters of ``channel`` start now, unless they already have."""
        self._db.execute("INSERT INTO cache_since (channel, since) VALUES (?, ?)"
                         " ON CONFLICT (channel) DO NOTHING", (channel, self._clock()))

    # -- statistics --------------------------------------------------------------------------

    def usage(self, channel: str) -> tuple[int, int]:
        """(bytes, objects) of the content the bucket holds."""
        row = self._db.execute("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT), COUNT(*)"
                               " FROM objects WHERE channel = ? AND stored = 1",
                               (channel,)).fetchone()
        return row[0], row[1]

    def stats(self, channel: str) -> dict:
        allocation, low = self.settings(channel)
        stored_bytes, stored_objects = self.usage(channel)
        counters = {name: {"count": 0, "bytes": 0} for name in COUNTERS}
        for name, count, nbytes in self._db.execute(
                "SELECT name, count, bytes FROM cache_counters WHERE channel = ?", (channel,)):
            counters[name] = {"count": count, "bytes": nbytes}
        row = self._db.execute("SELECT since FROM cache_since WHERE channel = ?",
                               (channel,)).fetchone()
        return {"channel": channel, "allocation": allocation, "lowWatermark": low,
                "storedBytes": stored_bytes, "storedObjects": stored_objects,
                "inFlight": self._db.execute(
                    "SELECT COUNT(*) FROM uploads WHERE channel = ? AND signed_at >= ?",
                    (channel, self._clock() - UPLOAD_IN_FLIGHT_S)).fetchone()[0],
                "since": row[0] if row else self._clock(), "now": self._clock(),
                **counters}

    # -- eviction ------------------------------------------------------------------------------

    def _schedule(self, channel: str) -> None:
        allocation, _ = self.settings(channel)
        if allocation is not None:
            self._due.add(channel)
            self._wake.set()

    def _protected(self, channel: str, sha1: str, since: float) -> bool:
        """Whether an eviction pass that started at ``since`` must leave ``sha1`` alone:
        its upload is in flight, it is requested, or it was in demand since the pass began
        (the pass awaits each deletion, and requests go on meanwhile)."""
        now = self._clock()
        if self.upload_in_flight(channel, sha1):
            return True
        if self._db.execute("SELECT 1 FROM holds WHERE channel = ? AND sha1 = ? AND until >= ?",
                            (channel, sha1, now)).fetchone():
            return True
        if sha1 in self._held(channel):
            return True
        row = self._db.execute("SELECT stored, last_demand FROM objects"
                               " WHERE channel = ? AND sha1 = ?", (channel, sha1)).fetchone()
        return row is None or not row[0] or row[1] > since

    def _prune(self, *, force: bool = False) -> None:
        """Drop expired holds and abandoned uploads (at most once a minute unless forced),
        so that a hub without allocations does not collect them forever."""
        now = self._clock()
        if not force and now - self._pruned_at < 60:
            return
        self._pruned_at = now
        self._db.execute("DELETE FROM uploads WHERE signed_at < ?", (now - UPLOAD_IN_FLIGHT_S,))
        self._db.execute("DELETE FROM holds WHERE until < ?", (now,))

    async def evict(self, channel: str) -> int:
        """Evict least-recently-demanded objects until usage is at the low watermark, if
        it is over the allocation. Returns the number of objects evicted."""
        allocation, low = self.settings(channel)
        usage, _ = self.usage(channel)
        if allocation is None or usage <= allocation:
            return 0
        target = int(allocation * low)
        self._prune(force=True)
        started = self._clock()
        backend = self._backend_of(channel)
        candidates = self._db.execute(
            "SELECT sha1, size FROM objects WHERE channel = ? AND stored = 1"
            " ORDER BY last_demand, finalized_at", (channel,)).fetchall()
        evicted = 0
        for sha1, size in candidates:
            if usage <= target:
                break
            if self._protected(channel, sha1, started):
                continue
            try:
                await backend.delete(object_key(channel, sha1))
            except NotFound:
                pass  # already gone: account it all the same
            except Exception as exc:
                log.warning("channel %s: could not evict sha1://%s (%s); will retry at the"
                            " next upload", channel, sha1, exc)
                continue
            if not self._db.execute("UPDATE objects SET stored = 0, evicted_at = ? WHERE"
                                    " channel = ? AND sha1 = ? AND stored = 1",
                                    (self._clock(), channel, sha1)).rowcount:
                # Another hub process evicted it meanwhile (and maybe others): what is
                # left to evict is what the rows say now.
                usage, _ = self.usage(channel)
                continue
            self._count(channel, "evictions", size)
            usage -= size
            evicted += 1
            log.info("channel %s: evicted sha1://%s (%d bytes) from the bucket", channel,
                     sha1, size)
        if usage > allocation:
            log.warning("channel %s: %d bytes stored after eviction, over the allocation of"
                        " %d: the rest is in flight or requested right now (raise the"
                        " allocation with `kachery-fs hub channel set %s --allocation`)",
                        channel, usage, allocation, channel)
        return evicted

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._due:
                channel = self._due.pop()
                try:
                    await self.evict(channel)
                except Exception:
                    log.exception("channel %s: eviction failed", channel)


# -- cost ------------------------------------------------------------------------------------

#: Google Cloud Storage list prices in US dollars (Standard class, region us-central1,
#: internet egress on the premium tier for the first TiB, as published in September 2026). Google
#: bills storage and egress per GiB. Change them with the flags of `hub channel stats`.
DEFAULT_PRICES = {
    "storage_gib_month": 0.020,
    "egress_gib": 0.12,
    "class_a_per_1000": 0.005,
    "class_b_per_1000": 0.0004,
}

_MONTH_S = 30 * 24 * 3600
_GIB = 1024**3


def monthly_cost(stats: dict, prices: dict = DEFAULT_PRICES) -> dict:
    """Estimate a month of a channel's bucket at ``prices``, from its stats.

    Storage is what is stored now, for a month. Egress and operations are the rates seen
    since the counters started, scaled to 30 days (a young channel gives a rough figure).
    Egress counts downloads by kachery-fs nodes only, at internet prices: downloads inside
    the bucket's own region cost nothing.
    """
    elapsed = max(stats["now"] - stats["since"], 3600.0)  # at least an hour, to damp noise
    scale = _MONTH_S / elapsed
    up, down = stats["uploads"], stats["downloads"]
    # One request per upload chunk and per download range, plus one to start each.
    class_a = (up["count"] + up["bytes"] / UPLOAD_CHUNK) * scale
    class_b = (down["count"] + down["bytes"] / DOWNLOAD_RANGE) * scale
    cost = {
        "storage": stats["storedBytes"] / _GIB * prices["storage_gib_month"],
        "egress": down["bytes"] / _GIB * scale * prices["egress_gib"],
        "class_a": class_a / 1000 * prices["class_a_per_1000"],
        "class_b": class_b / 1000 * prices["class_b_per_1000"],
    }
    cost["total"] = sum(cost.values())
    return cost
