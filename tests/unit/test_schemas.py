"""Versioned SQLite schemas: every database file of kachery-fs opens through
``kachery_fs._sqlite``, which brings it to the current version and refuses a newer one.

The files in ``databases-089f5a8/`` are databases as kachery-fs made them before the
versions were numbered (with the DDL it ran on every open at 089f5a8): ``user_version``
0, their tables present, a few rows in each.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest

from kachery_fs import __version__, _sqlite, state
from kachery_fs import cache as store_cache
from kachery_fs.errors import KacheryError, NewerDatabase
from kachery_fs.feeds import db as feeds_db
from kachery_fs.feeds.db import FeedStore
from kachery_fs.hub import storage as hub_storage
from kachery_fs.hub.cache import BucketCache
from kachery_fs.hub.feeds import FeedIndex
from kachery_fs.hub.storage import HubDB
from kachery_fs.state import NodeDB
from kachery_fs.store import Store

# -- the DDL before versions (089f5a8) ---------------------------------------------------

#: Databases made with the DDL of 089f5a8 (see its README): node.db, store.db and
#: feeds.db with a few rows; hub.db with rows and without the bucket cache's columns.
OLD_DATABASES = Path(__file__).parent / "databases-089f5a8"


# hub.db: hub.storage, then hub.requests, hub.feeds, hub.cache, in the order the hub made them
#: What hub.cache added to ``objects`` on every start when missing (089f5a8).
OLD_OBJECT_COLUMNS = {
    "stored": "INTEGER NOT NULL DEFAULT 1",
    "last_demand": "REAL NOT NULL DEFAULT 0",
    "downloads": "INTEGER NOT NULL DEFAULT 0",
    "evicted_at": "REAL",
}

H1, H2 = "a" * 40, "b" * 40
FEED = "c" * 64


def old_db(path, name):
    shutil.copyfile(OLD_DATABASES / name, path)
    assert version_of(path) == 0


def old_hub_db(path, columns=tuple(OLD_OBJECT_COLUMNS)):
    """A hub.db as kachery-fs made it before versions; ``columns``: the cache columns that
    ``objects`` has (none: a database from before the bucket cache)."""
    old_db(path, "hub.db")
    db = sqlite3.connect(path, isolation_level=None)
    for name in columns:
        db.execute(f"ALTER TABLE objects ADD COLUMN {name} {OLD_OBJECT_COLUMNS[name]}")
    if "stored" in columns and "last_demand" in columns:
        db.execute("CREATE INDEX IF NOT EXISTS objects_lru"
                   " ON objects (channel, stored, last_demand)")
    if "downloads" in columns:
        db.execute("UPDATE objects SET downloads = 3")
    db.close()


def rows(path, table):
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute(f"SELECT * FROM {table}"), key=repr)
    finally:
        db.close()


def version_of(path):
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA user_version").fetchone()[0]
    finally:
        db.close()


def schema_of(path):
    """What the file holds, the migrations' own record left out."""
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"
                                 " WHERE name NOT LIKE 'kachery_fs_migrations%'"))
    finally:
        db.close()


def history(path):
    return rows(path, "kachery_fs_migrations")


# -- one case per database file ------------------------------------------------------------


def open_node(path):
    NodeDB(path).close()


def open_store(path):
    Store(path.parent).cache.close()


def open_hub(path):
    HubDB(path).close()


def open_feeds(path):
    FeedStore(path).close()


DATABASES = {
    # name: (file name, Schema, open with the real class, tables whose rows must survive)
    # node.db's channels and entries change shape at version 2: see the test of that below
    "node.db": ("node.db", state.SCHEMA, open_node, ("uploads", "feed_singles")),
    "store.db": ("store.db", store_cache.SCHEMA, open_store, ("objects", "totals")),
    "hub.db": ("hub.db", hub_storage.SCHEMA, open_hub,
               ("channels", "authorizations", "nonces", "objects", "file_requests",
                "subfeeds", "cache_settings", "cache_counters", "cache_since")),
    "feeds.db": (feeds_db.FILENAME, feeds_db.SCHEMA, open_feeds, ("feeds", "subfeeds", "messages")),
}


