"""A node's persistent state in SQLite: channel memberships, the upload queue, named entries.

One database file (``node.db``) per node directory. Every method is a short synchronous
transaction: cheap enough to call from the trio thread (STYLE rule 7), and safe with
several processes on one node (WAL mode, busy timeout), e.g. a mount and ``kachery-fs put``.

Named entries are the files and directories a user made under ``<mount>/<channel>/``.
Each has a stable inode number (its row id plus :data:`INODE_BASE`) so names persist
across remounts with the same numbers.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ._sqlite import Migration, Schema
from .errors import Conflict, InvalidInput, NameTooLong, NotFound, as_no_space

log = logging.getLogger(__name__)

#: Inodes below this are reserved for the virtual tree (root, channel dirs, sha1/, ...).
INODE_BASE = 1 << 40

_V1 = """
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    hub_url TEXT NOT NULL,
    bucket_base_url TEXT NOT NULL,
    permissions TEXT NOT NULL DEFAULT '[]',
    checked_at REAL NOT NULL DEFAULT 0,
    joined_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS uploads (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL,          -- pending | uploading | done | failed
    session_uri TEXT,
    committed INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    PRIMARY KEY (channel, sha1)
);
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    parent INTEGER NOT NULL,      -- 0 = the channel directory itself
    name TEXT NOT NULL,
    is_dir INTEGER NOT NULL,
    sha1 TEXT,
    size INTEGER NOT NULL DEFAULT 0,
    mode INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    UNIQUE (channel, parent, name)
);
CREATE TABLE IF NOT EXISTS feed_singles (
    channel TEXT NOT NULL,
    feed_id TEXT NOT NULL,
    subfeed_hash TEXT NOT NULL,
    done INTEGER NOT NULL,        -- single-message objects uploaded: [0, done)
    target INTEGER NOT NULL,      -- announced: [0, target)
    PRIMARY KEY (channel, feed_id, subfeed_hash)
);
"""

#: ``node.db``'s versions (see :mod:`kachery_fs._sqlite`).
SCHEMA = Schema("node.db", synchronous="NORMAL", migrations=(
    Migration(1, "channels, upload queue, named entries, feed single-message objects", _V1),
))


@dataclass
class Channel:
    name: str
    hub_url: str
    bucket_base_url: str
    permissions: frozenset[str]
    checked_at: float


@dataclass
class Upload:
    channel: str
    sha1: str
    size: int
    state: str
    session_uri: str | None
    committed: int
    error: str | None
    attempts: int


@dataclass
class Entry:
    id: int
    channel: str
    parent: int
    name: str
    is_dir: bool
    sha1: str | None
    size: int
    mode: int
    mtime_ns: int

    @property
    def inode(self) -> int:
        return INODE_BASE + self.id


def _entry(row) -> Entry:
    return Entry(id=row[0], channel=row[1], parent=row[2], name=row[3], is_dir=bool(row[4]),
                 sha1=row[5], size=row[6], mode=row[7], mtime_ns=row[8])


_ENTRY_COLS = "id, channel, parent, name, is_dir, sha1, size, mode, mtime_ns"


class _Connection(sqlite3.Connection):
    """A connection on which a full disk (``SQLITE_FULL``) raises :class:`NoSpace`, the
    project's error, so that callers (a FUSE handler answers ``ENOSPC``) need not know
    SQLite. Every statement either happened or not: in autocommit mode a failed one
    leaves nothing behind."""

    def execute(self, sql, parameters=(), /):
        try:
            return super().execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            full = as_no_space(exc, "writing the node database")
            if full is None:
                raise
            raise full from exc


class NodeDB:
    """The node's SQLite state. See the module docstring for the concurrency model.

    Raises :class:`~kachery_fs.errors.NoSpace` when the disk is full; nothing is then
    changed.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._db = SCHEMA.open(self.path, factory=_Connection)

    def close(self) -> None:
        self._db.close()

    # -- channels -------------------------------------------------------------------

    def add_channel(self, name: str, hub_url: str, bucket_base_url: str,
                    permissions: set[str] | frozenset[str]) -> None:
        self._db.execute(
            "INSERT INTO channels (name, hub_url, bucket_base_url, permissions, checked_at, joined_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET hub_url=excluded.hub_url,"
            " bucket_base_url=excluded.bucket_base_url, permissions=excluded.permissions,"
            " checked_at=excluded.checked_at",
            (name, hub_url, bucket_base_url, json.dumps(sorted(permissions)), time.time(),
             time.time()))

    def remove_channel(self, name: str) -> None:
        self._db.execute("DELETE FROM channels WHERE name = ?", (name,))

    def channels(self) -> list[Channel]:
        rows = self._db.execute(
            "SELECT name, hub_url, bucket_base_url, permissions, checked_at FROM channels"
            " ORDER BY name").fetchall()
        return [Channel(r[0], r[1], r[2], frozenset(json.loads(r[3])), r[4]) for r in rows]

    def channel(self, name: str) -> Channel:
        for ch in self.channels():
            if ch.name == name:
                return ch
        raise NotFound(f"this node has not joined a channel named {name!r}"
                       " (see `kachery-fs join HUB_URL CHANNEL`)")

    def set_permissions(self, name: str, permissions: set[str] | frozenset[str],
                        bucket_base_url: str | None = None) -> None:
        self._db.execute(
            "UPDATE channels SET permissions = ?, checked_at = ?,"
            " bucket_base_url = COALESCE(?, bucket_base_url) WHERE name = ?",
            (json.dumps(sorted(permissions)), time.time(), bucket_base_url, name))

    # -- upload queue -------------------------------------------------------------------

    def enqueue_upload(self, channel: str, sha1: str, size: int, *, again: bool = False) -> bool:
        """Queue ``sha1`` for upload to ``channel``; False if it is already queued or done.

        ``again``: also when it is done (the bucket lost it; a file request asks for it).
        """
        redo = "('failed', 'done')" if again else "('failed')"
        cur = self._db.execute(
            "INSERT INTO uploads (channel, sha1, size, state, updated_at) VALUES (?, ?, ?, 'pending', ?)"
            " ON CONFLICT(channel, sha1) DO UPDATE SET state='pending', error=NULL,"
            " session_uri=NULL, committed=0, attempts=0, updated_at=excluded.updated_at"
            f" WHERE uploads.state IN {redo}",
            (channel, sha1, size, time.time()))
        return cur.rowcount > 0

    def upload(self, channel: str, sha1: str) -> Upload | None:
        row = self._db.execute(
            "SELECT channel, sha1, size, state, session_uri, committed, error, attempts"
            " FROM uploads WHERE channel = ? AND sha1 = ?", (channel, sha1)).fetchone()
        return Upload(*row) if row else None

    def pending_uploads(self) -> list[Upload]:
        rows = self._db.execute(
            "SELECT channel, sha1, size, state, session_uri, committed, error, attempts"
            " FROM uploads WHERE state IN ('pending', 'uploading') ORDER BY updated_at").fetchall()
        return [Upload(*r) for r in rows]

    def uploads(self) -> list[Upload]:
        rows = self._db.execute(
            "SELECT channel, sha1, size, state, session_uri, committed, error, attempts"
            " FROM uploads ORDER BY updated_at").fetchall()
        return [Upload(*r) for r in rows]

    def entries_not_queued(self) -> list[tuple[str, str, int]]:
        """(channel, sha1, size) of written files whose content has no upload record: a
        process that ended between committing a file and queuing its upload."""
        rows = self._db.execute(
            "SELECT DISTINCT e.channel, e.sha1, e.size FROM entries e WHERE e.sha1 IS NOT NULL"
            " AND NOT EXISTS (SELECT 1 FROM uploads u WHERE u.channel = e.channel"
            " AND u.sha1 = e.sha1)")
        return rows.fetchall()

    # -- feed single-message objects still to upload --------------------------------------

    def feed_singles_due(self, channel: str, feed_id: str, subfeed_hash: str,
                         start: int, end: int) -> None:
        """Messages ``start..end-1`` were announced; their single objects are due."""
        self._db.execute(
            "INSERT INTO feed_singles (channel, feed_id, subfeed_hash, done, target)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(channel, feed_id, subfeed_hash) DO UPDATE"
            " SET target = MAX(target, excluded.target)",
            (channel, feed_id, subfeed_hash, start, end))

    def feed_singles_done(self, channel: str, feed_id: str, subfeed_hash: str,
                          end: int) -> None:
        self._db.execute(
            "UPDATE feed_singles SET done = MAX(done, ?) WHERE channel = ? AND feed_id = ?"
            " AND subfeed_hash = ?", (end, channel, feed_id, subfeed_hash))

    def feed_singles(self) -> list[tuple[str, str, str, int, int]]:
        """(channel, feed id, subfeed hash, done, target) of every subfeed published here."""
        rows = self._db.execute("SELECT channel, feed_id, subfeed_hash, done, target FROM"
                                " feed_singles")
        return rows.fetchall()

    def requeue_failed(self) -> int:
        """Give failed uploads another try (a permission may have been granted since)."""
        cur = self._db.execute(
            "UPDATE uploads SET state = 'pending', session_uri = NULL, committed = 0,"
            " attempts = 0 WHERE state = 'failed'")
        return cur.rowcount

    def upload_counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT state, COUNT(*) FROM uploads GROUP BY state")
        return dict(rows.fetchall())

    def failed_uploads(self, limit: int = 10) -> list[Upload]:
        rows = self._db.execute(
            "SELECT channel, sha1, size, state, session_uri, committed, error, attempts"
            " FROM uploads WHERE state = 'failed' ORDER BY updated_at DESC LIMIT ?", (limit,))
        return [Upload(*r) for r in rows.fetchall()]

    def update_upload(self, channel: str, sha1: str, **fields) -> None:
        allowed = {"state", "session_uri", "committed", "error", "attempts"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"bad upload fields: {sorted(fields)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._db.execute(f"UPDATE uploads SET {sets}, updated_at = ? WHERE channel = ? AND sha1 = ?",
                         (*fields.values(), time.time(), channel, sha1))

    # -- named entries ------------------------------------------------------------------

    def entry(self, entry_id: int) -> Entry:
        row = self._db.execute(f"SELECT {_ENTRY_COLS} FROM entries WHERE id = ?",
                               (entry_id,)).fetchone()
        if row is None:
            raise NotFound(f"no entry {entry_id}")
        return _entry(row)

    def lookup(self, channel: str, parent: int, name: str) -> Entry | None:
        row = self._db.execute(
            f"SELECT {_ENTRY_COLS} FROM entries WHERE channel = ? AND parent = ? AND name = ?",
            (channel, parent, name)).fetchone()
        return _entry(row) if row else None

    def children(self, channel: str, parent: int) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLS} FROM entries WHERE channel = ? AND parent = ? ORDER BY id",
            (channel, parent)).fetchall()
        return [_entry(r) for r in rows]

    def create_entry(self, channel: str, parent: int, name: str, *, is_dir: bool, mode: int,
                     sha1: str | None = None, size: int = 0) -> Entry:
        _check_name(name)
        try:
            cur = self._db.execute(
                "INSERT INTO entries (channel, parent, name, is_dir, sha1, size, mode, mtime_ns)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (channel, parent, name, int(is_dir), sha1, size, mode, time.time_ns()))
        except sqlite3.IntegrityError:
            raise Conflict(f"{name!r} already exists") from None
        assert cur.lastrowid is not None  # set by the INSERT
        return self.entry(cur.lastrowid)

    def set_content(self, entry_id: int, sha1: str, size: int, *,
                    mtime_ns: int | None = None) -> None:
        """Point the entry at committed content; its modification time is ``mtime_ns``
        (one a program set while writing), else now."""
        self._db.execute("UPDATE entries SET sha1 = ?, size = ?, mtime_ns = ? WHERE id = ?",
                         (sha1, size, time.time_ns() if mtime_ns is None else mtime_ns,
                          entry_id))

    def set_mode(self, entry_id: int, mode: int) -> None:
        self._db.execute("UPDATE entries SET mode = ? WHERE id = ?", (mode, entry_id))

    def set_mtime(self, entry_id: int, mtime_ns: int) -> None:
        self._db.execute("UPDATE entries SET mtime_ns = ? WHERE id = ?", (mtime_ns, entry_id))

    def rename_entry(self, entry_id: int, new_parent: int, new_name: str) -> None:
        """Move an entry; an existing target file is replaced (POSIX rename semantics)."""
        _check_name(new_name)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            target = self._db.execute(
                "SELECT id, is_dir, channel FROM entries WHERE parent = ? AND name = ? AND channel ="
                " (SELECT channel FROM entries WHERE id = ?)",
                (new_parent, new_name, entry_id)).fetchone()
            if target is not None and target[0] != entry_id:
                if target[1]:
                    if self._db.execute("SELECT 1 FROM entries WHERE parent = ? LIMIT 1",
                                        (target[0],)).fetchone():
                        raise Conflict(f"{new_name!r} is a non-empty directory")
                self._db.execute("DELETE FROM entries WHERE id = ?", (target[0],))
            self._db.execute("UPDATE entries SET parent = ?, name = ? WHERE id = ?",
                             (new_parent, new_name, entry_id))
            self._db.execute("COMMIT")
        except BaseException:
            # A full disk may have rolled the transaction back already (SQLite does so
            # on SQLITE_FULL); a ROLLBACK then would fail and hide the real error.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def delete_entry(self, entry_id: int) -> None:
        if self._db.execute("SELECT 1 FROM entries WHERE parent = ? LIMIT 1",
                            (entry_id,)).fetchone():
            raise Conflict("directory not empty")
        self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))

    def uploaded_sha1s(self) -> set[str]:
        """Hashes this node has uploaded or queued for upload, in any state."""
        return {r[0] for r in self._db.execute("SELECT DISTINCT sha1 FROM uploads")}

    def pinned_sha1s(self) -> set[str]:
        """Hashes the local store may not evict: the content of named entries, and of
        uploads in any state but done."""
        rows = self._db.execute(
            "SELECT sha1 FROM entries WHERE sha1 IS NOT NULL"
            " UNION SELECT sha1 FROM uploads WHERE state != 'done'")
        return {r[0] for r in rows}


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidInput(f"invalid file name {name!r}")
    check_name_length(name)


#: The longest file name, in bytes, as on ext4 and every POSIX file system programs meet.
NAME_MAX = 255


def check_name_length(name: str) -> None:
    """``NameTooLong`` for a name over :data:`NAME_MAX` bytes."""
    if len(os.fsencode(name)) > NAME_MAX:
        raise NameTooLong(f"file name longer than {NAME_MAX} bytes")
