"""The mount's write-staging state machine (fs/staging.py), without FUSE: against a real
store and node database in a temporary directory."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
import trio

from kachery_fs import manifest as manifest_module
from kachery_fs.cache import MANIFEST_HERE
from kachery_fs.errors import NoSpace, NotFound
from kachery_fs.fs.namespace import Namespace
from kachery_fs.fs.staging import Staging
from kachery_fs.fs.vnodes import ChannelDir
from kachery_fs.manifest import manifest_of
from kachery_fs.state import INODE_BASE, NodeDB
from kachery_fs.store import Store

from ..util import make_entry

CH = "ch"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class Uploads:
    def __init__(self):
        self.queued: list[tuple[str, str, int]] = []

    def enqueue(self, channel: str, sha1: str, size: int) -> None:
        self.queued.append((channel, sha1, size))


@pytest.fixture
def parts(tmp_path):
    store = Store(tmp_path)
    db = NodeDB(tmp_path / "node.db")
    uploads = Uploads()
    lost: list[int] = []
    staging = Staging(store, db, uploads, on_lost=lost.append)
    yield staging, store, db, uploads, lost
    store.close()
    db.close()


def new_file(db: NodeDB, store: Store, content: bytes | None = None) -> int:
    entry = make_entry(db, CH, 0, "f", is_dir=False, mode=0o644)
    if content is not None:
        db.set_content(entry.id, store.add_bytes(content), len(content))
    return entry.id


def temp_files(store: Store) -> list:
    return list(store.tmp_dir.iterdir())


async def test_a_write_is_committed_at_flush_and_queued_at_close(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store)
    writer = await staging.open_write(inode_id, truncate=True)
    assert staging.is_writing(inode_id) and staging.staged_size(inode_id) == 0
    assert await staging.write(writer, 0, b"hello") == 5
    assert staging.staged_size(inode_id) == 5
    await staging.flush(writer)  # the only write handle: close(2) finds it in the store
    assert db.inode(inode_id).sha1 == sha1(b"hello") and store.has(sha1(b"hello"))
    assert uploads.queued == []  # queued at the last close only
    await staging.close_write(writer)
    assert uploads.queued == [(CH, sha1(b"hello"), 5)]
    assert staging.get(inode_id) is None and not staging.is_writing(inode_id)
    assert temp_files(store) == []


async def test_a_write_without_truncate_starts_from_the_committed_content(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store, b"hello")
    writer = await staging.open_write(inode_id, truncate=False)
    assert staging.staged_size(inode_id) is None  # no staging file before the first write
    await staging.write(writer, 5, b" world")
    await staging.close_write(writer)
    assert db.inode(inode_id).sha1 == sha1(b"hello world")
    assert uploads.queued == [(CH, sha1(b"hello world"), 11)]


async def test_an_unchanged_file_is_neither_committed_nor_queued(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store, b"same")
    writer = await staging.open_write(inode_id, truncate=False)
    await staging.flush(writer)
    await staging.close_write(writer)
    assert db.inode(inode_id).sha1 == sha1(b"same") and uploads.queued == []


async def test_handles_sharing_a_file_commit_at_the_last_close_and_upload_once(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store)
    first = await staging.open_write(inode_id, truncate=True)
    second = await staging.open_write(inode_id, truncate=False)
    assert first is second
    await staging.write(first, 0, b"ab")
    await staging.flush(first)  # another handle is open: not yet
    assert db.inode(inode_id).sha1 is None
    await staging.close_write(first)
    await staging.write(second, 2, b"cd")
    await staging.flush(second)
    assert db.inode(inode_id).sha1 == sha1(b"abcd")
    await staging.close_write(second)
    assert uploads.queued == [(CH, sha1(b"abcd"), 4)]


async def test_fsync_commits(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store)
    writer = await staging.open_write(inode_id, truncate=True)
    other = await staging.open_write(inode_id, truncate=False)
    await staging.write(writer, 0, b"synced")
    await staging.fsync(writer)
    assert db.inode(inode_id).sha1 == sha1(b"synced")
    await staging.close_write(writer)
    await staging.close_write(other)
    assert uploads.queued == [(CH, sha1(b"synced"), 6)]


async def test_a_reader_opened_while_writing_reads_what_is_written_so_far(parts):
    staging, store, db, _, _ = parts
    inode_id = new_file(db, store, b"old")
    assert staging.open_read(inode_id) is None  # nobody writes: read the content itself
    writer = await staging.open_write(inode_id, truncate=True)
    await staging.write(writer, 0, b"new bytes")
    reader = staging.open_read(inode_id)
    assert reader is writer
    assert await staging.read(reader, 4, 100) == b"bytes"
    await staging.close_write(writer)
    assert staging.get(inode_id) is reader  # still open for reading
    assert await staging.read(reader, 0, 3) == b"new"  # now from the store
    staging.close_read(reader)
    assert staging.get(inode_id) is None


async def test_truncate_of_a_file_nobody_writes_is_a_new_version_at_once(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store, b"0123456789")
    await staging.truncate(inode_id, 4)
    assert db.inode(inode_id).sha1 == sha1(b"0123")
    assert uploads.queued == [(CH, sha1(b"0123"), 4)]
    await staging.truncate(inode_id, 0)
    assert db.inode(inode_id).sha1 == sha1(b"")
    assert staging.get(inode_id) is None and temp_files(store) == []


async def test_truncate_of_a_file_being_written_changes_the_staged_version(parts):
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store, b"0123456789")
    writer = await staging.open_write(inode_id, truncate=False)
    await staging.truncate(inode_id, 3)
    assert staging.staged_size(inode_id) == 3 and db.inode(inode_id).sha1 == sha1(b"0123456789")
    await staging.close_write(writer)
    assert db.inode(inode_id).sha1 == sha1(b"012")


async def test_a_write_that_finds_the_disk_full_loses_the_version(parts):
    staging, store, db, uploads, lost = parts
    inode_id = new_file(db, store, b"previous")
    writer = await staging.open_write(inode_id, truncate=True)
    await staging.write(writer, 0, b"part")

    def full(offset, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    writer.staging.write = full
    with pytest.raises(OSError) as caught:
        await staging.write(writer, 4, b"more")
    assert caught.value.errno == errno.ENOSPC
    assert lost == [inode_id] and writer.staging is None and temp_files(store) == []
    for step in (staging.write(writer, 0, b"x"), staging.flush(writer), staging.fsync(writer)):
        with pytest.raises(OSError):
            await step
    await staging.close_write(writer)
    assert db.inode(inode_id).sha1 == sha1(b"previous") and uploads.queued == []
    # Once every handle has closed, a new writer starts afresh.
    writer = await staging.open_write(inode_id, truncate=True)
    await staging.write(writer, 0, b"next")
    await staging.close_write(writer)
    assert db.inode(inode_id).sha1 == sha1(b"next")


async def test_a_commit_that_finds_the_disk_full_loses_the_version(parts, monkeypatch):
    staging, store, db, uploads, lost = parts
    inode_id = new_file(db, store, b"previous")
    writer = await staging.open_write(inode_id, truncate=True)
    await staging.write(writer, 0, b"new")

    def full(*args, **kwargs):
        raise NoSpace("the disk is full")

    monkeypatch.setattr(db, "set_content", full)
    with pytest.raises(NoSpace):
        await staging.flush(writer)
    assert lost == [inode_id]
    with pytest.raises(NoSpace):
        await staging.flush(writer)  # every later step hears of it
    await staging.close_write(writer)
    assert db.inode(inode_id).sha1 == sha1(b"previous") and uploads.queued == []


async def test_a_file_unlinked_while_open_is_committed_and_never_uploaded(parts):
    staging, store, db, uploads, _ = parts
    ns = Namespace(db)
    inode_id = new_file(db, store)
    ns.remember(INODE_BASE + inode_id)  # the kernel holds it: it is open
    writer = await staging.open_write(inode_id, truncate=True)
    await staging.write(writer, 0, b"orphan")
    ns.unlink(ChannelDir(CH), "f")
    await staging.close_write(writer)
    row = db.inode(inode_id)
    assert (row.sha1, row.nlink) == (sha1(b"orphan"), 0)
    assert store.has(sha1(b"orphan")) and uploads.queued == []  # no one can name it
    assert ns.forget(INODE_BASE + inode_id, 1)  # the last close: it goes
    with pytest.raises(NotFound):
        await staging.open_write(inode_id, truncate=True)  # no row to stage from
    assert staging.get(inode_id) is None


async def test_content_gone_from_the_store_is_not_found(parts):
    staging, store, db, _, _ = parts
    inode_id = new_file(db, store)
    db.set_content(inode_id, "c" * 40, 3)  # a hash the store does not hold
    writer = await staging.open_write(inode_id, truncate=False)
    with pytest.raises(NotFound):
        await staging.write(writer, 0, b"x")
    await staging.close_write(writer)
    assert staging.get(inode_id) is None


async def test_a_large_file_is_committed_without_waiting_for_its_manifest(parts, monkeypatch):
    monkeypatch.setattr(manifest_module, "CHUNK_SIZE", 64 * 1024)  # files made small
    staging, store, db, uploads, _ = parts
    inode_id = new_file(db, store)
    writer = await staging.open_write(inode_id, truncate=True)
    data = os.urandom(200_000)
    for offset in range(0, len(data), 4096):
        await staging.write(writer, offset, data[offset:offset + 4096])
    await staging.close_write(writer)
    whole, manifest = manifest_of([data])
    assert manifest is not None and db.inode(inode_id).sha1 == whole
    # close hashed the file once: its manifest is made after (Uploader.manifest_of).
    assert store.cache.known_manifest(whole) is None
    made = await trio.to_thread.run_sync(store.make_manifest, whole)
    assert made == manifest
    assert store.cache.known_manifest(whole) == (manifest.hash, MANIFEST_HERE)
    assert store.path(manifest.hash).read_bytes() == manifest.to_bytes()
    # One upload: the uploader sends the manifest itself, before the file's finalize.
    assert uploads.queued == [(CH, whole, len(data))]
    # A small file, written after: no manifest, one upload.
    small = make_entry(db, CH, 0, "small", is_dir=False, mode=0o644).id
    writer = await staging.open_write(small, truncate=True)
    await staging.write(writer, 0, b"small")
    await staging.close_write(writer)
    assert store.cache.known_manifest(sha1(b"small")) is None
    assert uploads.queued[1:] == [(CH, sha1(b"small"), 5)]


async def test_a_file_cut_to_nothing_is_the_empty_content_on_the_disk_not_pending(tmp_path):
    """Committed without waiting for the disk, an empty version is still never a pending
    copy: a power cut could lose that copy, and recovery keeps every empty file."""
    from kachery_fs.bucket import EMPTY_SHA1
    from kachery_fs.fs.durability import Durability

    store, db = Store(tmp_path), NodeDB(tmp_path / "node.db")
    try:
        staging = Staging(store, db, Uploads(), durability=Durability(store, db))
        inode = new_file(db, store, b"some bytes")
        writer = await staging.open_write(inode, truncate=False)
        await staging.write(writer, 0, b"more")
        await staging.truncate(inode, 0)
        await staging.close_write(writer)
        assert db.inode(inode).sha1 == EMPTY_SHA1 and db.inode(inode).size == 0
        assert store.path(EMPTY_SHA1).exists() and not store.pending()
        assert not temp_files(store)
    finally:
        store.close()
        db.close()
