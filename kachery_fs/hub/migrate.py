"""``hub migrate``: move a hub's state from its ``hub.db`` (SQLite) to a PostgreSQL database.

With the hub stopped: ``hub.db`` is first brought to the newest version (what starting
this kachery-fs's hub would do), then every table of :data:`~kachery_fs.hub.database.TABLES`
but ``listeners`` (who was connected to a hub process that is gone) is copied into the
PostgreSQL database, which must hold no hub's state yet, in one transaction, with
``COPY``. The copy is verified by counting every table's rows on both sides before it
commits: a difference rolls it all back. ``hub.db`` is left as it was (apart from its
version), so going back is starting the old hub again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import Conflict, NotFound
from .database import TABLES, PostgresDatabase, SQLiteDatabase
from .storage import HubDB

log = logging.getLogger(__name__)

#: Tables not copied: what each hub process publishes about itself while it runs.
EPHEMERAL = ("listeners",)


@dataclass(frozen=True)
class Copied:
    table: str
    rows: int


def migrate(source_dir: Path, target_url: str) -> list[Copied]:
    """Copy the state of the hub whose directory is ``source_dir`` into the PostgreSQL
    database at ``target_url``; the rows copied per table (equal on both sides)."""
    path = Path(source_dir) / "hub.db"
    if not path.is_file():
        raise NotFound(f"{path} does not exist: give --from the directory of the hub whose"
                       " state to move (the --dir of its `hub serve`)")
    source = HubDB(path)
    try:
        target = HubDB(target_url)
        try:
            assert isinstance(source.database, SQLiteDatabase)
            assert isinstance(target.database, PostgresDatabase)
            with target.database._errors("copying the hub's state"):
                return _copy(source.database.connection, target.database)
        finally:
            target.close()
    finally:
        source.close()


def _copy(sqlite, target) -> list[Copied]:
    assert isinstance(target, PostgresDatabase)
    pg = target.connection
    tables = [t for t in TABLES if t not in EPHEMERAL]
    occupied = {t: pg.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    if any(occupied.values()):
        held = ", ".join(f"{n} {t}" for t, n in occupied.items() if n)
        raise Conflict(f"{target.describe()} already holds a hub's state ({held}); migrate"
                       " into an empty database")
    copied = []
    with pg.transaction():
        for table in tables:
            columns = [row[1] for row in sqlite.execute(f"PRAGMA table_info({table})")]
            names = ", ".join(columns)
            with pg.cursor() as cursor, cursor.copy(
                    f"COPY {table} ({names}) FROM STDIN") as copy:
                for row in sqlite.execute(f"SELECT {names} FROM {table}"):
                    copy.write_row(row)
            there = pg.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            here = sqlite.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
            if there != here:
                raise Conflict(f"table {table}: {here} rows in hub.db, {there} copied;"
                               " nothing was committed")
            copied.append(Copied(table, there))
            log.info("%s: %d rows", table, there)
    return copied