def make_old(name, path):
    if name == "hub.db":
        old_hub_db(path)
    else:
        old_db(path, name)


@pytest.fixture(params=sorted(DATABASES))
def database(request, tmp_path):
    name = request.param
    filename, schema, opener, tables = DATABASES[name]
    return name, tmp_path / filename, schema, opener, tables


def test_a_database_of_the_previous_version_keeps_its_rows_and_gets_the_current_version(
        database):
    name, path, schema, opener, tables = database
    make_old(name, path)
    before = {table: rows(path, table) for table in tables}
    assert all(before.values())
    opener(path)
    assert version_of(path) == schema.version
    # Every row kept, with its values; columns added since come after them.
    after = {table: rows(path, table) for table in tables}
    assert {table: [row[:len(before[table][0])] for row in after[table]]
            for table in tables} == before
    if name == "hub.db":  # version 4: a channel made before is public
        assert [row[len(before["channels"][0]):] for row in after["channels"]] == [(0,)]
    assert [row[:2] for row in history(path)] == [
        (v, __version__) for v in range(1, schema.version + 1)]


def test_node_db_entries_become_inodes_with_the_same_numbers_and_one_name_each(tmp_path):
    path = tmp_path / "node.db"
    make_old("node.db", path)
    entries = rows(path, "entries")
    channels = rows(path, "channels")
    assert entries
    open_node(path)
    db = NodeDB(path)
    try:
        assert [c[:6] for c in rows(path, "channels")] == [c[:6] for c in channels]
        for id_, channel, parent, name, is_dir, sha1, size, mode, mtime_ns in entries:
            inode = db.lookup(channel, parent, name)
            assert inode is not None and inode.id == id_  # the same inode number
            assert (inode.is_dir, inode.sha1, inode.size, inode.mode & 0o7777,
                    inode.mtime_ns, inode.uid) == (bool(is_dir), sha1, size, mode & 0o7777,
                                                   mtime_ns, os.getuid())
            subdirs = sum(1 for e in entries if e[2] == id_ and e[4])
            assert inode.nlink == (2 + subdirs if is_dir else 1)
    finally:
        db.close()


def test_the_current_schema_is_the_previous_versions(database, tmp_path):
    """Version 1 (the hub's 2) is exactly what kachery-fs made before the versions."""
    name, path, schema, opener, _ = database
    make_old(name, path)
    fresh = tmp_path / "fresh" / path.name
    fresh.parent.mkdir()
    opener(fresh)
    opener(path)
    assert schema_of(fresh) == schema_of(path)


def test_opening_twice_changes_nothing(database):
    name, path, schema, opener, tables = database
    opener(path)
    first = schema_of(path), history(path)
    opener(path)
    assert (schema_of(path), history(path)) == first
    assert version_of(path) == schema.version


def test_a_database_of_a_newer_kachery_fs_is_refused_and_left_alone(database):
    name, path, schema, opener, _ = database
    opener(path)
    db = sqlite3.connect(path, isolation_level=None)
    newer = schema.version + 1
    db.execute("INSERT INTO kachery_fs_migrations VALUES (?, '9.9.9', 0)", (newer,))
    db.execute(f"PRAGMA user_version = {newer}")
    db.close()
    before = schema_of(path), history(path)
    with pytest.raises(NewerDatabase) as caught:
        opener(path)
    assert isinstance(caught.value, KacheryError)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "kachery-fs 9.9.9" in message
    assert f"version {newer}" in message and "upgrade" in message
    assert version_of(path) == newer
    assert (schema_of(path), history(path)) == before


def test_a_newer_database_without_its_record_is_refused_too(tmp_path):
    path = tmp_path / "node.db"
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(NewerDatabase, match="a newer kachery-fs"):
        NodeDB(path)


