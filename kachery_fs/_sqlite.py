"""The one place where kachery-fs opens a SQLite database and brings its schema forward.

kachery-fs keeps four database files: ``node.db`` (:mod:`kachery_fs.state`), ``store.db``
(:mod:`kachery_fs.cache`), ``hub.db`` (:mod:`kachery_fs.hub.storage`, for every part of
the hub) and the node's feeds database (:mod:`kachery_fs.feeds.db`). Each has one
:class:`Schema`: its connection settings and an ordered list of numbered migrations.
Version *n* of a database is what migrations 1 to *n* make; the file says which version
it is in ``PRAGMA user_version``.

Contracts:

* Every connection is opened by :meth:`Schema.open`: busy timeout 30 s, autocommit
  (``isolation_level=None``: each statement commits unless the caller began a
  transaction), usable from any thread (callers serialize their use), WAL journal, and the
  schema's own ``synchronous`` and ``foreign_keys`` settings.
* Migration 1 of every schema is the schema of kachery-fs 0.1.0, written with ``IF NOT
  EXISTS``: a database made before the versions were numbered (``user_version`` 0, its
  tables present) is brought forward without losing a row. A later migration that
  replaces what 0.1.0 did ad hoc checks what is there (a column that 0.1.0 added may or
  may not be present).
* A released migration is never edited: a change of schema is a new migration at the end.
* Each migration runs in its own ``BEGIN IMMEDIATE`` transaction, which reads
  ``user_version`` again first and sets it last. Several processes may open one file at
  once (a mount and ``kachery-fs cat``): the first to take the write lock migrates, the
  others find the work done; a migration that fails leaves the database at the version
  before it.
* A database whose version is past the newest this kachery-fs knows is refused with
  :class:`~kachery_fs.errors.NewerDatabase`, before anything is written to it.
* Each migration applied is recorded in the table ``kachery_fs_migrations`` (the version,
  the kachery-fs version that applied it, when). That table's shape never changes: an
  older kachery-fs reads it to tell the user which kachery-fs made a database it refuses.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import NewerDatabase

log = logging.getLogger(__name__)

#: How long a statement waits for another process's lock on the database.
BUSY_TIMEOUT_S = 30.0

_HISTORY = """CREATE TABLE IF NOT EXISTS kachery_fs_migrations (
    version INTEGER PRIMARY KEY,
    kachery_fs TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


@dataclass(frozen=True)
class Migration:
    """One numbered step of a schema: ``sql`` (statements separated by ``;``), then
    ``run`` (for a step that must look at the database first), in one transaction."""

    version: int
    summary: str
    sql: str = ""
    run: Callable[[sqlite3.Connection], None] | None = None


@dataclass(frozen=True)
class Schema:
    """A database file's connection settings and migrations (see the module docstring)."""

    name: str
    migrations: Sequence[Migration]
    #: ``PRAGMA synchronous`` for every connection (None: SQLite's default, FULL).
    synchronous: str | None = None
    #: ``PRAGMA foreign_keys=ON`` for every connection.
    foreign_keys: bool = False

    def __post_init__(self):
        numbers = [m.version for m in self.migrations]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"{self.name}: migrations must be numbered 1, 2, ...: {numbers}")

    @property
    def version(self) -> int:
        """The version this kachery-fs makes and reads."""
        return len(self.migrations)

    def open(self, path: Path | str, *,
             factory: type[sqlite3.Connection] = sqlite3.Connection) -> sqlite3.Connection:
        """A connection to the database at ``path`` (made if absent), at :attr:`version`.

        Raises :class:`~kachery_fs.errors.NewerDatabase` for a database of a newer
        kachery-fs.
        """
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                             check_same_thread=False, factory=factory)
        try:
            if (version := user_version(db)) > self.version:
                raise _newer(db, self, version)  # before the journal mode is changed
            _use_wal(db)
            if self.synchronous is not None:
                db.execute(f"PRAGMA synchronous={self.synchronous}")
            if self.foreign_keys:
                db.execute("PRAGMA foreign_keys=ON")
            self.migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def migrate(self, db: sqlite3.Connection) -> None:
        """Bring the database of connection ``db`` (in autocommit mode, no transaction
        open) to :attr:`version`; cheap when it is there already."""
        version = user_version(db)
        if version == 0 and _has_tables(db):
            log.info("%s was made before kachery-fs numbered its database versions:"
                     " bringing it to version %d", _where(db, self), self.version)
        while version < self.version:
            db.execute("BEGIN IMMEDIATE")
            try:
                version = user_version(db)  # another process may have migrated meanwhile
                if version < self.version:
                    migration = self.migrations[version]
                    for statement in statements(migration.sql):
                        db.execute(statement)
                    if migration.run is not None:
                        migration.run(db)
                    db.execute(_HISTORY)
                    db.execute("INSERT OR REPLACE INTO kachery_fs_migrations"
                               " (version, kachery_fs, applied_at) VALUES (?, ?, ?)",
                               (migration.version, __version__, time.time()))
                    db.execute(f"PRAGMA user_version = {migration.version:d}")
                    version = migration.version
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            log.debug("%s is at version %d", _where(db, self), version)
        if version > self.version:
            raise _newer(db, self, version)


def _use_wal(db: sqlite3.Connection) -> None:
    """Put the database of ``db`` in WAL mode (a setting the file keeps).

    Switching a new file to WAL needs it to itself, and SQLite does not wait for that
    with its busy timeout: while another process switches it or reads it, the switch
    fails at once with "database is locked". It is tried again here, within the same
    :data:`BUSY_TIMEOUT_S`; a file already in WAL mode is left as it is.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    pause = 0.001
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def user_version(db: sqlite3.Connection) -> int:
    """The schema version that the database of ``db`` records (0: none)."""
    return db.execute("PRAGMA user_version").fetchone()[0]


def statements(script: str) -> list[str]:
    """The SQL statements of ``script``, each complete (a trigger's body stays whole)."""
    found, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            found.append(current.strip())
            current = ""
    if current.strip():
        found.append(current.strip())  # comments only, or an error SQLite will name
    return found


def _has_tables(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'"
                      " LIMIT 1").fetchone() is not None


def _where(db: sqlite3.Connection, schema: Schema) -> str:
    """The file of ``db``, for messages (the schema's file name for one in memory)."""
    for _, name, file in db.execute("PRAGMA database_list"):
        if name == "main" and file:
            return file
    return schema.name


def _newer(db: sqlite3.Connection, schema: Schema, version: int) -> NewerDatabase:
    made_by = None
    try:
        row = db.execute("SELECT kachery_fs FROM kachery_fs_migrations WHERE version = ?",
                         (version,)).fetchone()
        made_by = row[0] if row else None
    except sqlite3.DatabaseError:  # no such table: made by something else
        pass
    maker = f"kachery-fs {made_by}" if made_by else "a newer kachery-fs"
    upgrade = f"kachery-fs {made_by} or later" if made_by else "a newer kachery-fs"
    return NewerDatabase(
        f"{_where(db, schema)} was made by {maker} (database version {version}); this"
        f" kachery-fs {__version__} knows versions up to {schema.version} and leaves it"
        f" untouched: use {upgrade} (pip install --upgrade kachery-fs)")
