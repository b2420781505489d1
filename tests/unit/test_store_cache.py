"""The local store as a managed cache: index, limit, LRU eviction, pins, kachery stores as
sources.

In process with a real store and node database for the policy (what is evicted, in what
order, what survives a restart, how an old store gets indexed); the CLI's part in
tests/inproc/test_store_cache.py; content served from kachery stores and eviction through
real mounts in tests/mount/test_store_cache.py.
"""

from __future__ import annotations

import logging
import os

import pytest

from kachery_fs import cache
from kachery_fs.fs.namespace import Namespace
from kachery_fs.fs.vnodes import ChannelDir
from kachery_fs.state import NodeDB
from kachery_fs.store import Store

from ..stores import SIZE, content, fetched, present, read, sha1
from ..util import make_entry


def written(store: Store, data: bytes) -> str:
    """Commit ``data`` the way the mount commits a file written into it."""
    staging = store.new_staging()
    staging.write(0, data)
    return staging.commit()


@pytest.fixture
def node(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    yield tmp_path, db
    db.close()


def test_lru_eviction_keeps_what_is_pinned_and_what_is_open(node, monkeypatch):
    directory, db = node
    # No grace: a written file is kept only because its entry or upload pins it.
    monkeypatch.setattr(cache, "WRITTEN_GRACE_S", 0.0)
    store = Store(directory, limit=10 * SIZE, pinned=db.pinned_sha1s)
    w = written(store, content("written"))
    make_entry(db, "ch", 0, "mine.txt", is_dir=False, mode=0o644, sha1=w, size=SIZE)
    orphan = written(store, content("overwritten version"))  # no entry, no upload
    u = fetched(store, content("pending upload"))
    db.enqueue_upload("ch", u, SIZE, again=True)  # provided on request: not done yet
    d = fetched(store, content("done upload"))
    db.enqueue_upload("ch", d, SIZE)
    db.update_upload("ch", d, state="done")
    a = store.add_bytes(content("added"))  # `store add` / `put`
    r = fetched(store, content("open"))
    reader = store.open(r)  # held open, as a reader in the mount would
    f = [fetched(store, content(f"f{i}")) for i in range(1, 5)]
    assert store.cache.usage() == 10 * SIZE  # at the limit, not over: nothing evicted
    read(store, f[0])  # f1 is now the most recently read fetched object

    f.append(fetched(store, content("f5")))  # over: evict down to 90 %
    assert not present(store, orphan, d)  # least recently used first, pinned ones skipped
    assert present(store, w, u, a, r, *f) == {w, u, a, r, *f}
    assert store.cache.usage() == 9 * SIZE

    f.append(fetched(store, content("f6")))
    f.append(fetched(store, content("f7")))
    # r is older but open; f1 was read after f2 and f3 were stored.
    assert not present(store, f[1], f[2])
    assert present(store, w, u, a, r, f[0]) == {w, u, a, r, f[0]}

    os.close(reader)
    f.append(fetched(store, content("f8")))
    f.append(fetched(store, content("f9")))
    assert not present(store, r, f[3])
    assert f[0] in present(store, f[0])

    # Once nothing needs them, written content and finished uploads are cache too.
    Namespace(db).unlink(ChannelDir("ch"), "mine.txt")
    db.update_upload("ch", u, state="done")
    f.append(fetched(store, content("f10")))
    f.append(fetched(store, content("f11")))
    assert not present(store, w, u)
    assert a in present(store, a)  # added content is never evicted

    stats = store.cache.stats()
    assert stats["evictions"] == 8 and stats["evictedBytes"] == 8 * SIZE
    assert stats["bytes"] == 9 * SIZE and stats["objects"] == 9
    assert stats["pinnedBytes"] == SIZE  # a
    assert set(store.iter_hashes()) == {a, f[0], *f[4:]}  # the index matches the disk
    store.close()


def test_written_content_is_kept_while_its_entry_is_being_recorded(node):
    directory, db = node
    store = Store(directory, limit=2 * SIZE, pinned=db.pinned_sha1s)
    w = written(store, content("just committed"))  # no entry yet
    for tag in ("x", "y", "z"):
        fetched(store, content(tag))
    assert w in present(store, w)
    store.close()


def test_pinned_content_over_the_limit_warns_and_never_fails_a_write(node, caplog):
    directory, db = node
    store = Store(directory, limit=3 * SIZE, pinned=db.pinned_sha1s)
    x = fetched(store, content("cache"))
    with caplog.at_level(logging.WARNING, logger="kachery_fs.cache"):
        added = [store.add_bytes(content(f"added {i}")) for i in range(4)]
        w = written(store, content("written"))
        make_entry(db, "ch", 0, "w", is_dir=False, mode=0o644, sha1=w, size=SIZE)
    assert present(store, *added, w) == {*added, w}  # every write went through
    assert not store.has(x)  # what could go, went
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # said once, not at every insert
    assert "more than its limit" in warnings[0] and "--cache-size" in warnings[0]
    store.close()


def test_a_long_eviction_pass_is_cut_into_short_transactions(node, monkeypatch):
    directory, db = node
    monkeypatch.setattr(cache, "EVICT_BATCH", 3)
    store = Store(directory, pinned=db.pinned_sha1s)
    hashes = [fetched(store, content(f"object {i}")) for i in range(20)]
    store.cache.limit = 10 * SIZE  # lowered: 20 objects, down to 9 in batches of 3
    assert store.cache.evict() == (11, 11 * SIZE)
    assert present(store, *hashes) == set(hashes[11:])
    assert store.cache.usage() == 9 * SIZE
    store.close()


def test_a_store_without_an_index_is_indexed_once(node):
    directory, db = node
    objects = {}
    for i, tag in enumerate(("put", "named", "old", "older", "uploading")):
        data = content(tag, SIZE + i)
        h = sha1(data)
        path = directory / "sha1" / h[:2] / h[2:4] / h[4:6] / h
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o444)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # the oldest first
        objects[tag] = h
    make_entry(db, "ch", 0, "named", is_dir=False, mode=0o644, sha1=objects["named"],
                    size=SIZE + 1)
    db.enqueue_upload("ch", objects["uploading"], SIZE + 4)
    # `put` by the earlier version, uploaded since: it must never become evictable cache.
    db.enqueue_upload("ch", objects["put"], SIZE)
    db.update_upload("ch", objects["put"], state="done")
    assert not (directory / cache.INDEX_FILE).exists()  # as an earlier version left it

    store = Store(directory, pinned=db.pinned_sha1s, uploaded=db.uploaded_sha1s)
    assert store.cache.usage() == 5 * SIZE + 10
    assert store.cache.stats()["objects"] == 5
    store.close()

    store = Store(directory, limit=5 * SIZE, pinned=db.pinned_sha1s)
    assert store.cache.usage() == 5 * SIZE + 10  # read from the index, not walked again
    new = fetched(store, content("new"))
    # Over the limit: the unpinned old objects go, oldest first; the pinned ones stay.
    assert present(store, *objects.values(), new) == {
        objects["named"], objects["uploading"], objects["put"], new}
    store.close()


