"""A node's persistent state in SQLite: channel memberships, the upload queue, the user's files.

One database file (``node.db``) per node directory. Every method is a short synchronous
transaction: cheap enough to call from the trio thread (STYLE rule 7), and safe with
several processes on one node (WAL mode, busy timeout), e.g. a mount and ``kachery-fs put``.

The files, directories, symbolic links and special files a user made under
``<mount>/<channel>/`` are modelled as a file system models them: a table of inodes
(type and mode, owner, link count, content, times) and a table of names, each a
(directory, name) pointing at an inode. A file may have several names (hard links) or,
while it is open after its last name went, none. Each inode has a stable number (its
row id plus :data:`INODE_BASE`), the same across remounts.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
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

_V2 = """
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    channel TEXT NOT NULL,
    mode INTEGER NOT NULL,        -- st_mode: the file type and the permission bits
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    nlink INTEGER NOT NULL,       -- names; a directory 2 + its subdirectories; 0: unlinked, still open
    sha1 TEXT,                    -- a regular file's committed content (NULL: empty)
    size INTEGER NOT NULL DEFAULT 0,
    rdev INTEGER NOT NULL DEFAULT 0,
    target BLOB,                  -- a symbolic link's target
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL
);
CREATE TABLE names (
    channel TEXT NOT NULL,
    parent INTEGER NOT NULL,      -- an inode id; 0 = the channel directory itself
    name BLOB NOT NULL,           -- the name's bytes, as the kernel gives them (any but / and NUL)
    inode INTEGER NOT NULL,
    PRIMARY KEY (channel, parent, name)
) WITHOUT ROWID;
CREATE INDEX names_inode ON names (inode);
ALTER TABLE channels ADD COLUMN mtime_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE channels ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT 0;
"""


_V3 = """
ALTER TABLE inodes ADD COLUMN committed INTEGER NOT NULL DEFAULT 1;
CREATE TABLE unsynced (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    inode INTEGER NOT NULL,
    sha1 TEXT,                    -- the content the file was given (NULL: empty)
    size INTEGER NOT NULL,
    prev_sha1 TEXT,               -- the content it had before (NULL: empty)
    prev_size INTEGER NOT NULL,
    prev_committed INTEGER NOT NULL  -- 0: it had none, it was being created
);
CREATE INDEX unsynced_inode ON unsynced (inode);
CREATE INDEX uploads_by_state ON uploads (state, updated_at);
"""


_V4 = """
ALTER TABLE channels ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
"""


def _v2_inodes(db) -> None:
    """Each row of version 1's ``entries`` becomes an inode with the same id (so inode
    numbers stay as they were) and one name; its owner is the owner of the database
    file (the node's user: version 1 kept no owners), whoever opens it first."""
    uid, gid = _file_owner(db)
    db.execute(
        "INSERT INTO inodes (id, channel, mode, uid, gid, nlink, sha1, size, atime_ns,"
        " mtime_ns, ctime_ns) SELECT id, channel, (mode & 4095) | (CASE WHEN is_dir THEN ?"
        " ELSE ? END), ?, ?, CASE WHEN is_dir THEN 2 + (SELECT COUNT(*) FROM entries c"
        " WHERE c.parent = e.id AND c.is_dir) ELSE 1 END, sha1, size, mtime_ns, mtime_ns,"
        " mtime_ns FROM entries e", (stat.S_IFDIR, stat.S_IFREG, uid, gid))
    db.execute("INSERT INTO names (channel, parent, name, inode) SELECT channel, parent,"
               " CAST(name AS BLOB), id FROM entries")
    # Ids are never reused, also those of entries deleted before this version.
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'entries'").fetchone()
    if seq is not None:
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'inodes'")
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('inodes', ?)", seq)
    db.execute("DROP TABLE entries")
    db.execute("UPDATE channels SET mtime_ns = CAST(joined_at * 1e9 AS INTEGER),"
               " ctime_ns = CAST(joined_at * 1e9 AS INTEGER)")


def _file_owner(db) -> tuple[int, int]:
    """(uid, gid) of the file of connection ``db``; this process's for one in memory."""
    for _, name, file in db.execute("PRAGMA database_list"):
        if name == "main" and file:
            st = os.stat(file)
            return st.st_uid, st.st_gid
    return os.getuid(), os.getgid()


#: ``node.db``'s versions (see :mod:`kachery_fs._sqlite`).
SCHEMA = Schema("node.db", synchronous="NORMAL", migrations=(
    Migration(1, "channels, upload queue, named entries, feed single-message objects", _V1),
    Migration(2, "inodes apart from names: owners, link counts, times, links and special"
                 " files", _V2, _v2_inodes),
    Migration(3, "files being created, content committed but not yet on the disk, and"
                 " the upload queue in order", _V3),
    Migration(4, "whether a channel is private (its bucket is read through signed URLs)",
              _V4),
))


@dataclass
class Channel:
    name: str
    hub_url: str
    bucket_base_url: str
    permissions: frozenset[str]
    checked_at: float
    #: Its bucket's objects are read through URLs the hub signs (``signReads``).
    private: bool = False


_CHANNEL_COLS = "name, hub_url, bucket_base_url, permissions, checked_at, private"


def _channel(r) -> Channel:
    return Channel(r[0], r[1], r[2], frozenset(json.loads(r[3])), r[4], bool(r[5]))


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
class Unsynced:
    """One entry of the ``unsynced`` log: inode ``inode`` was given content ``sha1``
    (``size`` bytes) that may not be on the disk yet; before, it had ``prev_sha1``
    (``prev_size`` bytes), or nothing at all if not ``prev_committed`` (it was being
    created)."""

    seq: int
    inode: int
    sha1: str | None
    size: int
    prev_sha1: str | None
    prev_size: int
    prev_committed: bool


@dataclass
class Inode:
    """A file, directory, symbolic link or special file the user made: one row of
    ``inodes``, under any number of names (``nlink``; none while it is open after its
    last name went)."""

    id: int
    channel: str
    mode: int
    uid: int
    gid: int
    nlink: int
    sha1: str | None
    size: int
    rdev: int
    target: bytes | None
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    #: False for a file ``create(2)`` made until its first commit (its first close): a
    #: crash before that removes it (see :mod:`kachery_fs.fs.durability`).
    committed: bool = True

    @property
    def inode(self) -> int:
        return INODE_BASE + self.id

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)


