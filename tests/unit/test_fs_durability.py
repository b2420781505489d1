"""What close, a sync and a crash leave (fs/durability.py, the store's pending/, node.db's
unsynced log), without FUSE: a real store and a real node database in a temp dir, and
the damage a power cut does made by hand."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading

import pytest
import trio

from kachery_fs import status
from kachery_fs.errors import NoSpace, NotFound
from kachery_fs.fs import vnodes as v
from kachery_fs.fs.durability import Durability, recover
from kachery_fs.fs.namespace import Namespace
from kachery_fs.state import NodeDB
from kachery_fs.store import Store

from ..stores import fetched
from ..util import until

FILE = stat.S_IFREG | 0o644


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@pytest.fixture
def node(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    db.add_channel("ch", "http://127.0.0.1:9", "http://127.0.0.1:9/b", set())
    store = Store(tmp_path)
    yield store, db, Namespace(db)
    store.close()
    db.close()


def commit(store: Store, data: bytes) -> str:
    """What the mount's close does to the store: hashed, not fsynced, into pending/."""
    staging = store.new_staging()
    staging.write(0, data)
    return staging.commit(durable=False)


def written(store, db, ns, name: str, *versions: bytes, created: bool = True) -> int:
    """A file made as create(2) makes one, then committed once per version, unsynced."""
    row = ns.make(v.ChannelDir("ch"), name, mode=FILE, uid=0, gid=0, committed=not created)
    for data in versions:
        db.set_content(row.id, commit(store, data), len(data), unsynced=True)
    return row.id


def damage(store: Store, data: bytes) -> None:
    """What a power cut does to content that had not reached the disk: ext4 keeps the
    name of a file whose data it had not yet allocated, with none of its bytes."""
    path = store.layout.pending_path(sha1(data))
    os.chmod(path, 0o644)
    os.truncate(path, 0)


def test_committed_content_is_pending_readable_and_moves_to_sha1_once_synced(node):
    store, db, _ = node
    h = commit(store, b"fresh")
    assert (store.layout.pending_dir / h).exists() and not store.path(h).exists()
    assert store.size(h) == 5 and store.has(h)
    fd = store.open(h)  # another process's store: hashed before it is read
    assert os.pread(fd, 10, 0) == b"fresh"
    os.close(fd)
    assert store.pending() == [h]
    store.syncfs()
    store.install_pending([h])
    assert store.path(h).read_bytes() == b"fresh" and not store.pending()
    assert store.cache.stats()["objects"] == 1  # indexed once in sha1/


def test_pending_content_that_lost_its_bytes_is_never_read_but_by_the_mount(node):
    store, _, _ = node
    h = commit(store, b"x" * 1000)
    damage(store, b"x" * 1000)
    with pytest.raises(NotFound, match="does not hold its bytes"):
        store.open(h)
    store.pending_trusted = True  # the mount, after recover(): what it wrote itself
    os.close(store.open(h))


def test_recover_keeps_whole_pending_content_and_removes_damaged(node):
    store, _, _ = node
    good, bad = commit(store, b"whole"), commit(store, b"damaged")
    damage(store, b"damaged")
    kept, removed = store.recover_pending()
    assert (kept, removed) == ([good], [bad])
    assert store.path(good).read_bytes() == b"whole" and not store.has(bad)


def test_a_crash_brings_each_name_back_to_its_last_content_on_the_disk(node, caplog):
    store, db, ns = node
    # Made and synced: v1 is on the disk.
    kept = written(store, db, ns, "kept.txt", b"v1")
    store.syncfs()
    store.install_pending(store.pending())
    db.forget_unsynced(db.unsynced_seq())
    # Then, unsynced: two versions over it (both lost), a new file (lost), a new file
    # whose content survived, and one that create(2) made and no close committed.
    db.set_content(kept, commit(store, b"v2"), 2, unsynced=True)
    db.set_content(kept, commit(store, b"v3"), 2, unsynced=True)
    lost = written(store, db, ns, "lost.txt", b"never on the disk")
    whole = written(store, db, ns, "whole.txt", b"made it")
    open_one = written(store, db, ns, "open.txt")
    for data in (b"v2", b"v3", b"never on the disk"):
        damage(store, data)
    recover(store, db, ns)
    assert db.inode(kept).sha1 == sha1(b"v1") and db.inode(kept).size == 2
    assert db.inode(whole).sha1 == sha1(b"made it")
    names = {name for name, _ in db.children("ch", 0)}
    assert names == {"kept.txt", "whole.txt"}
    for gone in (lost, open_one):
        with pytest.raises(NotFound):
            db.inode(gone)
    assert not store.pending() and db.unsynced_seq() == 0 and store.pending_trusted
    log = caplog.text
    assert "ch/kept.txt lost its last content" in log
    assert "ch/lost.txt lost its first content" in log
    assert "ch/open.txt was being created and never closed" in log


