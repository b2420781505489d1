"""The hub's state: channels, authorizations, seen nonces, finalized objects.

In SQLite (``hub.db``, the default) or PostgreSQL (``hub.database``: the same SQL on
either). The schema of the whole ``hub.db`` is here (:data:`SCHEMA`, one ordered list of
migrations), also for the tables that ``hub.requests``, ``hub.feeds``, ``hub.cache`` and
``hub.manifests`` query on this database; PostgreSQL's is ``hub.database.PG_MIGRATIONS``.
The objects table is kept by ``hub.cache`` (its own columns are migration 2); the
manifests vouched for are migration 3.

Short synchronous statements, called from the hub's trio thread. Every change is
committed at once, so a permission change is in force for the very next request.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .._sqlite import Migration, Schema
from ..errors import Conflict, NotFound
from .database import Database, PostgresDatabase, SQLiteDatabase, is_postgresql

# Version 1 of hub.db: the tables of this module, then those of hub.requests, hub.feeds
# and hub.cache (as each created them on the hub's connection in kachery-fs 0.1.0).
_V1 = """
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    bucket_uri TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS authorizations (
    channel TEXT NOT NULL REFERENCES channels(name) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    permissions TEXT NOT NULL,
    label TEXT,
    PRIMARY KEY (channel, node_id)
);
CREATE TABLE IF NOT EXISTS nonces (
    node_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (node_id, nonce)
);
CREATE INDEX IF NOT EXISTS nonces_ts ON nonces (ts);
CREATE TABLE IF NOT EXISTS objects (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    size INTEGER NOT NULL,
    finalized_at REAL NOT NULL,
    finalized_by TEXT NOT NULL,
    PRIMARY KEY (channel, sha1)
);
-- hub.requests
CREATE TABLE IF NOT EXISTS file_requests (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (channel, sha1)
);
-- hub.feeds
CREATE TABLE IF NOT EXISTS subfeeds (
    channel TEXT NOT NULL,
    feed_id TEXT NOT NULL,
    subfeed_hash TEXT NOT NULL,
    message_count INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (channel, feed_id, subfeed_hash)
);
-- hub.cache
CREATE TABLE IF NOT EXISTS cache_settings (
    channel TEXT PRIMARY KEY,
    allocation INTEGER,
    low_watermark REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_counters (
    channel TEXT NOT NULL,
    name TEXT NOT NULL,
    count INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, name)
);
CREATE TABLE IF NOT EXISTS cache_since (
    channel TEXT PRIMARY KEY,
    since REAL NOT NULL
);
"""

#: The columns that hub.cache keeps in ``objects``. kachery-fs 0.1.0 added the missing
#: ones on every start, so a database made before the versions were numbered may have
#: all of them or none.
OBJECT_CACHE_COLUMNS = {
    "stored": "INTEGER NOT NULL DEFAULT 1",
    "last_demand": "REAL NOT NULL DEFAULT 0",
    "downloads": "INTEGER NOT NULL DEFAULT 0",
    "evicted_at": "REAL",
}


def _add_object_cache_columns(db: sqlite3.Connection) -> None:
    have = {row[1] for row in db.execute("PRAGMA table_info(objects)")}
    for name, decl in OBJECT_CACHE_COLUMNS.items():
        if name not in have:
            db.execute(f"ALTER TABLE objects ADD COLUMN {name} {decl}")
    db.execute("CREATE INDEX IF NOT EXISTS objects_lru ON objects (channel, stored, last_demand)")


# Version 3: the manifests of large files that nodes vouched for (hub.manifests), and what
# became of each node's vouches.
_V3 = """
CREATE TABLE manifests (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,             -- a large file's SHA-1
    manifest TEXT NOT NULL,         -- the SHA-1 of its kachery manifest
    vouched_by TEXT NOT NULL,       -- the node that vouched for it at its finalize
    vouched_at REAL NOT NULL,
    PRIMARY KEY (channel, sha1)
) WITHOUT ROWID;
CREATE TABLE manifest_vouchers (
    channel TEXT NOT NULL,
    node_id TEXT NOT NULL,
    vouched INTEGER NOT NULL DEFAULT 0,   -- vouches recorded
    refused INTEGER NOT NULL DEFAULT 0,   -- vouches whose check failed
    disputed INTEGER NOT NULL DEFAULT 0,  -- recorded vouches a reader reported as lies
    PRIMARY KEY (channel, node_id)
) WITHOUT ROWID;
"""

# Version 4: private channels, whose bucket objects are read only through signed URLs.
_V4 = """
ALTER TABLE channels ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
"""

# Version 5: what several hub processes on one database share, that each kept to itself
# before: the providers connected to each (hub.requests), the uploads signed and not
# finalized, and the requested objects kept for their requesters (hub.cache).
_V5 = """
CREATE TABLE listeners (
    hub TEXT NOT NULL,              -- a hub process (random at each start)
    node_id TEXT NOT NULL,          -- a provider connected to it
    seen_at REAL NOT NULL,          -- when it was last listening there
    PRIMARY KEY (hub, node_id)
);
CREATE INDEX listeners_node ON listeners (node_id);
CREATE TABLE uploads (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    node_id TEXT NOT NULL,          -- the node the upload URL was signed for
    signed_at REAL NOT NULL,
    PRIMARY KEY (channel, sha1)
);
CREATE INDEX uploads_node ON uploads (node_id, signed_at);
CREATE TABLE holds (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    until REAL NOT NULL,            -- kept in the bucket for its requesters until then
    PRIMARY KEY (channel, sha1)
);
"""

#: ``hub.db``'s versions (see :mod:`kachery_fs._sqlite`), for every part of the hub: they
#: keep their queries, the schema of the file is here. Version 2 is kachery-fs 0.1.0's.
SCHEMA = Schema("hub.db", foreign_keys=True, migrations=(
    Migration(1, "channels, authorizations, nonces, objects, file requests, subfeed counts,"
                 " bucket cache settings and counters", _V1),
    Migration(2, "objects: the bucket cache's columns (stored, last demand, downloads,"
                 " evicted at) and its eviction index", run=_add_object_cache_columns),
    Migration(3, "manifests of large files vouched for by nodes, and each node's vouches"
                 " (recorded, refused, disputed)", _V3),
    Migration(4, "channels: private (objects read through signed URLs only)", _V4),
    Migration(5, "what hub processes share: connected providers, uploads in flight,"
                 " requested objects' holds", _V5),
))


@dataclass(frozen=True)
class ChannelRecord:
    name: str
    bucket_uri: str
    created_at: float
    #: Its bucket objects are not publicly readable: members read them through short-lived
    #: signed URLs from the hub (``signReads``).
    private: bool = False


_CHANNEL_COLS = "name, bucket_uri, created_at, private"


def _channel(row) -> ChannelRecord:
    name, bucket_uri, created_at, private = row
    return ChannelRecord(name, bucket_uri, created_at, bool(private))


#: How often nonces past their use are deleted.
NONCE_PRUNE_S = 10.0


def open_database(where: Path | str) -> Database:
    """The hub's state at ``where``: a ``postgresql://`` URL, or the path of ``hub.db``."""
    if is_postgresql(where):
        from .database import PG_MIGRATIONS

        return PostgresDatabase(str(where), PG_MIGRATIONS)
    return SQLiteDatabase(where, SCHEMA)