def test_a_fresh_database_gets_the_current_version(database):
    name, path, schema, opener, _ = database
    opener(path)
    assert version_of(path) == schema.version


# -- the hub's objects columns (an ALTER TABLE on every start before versions) --------------


@pytest.mark.parametrize("columns", [(), ("stored", "last_demand"), tuple(OLD_OBJECT_COLUMNS)],
                         ids=["none", "some", "all"])
def test_the_hub_cache_columns_are_added_where_missing(tmp_path, columns):
    path = tmp_path / "hub.db"
    old_hub_db(path, columns)
    hub = HubDB(path)
    try:
        db = hub.database.connection
        assert _sqlite.user_version(db) == hub_storage.SCHEMA.version
        names = [row[1] for row in db.execute("PRAGMA table_info(objects)")]
        assert names == ["channel", "sha1", "size", "finalized_at", "finalized_by",
                         "stored", "last_demand", "downloads", "evicted_at"][:len(names)]
        assert set(names) >= set(OLD_OBJECT_COLUMNS)
        assert db.execute("SELECT 1 FROM sqlite_master WHERE name = 'objects_lru'").fetchone()
        row = db.execute("SELECT size, stored, last_demand, downloads, evicted_at FROM objects"
                         " WHERE channel = 'lab' AND sha1 = ?", (H1,)).fetchone()
        assert row == (100, 1, 0, 3 if "downloads" in columns else 0, None)
        # the parts of the hub that query this connection find what they need
        cache = BucketCache(db, backend_of=lambda channel: None, held=lambda channel: set())
        assert cache.size_of("lab", H1) == 100
        assert cache.settings("lab") == (1000, 0.9)
        assert FeedIndex(db).count("lab", FEED, H2) == 7
        assert hub.permissions("lab", FEED) == {"provideFiles"}
        assert _sqlite.user_version(db) == hub_storage.SCHEMA.version
    finally:
        hub.close()


def test_the_hub_parts_bring_a_bare_connection_to_the_hub_schema():
    db = sqlite3.connect(":memory:", isolation_level=None)
    FeedIndex(db)
    assert _sqlite.user_version(db) == hub_storage.SCHEMA.version
    assert FeedIndex(db).count("lab", FEED, H2) == 0


# -- the mechanism ----------------------------------------------------------------------------


def test_several_processes_opening_one_new_database_migrate_it_once(tmp_path):
    path = tmp_path / "node.db"
    errors, start = [], threading.Barrier(6)

    def open_it():
        try:
            start.wait()
            NodeDB(path).close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert version_of(path) == state.SCHEMA.version
    assert [row[0] for row in history(path)] == list(range(1, state.SCHEMA.version + 1))


def test_a_failed_migration_leaves_the_version_before_it(tmp_path):
    def fail(db):
        db.execute("INSERT INTO things VALUES (2)")
        raise RuntimeError("migration 2 failed")

    one = _sqlite.Migration(1, "things", "CREATE TABLE things (n INTEGER);\n"
                                         "INSERT INTO things VALUES (1);")
    two = _sqlite.Migration(2, "more things", "CREATE TABLE more (n INTEGER);", run=fail)
    path = tmp_path / "test.db"
    with pytest.raises(RuntimeError):
        _sqlite.Schema("test.db", (one, two)).open(path)
    assert version_of(path) == 1
    assert rows(path, "things") == [(1,)]
    assert "more" not in {row[1] for row in schema_of(path)}
    _sqlite.Schema("test.db", (one,)).open(path).close()  # version 1 opens as before


def test_migrations_are_numbered_from_one():
    with pytest.raises(ValueError):
        _sqlite.Schema("x.db", (_sqlite.Migration(2, "two"),))


def test_statements_keep_a_trigger_whole():
    found = _sqlite.statements(store_cache.SCHEMA.migrations[0].sql)
    assert len(found) == 6
    assert found[4].startswith("CREATE TRIGGER") and found[4].endswith("END;")
