"""Kachery manifests of files written through a staging file (store.py's StagingFile with
``manifest=True``, as the mount and ``put`` make them): hashed chunk by chunk on a pool
thread as sequential writes pass each chunk, recomputed by re-reading after any other
write, stored and recorded at the commit. The chunk size is made small so the files are."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os

import pytest

from kachery_fs import manifest as manifest_module
from kachery_fs import store as store_module
from kachery_fs.cache import ADDED, FETCHED, MANIFEST_HERE
from kachery_fs.manifest import manifest_of
from kachery_fs.store import StagingFile, Store

CHUNK = 256 * 1024
BLOCK = 100_000  # writes that do not line up with the chunks


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(manifest_module, "CHUNK_SIZE", CHUNK)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path)
    yield store
    store.close()


@pytest.fixture
def pool_jobs(monkeypatch):
    """The chunk jobs started on the pool: ``(start, end, future)``."""
    jobs: list[tuple[int, int, concurrent.futures.Future[str]]] = []
    real = store_module._hash_on_pool

    def spy(fd, start, end):
        future = real(fd, start, end)
        jobs.append((start, end, future))
        return future

    monkeypatch.setattr(store_module, "_hash_on_pool", spy)
    return jobs


def write_in_order(staging: StagingFile, data: bytes, start: int = 0) -> None:
    for offset in range(start, len(data), BLOCK):
        assert staging.write(offset, data[offset:offset + BLOCK]) == len(
            data[offset:offset + BLOCK])


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def assert_manifest_of(store: Store, staging: StagingFile, committed: str, data: bytes):
    whole, expected = manifest_of([data])
    assert committed == whole and store.path(whole).read_bytes() == data
    assert expected is not None and staging.manifest == expected
    assert staging.manifest.to_bytes() == expected.to_bytes()  # byte for byte
    # Stored as content of its own (kept), and recorded as this file's, computed here.
    assert store.path(expected.hash).read_bytes() == expected.to_bytes()
    assert store.cache.known_manifest(whole) == (expected.hash, MANIFEST_HERE)
    row = store.cache._db.execute("SELECT origin FROM objects WHERE sha1 = ?",
                                  (expected.hash,)).fetchone()
    assert row == (ADDED,)
    assert list(store.tmp_dir.iterdir()) == []


def test_sequential_writes_hash_each_chunk_on_the_pool_as_they_pass_it(store, pool_jobs):
    data = os.urandom(int(3.5 * CHUNK))
    staging = store.new_staging(manifest=True)
    write_in_order(staging, data[:2 * CHUNK])
    # Chunk 1 ends where the writes stand: it might be the last, so it waits.
    assert [(s, e) for s, e, _ in pool_jobs] == [(0, CHUNK)]
    write_in_order(staging, data, start=2 * CHUNK)
    assert [(s, e) for s, e, _ in pool_jobs] == [(0, CHUNK), (CHUNK, 2 * CHUNK),
                                                 (2 * CHUNK, 3 * CHUNK)]
    committed = staging.commit()
    assert_manifest_of(store, staging, committed, data)
    # The commit started the last one there too (before its fsync).
    assert [(s, e) for s, e, _ in pool_jobs[3:]] == [(3 * CHUNK, len(data))]
    assert [f.result() for _, _, f in pool_jobs] == [c.sha1 for c in staging.manifest.chunks]


def test_a_rewrite_in_the_middle_after_its_chunk_was_hashed_is_in_the_manifest(store,
                                                                              pool_jobs):
    data = bytearray(os.urandom(int(3.5 * CHUNK)))
    staging = store.new_staging(manifest=True)
    write_in_order(staging, bytes(data))
    stale = [f for _, _, f in pool_jobs]
    concurrent.futures.wait(stale)  # chunk 1's hash was taken before the rewrite
    before = stale[1].result()
    staging.write(CHUNK + 5, b"rewritten")
    data[CHUNK + 5:CHUNK + 14] = b"rewritten"
    committed = staging.commit()
    assert_manifest_of(store, staging, committed, bytes(data))
    assert staging.manifest.chunks[1].sha1 != before
    # The commit hashed every chunk again, on the pool, from the file.
    assert [(s, e) for s, e, _ in pool_jobs[len(stale):]] == [
        (0, CHUNK), (CHUNK, 2 * CHUNK), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK, len(data))]


def test_a_truncate_then_more_writes_give_the_manifest_of_what_is_left(store):
    data = os.urandom(int(3.5 * CHUNK))
    staging = store.new_staging(manifest=True)
    write_in_order(staging, data)
    staging.truncate(CHUNK + 7)
    tail = os.urandom(CHUNK)
    staging.write(CHUNK + 7, tail)
    committed = staging.commit()
    assert_manifest_of(store, staging, committed, data[:CHUNK + 7] + tail)


def test_a_copy_of_stored_content_appended_to_gets_its_manifest(store):
    base = os.urandom(int(2.5 * CHUNK))
    h = store.add_bytes(base)
    staging = StagingFile.from_existing(store, h, truncate=False, manifest=True)
    more = os.urandom(CHUNK)
    staging.write(len(base), more)
    committed = staging.commit()
    assert_manifest_of(store, staging, committed, base + more)


@pytest.mark.parametrize("in_order", [True, False])
def test_a_file_of_one_chunk_has_no_manifest_and_one_byte_more_has_one(store, pool_jobs,
                                                                       in_order):
    """kachery: a manifest is for a file of more than 20,000,000 bytes (two chunks or
    more), in order or not."""
    data = os.urandom(CHUNK + 1)
    for size in (CHUNK, CHUNK + 1):
        staging = store.new_staging(manifest=True)
        if in_order:
            write_in_order(staging, data[:size])
        else:
            staging.write(size - 10, data[size - 10:size])
            staging.write(0, data[:size - 10])
        committed = staging.commit()
        if size == CHUNK:
            assert committed == sha1(data[:CHUNK]) and staging.manifest is None
            assert store.cache.known_manifest(committed) is None
            assert pool_jobs == []  # not one chunk hashed for nothing
        else:
            assert_manifest_of(store, staging, committed, data)
            assert len(staging.manifest.chunks) == 2
            assert staging.manifest.chunks[1].start == CHUNK
    assert sorted(store.iter_hashes()) == sorted(
        [sha1(data[:CHUNK]), sha1(data), staging.manifest.hash])


def test_a_staging_file_not_asked_for_a_manifest_makes_none(store, pool_jobs):
    data = os.urandom(3 * CHUNK)
    staging = store.new_staging()
    write_in_order(staging, data)
    committed = staging.commit(origin=FETCHED)
    assert committed == sha1(data) and staging.manifest is None and pool_jobs == []
    assert store.cache.known_manifest(committed) is None
    assert list(store.iter_hashes()) == [committed]


def test_the_manifest_is_stored_then_recorded_then_the_file_is_put_in_place(store,
                                                                           monkeypatch):
    """A crash between any two steps never leaves a record of a manifest the store does
    not hold."""
    data = os.urandom(2 * CHUNK + 1)
    whole, expected = manifest_of([data])
    assert expected is not None
    seen = []
    note, install = store.cache.note_manifest, store._install

    def noting(sha1, manifest_sha1, source):
        seen.append(("note", store.has(manifest_sha1), store.has(sha1)))
        note(sha1, manifest_sha1, source)

    def installing(temp, sha1, origin):
        if sha1 == whole:
            seen.append(("install", store.cache.known_manifest(sha1) is not None))
        install(temp, sha1, origin)

    monkeypatch.setattr(store.cache, "note_manifest", noting)
    monkeypatch.setattr(store, "_install", installing)
    staging = store.new_staging(manifest=True)
    write_in_order(staging, data)
    assert staging.commit() == whole
    assert seen == [("note", True, False), ("install", True)]


def test_a_manifest_that_cannot_be_stored_fails_the_commit_whole(store, monkeypatch):
    data = os.urandom(2 * CHUNK + 1)

    def full(data, *, origin=ADDED):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "add_bytes", full)
    staging = store.new_staging(manifest=True)
    write_in_order(staging, data)
    with pytest.raises(OSError) as info:
        staging.commit()
    assert info.value.errno == errno.ENOSPC
    assert not store.has(sha1(data)) and store.cache.known_manifest(sha1(data)) is None
    assert list(store.tmp_dir.iterdir()) == [] and staging.fd == -1


def test_store_add_file_with_manifest_computes_it_while_copying(store, tmp_path, pool_jobs):
    data = os.urandom(int(4.25 * CHUNK))
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    seen: list[int] = []
    committed, size, manifest = store.add_file_with_manifest(src, progress=seen.append)
    whole, expected = manifest_of([data])
    assert (committed, size, manifest) == (whole, len(data), expected)
    assert sum(seen) == len(data) and len(pool_jobs) == 5
    assert expected is not None
    assert store.cache.known_manifest(whole) == (expected.hash, MANIFEST_HERE)
    assert store.path(expected.hash).read_bytes() == expected.to_bytes()
    src.write_bytes(data[:CHUNK])
    assert store.add_file_with_manifest(src)[2] is None
