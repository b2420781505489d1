"""The hub's database: SQLite (embedded, the default) or PostgreSQL (several hub processes
on one state).

Every part of the hub (``hub.storage``, ``hub.requests``, ``hub.feeds``, ``hub.cache``,
``hub.manifests``) queries one :class:`Database` with the same SQL, written in what both
engines read alike:

* ``?`` placeholders (turned into psycopg's ``%s`` for PostgreSQL);
* ``INSERT ... ON CONFLICT (columns) DO UPDATE SET ... excluded.x`` or ``DO NOTHING``
  (no ``INSERT OR REPLACE``/``OR IGNORE``), and a column of the row already there named
  with its table (``counters.count + 1``: PostgreSQL finds a bare ``count`` ambiguous);
  whether an insert happened is its ``rowcount``, so that no constraint error is expected;
* ``CAST(... AS BIGINT)`` around a ``SUM`` (PostgreSQL's is a ``numeric``).

Each statement commits by itself; :meth:`Database.transaction` runs several as one, with
every other writer of the hub's state (in any hub process) kept out meanwhile: SQLite's
``BEGIN IMMEDIATE``, a PostgreSQL transaction under one advisory lock. A transaction holds
no ``await``: the hub's calls are short and synchronous, on the trio thread.

**PostgreSQL** is reached with psycopg 3, synchronously, from the trio thread, as SQLite
is: psycopg's and asyncpg's asynchronous interfaces need asyncio, and a second event
loop in the hub (trio-asyncio) would buy nothing for statements that take a tenth of a
millisecond on a local network. A statement is bounded (``statement_timeout``) so that a
stalled server cannot hold the hub for long; a lost connection fails the hub call that
met it with ``Unavailable`` (nodes retry) and is opened again for the next one. Waiting
for notifications (``LISTEN``) runs on a connection and a thread of its own
(``hub.notify``).

The PostgreSQL schema has its own versions (:data:`PG_MIGRATIONS`), recorded in the
table ``kachery_fs_migrations`` as in SQLite; its version 1 holds what ``hub.db`` version
5 holds, with PostgreSQL's types (``BIGINT`` sizes, ``DOUBLE PRECISION`` times).
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import __version__, metrics
from .._sqlite import Migration, Schema, statements
from ..errors import InvalidInput, NewerDatabase, Unavailable

log = logging.getLogger(__name__)

#: The longest one statement may run on PostgreSQL before the server cancels it.
STATEMENT_TIMEOUT_S = 20.0
#: How long opening a connection to PostgreSQL may take.
CONNECT_TIMEOUT_S = 10
#: A transaction left open (its hub process stopped, or cut off) is ended by the server
#: after this long, so that the lock it holds does not stop every other hub process; and
#: the longest a statement waits for a lock.
IDLE_IN_TRANSACTION_S = 10.0
LOCK_TIMEOUT_S = 5.0
#: TCP keepalives and a bound on unacknowledged data: a connection whose server or network
#: went silent fails within seconds instead of hanging until TCP gives up (many minutes).
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                               "keepalives_count": 3, "tcp_user_timeout": 10_000}
#: After a failed connection attempt, calls fail at once for this long before the next
#: attempt (each may take CONNECT_TIMEOUT_S, on the hub's event loop).
RECONNECT_PAUSE_S = 2.0
#: The advisory lock keys: the hub's writers' transactions, and migrations.
_WRITE_LOCK = 0x6B616368  # "kach"
_MIGRATION_LOCK = 0x6B667321  # "kfs!"


def is_postgresql(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Database:
    """One connection to the hub's state (see the module docstring)."""

    #: "sqlite" or "postgresql".
    engine: str
    #: What a broken constraint raises (a caller that expects none may still meet one).
    IntegrityError: type[Exception]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; a cursor (``fetchone``, ``fetchall``, iteration,
        ``rowcount``)."""
        raise NotImplementedError

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """The statements of the block as one transaction, with every other writer of the
        hub's state kept out (rolled back if the block raises)."""
        raise NotImplementedError
        yield

    def close(self) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        """Where the state is, for messages."""
        raise NotImplementedError