def test_a_manifest_computed_here_is_not_replaced_by_one_a_hub_vouches_for(tmp_path):
    store = Store(tmp_path)
    try:
        big, m_here, m_hub, m_other = "1" * 40, "2" * 40, "3" * 40, "4" * 40
        assert store.cache.known_manifest(big) is None
        store.cache.note_manifest(big, m_hub, cache.vouched_by_hub("lab"))
        store.cache.note_manifest(big, m_here, cache.MANIFEST_HERE)
        store.cache.note_manifest(big, m_other, cache.vouched_by_hub("lab"))
        assert store.cache.known_manifest(big) == (m_here, cache.MANIFEST_HERE)
        store.cache.forget_manifest(big, m_other)  # not the one recorded: kept
        assert store.cache.known_manifest(big) == (m_here, cache.MANIFEST_HERE)
        store.cache.forget_manifest(big, m_here)
        assert store.cache.known_manifest(big) is None
    finally:
        store.close()
    reopened = Store(tmp_path)  # recorded in store.db: kept across restarts
    try:
        reopened.cache.note_manifest("5" * 40, m_hub, cache.vouched_by_hub("lab"))
    finally:
        reopened.close()
    reopened = Store(tmp_path)
    try:
        assert reopened.cache.known_manifest("5" * 40) == (m_hub, cache.vouched_by_hub("lab"))
    finally:
        reopened.close()