def as_database(db: Database | sqlite3.Connection) -> Database:
    """``db``, or a bare SQLite connection (autocommit) brought to :data:`SCHEMA`, as a
    :class:`Database` for the parts of the hub."""
    if isinstance(db, Database):
        return db
    return SQLiteDatabase(":memory:", SCHEMA, connection=db)


class HubDB:
    def __init__(self, where: Path | str | Database):
        """The state at ``where``: a database, a ``postgresql://`` URL, or a path of a
        ``hub.db`` (made if absent)."""
        self._db = where if isinstance(where, Database) else open_database(where)
        self._nonces_pruned_at = float("-inf")
        self._bucket_uris: dict[str, str] = {}

    def close(self) -> None:
        self._db.close()

    @property
    def database(self) -> Database:
        """For the parts of the hub that keep their own tables in this database."""
        return self._db

    def providers(self, channel: str) -> set[str]:
        """The nodes that may provide files on ``channel``."""
        return {node for node, perms in self.authorizations(channel).items()
                if "provideFiles" in perms}

    # -- channels -------------------------------------------------------------------

    def create_channel(self, name: str, bucket_uri: str, *,
                       private: bool = False) -> ChannelRecord:
        if not self._db.execute("INSERT INTO channels (name, bucket_uri, created_at, private)"
                                " VALUES (?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                                (name, bucket_uri, time.time(), int(private))).rowcount:
            raise Conflict(f"channel {name!r} already exists")
        return self.channel(name)

    def channel(self, name: str) -> ChannelRecord:
        row = self._db.execute(f"SELECT {_CHANNEL_COLS} FROM channels WHERE name = ?",
                               (name,)).fetchone()
        if row is None:
            raise NotFound(f"no channel named {name!r} on this hub")
        return _channel(row)

    def bucket_uri(self, name: str) -> str:
        """Channel ``name``'s bucket (NotFound if there is none), remembered: a channel's
        bucket never changes, and most hub calls need it."""
        uri = self._bucket_uris.get(name)
        if uri is None:
            uri = self._bucket_uris[name] = self.channel(name).bucket_uri
        return uri

    def channels(self) -> list[ChannelRecord]:
        """Every channel, by name (in code point order, whatever the database's collation)."""
        rows = self._db.execute(f"SELECT {_CHANNEL_COLS} FROM channels")
        return sorted((_channel(r) for r in rows), key=lambda c: c.name)

    def set_private(self, name: str, private: bool) -> ChannelRecord:
        """Make channel ``name`` private or public; NotFound if there is none."""
        if self._db.execute("UPDATE channels SET private = ? WHERE name = ?",
                            (int(private), name)).rowcount == 0:
            raise NotFound(f"no channel named {name!r} on this hub")
        return self.channel(name)

    def is_public(self, name: str) -> bool:
        """Whether ``name`` is exactly the name of a public channel, and no private channel's
        name differs from it in case only (on a file system that ignores case, such as
        macOS's, ``lab/...`` would open the objects of a private ``Lab``). What the local
        bucket asks before every anonymous read (an indexed lookup)."""
        rows = self._db.execute("SELECT name, private FROM channels WHERE lower(name) ="
                                " lower(?)", (name,)).fetchall()
        return any(n == name for n, _ in rows) and not any(p for _, p in rows)

    # -- authorizations -------------------------------------------------------------------

    def set_permissions(self, channel: str, node_id: str, permissions: set[str],
                        label: str | None = None) -> None:
        if not permissions:
            self._db.execute("DELETE FROM authorizations WHERE channel = ? AND node_id = ?",
                             (channel, node_id))
            return
        self._db.execute(
            "INSERT INTO authorizations (channel, node_id, permissions, label) VALUES (?, ?, ?, ?)"
            " ON CONFLICT(channel, node_id) DO UPDATE SET permissions = excluded.permissions,"
            " label = COALESCE(excluded.label, authorizations.label)",
            (channel, node_id, json.dumps(sorted(permissions)), label))

    def permissions(self, channel: str, node_id: str) -> frozenset[str]:
        row = self._db.execute(
            "SELECT permissions FROM authorizations WHERE channel = ? AND node_id = ?",
            (channel, node_id)).fetchone()
        return frozenset(json.loads(row[0])) if row else frozenset()

    def authorizations(self, channel: str) -> dict[str, list[str]]:
        rows = self._db.execute(
            "SELECT node_id, permissions FROM authorizations WHERE channel = ? ORDER BY node_id",
            (channel,))
        return {r[0]: json.loads(r[1]) for r in rows}

    def channels_of(self, node_id: str) -> list[str]:
        """The channels where ``node_id`` holds any permission."""
        rows = self._db.execute("SELECT channel FROM authorizations WHERE node_id = ?",
                                (node_id,))
        return [r[0] for r in rows]

    # -- replay protection -------------------------------------------------------------

    def remember_nonce(self, node_id: str, nonce: str, *, now: float, keep_s: float) -> bool:
        """Record a nonce; False if this node already used it (a replay). Nonces older
        than ``keep_s`` are deleted every :data:`NONCE_PRUNE_S` (a request that old is
        refused for its timestamp anyway), not at every request: that would be a second
        write, and a second sync of the database, per request."""
        if not 0 <= now - self._nonces_pruned_at < NONCE_PRUNE_S:
            self._db.execute("DELETE FROM nonces WHERE ts < ?", (now - keep_s,))
            self._nonces_pruned_at = now
        return bool(self._db.execute("INSERT INTO nonces (node_id, nonce, ts) VALUES (?, ?, ?)"
                                     " ON CONFLICT (node_id, nonce) DO NOTHING",
                                     (node_id, nonce, now)).rowcount)