def test_status_tells_how_many_committed_files_wait_for_the_disk(node):
    store, _, _ = node
    commit(store, b"one")
    commit(store, b"two")
    report = {"bytes": 0, "objects": 0, "limit": None, "pinnedBytes": 0, "evictions": 0,
              "evictedBytes": 0, "sources": [], "pendingSync": len(store.pending())}
    assert "  committed, not yet on the disk: 2 file(s)" in "\n".join(
        status._render_store(report))
    report["pendingSync"] = 0
    assert "not yet on the disk" not in "\n".join(status._render_store(report))


def test_recover_drops_the_uploads_of_content_it_removed(node):
    store, db, ns = node
    written(store, db, ns, "lost.txt", b"gone")
    db.enqueue_upload("ch", sha1(b"gone"), 4)
    damage(store, b"gone")
    recover(store, db, ns)
    assert db.upload("ch", sha1(b"gone")) is None  # never tried, never failing


def test_content_committed_again_is_pinned_before_it_is_named(node):
    """A commit of bytes the store has as fetched cache: recorded as written (kept for
    its grace) before the file names it, so that an eviction pass cannot take it."""
    store, _, _ = node
    fetched(store, b"cached")
    commit(store, b"cached")
    row = store.cache._db.execute("SELECT origin FROM objects WHERE sha1 = ?",
                                  (sha1(b"cached"),)).fetchone()
    assert row == ("written",)
    assert not store.pending()  # not copied again


def test_recover_after_a_clean_end_changes_nothing(node):
    store, db, ns = node
    inode = written(store, db, ns, "a.txt", b"one", b"two")
    recover(store, db, ns)  # a kill -9: nothing damaged
    assert db.inode(inode).sha1 == sha1(b"two")
    assert store.path(sha1(b"two")).read_bytes() == b"two"
    assert db.unsynced_seq() == 0


def test_the_previous_content_of_an_unsynced_change_is_pinned(node):
    store, db, ns = node
    inode = written(store, db, ns, "a.txt", b"one", created=False)
    db.forget_unsynced(db.unsynced_seq())
    db.set_content(inode, commit(store, b"two"), 3, unsynced=True)
    assert {sha1(b"one"), sha1(b"two")} <= db.pinned_sha1s()
    db.forget_unsynced(db.unsynced_seq())
    assert sha1(b"one") not in db.pinned_sha1s()


async def test_a_sync_asked_for_during_one_waits_for_the_next_and_shares_it(node,
                                                                          monkeypatch):
    store, db, _ = node
    gate, calls, real = threading.Event(), [], store.syncfs

    def syncfs():
        calls.append(1)
        if len(calls) == 1:
            gate.wait(10)  # the first sync is slow: the others ask while it runs
        real()

    monkeypatch.setattr(store, "syncfs", syncfs)
    durability = Durability(store, db)
    returned = []

    async def fsync():
        await durability.sync()
        returned.append(len(calls))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(durability.sync)
        await until(lambda: calls, within=10, what="the first sync")
        h = commit(store, b"committed while a sync ran")
        for _ in range(3):
            nursery.start_soon(fsync)
        await trio.sleep(0.2)
        assert not returned  # the running sync may not cover what they committed
        gate.set()
    assert returned == [2, 2, 2] and len(calls) == 2  # one more sync, shared
    assert store.path(h).read_bytes() == b"committed while a sync ran"


async def test_a_commit_is_synced_within_the_interval(node):
    store, db, _ = node
    durability = Durability(store, db, interval=0.3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(durability.run)
        h = commit(store, b"soon")
        durability.committed()
        await trio.sleep(0.1)
        assert not store.path(h).exists()
        await until(store.path(h).exists, within=10, what="the periodic sync")
        nursery.cancel_scope.cancel()


async def test_a_sync_that_fails_leaves_everything_pending_and_fails_every_fsync(node,
                                                                                monkeypatch):
    store, db, _ = node
    durability = Durability(store, db)
    h = commit(store, b"not on the disk")

    def broken():
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, "syncfs", broken)
    with pytest.raises(OSError):
        await durability.sync()
    monkeypatch.undo()  # the disk seems fine again: what failed to reach it is not
    with pytest.raises(OSError, match="an earlier sync failed"):
        await durability.sync()
    assert store.pending() == [h] and not store.path(h).exists()


async def test_the_periodic_sync_survives_a_full_disk_after_its_syncfs(node, monkeypatch):
    store, db, _ = node
    durability = Durability(store, db, interval=0.05)
    h = commit(store, b"synced, not moved")
    calls = []

    def full(hashes):
        calls.append(hashes)
        raise NoSpace("the disk is full")

    monkeypatch.setattr(store, "install_pending", full)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(durability.run)
        durability.committed()
        await until(lambda: len(calls) >= 2, within=10, what="a sync, then another")
        nursery.cancel_scope.cancel()
    assert store.pending() == [h]  # safe where it is; the mount kept running
