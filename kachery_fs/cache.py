"""The local store as a managed cache: an index of its objects, a size limit, LRU eviction.

The index is ``store.db`` (SQLite) beside ``sha1/``: one row per object with its size,
when it was last read, and where it came from (its origin):

``fetched``
    downloaded from a bucket, or copied from a kachery store on this machine. This is the
    cache proper: when an insert takes the store over its limit, fetched objects are
    deleted, least recently read first, until the store is down to
    :data:`LOW_WATERMARK` of the limit.
``written``
    committed from a file written in the mount. Evictable like fetched content once
    nothing needs it any more (see *pinned*), but never in the first
    :data:`WRITTEN_GRACE_S` after it was committed: the moment between the commit and
    the named entry that records it.
``added``
    added by ``kachery-fs put`` or ``kachery-fs store add``: the user asked this node to
    hold and provide it. Never evicted.

Whatever its origin, an object is *pinned* (never evicted) while a named entry uses it
or an upload of it is not done; the node database says which (the ``pinned`` callable).
Without that callable there is no eviction at all: the limit is only reported.

Reads cost no SQLite write: :meth:`StoreCache.touch` notes the time in memory, and the
notes are written in one transaction every :data:`FLUSH_INTERVAL_S` (by :meth:`run`),
before each eviction pass, and at :meth:`close`.

Several processes share one store (a mount, ``put``, ``cat``). Usage is kept in the
database by triggers, so every process sees the same figure. An eviction pass is one
write transaction that deletes each file while holding it, and an insert of pinned
content records its row before the file is put in place: either the pass sees the pin,
or the insert finds the file gone and puts its own copy there. Fetched content is
recorded after it is in place, so a pass never meets a row whose file is still coming.
A file that some process is reading holds a shared ``flock`` (``Store.open``; a download
holds an exclusive one): a pass skips the files it cannot lock.

A store that has no index yet (made by an earlier version) is indexed once, by walking
``sha1/``, when it is first opened.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import trio

from ._sqlite import Migration, Schema
from .layout import Layout
from .units import format_size
from .uris import is_sha1

log = logging.getLogger(__name__)

FETCHED, WRITTEN, ADDED = "fetched", "written", "added"
#: What an eviction pass calls a partial file (not an origin: partials have their own table).
PARTIAL = "partial"
#: An eviction pass stops when the store is down to this share of its limit.
LOW_WATERMARK = 0.9
#: How long a committed file is kept before the entry naming it must pin it.
WRITTEN_GRACE_S = 600.0
#: The most objects one eviction transaction deletes (about 0.5 s of work): a long pass is
#: cut into transactions, so that another process's insert never waits long for the index.
EVICT_BATCH = 1000
#: How often a running mount writes the access times it noted.
FLUSH_INTERVAL_S = 30.0
#: How long the pinned-bytes figure of :meth:`StoreCache.stats` is reused.
PINNED_BYTES_TTL_S = 5.0

INDEX_FILE = "store.db"

_V1 = """
CREATE TABLE IF NOT EXISTS objects (
    sha1 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    origin TEXT NOT NULL,          -- fetched | written | added
    last_access REAL NOT NULL      -- time.time() of the last read (or of the insert)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_access ON objects (last_access);
CREATE TABLE IF NOT EXISTS totals (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (name, value) VALUES ('bytes', 0), ('objects', 0),
    ('evictions', 0), ('evicted_bytes', 0), ('indexed', 0);
CREATE TRIGGER IF NOT EXISTS objects_added AFTER INSERT ON objects BEGIN
    UPDATE totals SET value = value + NEW.size WHERE name = 'bytes';
    UPDATE totals SET value = value + 1 WHERE name = 'objects';
END;
CREATE TRIGGER IF NOT EXISTS objects_removed AFTER DELETE ON objects BEGIN
    UPDATE totals SET value = value - OLD.size WHERE name = 'bytes';
    UPDATE totals SET value = value - 1 WHERE name = 'objects';
END;
"""

_V2 = """
CREATE TABLE manifests (
    sha1 TEXT PRIMARY KEY,          -- a large file's SHA-1
    manifest TEXT NOT NULL,         -- the SHA-1 of its kachery manifest
    source TEXT NOT NULL,           -- here | hub:<channel>: who made it trusted
    recorded_at REAL NOT NULL
) WITHOUT ROWID;
"""

_V3 = """
CREATE TABLE partials (
    sha1 TEXT NOT NULL,             -- a large file of which some chunks are here
    manifest TEXT NOT NULL,         -- the SHA-1 of the manifest that names its chunks
    present BLOB NOT NULL,          -- one bit per chunk (chunk i: byte i // 8, bit i % 8)
    bytes INTEGER NOT NULL,         -- the bytes of the chunks present
    last_access REAL NOT NULL,
    PRIMARY KEY (sha1, manifest)
) WITHOUT ROWID;
CREATE TRIGGER partials_added AFTER INSERT ON partials BEGIN
    UPDATE totals SET value = value + NEW.bytes WHERE name = 'bytes';
END;
CREATE TRIGGER partials_grown AFTER UPDATE OF bytes ON partials BEGIN
    UPDATE totals SET value = value + NEW.bytes - OLD.bytes WHERE name = 'bytes';
END;
CREATE TRIGGER partials_removed AFTER DELETE ON partials BEGIN
    UPDATE totals SET value = value - OLD.bytes WHERE name = 'bytes';
END;
"""

#: ``store.db``'s versions (see :mod:`kachery_fs._sqlite`).
SCHEMA = Schema("store.db", synchronous="NORMAL", migrations=(
    Migration(1, "objects with size, origin and last read; totals kept by triggers", _V1),
    Migration(2, "trusted manifests of large files", _V2),
    Migration(3, "partial files: the chunks of large files present, counted in the usage",
              _V3),
))

#: Where a trusted manifest came from: computed on this node from the file itself
#: (``here``), or vouched for by a channel's hub (:func:`vouched_by_hub`). A manifest the
#: user named in a URI or a path is trusted for that read only and is not recorded.
MANIFEST_HERE = "here"


def vouched_by_hub(channel: str) -> str:
    """The source of a manifest that ``channel``'s hub vouches for: trusted for reads
    through that channel only."""
    return f"hub:{channel}"

# An insert never lowers an origin: added > written > fetched.
_RECORD = (
    "INSERT INTO objects (sha1, size, origin, last_access) VALUES (?, ?, ?, ?)"
    " ON CONFLICT(sha1) DO UPDATE SET last_access = MAX(last_access, excluded.last_access),"
    " origin = CASE WHEN objects.origin = 'added' OR excluded.origin = 'fetched'"
    " THEN objects.origin ELSE excluded.origin END")


class StoreCache:
    """The index, limit and eviction of one store. See the module docstring.

    Thread-safe: the store's writers call it from worker threads, the mount from the
    trio thread. ``limit`` may be changed at any time (a ``--cache-size`` flag).
    """

    def __init__(self, layout: Layout, *, limit: int | None = None,
                 pinned: Callable[[], set[str]] | None = None,
                 uploaded: Callable[[], set[str]] | None = None):
        self.layout = layout
        self.limit = limit
        self._pinned = pinned
        self._uploaded = uploaded  # only for indexing a store made by an earlier version
        self._lock = threading.Lock()  # one connection, used by one thread at a time
        self._db = SCHEMA.open(layout.root / INDEX_FILE)
        self._touched: dict[str, float] = {}
        self._touched_lock = threading.Lock()  # cheap: never held across I/O
        self._newest: str | None = None  # a pass leaves the latest insert alone
        self._wake: Callable[[], None] | None = None  # set while run() runs
        self._pinned_bytes: tuple[float, int] | None = None  # (monotonic time, bytes)
        self._stats: dict | None = None  # the last stats(), shown during a pass
        self._evicting = False
        self._warned = False
        if not self._total("indexed"):
            self._index_existing()

    # -- recording ------------------------------------------------------------------

    def record(self, sha1: str, size: int, origin: str) -> None:
        """Note an object that is being put in (or is already in) the store."""
        with self._lock:
            self._db.execute(_RECORD, (sha1, size, origin, time.time()))

    def unpin(self, sha1: str) -> bool:
        """Make content added with ``put``/``store add`` ordinary cache (still kept while
        a name or an unfinished upload needs it); False if it was not pinned that way."""
        with self._lock:
            cursor = self._db.execute("UPDATE objects SET origin = ? WHERE sha1 = ? AND"
                                      " origin = ?", (FETCHED, sha1, ADDED))
            return cursor.rowcount > 0

    def forget(self, sha1: str) -> None:
        """Drop the row of an object that was removed from the store."""
        with self._lock:
            self._db.execute("DELETE FROM objects WHERE sha1 = ?", (sha1,))

    def note_manifest(self, sha1: str, manifest_sha1: str, source: str) -> None:
        """Record a trusted manifest of ``sha1``; one computed here is never replaced by
        one the hub vouches for."""
        with self._lock:
            self._db.execute(
                "INSERT INTO manifests (sha1, manifest, source, recorded_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(sha1) DO UPDATE SET"
                " manifest = excluded.manifest, source = excluded.source,"
                " recorded_at = excluded.recorded_at"
                " WHERE manifests.source != 'here' OR excluded.source = 'here'",
                (sha1, manifest_sha1, source, time.time()))

    def known_manifest(self, sha1: str) -> tuple[str, str] | None:
        """``(manifest sha1, source)`` of a trusted manifest of ``sha1``, or None."""
        with self._lock:
            row = self._db.execute("SELECT manifest, source FROM manifests WHERE sha1 = ?",
                                   (sha1,)).fetchone()
        return (row[0], row[1]) if row else None

    def forget_manifest(self, sha1: str, manifest_sha1: str) -> None:
        """Drop a recorded manifest of ``sha1`` that turned out to lie."""
        with self._lock:
            self._db.execute("DELETE FROM manifests WHERE sha1 = ? AND manifest = ?",
                             (sha1, manifest_sha1))

    # -- partial files ------------------------------------------------------------------

    @contextmanager
    def _partial_row(self, sha1: str, manifest_sha1: str) -> Iterator[bytes | None]:
        """The ``present`` bitmap of a partial file's row (None: no row), in a write
        transaction that the body may add to."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT present FROM partials WHERE sha1 = ? AND"
                                       " manifest = ?", (sha1, manifest_sha1)).fetchone()
                yield row[0] if row else None
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def partial_chunks(self, sha1: str, manifest_sha1: str) -> set[int]:
        """The chunks of the partial file of (``sha1``, ``manifest_sha1``) recorded as
        present; its row is made (empty) if there is none."""
        with self._partial_row(sha1, manifest_sha1) as present:
            if present is None:
                self._db.execute(
                    "INSERT INTO partials (sha1, manifest, present, bytes, last_access)"
                    " VALUES (?, ?, x'', 0, ?)", (sha1, manifest_sha1, time.time()))
                present = b""
            else:
                self._db.execute("UPDATE partials SET last_access = ? WHERE sha1 = ? AND"
                                 " manifest = ?", (time.time(), sha1, manifest_sha1))
        return {i for i in range(len(present) * 8) if _has_bit(present, i)}

    def partial_add(self, sha1: str, manifest_sha1: str, chunk: int, nbytes: int) -> bool:
        """Record chunk ``chunk`` (``nbytes``) of the partial file of (``sha1``,
        ``manifest_sha1``) as present; False when its row is gone (evicted meanwhile)."""
        with self._partial_row(sha1, manifest_sha1) as row:
            if row is None:
                return False
            if not _has_bit(row, chunk):
                present = bytearray(row)
                if len(present) <= chunk // 8:
                    present.extend(bytes(chunk // 8 + 1 - len(present)))
                present[chunk // 8] |= 1 << (chunk % 8)
                self._db.execute("UPDATE partials SET present = ?, bytes = bytes + ?,"
                                 " last_access = ? WHERE sha1 = ? AND manifest = ?",
                                 (bytes(present), nbytes, time.time(), sha1, manifest_sha1))
        return True

    def partial_drop_chunk(self, sha1: str, manifest_sha1: str, chunk: int,
                           nbytes: int) -> None:
        """Chunk ``chunk`` of a partial file is not what its row said (lost in a crash,
        say): no longer present."""
        with self._partial_row(sha1, manifest_sha1) as row:
            if row is not None and _has_bit(row, chunk):
                present = bytearray(row)
                present[chunk // 8] &= ~(1 << (chunk % 8)) & 0xFF
                self._db.execute("UPDATE partials SET present = ?, bytes = bytes - ?"
                                 " WHERE sha1 = ? AND manifest = ?",
                                 (bytes(present), nbytes, sha1, manifest_sha1))

    def partial_forget(self, sha1: str, manifest_sha1: str) -> None:
        """Drop the row of a partial file that was removed, or became an object."""
        with self._lock:
            self._db.execute("DELETE FROM partials WHERE sha1 = ? AND manifest = ?",
                             (sha1, manifest_sha1))

    def partials(self) -> list[tuple[str, str, int]]:
        """``(sha1, manifest sha1, bytes present)`` of every partial file on record."""
        with self._lock:
            return self._db.execute("SELECT sha1, manifest, bytes FROM partials").fetchall()

    def touch(self, sha1: str) -> None:
        """Note a read, in memory (written out by :meth:`flush`)."""
        with self._touched_lock:
            self._touched[sha1] = time.time()

    def inserted(self, sha1: str) -> None:
        """An object is in place: evict if that took the store over its limit.

        Inline in a one-shot command; a long-running process (:meth:`run`) is only woken,
        so that a writer's ``close`` never waits for a pass.
        """
        self._newest = sha1
        if self._wake is not None:
            self._wake()
        elif self.over_limit():
            self.evict()

    def flush(self) -> None:
        """Write the access times noted since the last flush."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._touched_lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "UPDATE objects SET last_access = MAX(last_access, ?) WHERE sha1 = ?",
                [(t, sha1) for sha1, t in touched.items()])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # -- figures ----------------------------------------------------------------------

    def _total(self, name: str) -> int:
        with self._lock:
            return self._db.execute("SELECT value FROM totals WHERE name = ?",
                                    (name,)).fetchone()[0]

    def usage(self) -> int:
        """Bytes of the indexed objects (every process's inserts included)."""
        return self._total("bytes")

    def over_limit(self) -> bool:
        return self.limit is not None and self._pinned is not None and self.usage() > self.limit

    def pinned_bytes(self, pins: set[str] | None = None) -> int:
        """Bytes that no eviction may free: added content and what ``pins`` names."""
        if pins is None:
            pins = self._pinned() if self._pinned is not None else set()
        with self._lock:
            total = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM objects"
                                     " WHERE origin = 'added'").fetchone()[0]
            for sha1 in pins:
                row = self._db.execute("SELECT size FROM objects WHERE sha1 = ? AND"
                                       " origin != 'added'", (sha1,)).fetchone()
                total += row[0] if row else 0
        return total

    def stats(self) -> dict:
        """A JSON-able summary for ``kachery-fs status``. Never waits for an eviction pass
        (the mount's status is written from its event loop): during one, the last figures."""
        if self._evicting and self._stats is not None:
            return self._stats
        now = time.monotonic()
        if self._pinned_bytes is None or now - self._pinned_bytes[0] > PINNED_BYTES_TTL_S:
            self._pinned_bytes = (now, self.pinned_bytes())
        with self._lock:
            totals = dict(self._db.execute("SELECT name, value FROM totals").fetchall())
        self._stats = {"bytes": totals["bytes"], "objects": totals["objects"],
                       "limit": self.limit, "pinnedBytes": self._pinned_bytes[1],
                       "evictions": totals["evictions"], "evictedBytes": totals["evicted_bytes"]}
        return self._stats

    # -- eviction -----------------------------------------------------------------------

    def evict(self, pins: set[str] | None = None) -> tuple[int, int]:
        """Delete unpinned objects, least recently read first, until the store is down to
        the low watermark; returns ``(objects, bytes)`` freed. No-op under the limit."""
        if self.limit is None or self._pinned is None:
            return 0, 0
        if pins is None:
            pins = self._pinned()
        self._evicting = True  # before waiting for the lock: stats() must not wait either
        victims, freed, usage = [], 0, None
        try:
            while True:
                with self._lock:
                    self._flush_locked()
                    before, batch, batch_freed = self._evict_locked(pins)
                usage = before if usage is None else usage
                victims += batch
                freed += batch_freed
                if len(batch) < EVICT_BATCH:
                    break
        finally:
            self._evicting = False
        if victims:
            log.info("evicted %d object(s), %s, from the local store: it held %s, over its"
                     " limit of %s", len(victims), format_size(freed), format_size(usage),
                     format_size(self.limit))
        if usage - freed > self.limit:
            self._warn_full(usage - freed, pins)
        else:
            self._warned = False
        return len(victims), freed

    def _evict_locked(self, pins: set[str]) -> tuple[int, list[str], int]:
        """One pass, one transaction: ``(usage before, hashes evicted, bytes freed)``."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            usage = self._db.execute("SELECT value FROM totals WHERE name = 'bytes'"
                                     ).fetchone()[0]
            victims: list[str] = []
            freed = 0
            if usage > self.limit:
                victims, partials, freed = self._choose_and_delete(usage, pins)
                self._db.executemany("DELETE FROM objects WHERE sha1 = ?",
                                     [(v,) for v in victims])
                self._db.executemany("DELETE FROM partials WHERE sha1 = ? AND manifest = ?",
                                     partials)
                victims += [f"{sha1} (partial)" for sha1, _ in partials]
                self._db.execute("UPDATE totals SET value = value + ? WHERE name = 'evictions'",
                                 (len(victims),))
                self._db.execute("UPDATE totals SET value = value + ? WHERE name ="
                                 " 'evicted_bytes'", (freed,))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return usage, victims, freed

    def _choose_and_delete(self, usage: int, pins: set[str],
                           ) -> tuple[list[str], list[tuple[str, str]], int]:
        """Within the pass's transaction: delete files in LRU order, skipping the pinned,
        the fresh and the open ones, until the low watermark: ``(objects deleted, partial
        files deleted (sha1, manifest), bytes freed)``."""
        assert self.limit is not None  # evict() returns early without a limit
        target = int(self.limit * LOW_WATERMARK)
        now = time.time()
        victims: list[str] = []
        freed = 0
        partials: list[tuple[str, str]] = []
        rows = self._db.execute("SELECT sha1, size, origin, last_access, NULL FROM objects"
                                " WHERE origin != 'added' UNION ALL SELECT sha1, bytes,"
                                f" '{PARTIAL}', last_access, manifest FROM partials"
                                " ORDER BY last_access")
        try:
            for sha1, size, origin, last_access, manifest in rows:
                if usage - freed <= target or len(victims) + len(partials) >= EVICT_BATCH:
                    break
                if origin == PARTIAL:
                    if self._delete_unused(self.layout.partial_path(sha1, manifest)):
                        partials.append((sha1, manifest))
                        freed += size
                    continue
                if sha1 in pins or sha1 == self._newest:
                    continue
                if origin == WRITTEN and now - last_access < WRITTEN_GRACE_S:
                    continue
                if self._delete_unused(self.layout.path(sha1)):
                    victims.append(sha1)
                    freed += size
        finally:
            rows.close()
        return victims, partials, freed

    def _delete_unused(self, path: Path) -> bool:
        """Delete an object's (or a partial) file unless a reader holds it; True when it is
        gone."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return True  # removed behind our back: only the row is left
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being read or downloaded right now
            os.unlink(path)
            return True
        finally:
            os.close(fd)

    def _warn_full(self, remaining: int, pins: set[str]) -> None:
        if self._warned:
            return
        self._warned = True
        assert self.limit is not None  # only evict() warns, and only with a limit
        pinned = self.pinned_bytes(pins)
        if pinned > self.limit:
            log.warning(
                "the local store holds %s that it must keep (files written here, uploads not"
                " done, content added with put or store add), more than its limit of %s:"
                " nothing more can be evicted, and writes go on. Raise the limit (`kachery-fs"
                " init --cache-size SIZE`, or --cache-size), or remove written files that are"
                " uploaded and no longer needed here", format_size(pinned),
                format_size(self.limit))
        else:
            log.warning("the local store still holds %s, over its limit of %s: the rest is"
                        " pinned (%s) or being read; it is evicted once readers close it",
                        format_size(remaining), format_size(self.limit), format_size(pinned))

    # -- a long-running process -------------------------------------------------------------

    async def run(self, *, interval: float = FLUSH_INTERVAL_S) -> None:
        """Keep the cache for a mount or ``serve``, until cancelled: evict (on a worker
        thread) as soon as an insert takes the store over its limit, flush access times
        every ``interval`` seconds, and once more at the end."""
        token = trio.lowlevel.current_trio_token()
        wake = trio.Event()

        def wake_soon() -> None:  # from any thread
            try:
                token.run_sync_soon(lambda: wake.set())
            except trio.RunFinishedError:
                pass

        self._wake = wake_soon
        next_flush = trio.current_time() + interval
        try:
            while True:
                if self.over_limit():
                    # The pins are read here, on the trio thread, where the mount uses the
                    # node database's connection. (A one-shot command reads them in
                    # `inserted`, on whatever thread installs: it runs nothing else then.)
                    assert self._pinned is not None  # over_limit() is False without it
                    pins = self._pinned()
                    await trio.to_thread.run_sync(self.evict, pins)
                with trio.move_on_at(next_flush):
                    await wake.wait()
                wake = trio.Event()
                if trio.current_time() >= next_flush:
                    await trio.to_thread.run_sync(self.flush)
                    next_flush = trio.current_time() + interval
        finally:
            self._wake = None
            self.flush()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._db.close()

    # -- indexing a store made by an earlier version -------------------------------------------

    def _index_existing(self) -> None:
        # The walk takes a while on a big store: it is done before taking the write lock,
        # which other processes' inserts would otherwise wait for.
        # Earlier versions kept no origin. Whatever this node ever uploaded may have been
        # put or written by its user, and other nodes may count on this copy: never
        # evicted (`added`). The rest was fetched.
        pins = self._pinned() if self._pinned is not None else set()
        provided = self._uploaded() if self._uploaded is not None else set()
        rows = [(sha1, st.st_size,
                 ADDED if sha1 in provided else WRITTEN if sha1 in pins else FETCHED,
                 max(st.st_atime, st.st_mtime)) for sha1, st in _walk(self.layout.sha1_dir)]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have indexed it meanwhile; objects stored since the
                # walk recorded themselves, hence OR IGNORE.
                done = self._db.execute("SELECT value FROM totals WHERE name = 'indexed'"
                                        ).fetchone()[0]
                if not done:
                    self._db.executemany(
                        "INSERT OR IGNORE INTO objects (sha1, size, origin, last_access)"
                        " VALUES (?, ?, ?, ?)", rows)
                    self._db.execute("UPDATE totals SET value = 1 WHERE name = 'indexed'")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        if rows and not done:
            log.info("indexed the %d object(s), %s, that the local store held",
                     len(rows), format_size(sum(r[1] for r in rows)))


def _has_bit(bitmap: bytes, i: int) -> bool:
    """Whether chunk ``i`` is marked in a ``partials.present`` bitmap."""
    return len(bitmap) > i // 8 and bool(bitmap[i // 8] >> (i % 8) & 1)


def _walk(directory: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(sha1, stat)`` of every object file under ``sha1/`` (three levels of fan-out)."""
    stack: list[str | Path] = [directory]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except FileNotFoundError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif is_sha1(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    yield entry.name.lower(), entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    pass