class SQLiteDatabase(Database):
    engine = "sqlite"
    IntegrityError = sqlite3.IntegrityError

    def __init__(self, path: Path | str, schema: Schema, *,
                 connection: sqlite3.Connection | None = None):
        """``path`` opened at ``schema``'s version; or ``connection``, already open (in
        autocommit mode), brought to it."""
        self.path = path
        if connection is None:
            connection = schema.open(path)
        else:
            schema.migrate(connection)
        self.connection = connection

    def execute(self, sql, params=()):
        return self.connection.execute(sql, params)

    def executemany(self, sql, rows):
        self.connection.executemany(sql, rows)

    @contextmanager
    def transaction(self):
        started = time.monotonic()
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.connection.execute("COMMIT")
        except BaseException:
            if self.connection.in_transaction:  # a COMMIT that failed may leave it open
                self.connection.execute("ROLLBACK")
            raise
        finally:
            metrics.HUB_TRANSACTION_SECONDS.observe(time.monotonic() - started)

    def close(self):
        self.connection.close()

    def describe(self):
        return str(self.path)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@functools.lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """SQL with ``?`` placeholders as psycopg wants it (``%s``, and ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise InvalidInput("a PostgreSQL database needs psycopg: pip install"
                           " 'kachery-fs[postgresql]'") from None
    return psycopg


class PostgresDatabase(Database):
    engine = "postgresql"

    def __init__(self, url: str, migrations: Sequence[Migration]):
        self._psycopg = _psycopg()
        self.url = url
        self.IntegrityError = self._psycopg.IntegrityError
        self._migrations = migrations
        self._retry_at = 0.0
        self._conn = self._connect()
        try:
            with self._errors("bringing its tables to this kachery-fs's version"):
                migrate_postgres(self._conn, migrations)
        except BaseException:
            self._conn.close()
            raise

    def _connect(self):
        options = " ".join(f"-c {name}={int(seconds * 1000)}" for name, seconds in (
            ("statement_timeout", STATEMENT_TIMEOUT_S), ("lock_timeout", LOCK_TIMEOUT_S),
            ("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION_S)))
        try:
            return self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                application_name="kachery-fs hub", options=options, **KEEPALIVES)
        except self._psycopg.OperationalError as exc:
            self._retry_at = time.monotonic() + RECONNECT_PAUSE_S
            raise Unavailable(f"cannot connect to the hub's database {redact(self.url)}:"
                              f" {_first_line(exc)}", retry_after=5) from None
        except self._psycopg.Error as exc:  # a URL that does not parse, say
            raise InvalidInput(f"cannot use the hub's database {redact(self.url)}:"
                               f" {_first_line(exc)}") from None

    @property
    def connection(self):
        """The psycopg connection (opened again if it was lost, at most every
        :data:`RECONNECT_PAUSE_S`)."""
        if self._conn.closed:
            if time.monotonic() < self._retry_at:
                raise Unavailable(f"the hub's database {self.describe()} is unreachable",
                                  retry_after=5)
            log.warning("the connection to %s was lost; opening it again", self.describe())
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def _errors(self, doing: str | None = None) -> Iterator[None]:
        """psycopg's errors as the project's: a lost connection, a cancelled statement or
        a lock not had in time is ``Unavailable`` (nodes retry); with ``doing``, any other
        is ``InvalidInput`` saying what was being done (a database that is not the hub's,
        a role without rights)."""
        try:
            yield
        except (self._psycopg.OperationalError, self._psycopg.errors.QueryCanceled,
                self._psycopg.errors.LockNotAvailable) as exc:
            raise Unavailable(f"the hub's database {self.describe()} failed:"
                              f" {_first_line(exc)}", retry_after=2) from None
        except self._psycopg.Error as exc:
            if doing is None:
                raise
            raise InvalidInput(f"the hub's database {self.describe()}, {doing}:"
                               f" {_first_line(exc)}") from None

    def execute(self, sql, params=()):
        with self._errors():
            return self.connection.execute(_pg_sql(sql), params)

    def executemany(self, sql, rows):
        with self._errors(), self.connection.cursor() as cursor:
            cursor.executemany(_pg_sql(sql), list(rows))

    @contextmanager
    def transaction(self):
        started = time.monotonic()
        try:
            with self._errors():
                connection = self.connection
                with connection.transaction():
                    connection.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
                    yield
        finally:
            metrics.HUB_TRANSACTION_SECONDS.observe(time.monotonic() - started)

    def close(self):
        self._conn.close()

    def describe(self):
        return redact(self.url)


# -- the PostgreSQL schema's versions ----------------------------------------------------

_PG_V1 = """
CREATE TABLE channels (
    name TEXT PRIMARY KEY,
    bucket_uri TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    private INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE authorizations (
    channel TEXT NOT NULL REFERENCES channels(name) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    permissions TEXT NOT NULL,
    label TEXT,
    PRIMARY KEY (channel, node_id)
);
CREATE INDEX authorizations_node ON authorizations (node_id);
CREATE TABLE nonces (
    node_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    ts DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (node_id, nonce)
);
CREATE INDEX nonces_ts ON nonces (ts);
CREATE TABLE objects (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    size BIGINT NOT NULL,
    finalized_at DOUBLE PRECISION NOT NULL,
    finalized_by TEXT NOT NULL,
    stored INTEGER NOT NULL DEFAULT 1,
    last_demand DOUBLE PRECISION NOT NULL DEFAULT 0,
    downloads BIGINT NOT NULL DEFAULT 0,
    evicted_at DOUBLE PRECISION,
    PRIMARY KEY (channel, sha1)
);
CREATE INDEX objects_lru ON objects (channel, stored, last_demand);
CREATE TABLE file_requests (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (channel, sha1)
);
CREATE TABLE subfeeds (
    channel TEXT NOT NULL,
    feed_id TEXT NOT NULL,
    subfeed_hash TEXT NOT NULL,
    message_count BIGINT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (channel, feed_id, subfeed_hash)
);
CREATE TABLE cache_settings (
    channel TEXT PRIMARY KEY,
    allocation BIGINT,
    low_watermark DOUBLE PRECISION NOT NULL
);
CREATE TABLE cache_counters (
    channel TEXT NOT NULL,
    name TEXT NOT NULL,
    count BIGINT NOT NULL DEFAULT 0,
    bytes BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, name)
);
CREATE TABLE cache_since (
    channel TEXT PRIMARY KEY,
    since DOUBLE PRECISION NOT NULL
);
CREATE TABLE manifests (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    manifest TEXT NOT NULL,
    vouched_by TEXT NOT NULL,
    vouched_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (channel, sha1)
);
CREATE TABLE manifest_vouchers (
    channel TEXT NOT NULL,
    node_id TEXT NOT NULL,
    vouched BIGINT NOT NULL DEFAULT 0,
    refused BIGINT NOT NULL DEFAULT 0,
    disputed BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (channel, node_id)
);
CREATE TABLE listeners (
    hub TEXT NOT NULL,
    node_id TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (hub, node_id)
);
CREATE INDEX listeners_node ON listeners (node_id);
CREATE TABLE uploads (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    node_id TEXT NOT NULL,
    signed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (channel, sha1)
);
CREATE INDEX uploads_node ON uploads (node_id, signed_at);
CREATE TABLE holds (
    channel TEXT NOT NULL,
    sha1 TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (channel, sha1)
);
"""

#: The PostgreSQL schema's versions; version 1 is ``hub.db`` version 5 (the tables that
#: ``hub migrate`` copies are those of :data:`TABLES`).
PG_MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the hub's state as in hub.db version 5: channels, authorizations, nonces,"
                 " objects, file requests, subfeed counts, bucket cache settings and"
                 " counters, vouched manifests, connected providers, uploads in flight,"
                 " holds", _PG_V1),
)

#: Every table of the hub's state, parents first (``hub migrate`` copies them in order).
TABLES = ("channels", "authorizations", "nonces", "objects", "file_requests", "subfeeds",
          "cache_settings", "cache_counters", "cache_since", "manifests",
          "manifest_vouchers", "listeners", "uploads", "holds")

_PG_HISTORY = """CREATE TABLE IF NOT EXISTS kachery_fs_migrations (
    version INTEGER PRIMARY KEY,
    kachery_fs TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL
)"""


def postgres_version(conn) -> int:
    """The schema version a PostgreSQL database records (0: none)."""
    exists = conn.execute("SELECT to_regclass('kachery_fs_migrations')").fetchone()[0]
    if exists is None:
        return 0
    return conn.execute("SELECT COALESCE(MAX(version), 0) FROM kachery_fs_migrations"
                        ).fetchone()[0]


def migrate_postgres(conn, migrations: Sequence[Migration]) -> None:
    """Bring the database of psycopg connection ``conn`` (autocommit) to the newest
    version, each migration in a transaction of its own under an advisory lock (several
    hub processes may start at once: the first migrates, the others find it done);
    NewerDatabase, touching nothing, for a database of a newer kachery-fs."""
    newest = len(migrations)
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            version = postgres_version(conn)
            if version > newest:
                row = conn.execute("SELECT kachery_fs FROM kachery_fs_migrations WHERE"
                                   " version = %s", (version,)).fetchone()
                maker = f"kachery-fs {row[0]}" if row else "a newer kachery-fs"
                raise NewerDatabase(
                    f"the hub's PostgreSQL database was made by {maker} (version {version});"
                    f" this kachery-fs {__version__} knows versions up to {newest} and"
                    " leaves it untouched: upgrade kachery-fs")
            if version == newest:
                return
            migration = migrations[version]
            for statement in statements(migration.sql):
                conn.execute(statement)
            conn.execute(_PG_HISTORY)
            conn.execute("INSERT INTO kachery_fs_migrations (version, kachery_fs,"
                         " applied_at) VALUES (%s, %s, %s)",
                         (migration.version, __version__, time.time()))
            log.info("the hub's PostgreSQL database is at version %d", migration.version)