_INODE_COLS = ("id, channel, mode, uid, gid, nlink, sha1, size, rdev, target, atime_ns,"
               " mtime_ns, ctime_ns, committed")
#: The same columns of ``inodes i`` in a join with ``names``.
_JOINED_INODE_COLS = ", ".join("i." + c.strip() for c in _INODE_COLS.split(","))
_S_IFMT = 0o170000  # the file type bits of st_mode
#: How many inode rows a NodeDB keeps in memory (see NodeDB._inodes).
_INODES_CACHED = 100_000
#: The columns of an inode that :meth:`NodeDB.update_inode` may set.
_SETTABLE = frozenset({"mode", "uid", "gid", "nlink", "sha1", "size", "atime_ns", "mtime_ns",
                       "ctime_ns"})


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
        #: Inode rows as read, until this NodeDB changes them: only the mount writes
        #: inodes (one mount per node), through one NodeDB, and a FUSE request reads
        #: the same rows many times.
        self._inodes: dict[int, Inode] = {}
        #: Called after each :meth:`transaction` commits (the mount: a sync is due).
        self.on_commit: Callable[[], None] | None = None

    def close(self) -> None:
        self._db.close()

    # -- channels -------------------------------------------------------------------

    def add_channel(self, name: str, hub_url: str, bucket_base_url: str,
                    permissions: set[str] | frozenset[str], *, private: bool = False) -> None:
        self._db.execute(
            "INSERT INTO channels (name, hub_url, bucket_base_url, permissions, checked_at,"
            " joined_at, mtime_ns, ctime_ns, private) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET hub_url=excluded.hub_url,"
            " bucket_base_url=excluded.bucket_base_url, permissions=excluded.permissions,"
            " checked_at=excluded.checked_at, private=excluded.private",
            (name, hub_url, bucket_base_url, json.dumps(sorted(permissions)), time.time(),
             time.time(), time.time_ns(), time.time_ns(), int(private)))

    def remove_channel(self, name: str) -> None:
        self._db.execute("DELETE FROM channels WHERE name = ?", (name,))

    def channels(self) -> list[Channel]:
        rows = self._db.execute(f"SELECT {_CHANNEL_COLS} FROM channels ORDER BY name")
        return [_channel(r) for r in rows.fetchall()]

    def channel(self, name: str) -> Channel:
        r = self._db.execute(f"SELECT {_CHANNEL_COLS} FROM channels WHERE name = ?",
                             (name,)).fetchone()
        if r is not None:
            return _channel(r)
        raise NotFound(f"this node has not joined a channel named {name!r}"
                       " (see `kachery-fs join HUB_URL CHANNEL`)")

    def set_permissions(self, name: str, permissions: set[str] | frozenset[str],
                        bucket_base_url: str | None = None, *,
                        private: bool | None = None) -> None:
        """What the hub last said of this node's membership of ``name`` (None: unchanged)."""
        self._db.execute(
            "UPDATE channels SET permissions = ?, checked_at = ?,"
            " bucket_base_url = COALESCE(?, bucket_base_url), private = COALESCE(?, private)"
            " WHERE name = ?",
            (json.dumps(sorted(permissions)), time.time(), bucket_base_url,
             None if private is None else int(private), name))

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

    def forget_upload(self, sha1: str) -> None:
        """Drop the unfinished uploads of ``sha1`` (content that is gone: see
        kachery_fs.fs.durability.recover)."""
        self._db.execute("DELETE FROM uploads WHERE sha1 = ? AND state != 'done'", (sha1,))

    def upload(self, channel: str, sha1: str) -> Upload | None:
        row = self._db.execute(
            "SELECT channel, sha1, size, state, session_uri, committed, error, attempts"
            " FROM uploads WHERE channel = ? AND sha1 = ?", (channel, sha1)).fetchone()
        return Upload(*row) if row else None

    def pending_uploads(self, limit: int = -1) -> list[Upload]:
        """The uploads not done, oldest first (at most ``limit`` of them; -1: all)."""
        rows = self._db.execute(
            "SELECT channel, sha1, size, state, session_uri, committed, error, attempts"
            " FROM uploads WHERE state IN ('pending', 'uploading') ORDER BY updated_at"
            " LIMIT ?", (limit,)).fetchall()
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
            "SELECT DISTINCT e.channel, e.sha1, e.size FROM inodes e WHERE e.sha1 IS NOT NULL"
            " AND e.nlink > 0 AND NOT EXISTS (SELECT 1 FROM uploads u"
            " WHERE u.channel = e.channel AND u.sha1 = e.sha1)")
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

    # -- inodes and names -------------------------------------------------------------
    #
    # Primitives only: the rules of a file system (what may be linked, renamed, removed)
    # are kachery_fs.fs.namespace's, which groups these in transactions.

    @contextmanager
    def transaction(self):
        """One ``BEGIN IMMEDIATE`` transaction around the block; nested blocks join it."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
            if self.on_commit is not None:
                self.on_commit()
        except BaseException:
            self._inodes.clear()  # rows read inside it may hold what is rolled back
            # A full disk may have rolled the transaction back already (SQLite does so
            # on SQLITE_FULL); a ROLLBACK then would fail and hide the real error.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def inode(self, inode_id: int) -> Inode:
        cached = self._inodes.get(inode_id)
        if cached is not None:
            return cached
        row = self._db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE id = ?",
                               (inode_id,)).fetchone()
        if row is None:
            raise NotFound(f"no inode {inode_id}")
        if len(self._inodes) >= _INODES_CACHED:
            self._inodes.clear()
        inode = self._inodes[inode_id] = Inode(*row)
        return inode

    def lookup(self, channel: str, parent: int, name: str) -> Inode | None:
        """The inode named ``name`` in directory ``parent`` (0: the channel directory)."""
        row = self._db.execute(
            f"SELECT {_JOINED_INODE_COLS} FROM names n"
            " JOIN inodes i ON i.id = n.inode WHERE n.channel = ? AND n.parent = ?"
            " AND n.name = ?", (channel, parent, os.fsencode(name))).fetchone()
        return Inode(*row) if row else None

    def children(self, channel: str, parent: int) -> list[tuple[str, Inode]]:
        """The names in directory ``parent`` and their inodes, by name."""
        rows = self._db.execute(
            f"SELECT n.name, {_JOINED_INODE_COLS}"
            " FROM names n JOIN inodes i ON i.id = n.inode WHERE n.channel = ?"
            " AND n.parent = ? ORDER BY n.name", (channel, parent)).fetchall()
        return [(os.fsdecode(r[0]), Inode(*r[1:])) for r in rows]

    def has_children(self, channel: str, parent: int) -> bool:
        return self._db.execute("SELECT 1 FROM names WHERE channel = ? AND parent = ? LIMIT 1",
                                (channel, parent)).fetchone() is not None

    def subdirectories(self, channel: str, parent: int) -> int:
        """How many directories directory ``parent`` holds."""
        return self._db.execute(
            "SELECT COUNT(*) FROM names n JOIN inodes i ON i.id = n.inode WHERE n.channel = ?"
            " AND n.parent = ? AND i.mode & ? = ?",
            (channel, parent, _S_IFMT, stat.S_IFDIR)).fetchone()[0]

    def name_of(self, inode_id: int) -> tuple[int, str] | None:
        """(parent, name) of one name of ``inode_id`` (a directory has one), or None."""
        row = self._db.execute("SELECT parent, name FROM names WHERE inode = ? LIMIT 1",
                               (inode_id,)).fetchone()
        return (row[0], os.fsdecode(row[1])) if row else None

    def new_inode(self, channel: str, *, mode: int, uid: int, gid: int, nlink: int = 1,
                  rdev: int = 0, target: bytes | None = None, sha1: str | None = None,
                  size: int = 0, now_ns: int | None = None, committed: bool = True) -> int:
        """A new inode, with no name yet (see :meth:`add_name`); its id. ``committed``:
        see :attr:`Inode.committed`."""
        now = time.time_ns() if now_ns is None else now_ns
        cur = self._db.execute(
            "INSERT INTO inodes (channel, mode, uid, gid, nlink, sha1, size, rdev, target,"
            " atime_ns, mtime_ns, ctime_ns, committed) VALUES"
            " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (channel, mode, uid, gid, nlink, sha1, size, rdev, target, now, now, now,
             int(committed)))
        assert cur.lastrowid is not None  # set by the INSERT
        self._inodes[cur.lastrowid] = Inode(cur.lastrowid, channel, mode, uid, gid, nlink,
                                            sha1, size, rdev, target, now, now, now,
                                            committed)
        return cur.lastrowid

    def add_name(self, channel: str, parent: int, name: str, inode_id: int) -> None:
        """Name ``inode_id`` ``name`` in ``parent``; ``Conflict`` if the name is taken."""
        _check_name(name)
        try:
            self._db.execute("INSERT INTO names (channel, parent, name, inode) VALUES"
                             " (?, ?, ?, ?)", (channel, parent, os.fsencode(name), inode_id))
        except sqlite3.IntegrityError:
            raise Conflict(f"{name!r} already exists") from None

    def remove_name(self, channel: str, parent: int, name: str) -> None:
        self._db.execute("DELETE FROM names WHERE channel = ? AND parent = ? AND name = ?",
                         (channel, parent, os.fsencode(name)))

    def move_name(self, channel: str, parent: int, name: str, new_parent: int,
                  new_name: str) -> None:
        """Give the name ``name`` in ``parent`` a new place (the target must be free)."""
        _check_name(new_name)
        self._db.execute("UPDATE names SET parent = ?, name = ? WHERE channel = ?"
                         " AND parent = ? AND name = ?",
                         (new_parent, os.fsencode(new_name), channel, parent,
                          os.fsencode(name)))

    def point_name(self, channel: str, parent: int, name: str, inode_id: int) -> None:
        """Make an existing name name another inode."""
        self._db.execute("UPDATE names SET inode = ? WHERE channel = ? AND parent = ?"
                         " AND name = ?", (inode_id, channel, parent, os.fsencode(name)))

    def update_inode(self, inode_id: int, **fields) -> None:
        """Set columns of an inode (``mode``, ``uid``, ``gid``, ``nlink``, ``sha1``,
        ``size``, ``atime_ns``, ``mtime_ns``, ``ctime_ns``)."""
        if not fields or not set(fields) <= _SETTABLE:
            raise ValueError(f"bad inode fields: {sorted(fields)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._inodes.pop(inode_id, None)
        self._db.execute(f"UPDATE inodes SET {sets} WHERE id = ?", (*fields.values(), inode_id))

    def add_links(self, inode_id: int, delta: int, *, ctime_ns: int | None = None) -> None:
        self._inodes.pop(inode_id, None)
        if ctime_ns is None:
            self._db.execute("UPDATE inodes SET nlink = nlink + ? WHERE id = ?",
                             (delta, inode_id))
        else:
            self._db.execute("UPDATE inodes SET nlink = nlink + ?, ctime_ns = ? WHERE id = ?",
                             (delta, ctime_ns, inode_id))

    def delete_inode(self, inode_id: int) -> None:
        """Remove an inode that has no name left (kept while it was open)."""
        self._inodes.pop(inode_id, None)
        self._db.execute("DELETE FROM inodes WHERE id = ? AND nlink = 0 AND NOT EXISTS"
                         " (SELECT 1 FROM names WHERE inode = inodes.id)", (inode_id,))

    def delete_unlinked(self) -> int:
        """Remove every inode without a name: left by a mount that ended while they were
        open (the kernel forgets them at once then). How many."""
        self._inodes.clear()
        cur = self._db.execute("DELETE FROM inodes WHERE nlink = 0 AND NOT EXISTS"
                               " (SELECT 1 FROM names WHERE inode = inodes.id)")
        return cur.rowcount

    def names_of(self, inode_id: int) -> list[tuple[int, str]]:
        """(parent, name) of every name of ``inode_id``."""
        rows = self._db.execute("SELECT parent, name FROM names WHERE inode = ?",
                                (inode_id,)).fetchall()
        return [(r[0], os.fsdecode(r[1])) for r in rows]

    def set_content(self, inode_id: int, sha1: str, size: int, *,
                    mtime_ns: int | None = None, unsynced: bool = False) -> None:
        """Point the file at committed content; its modification time is ``mtime_ns``
        (one a program set while writing), else now; its change time is now. The file is
        committed (:attr:`Inode.committed`).

        ``unsynced``: the content may not be on the disk yet. The change is logged in
        ``unsynced`` with what the file had before, in the same transaction, until
        :meth:`forget_unsynced` (see :mod:`kachery_fs.fs.durability`)."""
        now = time.time_ns()
        mtime = now if mtime_ns is None else mtime_ns
        cached = self._inodes.pop(inode_id, None)
        with self.transaction():
            if unsynced:
                self._db.execute(
                    "INSERT INTO unsynced (inode, sha1, size, prev_sha1, prev_size,"
                    " prev_committed) SELECT id, ?, ?, sha1, size, committed FROM inodes"
                    " WHERE id = ?", (sha1, size, inode_id))
            self._db.execute("UPDATE inodes SET sha1 = ?, size = ?, mtime_ns = ?,"
                             " ctime_ns = ?, committed = 1 WHERE id = ?",
                             (sha1, size, mtime, now, inode_id))
        if cached is not None:  # committed: the row as it now is
            self._inodes[inode_id] = replace(cached, sha1=sha1, size=size, mtime_ns=mtime,
                                             ctime_ns=now, committed=True)

    def names_content(self, sha1: str) -> bool:
        """Whether a file has content ``sha1``."""
        return self._db.execute("SELECT 1 FROM inodes WHERE sha1 = ? LIMIT 1",
                                (sha1,)).fetchone() is not None

    def mark_committed(self, inode_id: int) -> None:
        """A file ``create(2)`` made was closed without a write: it is an empty file now,
        not one being created (:attr:`Inode.committed`)."""
        try:
            if self.inode(inode_id).committed:
                return
        except NotFound:
            return
        self._inodes.pop(inode_id, None)
        self._db.execute("UPDATE inodes SET committed = 1 WHERE id = ?", (inode_id,))

    def uncommitted(self) -> list[Inode]:
        """Files ``create(2)`` made that were never committed."""
        rows = self._db.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE committed = 0")
        return [Inode(*r) for r in rows.fetchall()]

    # -- content not yet on the disk (kachery_fs.fs.durability) -------------------------

    def unsynced_seq(self) -> int:
        """The newest entry of the ``unsynced`` log (0: none)."""
        return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM unsynced").fetchone()[0]

    def unsynced_changes(self) -> list[Unsynced]:
        """Every entry of the ``unsynced`` log, oldest first."""
        rows = self._db.execute("SELECT seq, inode, sha1, size, prev_sha1, prev_size,"
                                " prev_committed FROM unsynced ORDER BY seq")
        return [Unsynced(*r) for r in rows.fetchall()]

    def forget_unsynced(self, through: int) -> None:
        """Entries up to ``through`` of the ``unsynced`` log are on the disk."""
        self._db.execute("DELETE FROM unsynced WHERE seq <= ?", (through,))

    def channel_times(self, channel: str) -> tuple[int, int]:
        """(mtime, ctime) of a channel directory, in ns."""
        row = self._db.execute("SELECT mtime_ns, ctime_ns FROM channels WHERE name = ?",
                               (channel,)).fetchone()
        return (row[0], row[1]) if row else (0, 0)

    def touch_channel(self, channel: str, now_ns: int) -> None:
        """A name was added to or removed from a channel directory."""
        self._db.execute("UPDATE channels SET mtime_ns = ?, ctime_ns = ? WHERE name = ?",
                         (now_ns, now_ns, channel))

    def uploaded_sha1s(self) -> set[str]:
        """Hashes this node has uploaded or queued for upload, in any state."""
        return {r[0] for r in self._db.execute("SELECT DISTINCT sha1 FROM uploads")}

    def pinned_sha1s(self) -> set[str]:
        """Hashes the local store may not evict: the content of files (also those open
        after their last name went), of uploads in any state but done, and what a file
        had before a change that may not be on the disk yet (a crash goes back to it)."""
        rows = self._db.execute(
            "SELECT sha1 FROM inodes WHERE sha1 IS NOT NULL"
            " UNION SELECT sha1 FROM uploads WHERE state != 'done'"
            " UNION SELECT prev_sha1 FROM unsynced WHERE prev_sha1 IS NOT NULL")
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
