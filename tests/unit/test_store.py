"""The local store and the node database, in process."""

from __future__ import annotations

import hashlib
import os

import pytest

from kachery_fs.errors import Conflict, IntegrityError, InvalidInput, NotFound
from kachery_fs.state import INODE_BASE, NodeDB
from kachery_fs.store import StagingFile, Store

from ..util import make_entry


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def test_add_bytes_layout_and_mode(tmp_path):
    store = Store(tmp_path)
    h = store.add_bytes(b"Hello, world!")
    assert h == "943a702d06f34599aee1f8da8ef9f7296031d699"
    path = tmp_path / "sha1" / "94" / "3a" / "70" / h
    assert path.read_bytes() == b"Hello, world!"
    assert oct(path.stat().st_mode & 0o777) == oct(0o444)
    assert store.size(h) == 13 and store.has(h)
    assert not any((tmp_path / "tmp").iterdir())
    # adding the same content again is a no-op
    assert store.add_bytes(b"Hello, world!") == h


def test_staging_sequential_and_random_writes_hash_right(tmp_path):
    store = Store(tmp_path)
    s = store.new_staging()
    s.write(0, b"abc")
    s.write(3, b"def")
    assert s.commit() == sha1(b"abcdef")
    s = store.new_staging()
    s.write(3, b"def")  # out of order: re-hashed at commit
    s.write(0, b"abc")
    assert s.commit() == sha1(b"abcdef")
    s = store.new_staging()
    s.write(0, b"abcdef")
    s.truncate(2)
    assert s.commit() == sha1(b"ab")


def test_staging_from_existing_copies(tmp_path):
    store = Store(tmp_path)
    h = store.add_bytes(b"base")
    s = StagingFile.from_existing(store, h, truncate=False)
    s.write(4, b"+more")
    assert s.commit() == sha1(b"base+more")
    s = StagingFile.from_existing(store, h, truncate=True)
    assert s.size == 0
    s.discard()
    assert not any((tmp_path / "tmp").iterdir())


def test_install_verified_refuses_mismatch(tmp_path):
    store = Store(tmp_path)
    temp = store.new_temp_path()
    temp.write_bytes(b"bad")
    with pytest.raises(IntegrityError):
        store.install_verified(temp, sha1(b"good"), actual_sha1=sha1(b"bad"))
    assert not temp.exists()
    assert not store.has(sha1(b"good"))


def test_verify_deletes_corrupt_object(tmp_path):
    store = Store(tmp_path)
    h = store.add_bytes(b"content")
    p = store.path(h)
    os.chmod(p, 0o644)
    p.write_bytes(b"tampered")
    assert store.verify(h) is False
    assert not store.has(h)


def test_invalid_hash_and_missing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(InvalidInput):
        store.path("nothex")
    with pytest.raises(NotFound):
        store.open(sha1(b"missing"))


def test_add_file_with_progress(tmp_path):
    store = Store(tmp_path / "store")
    src = tmp_path / "f"
    data = os.urandom(3 << 20)
    src.write_bytes(data)
    seen = []
    h, size = store.add_file(src, progress=seen.append)
    assert (h, size) == (sha1(data), len(data)) and sum(seen) == len(data)


# -- node database -----------------------------------------------------------------------


def test_inodes_and_names(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    d = make_entry(db, "c", 0, "dir", is_dir=True, mode=0o755)
    f = make_entry(db, "c", d.id, "f", is_dir=False, mode=0o644)
    assert d.inode == INODE_BASE + d.id and db.inode(d.id).nlink == 2
    with pytest.raises(Conflict):
        db.add_name("c", d.id, "f", f.id)
    with pytest.raises(InvalidInput):
        db.add_name("c", 0, "a/b", f.id)
    db.set_content(f.id, sha1(b"x"), 1)
    assert db.lookup("c", d.id, "f").sha1 == sha1(b"x")
    db.add_name("c", 0, "g", f.id)
    db.add_links(f.id, 1)
    assert db.lookup("c", 0, "g").id == f.id and db.inode(f.id).nlink == 2
    assert [name for name, _ in db.children("c", 0)] == ["dir", "g"]
    assert db.has_children("c", d.id) and db.subdirectories("c", 0) == 1
    db.close()
    db = NodeDB(tmp_path / "node.db")  # persists
    assert db.lookup("c", 0, "g").id == db.lookup("c", d.id, "f").id == f.id
    db.close()


def test_upload_queue(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    assert db.enqueue_upload("c", "a" * 40, 10)
    assert not db.enqueue_upload("c", "a" * 40, 10)  # already queued
    db.update_upload("c", "a" * 40, state="failed", error="nope")
    assert db.pending_uploads() == []
    assert db.enqueue_upload("c", "a" * 40, 10)  # a failed upload can be queued again
    assert [u.sha1 for u in db.pending_uploads()] == ["a" * 40]
    db.update_upload("c", "a" * 40, state="done")
    assert not db.enqueue_upload("c", "a" * 40, 10)


def test_a_large_file_written_in_order_is_hashed_behind_the_writes(tmp_path, monkeypatch):
    import kachery_fs.store as store_module

    monkeypatch.setattr(store_module, "HASH_STEP", 1 << 16)
    store = Store(tmp_path)
    data = os.urandom(3 << 20)
    staging = store.new_staging()
    for offset in range(0, len(data), 1 << 17):
        staging.write(offset, data[offset:offset + (1 << 17)])
    for job in staging._whole_jobs:
        job.result()
    assert staging._whole.done > 0  # the pool took most of it, not the commit
    assert staging.commit() == sha1(data)
    assert store.path(sha1(data)).read_bytes() == data
    store.close()


def test_writes_back_out_of_order_are_still_hashed_as_they_go(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(1 << 20)
    staging = store.new_staging()
    page = 4096
    order = []
    for window in range(0, len(data), 8 * page):  # as the kernel's writeback sends them
        order += sorted(range(window, window + 8 * page, page), key=lambda o: -o)
    for offset in order:
        staging.write(offset, data[offset:offset + page])
    assert staging._sequential and staging._hashed == len(data)  # no second pass
    assert staging.commit() == sha1(data)
    rewritten = store.new_staging()
    rewritten.write(0, data[:page])
    rewritten.write(2 * page, b"x" * page)  # ahead of its turn
    rewritten.write(page, data[page:2 * page])
    rewritten.write(page, b"y" * page)  # a rewrite of what is hashed: hashed again
    assert not rewritten._sequential
    assert rewritten.commit() == sha1(data[:page] + b"y" * page + b"x" * page)
    store.close()
