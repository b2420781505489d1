"""The node's feeds in SQLite: keys of owned feeds, subfeed names, verified messages.

Local storage (:class:`FeedStore`) is one SQLite file (``feeds.db`` in the node directory,
:meth:`FeedStore.for_node`; mode 0600 since it holds private keys)::

    feeds(feed_id PK, private_key_pem NULL unless this node owns the feed, label, created_at)
    subfeeds(feed_id, subfeed_hash, name NULL when only the hash is known; PK both)
    messages(feed_id, subfeed_hash, position, signed = canonical JSON of the signed
             message; PK (feed_id, subfeed_hash, position))

A subfeed's rows are always positions ``0 .. count-1`` with no gap: every write appends
to the end of a chain inside one ``BEGIN IMMEDIATE`` transaction, which reads the last
message, so several processes (a mount, the CLI) appending at once still build one valid
chain. Messages are checked before they are stored (:mod:`.messages`), not on every read.

All methods here block (SQLite, signing); async callers run large appends and reads in
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .._sqlite import Migration, Schema
from ..canonical import canonical_json
from ..errors import IntegrityError, InvalidInput, NotFound, PermissionDenied
from ..identity import NodeKey, is_node_id
from .messages import check_message, message_json, sign_message, verify_messages
from .uri import check_subfeed_hash, normalize_feed_id, subfeed_hash

log = logging.getLogger(__name__)

_hash_of_name = subfeed_hash  # for code where a parameter is called subfeed_hash

#: The feed database's file name in a node directory.
FILENAME = "feeds.db"

_V1 = """
CREATE TABLE IF NOT EXISTS feeds (
    feed_id TEXT PRIMARY KEY,
    private_key_pem TEXT,         -- NULL unless this node owns the feed
    label TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS subfeeds (
    feed_id TEXT NOT NULL REFERENCES feeds(feed_id),
    subfeed_hash TEXT NOT NULL,
    name TEXT,                    -- NULL while only the hash is known
    PRIMARY KEY (feed_id, subfeed_hash)
);
CREATE TABLE IF NOT EXISTS messages (
    feed_id TEXT NOT NULL,
    subfeed_hash TEXT NOT NULL,
    position INTEGER NOT NULL,
    signed TEXT NOT NULL,         -- canonical JSON of the signed message
    PRIMARY KEY (feed_id, subfeed_hash, position)
) WITHOUT ROWID;
"""

#: The feed database's versions (see :mod:`kachery_fs._sqlite`). synchronous=FULL: a
#: signed message the owner may already have published must survive a power loss, or the
#: next append would sign a different message at the same position.
SCHEMA = Schema(FILENAME, synchronous="FULL", migrations=(
    Migration(1, "feeds with their keys, subfeed names, verified messages", _V1),
))


# -- local storage -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedInfo:
    feed_id: str
    label: str | None
    owned: bool
    created_at: float


@dataclass(frozen=True)
class SubfeedInfo:
    subfeed_hash: str
    #: The name, if this node has seen it (appended by name, or told it); else None.
    name: str | None
    count: int


class FeedStore:
    """The node's feeds in SQLite. See the module docstring for layout and concurrency.

    One connection, shared by the threads of a process under a lock; other processes
    open their own ``FeedStore`` on the same file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # private keys live here; -wal and -shm copy this mode
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._db = SCHEMA.open(self.path)

    @classmethod
    def for_node(cls, directory: Path) -> FeedStore:
        """The feed database of the node in ``directory``."""
        return cls(Path(directory) / FILENAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the database's write lock at once."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- feeds -----------------------------------------------------------------------

    def create_feed(self, label: str | None = None) -> str:
        """Make a new feed owned by this node (its private key is stored); its id."""
        if label is not None and not isinstance(label, str):
            raise InvalidInput("a feed label must be a string")
        key = NodeKey.generate()
        with self._write() as db:
            db.execute("INSERT INTO feeds (feed_id, private_key_pem, label, created_at)"
                       " VALUES (?, ?, ?, ?)", (key.node_id, key.private_pem(), label, time.time()))
        return key.node_id

    def add_feed(self, feed_id: str, label: str | None = None) -> None:
        """Remember a feed owned elsewhere (no-op if known; a given label replaces the old)."""
        feed_id = normalize_feed_id(feed_id)
        if label is not None and not isinstance(label, str):
            raise InvalidInput("a feed label must be a string")
        with self._write() as db:
            self._ensure_feed(db, feed_id)
            if label is not None:
                db.execute("UPDATE feeds SET label = ? WHERE feed_id = ?", (label, feed_id))

    @staticmethod
    def _ensure_feed(db: sqlite3.Connection, feed_id: str) -> None:
        db.execute("INSERT OR IGNORE INTO feeds (feed_id, created_at) VALUES (?, ?)",
                   (feed_id, time.time()))

    def feeds(self) -> list[FeedInfo]:
        rows = self._read("SELECT feed_id, label, private_key_pem IS NOT NULL, created_at"
                          " FROM feeds ORDER BY created_at, feed_id")
        return [FeedInfo(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def feed(self, feed_id: str) -> FeedInfo:
        feed_id = normalize_feed_id(feed_id)
        rows = self._read("SELECT feed_id, label, private_key_pem IS NOT NULL, created_at"
                          " FROM feeds WHERE feed_id = ?", (feed_id,))
        if not rows:
            raise NotFound(f"feed {feed_id} is not known to this node")
        r = rows[0]
        return FeedInfo(r[0], r[1], bool(r[2]), r[3])

    def owned(self, feed_id: str) -> bool:
        """True if this node holds the private key of ``feed_id`` (False if unknown)."""
        if not isinstance(feed_id, str) or not is_node_id(feed_id.lower()):
            return False
        rows = self._read("SELECT private_key_pem IS NOT NULL FROM feeds WHERE feed_id = ?",
                          (feed_id.lower(),))
        return bool(rows and rows[0][0])

    def key(self, feed_id: str) -> NodeKey:
        """The private key of an owned feed (e.g. to prove ownership to a hub).

        NotFound for an unknown feed; PermissionDenied if another node owns it.
        """
        feed_id = normalize_feed_id(feed_id)
        with self._lock:
            return self._key(self._db, feed_id)

    def _key(self, db: sqlite3.Connection, feed_id: str) -> NodeKey:
        row = db.execute("SELECT private_key_pem FROM feeds WHERE feed_id = ?",
                         (feed_id,)).fetchone()
        if row is None:
            raise NotFound(f"feed {feed_id} is not known to this node")
        if row[0] is None:
            raise PermissionDenied(f"feed {feed_id} is not owned by this node; only its owner"
                                   " can append")
        return NodeKey.from_private_pem(row[0])

    # -- subfeeds --------------------------------------------------------------------

    @staticmethod
    def _ensure_subfeed(db: sqlite3.Connection, feed_id: str, h: str,
                        name: str | None) -> None:
        db.execute("INSERT INTO subfeeds (feed_id, subfeed_hash, name) VALUES (?, ?, ?)"
                   " ON CONFLICT(feed_id, subfeed_hash) DO UPDATE SET"
                   " name = COALESCE(subfeeds.name, excluded.name)", (feed_id, h, name))

    @staticmethod
    def _tail(db: sqlite3.Connection, feed_id: str, h: str) -> tuple[int, str | None]:
        """(count, signature of the last message) of a subfeed, inside a transaction."""
        row = db.execute("SELECT position, signed FROM messages WHERE feed_id = ? AND"
                         " subfeed_hash = ? ORDER BY position DESC LIMIT 1",
                         (feed_id, h)).fetchone()
        if row is None:
            return 0, None
        return row[0] + 1, json.loads(row[1])["signature"]

    def append(self, feed_id: str, subfeed_name: str, messages: Sequence, *,
               metaData: dict | None = None) -> list[dict]:
        """Sign ``messages`` (JSON objects or arrays) onto the end of a subfeed of an owned feed.

        All or nothing, in one transaction that chains from the last stored message, so
        concurrent appenders (threads or processes) interleave whole batches. Returns the
        signed messages. InvalidInput for a message that is not a JSON object or array,
        or with no JSON form or over the size limit; NotFound for an unknown feed;
        PermissionDenied if another node owns it.
        """
        feed_id = normalize_feed_id(feed_id)
        h = subfeed_hash(subfeed_name)
        name = None if subfeed_name.startswith("~") else subfeed_name
        if not isinstance(messages, (list, tuple)):
            raise InvalidInput("messages must be a list of JSON values")
        if metaData is not None and not isinstance(metaData, dict):
            raise InvalidInput("metaData must be a JSON object")
        for i, m in enumerate(messages):  # fail before taking the write lock
            what = "the message" if len(messages) == 1 else f"message {i} of the batch"
            check_message(m, what)
            message_json(m, what)
        if not messages:
            return []
        signed: list[dict] = []
        with self._write() as db:
            key = self._key(db, feed_id)
            self._ensure_subfeed(db, feed_id, h, name)
            n, prev = self._tail(db, feed_id, h)
            rows = []
            for i, m in enumerate(messages):
                s = sign_message(key, m, message_number=n + i, previous_signature=prev,
                                 metaData=metaData)
                prev = s["signature"]
                signed.append(s)
                rows.append((feed_id, h, n + i, canonical_json(s)))
            db.executemany("INSERT INTO messages (feed_id, subfeed_hash, position, signed)"
                           " VALUES (?, ?, ?, ?)", rows)
        return signed

    def add_signed(self, feed_id: str, subfeed_hash: str, signed_messages, start: int, *,
                   name: str | None = None) -> tuple[int, str | None]:
        """Store messages received from elsewhere, claimed to be positions ``start, ...``.

        They are verified against ``feed_id`` and against the local chain: a run that
        starts beyond the local end, does not chain to the local message before ``start``,
        or differs from a message already stored (a fork) adds nothing; otherwise the
        valid prefix is stored past what is already here. Returns ``(added, problem)``,
        problem None when every message was good. ``name``, if given, is remembered as
        the subfeed's name. InvalidInput only for bad arguments, never for bad messages.
        """
        feed_id = normalize_feed_id(feed_id)
        h = check_subfeed_hash(subfeed_hash)
        if name is not None and _hash_of_name(name) != h:
            raise InvalidInput(f"subfeed name {name!r} does not hash to {h}")
        if name is not None and name.startswith("~"):
            name = None
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise InvalidInput(f"bad start position {start!r}")
        # The expensive part (signatures) runs before the write lock is taken.
        valid, problem = verify_messages(feed_id, signed_messages, start=start)
        # Every part of a valid message has a canonical form in valid UTF-8 (checked).
        texts = [canonical_json(m) for m in valid]
        added = 0
        with self._write() as db:
            n, _ = self._tail(db, feed_id, h)
            refusal = self._continues(db, feed_id, h, n, valid, start)
            if refusal is None:
                if valid or problem is None:  # nothing is learnt from garbage alone
                    self._ensure_feed(db, feed_id)
                    self._ensure_subfeed(db, feed_id, h, name)
                rows = [(feed_id, h, start + i, texts[i])
                        for i in range(max(n - start, 0), len(valid))]
                db.executemany("INSERT INTO messages (feed_id, subfeed_hash, position, signed)"
                               " VALUES (?, ?, ?, ?)", rows)
                added = len(rows)
            else:
                problem = refusal
        if problem:
            log.warning("feed %s subfeed %s: %s (%d messages added)", feed_id, h, problem, added)
        return added, problem

    @staticmethod
    def _continues(db: sqlite3.Connection, feed_id: str, h: str, n: int, valid: list[dict],
                   start: int) -> str | None:
        """Why a verified run at ``start`` cannot extend the ``n`` stored messages, or None."""
        if not valid:
            return None
        if start > n:
            return f"the messages start at {start} but only {n} are stored here (a gap)"
        local = [json.loads(r[0])["signature"] for r in db.execute(
            "SELECT signed FROM messages WHERE feed_id = ? AND subfeed_hash = ? AND"
            " position >= ? AND position < ? ORDER BY position",
            (feed_id, h, max(start - 1, 0), min(start + len(valid), n)))]
        if start > 0:
            if valid[0]["body"]["previousSignature"] != local[0]:
                return (f"message {start}: previousSignature does not match the stored"
                        f" message {start - 1}")
            local = local[1:]
        for i, sig in enumerate(local):
            if valid[i]["signature"] != sig:
                return f"message {start + i}: differs from the stored message (a fork)"
        return None

    def count(self, feed_id: str, subfeed_hash: str) -> int:
        """How many messages of the subfeed are stored here (0 if none or unknown)."""
        rows = self._read("SELECT MAX(position) FROM messages WHERE feed_id = ? AND"
                          " subfeed_hash = ?",
                          (normalize_feed_id(feed_id), check_subfeed_hash(subfeed_hash)))
        return 0 if rows[0][0] is None else rows[0][0] + 1

    def messages(self, feed_id: str, subfeed_hash: str, start: int = 0,
                 end: int | None = None) -> list[dict]:
        """Stored signed messages ``start <= position < end`` (to the last if end is None).

        They were verified when stored. IntegrityError if the rows have a gap.
        """
        feed_id = normalize_feed_id(feed_id)
        h = check_subfeed_hash(subfeed_hash)
        for v in (start, end):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise InvalidInput(f"bad position {v!r}")
        rows = self._read("SELECT position, signed FROM messages WHERE feed_id = ? AND"
                          " subfeed_hash = ? AND position >= ? AND position < ?"
                          " ORDER BY position",
                          (feed_id, h, start, 2**62 if end is None else end))
        out = []
        for i, (position, text) in enumerate(rows):
            if position != start + i:
                raise IntegrityError(f"feed {feed_id} subfeed {h}: message {start + i} is"
                                     " missing from the local database")
            out.append(json.loads(text))
        return out

    def subfeeds(self, feed_id: str) -> list[SubfeedInfo]:
        """The subfeeds of ``feed_id`` known here, named ones first (by name), then hashes."""
        rows = self._read(
            "SELECT s.subfeed_hash, s.name, (SELECT MAX(m.position) FROM messages m WHERE"
            " m.feed_id = s.feed_id AND m.subfeed_hash = s.subfeed_hash)"
            " FROM subfeeds s WHERE s.feed_id = ? ORDER BY s.name IS NULL, s.name, s.subfeed_hash",
            (normalize_feed_id(feed_id),))
        return [SubfeedInfo(r[0], r[1], 0 if r[2] is None else r[2] + 1) for r in rows]
