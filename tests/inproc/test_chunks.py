"""Large files read by chunk through a trusted manifest: only the chunks a read overlaps
are fetched, each verified before a byte of it is served, from the whole object or from
chunk objects (hub-era kachery's layout). Against a real hub and local bucket on
127.0.0.1; the chunk size is made small so the files are."""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import math
import os
import sqlite3
import threading

import pyfuse3
import pytest
import trio

from kachery_fs import cache, parts, resumable
from kachery_fs import chunks as chunks_module
from kachery_fs import manifest as manifest_module
from kachery_fs import partial as partial_module
from kachery_fs.cli import data as cli_data
from kachery_fs.errors import IntegrityError, KacheryError, leaves
from kachery_fs.fs.vnodes import HashFile
from kachery_fs.hub import backends as hub_backends
from kachery_fs.hub import service as hub_service
from kachery_fs.manifest import manifest_of
from kachery_fs.resolver import SharedChunks

from ..util import local_bucket_file, log_requests, past_startup_grace, until
from . import test_faults
from .test_faults import CH, CTX, fuse_errno, in_bucket, make_node, mount_in_process

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
clock = test_faults.clock  # trio's MockClock at real speed, for the tests that ask for it
CHUNK = 256 * 1024
WAIT_S = 30


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(manifest_module, "CHUNK_SIZE", CHUNK)


def large_file(chunks: float = 4.5) -> tuple[bytes, str, manifest_module.Manifest]:
    data = os.urandom(int(chunks * CHUNK))
    sha1, manifest = manifest_of([data])
    assert manifest is not None and len(manifest.chunks) == -(-len(data) // CHUNK)
    return data, sha1, manifest


async def large_file_in_bucket(hub, chunks: float = 4.5):
    """A large file in the bucket whole, with its manifest (as kachery-fs uploads one)."""
    data, sha1, manifest = large_file(chunks)
    await in_bucket(hub, data)
    await in_bucket(hub, manifest.to_bytes())
    return data, sha1, manifest


async def chunked(hub, nursery, sha1, manifest):
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    with trio.fail_after(WAIT_S):
        return node, await res.open(CH, sha1, manifest=manifest.hash)


async def test_a_read_fetches_only_the_chunk_it_touches_from_the_whole_object(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub)
    requests = log_requests(hub)
    _, content = await chunked(hub, nursery, sha1, manifest)
    assert content.size == len(data)
    offset = 2 * CHUNK + 1000
    with trio.fail_after(WAIT_S):
        assert await content.read(offset, 4096) == data[offset:offset + 4096]
    ranged = [h.get("range") for method, target, h in requests.seen
              if method == "GET" and sha1 in target]
    assert ranged == [f"bytes={2 * CHUNK}-{3 * CHUNK - 1}"]  # one chunk, ranged
    # Across a chunk boundary and into the short last chunk: two more chunks, no more.
    with trio.fail_after(WAIT_S):
        assert await content.read(4 * CHUNK - 10, 20) == data[4 * CHUNK - 10:4 * CHUNK + 10]
    assert content.chunked.fetched == 3
    content.close()


async def test_a_bucket_holding_only_chunks_and_the_manifest_is_read(hub, nursery):
    """Hub-era kachery stores a large file as its chunks (each under its own hash) and its
    manifest; the whole object is not in the bucket."""
    data, sha1, manifest = large_file(3.25)
    for chunk in {c.sha1: c for c in manifest.chunks}.values():
        await in_bucket(hub, data[chunk.start:chunk.end])
    await in_bucket(hub, manifest.to_bytes())
    assert not local_bucket_file(hub.server, CH, sha1).exists()
    node, content = await chunked(hub, nursery, sha1, manifest)
    with trio.fail_after(WAIT_S):
        assert await content.read(0, len(data)) == data
    # The chunks are content of their own: installed in the store (just after serving).
    await until(lambda: all(node.store.has(c.sha1) for c in manifest.chunks), within=WAIT_S,
                what="the chunks to be installed")
    content.close()


async def test_a_corrupt_chunk_fails_alone(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub)
    path = local_bucket_file(hub.server, CH, sha1)
    bad = bytearray(path.read_bytes())
    bad[CHUNK + 5] ^= 0xFF  # in chunk 1
    path.write_bytes(bytes(bad))
    _, content = await chunked(hub, nursery, sha1, manifest)
    with trio.fail_after(WAIT_S):
        with pytest.raises(IntegrityError, match="chunk 1 .* does not match"):
            await content.read(CHUNK, 10)
        assert await content.read(0, 10) == data[:10]  # the others stay readable
        assert await content.read(3 * CHUNK, 10) == data[3 * CHUNK:3 * CHUNK + 10]
    content.close()


async def test_a_manifest_of_another_file_is_refused(hub, nursery):
    data, sha1, manifest = large_file()
    _, other_sha1, _ = large_file()
    await in_bucket(hub, manifest.to_bytes())
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    with trio.fail_after(WAIT_S), pytest.raises(IntegrityError, match="is of sha1://"):
        await res.open(CH, other_sha1, manifest=manifest.hash)


async def test_cat_with_a_manifest_in_the_uri_and_a_lying_manifest(hub, nursery, monkeypatch,
                                                                  capsysbinary):
    data, sha1, manifest = large_file(2.5)
    for chunk in {c.sha1: c for c in manifest.chunks}.values():
        await in_bucket(hub, data[chunk.start:chunk.end])
    await in_bucket(hub, manifest.to_bytes())
    node = await make_node(hub, "reader")
    monkeypatch.setattr(cli_data._common, "open_node", lambda create=False: node)
    args = argparse.Namespace(uri=f"sha1://{sha1}/big.bin?manifest={manifest.hash}",
                              channel=None, cache_size=None, request_timeout=WAIT_S,
                              strict=False)
    with trio.fail_after(WAIT_S):
        assert await cli_data._cat(args) == 0
    assert capsysbinary.readouterr().out == data

    # A manifest whose chunks are real content but not this file's: every chunk matches
    # its hash, so each is served; the whole SHA-1 at the end does not.
    liar = swapped_liar(data, manifest)
    await in_bucket(hub, liar.to_bytes())  # its chunks are in the bucket already
    node = await make_node(hub, "second reader")
    monkeypatch.setattr(cli_data._common, "open_node", lambda create=False: node)
    args.uri = f"sha1://{sha1}?manifest={liar.hash}"
    with trio.fail_after(WAIT_S), pytest.raises(BaseExceptionGroup) as raised:
        await cli_data._cat(args)  # raised in the parts' nursery: the CLI unwraps it
    assert [str(e) for e in leaves(raised.value) if isinstance(e, IntegrityError)] == [
        f"the chunks of manifest sha1://{liar.hash} each matched, but together they are"
        f" sha1://{hashlib.sha1(b''.join(reversed_bytes(data, manifest))).hexdigest()}, not"
        f" sha1://{sha1}: the manifest is wrong, and what was read is not that file"]
    # Nothing of the last chunk was written out: the lie was caught before it.
    assert len(capsysbinary.readouterr().out) <= manifest.chunks[-1].start


def swapped_liar(data, manifest):
    """A lying manifest of ``data``'s hash whose chunks are real content (two swapped)."""
    return manifest_module.Manifest(manifest.size, manifest.sha1,
                                    tuple(reversed_chunks(data, manifest)))


def reversed_bytes(data, manifest):
    a, b, *rest = manifest.chunks
    return [data[b.start:b.end], data[a.start:a.end], *(data[c.start:c.end] for c in rest)]


def reversed_chunks(data, manifest):
    """Chunks of the same sizes whose bytes are other parts of ``data`` (the first two
    swapped): each is real content under its own hash."""
    a, b, *rest = manifest.chunks
    swapped_a = hashlib.sha1(data[b.start:b.end]).hexdigest()
    swapped_b = hashlib.sha1(data[a.start:a.end]).hexdigest()
    return [manifest_module.Chunk(a.start, a.end, swapped_a),
            manifest_module.Chunk(b.start, b.end, swapped_b), *rest]



async def test_put_prints_kacherys_manifest_uri_and_cat_reads_it_by_chunk(
        hub, nursery, monkeypatch, capsysbinary, tmp_path):
    data, sha1, manifest = large_file(2.5)
    src = tmp_path / "big data.bin"
    src.write_bytes(data)
    writer = await make_node(hub, "writer")
    monkeypatch.setattr(cli_data._common, "open_node", lambda create=False: writer)
    args = argparse.Namespace(files=[str(src)], channel=None, quiet=True, bwlimit=None)
    with trio.fail_after(WAIT_S):
        assert await cli_data._put(args) == 0
    uri = capsysbinary.readouterr().out.decode().strip()
    assert uri == f"sha1://{sha1}/big%20data.bin?manifest={manifest.hash}"
    assert writer.store.path(manifest.hash).read_bytes() == manifest.to_bytes()
    assert local_bucket_file(hub.server, CH, manifest.hash).read_bytes() == manifest.to_bytes()

    reader = await make_node(hub, "reader")
    monkeypatch.setattr(cli_data._common, "open_node", lambda create=False: reader)
    requests = log_requests(hub)
    cat = argparse.Namespace(uri=uri, channel=None, cache_size=None, request_timeout=WAIT_S,
                              strict=False)
    with trio.fail_after(WAIT_S):
        assert await cli_data._cat(cat) == 0
    assert capsysbinary.readouterr().out == data
    ranged = [h.get("range") for method, target, h in requests.seen
              if method == "GET" and sha1 in target]
    assert len(ranged) == len(manifest.chunks) and all(ranged)  # by chunk, from the whole


# -- the mount's handlers ------------------------------------------------------------------


def ranged_gets(requests, sha1: str) -> list[str | None]:
    return [h.get("range") for method, target, h in requests.seen
            if method == "GET" and target.endswith(sha1)]


async def read_in_order(fs, fh: int, size: int) -> tuple[int, int | None]:
    """Read an open file from its start, a chunk at a time, until the end or an error:
    how many bytes were served, and the errno that stopped it (None: none)."""
    served = 0
    while served < size:
        try:
            served += len(await fs.ops.read(fh, served, CHUNK))
        except pyfuse3.FUSEError as exc:
            return served, exc.errno
    return served, None


async def read_range(fs, inode: int, offset: int, size: int) -> bytes:
    fh = (await fs.ops.open(inode, os.O_RDONLY, CTX)).fh
    try:
        return await fs.ops.read(fh, offset, size)
    finally:
        await fs.ops.release(fh)


async def test_sha1_hash_with_its_manifest_in_the_name_is_read_by_chunk(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        assert attrs.st_size == len(data)  # from the manifest
        assert await read_range(fs, attrs.st_ino, 3 * CHUNK + 7, 100) == data[
            3 * CHUNK + 7:3 * CHUNK + 107]
    assert ranged_gets(requests, sha1) == [f"bytes={3 * CHUNK}-{4 * CHUNK - 1}"]
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.uri", CTX) == (
        f"sha1://{sha1}?manifest={manifest.hash}".encode())
    # The bare hash is another name: without a manifest on record it is read whole.
    assert fs.ops.ns.inode(HashFile(CH, sha1)) != attrs.st_ino
    for bad in (f"{sha1}?manifest=xyz", f"{sha1}?manifest={manifest.hash.upper()}",
                f"{sha1}?label=x", f"{sha1}?manifest="):
        assert await fuse_errno(fs.lookup(bad)) == errno.ENOENT


async def test_a_manifest_on_record_makes_the_bare_hash_read_by_chunk(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub)
    reader = await make_node(hub, "reader")
    reader.store.cache.note_manifest(sha1, manifest.hash, cache.vouched_by_hub(CH))
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        assert attrs.st_size == len(data)
        assert await read_range(fs, attrs.st_ino, CHUNK - 2, 4) == data[CHUNK - 2:CHUNK + 2]
    assert ranged_gets(requests, sha1) == [f"bytes=0-{CHUNK - 1}",
                                           f"bytes={CHUNK}-{2 * CHUNK - 1}"]
    assert await fs.ops.getxattr(attrs.st_ino, b"user.kachery.uri", CTX) == (
        f"sha1://{sha1}?manifest={manifest.hash}".encode())


async def test_a_corrupt_chunk_is_eio_there_only_through_the_mount(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub)
    path = local_bucket_file(hub.server, CH, sha1)
    bad = bytearray(path.read_bytes())
    bad[2 * CHUNK] ^= 0xFF
    path.write_bytes(bytes(bad))
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fuse_errno(fs.ops.read(fh, 2 * CHUNK + 10, 10)) == errno.EIO
        assert await fs.ops.read(fh, 4 * CHUNK, 10) == data[4 * CHUNK:4 * CHUNK + 10]
        assert await fs.ops.read(fh, 0, 10) == data[:10]
        await fs.ops.release(fh)
    assert not reader.store.has(sha1)  # nothing wrong cached


async def test_a_sequential_reader_gets_read_ahead_and_the_file_is_kept_once_whole(
        hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub, 4.5)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 0, 4096) == data[:4096]
        assert ranged_gets(requests, sha1) == [f"bytes=0-{CHUNK - 1}"]  # not yet sequential
        assert await fs.ops.read(fh, 4096, 4096) == data[4096:8192]
        # Read on from where it stopped: the next READ_AHEAD chunks are fetched for it.
        await until(lambda: len(ranged_gets(requests, sha1)) == 1 + chunks_module.READ_AHEAD,
                    within=WAIT_S, what="the read-ahead")
        got, offset = [], 0
        while offset < len(data):
            got.append(await fs.ops.read(fh, offset, 128 * 1024))
            offset += len(got[-1])
        assert b"".join([data[:0], *got]) == data
        await fs.ops.release(fh)
    assert len(ranged_gets(requests, sha1)) == len(manifest.chunks)  # each chunk once
    # Read whole, in order: its whole SHA-1 checked, and it is in the store now.
    assert reader.store.path(sha1).read_bytes() == data
    assert (await fs.ops.getxattr(attrs.st_ino, b"user.kachery.status", CTX)) == b"local"


async def test_a_manifest_that_lies_is_caught_forgotten_and_refused(hub, nursery,
                                                                   monkeypatch):
    invalidated = []
    monkeypatch.setattr(pyfuse3, "invalidate_inode",
                        lambda inode, attr_only: invalidated.append(inode))
    monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda parent, name: None)
    data, sha1, manifest = large_file(2.5)
    for chunk in {c.sha1: c for c in manifest.chunks}.values():
        await in_bucket(hub, data[chunk.start:chunk.end])
    liar = swapped_liar(data, manifest)
    await in_bucket(hub, liar.to_bytes())
    reader = await make_node(hub, "reader")
    reader.store.cache.note_manifest(sha1, liar.hash, cache.vouched_by_hub(CH))
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        # Each chunk matches the liar's hash for it, so each is served ...
        assert await fs.ops.read(fh, 0, CHUNK) == data[CHUNK:2 * CHUNK]
        try:  # (the read-ahead may have caught the lie already)
            assert await fs.ops.read(fh, CHUNK, CHUNK) == data[:CHUNK]
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EIO
        # ... until the last one, where the whole SHA-1 is checked: never served.
        assert await fuse_errno(fs.ops.read(fh, 2 * CHUNK, CHUNK)) == errno.EIO
        assert await fuse_errno(fs.ops.read(fh, 0, 10)) == errno.EIO
        await fs.ops.release(fh)
    # The kernel drops the pages it cached from the liar, and looks the name up again,
    # into a new inode: the next read is of the file itself.
    await until(lambda: attrs.st_ino in invalidated, within=WAIT_S, what="invalidation")
    assert fs.ops.ns.inode(HashFile(CH, sha1)) != attrs.st_ino
    assert reader.store.cache.known_manifest(sha1) is None
    assert not reader.store.has(sha1)
    with trio.fail_after(WAIT_S):  # named in a path, it is refused at once now
        assert await fuse_errno(fs.lookup(f"{sha1}?manifest={liar.hash}")) == errno.EIO


async def test_strict_mode_serves_nothing_before_the_whole_file_is_verified(hub, nursery):
    data, sha1, manifest = large_file(2.5)
    for chunk in {c.sha1: c for c in manifest.chunks}.values():  # only chunks: hub-era
        await in_bucket(hub, data[chunk.start:chunk.end])
    await in_bucket(hub, manifest.to_bytes())
    liar = swapped_liar(data, manifest)
    await in_bucket(hub, liar.to_bytes())
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery, strict=True)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={liar.hash}")
        # The lie is caught at open: not one byte was served.
        assert await fuse_errno(fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)) == errno.EIO
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert reader.store.path(sha1).read_bytes() == data  # whole, verified, before
        assert await fs.ops.read(fh, CHUNK, 10) == data[CHUNK:CHUNK + 10]
        await fs.ops.release(fh)


# -- a manifest the hub vouches for ----------------------------------------------------------


async def put_with_manifest(hub, nursery, tmp_path, data: bytes) -> None:
    """Store ``data`` on a writer node as put does (its manifest computed there) and upload
    it: the writer vouches for the manifest at the finalize."""
    writer = await make_node(hub, "writer")
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    await trio.to_thread.run_sync(writer.store.add_file_with_manifest, src)
    uploader = (await parts.start(writer, nursery, upload_workers=0)).uploader
    with trio.fail_after(WAIT_S):
        await uploader.upload_now(CH, hashlib.sha1(data).hexdigest(), len(data))


async def test_a_bare_hash_is_read_by_chunk_through_the_manifest_the_hub_vouches_for(
        hub, nursery, tmp_path):
    data, sha1, manifest = large_file()
    await put_with_manifest(hub, nursery, tmp_path, data)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        assert attrs.st_size == len(data)
        assert reader.store.cache.known_manifest(sha1) == (manifest.hash, cache.vouched_by_hub(CH))
        assert await read_range(fs, attrs.st_ino, 3 * CHUNK + 1, 10) == data[
            3 * CHUNK + 1:3 * CHUNK + 11]
    assert ranged_gets(requests, sha1) == [f"bytes={3 * CHUNK}-{4 * CHUNK - 1}"]
    # Strict: the hub is not asked, and the file is read whole before a byte is served.
    strict_reader = await make_node(hub, "strict reader")
    fs = await mount_in_process(strict_reader, nursery, strict=True)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        assert strict_reader.store.cache.known_manifest(sha1) is None
        assert await read_range(fs, attrs.st_ino, 3 * CHUNK + 1, 10) == data[
            3 * CHUNK + 1:3 * CHUNK + 11]
    await until(lambda: strict_reader.store.has(sha1), within=WAIT_S, what="the download")


async def test_a_lie_the_hub_vouched_for_is_reported_and_the_hub_drops_it(
        hub, nursery, tmp_path, monkeypatch):
    """On GCS the hub hashes neither uploads nor chunks: a member can upload other bytes
    under a file's hash and vouch for the manifest of those bytes. (Here the local bucket's
    checks are switched off to stand for that.) Each chunk then matches; the whole does
    not, and the reader finds out before it serves the last chunk."""
    data, sha1, _ = large_file(2.5)
    other = os.urandom(len(data))
    _, liar = manifest_of([other])
    assert liar is not None
    liar = manifest_module.Manifest(liar.size, sha1, liar.chunks)  # "of" the real file
    await in_bucket(hub, liar.to_bytes())

    async def no_check(*args, **kwargs):
        pass

    monkeypatch.setattr(hub_service, "check_manifest", no_check)
    monkeypatch.setattr(hub_backends.LocalBucketBackend, "can_hash", False)
    voucher = await make_node(hub, "voucher")
    client = voucher.channels.hub(hub.url)
    signed = await client.initiate_upload(CH, sha1, len(data))  # other bytes, its own upload
    session = await resumable.start_session(client.client, signed)
    (tmp_path / "other").write_bytes(other)
    await resumable.upload(client.client, session, tmp_path / "other", len(other))
    assert await client.finalize_upload(CH, sha1, len(data), manifest=liar.hash) == "vouched"
    bystander = (await make_node(hub, "bystander")).channels.hub(hub.url)
    assert (await bystander.finalize_upload(CH, sha1, len(data), manifest="3" * 40)
            ).startswith("refused: manifest")  # on record; and not its upload anyway
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        offset, code = await read_in_order(fs, fh, len(data))
        await fs.ops.release(fh)
    assert code == errno.EIO and offset <= liar.chunks[-1].start  # the last chunk: never
    await until(lambda: hub.server.hub.manifests.get(CH, sha1) is None, within=WAIT_S,
                what="the hub to drop the lying manifest")
    stats = await hub.owner.channel_stats(CH)
    assert stats["vouchers"][voucher.node_id]["disputed"] == 1
    assert reader.store.cache.known_manifest(sha1) is None
    assert not reader.store.has(sha1)


async def test_a_manifest_on_record_whose_chunks_fail_is_dropped_for_whole_reads(
        hub, nursery):
    """Chunk hashes that do not match the whole object (a manifest that lies, or a bad
    object): the read fails there, and the next open reads the file whole, verified."""
    data, sha1, manifest = large_file(2.5)
    liar = swapped_liar(data, manifest)
    await in_bucket(hub, data)
    await in_bucket(hub, liar.to_bytes())
    reader = await make_node(hub, "reader")
    reader.store.cache.note_manifest(sha1, liar.hash, cache.vouched_by_hub(CH))
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fuse_errno(fs.ops.read(fh, 0, 10)) == errno.EIO
        await fs.ops.release(fh)
        assert reader.store.cache.known_manifest(sha1) is None
        assert await read_range(fs, attrs.st_ino, 0, len(data)) == data


# -- partial files in the store ---------------------------------------------------------------


async def kept(node, sha1: str, manifest, nbytes: int) -> None:
    """Wait until ``node``'s partial file of ``sha1`` holds ``nbytes`` (a chunk read is
    served from memory while it is written there)."""
    await until(lambda: node.store.cache.partials() == [(sha1, manifest.hash, nbytes)],
                within=WAIT_S, what=f"{nbytes} bytes in the partial file")


async def reader_of_kept_chunks(hub, nursery, chunks: float, read: list[int]):
    """A large file of ``chunks`` chunks in the bucket, and a reader that read 10 bytes in
    each chunk of ``read`` through the mount's path with the manifest, kept in its partial
    file: ``data, sha1, manifest, reader, name``."""
    data, sha1, manifest = await large_file_in_bucket(hub, chunks)
    reader = await make_node(hub, "reader")
    name = f"{sha1}?manifest={manifest.hash}"
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(name)
        for i in read:
            at = i * CHUNK + 5
            assert await read_range(fs, attrs.st_ino, at, 10) == data[at:at + 10]
    await kept(reader, sha1, manifest, len(read) * CHUNK)
    return data, sha1, manifest, reader, name


async def chunk_1_kept(hub, nursery):
    """A large file in the bucket, and a reader whose partial file holds its chunk 1 (read
    through the mount's path with the manifest): ``data, sha1, manifest, reader, name``."""
    return await reader_of_kept_chunks(hub, nursery, 2.5, [1])


async def test_chunks_fetched_are_kept_in_a_partial_file_across_a_restart(hub, nursery):
    data, sha1, manifest, reader, name = await reader_of_kept_chunks(hub, nursery, 4.5, [1, 3])
    usage = reader.store.cache.usage()
    assert usage >= 2 * CHUNK  # the chunks count in the store's usage

    # Another process on the same node directory (a remount) finds them there.
    again = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await again.lookup(name)
        fh = (await again.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await again.ops.read(fh, 3 * CHUNK, 100) == data[3 * CHUNK:3 * CHUNK + 100]
        assert ranged_gets(requests, sha1) == []  # from the partial file, verified
        assert await again.ops.read(fh, 2 * CHUNK, 100) == data[2 * CHUNK:2 * CHUNK + 100]
        assert ranged_gets(requests, sha1) == [f"bytes={2 * CHUNK}-{3 * CHUNK - 1}"]
        # The rest, out of order: once the last chunk is there the file is checked whole
        # and becomes an ordinary object of the store.
        for i in (4, 0, 1):
            assert await again.ops.read(fh, i * CHUNK, 10) == data[i * CHUNK:i * CHUNK + 10]
        await until(lambda: reader.store.has(sha1), within=WAIT_S, what="the whole file")
        await again.ops.release(fh)
    assert reader.store.path(sha1).read_bytes() == data
    assert reader.store.cache.partials() == []
    assert reader.store.cache.usage() == usage - 2 * CHUNK + len(data)
    assert not reader.store.layout.partial_path(sha1, manifest.hash).exists()


async def test_a_chunk_of_a_partial_file_lost_in_a_crash_is_fetched_again(hub, nursery,
                                                                          caplog):
    data, sha1, manifest, reader, name = await chunk_1_kept(hub, nursery)
    # Recorded as present, but the bytes never reached the disk.
    path = reader.store.layout.partial_path(sha1, manifest.hash)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, bytes(CHUNK), CHUNK)
    os.close(fd)
    again = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await again.lookup(name)
        assert await read_range(again, attrs.st_ino, CHUNK, 10) == data[CHUNK:CHUNK + 10]
    assert ranged_gets(requests, sha1) == [f"bytes={CHUNK}-{2 * CHUNK - 1}"]
    assert any("lost in a crash?" in r.getMessage() for r in caplog.records)


async def test_partial_files_are_evicted_least_recently_used_first_but_not_while_open(
        hub, nursery):
    files = [large_file(2.5) for _ in range(3)]
    for data, _, manifest in files:
        await in_bucket(hub, data)
        await in_bucket(hub, manifest.to_bytes())
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    handles = []
    with trio.fail_after(WAIT_S):
        for data, sha1, manifest in files:
            attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
            fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
            assert await fs.ops.read(fh, 0, 10) == data[:10]
            handles.append(fh)
            await trio.sleep(0.01)  # distinct access times
    await fs.ops.release(handles[0])  # the oldest is closed; the others stay open
    assert {p[0] for p in reader.store.cache.partials()} == {f[1] for f in files}
    reader.store.cache.limit = reader.store.cache.usage() - 1
    await trio.to_thread.run_sync(reader.store.cache.evict, set())
    assert {p[0] for p in reader.store.cache.partials()} == {files[1][1], files[2][1]}
    assert not reader.store.layout.partial_path(files[0][1], files[0][2].hash).exists()
    # Over the limit still, but what is left is open: kept, and readable.
    reader.store.cache.limit = 1
    await trio.to_thread.run_sync(reader.store.cache.evict, set())
    assert {p[0] for p in reader.store.cache.partials()} == {files[1][1], files[2][1]}
    with trio.fail_after(WAIT_S):
        assert await fs.ops.read(handles[1], 0, 10) == files[1][0][:10]
    for fh in handles[1:]:
        await fs.ops.release(fh)


async def test_a_partial_file_on_no_record_is_swept_unless_held(hub, nursery):
    data, sha1, manifest = large_file(2.5)
    reader = await make_node(hub, "reader")
    held = partial_module.PartialFile.open(reader.store, manifest)  # recorded, held
    orphan = reader.store.layout.partial_path("1" * 40, "2" * 40)
    orphan.write_bytes(b"left by a crash before its row")
    assert reader.store.sweep_temp() == 1
    assert not orphan.exists() and held.path.exists()
    held.close()
    assert reader.store.sweep_temp() == 0  # on record: kept for the next reader
    assert held.path.exists()


async def test_a_stalled_chunk_read_times_out_at_its_deadline(hub, nursery, clock):
    data, sha1, manifest = await large_file_in_bucket(hub, 2.5)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
    fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
    # The bucket accepts ranged reads of the file and never answers them.
    hub.faults.add(lambda method, path, kind: method == "GET" and path.endswith(sha1), None,
                   on_hit=test_faults.autojump_from_here(clock))
    start = trio.current_time()
    assert await fuse_errno(fs.ops.read(fh, CHUNK, 4096)) == errno.ETIMEDOUT
    assert trio.current_time() - start <= chunks_module.STALL_TIMEOUT_S + 5
    # The kernel reads the page again: no second deadline for the same chunk.
    assert await fuse_errno(fs.ops.read(fh, CHUNK, 4096)) == errno.ETIMEDOUT
    assert trio.current_time() - start <= chunks_module.STALL_TIMEOUT_S + 5
    hub.faults.clear()
    clock.autojump_threshold = math.inf
    clock.jump(chunks_module.FAILED_CHUNK_TTL_S)
    with trio.fail_after(WAIT_S):  # answered again: read
        assert await fs.ops.read(fh, CHUNK, 4096) == data[CHUNK:CHUNK + 4096]
    await fs.ops.release(fh)


async def test_a_chunk_is_served_while_it_is_written_and_kept_after_its_reader_goes(
        hub, nursery, monkeypatch):
    data, sha1, manifest = await large_file_in_bucket(hub, 2.5)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    disk = threading.Event()  # the disk is slow: no chunk reaches it until this is set
    add_chunk = partial_module.PartialFile.add_chunk

    def slow_add_chunk(self, i, chunk):
        assert disk.wait(WAIT_S)
        return add_chunk(self, i, chunk)

    monkeypatch.setattr(partial_module.PartialFile, "add_chunk", slow_add_chunk)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 5, 100) == data[5:105]  # from memory
        assert await fs.ops.read(fh, CHUNK - 50, 100) == data[CHUNK - 50:CHUNK + 50]
        await fs.ops.release(fh)  # the last reader goes before the writes end
    assert reader.store.cache.partials() == [(sha1, manifest.hash, 0)]
    disk.set()
    await kept(reader, sha1, manifest, 2 * CHUNK)  # written all the same
    with trio.fail_after(WAIT_S):  # and served from there, with the rest: checked whole
        assert await read_range(fs, attrs.st_ino, 0, len(data)) == data
    await until(lambda: reader.store.has(sha1), within=WAIT_S, what="the file installed")


# -- requests that stream ---------------------------------------------------------------------


async def streaming_writer(hub, nursery, tmp_path, data: bytes):
    """A node that holds ``data`` (added with its manifest), providing, its own upload of
    the whole object held until the returned event is set."""
    writer = await make_node(hub, "writer")
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    await trio.to_thread.run_sync(writer.store.add_file_with_manifest, src)
    writer_parts = await parts.start(writer, nursery, provide=True, upload_workers=0)
    sha1 = hashlib.sha1(data).hexdigest()
    release = trio.Event()
    upload_now = writer_parts.uploader.upload_now

    async def held(channel, h, size, **kwargs):
        if h == sha1:
            await release.wait()
        return await upload_now(channel, h, size, **kwargs)

    writer_parts.uploader.upload_now = held  # type: ignore[method-assign]
    past_startup_grace(hub.server)
    return writer_parts, release


async def test_a_requested_large_file_is_read_by_chunk_as_its_provider_streams_it(
        hub, nursery, tmp_path):
    data, sha1, manifest = large_file()
    _, release = await streaming_writer(hub, nursery, tmp_path, data)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    served: list[bytes] = [b"", b""]

    async def read_all(k: int) -> None:
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        try:
            while len(served[k]) < len(data):
                served[k] += await fs.ops.read(fh, len(served[k]), 100_000)
        finally:
            await fs.ops.release(fh)

    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)  # by bare hash: the reader knows no manifest
        assert attrs.st_size == len(data)
        async with trio.open_nursery() as readers:  # two readers, one request
            readers.start_soon(read_all, 0)
            readers.start_soon(read_all, 1)
    # Every byte came, verified, while the whole object was not in the bucket.
    assert served == [data, data]
    assert not local_bucket_file(hub.server, CH, sha1).exists()
    assert ranged_gets(requests, sha1) == []
    for chunk in {c.sha1: c for c in manifest.chunks}.values():  # each chunk object once
        assert len(ranged_gets(requests, chunk.sha1)) == 1
    # Verified whole: an ordinary object of the reader's store.
    await until(lambda: reader.store.has(sha1), within=WAIT_S, what="the reader's copy")
    release.set()  # and the whole object follows, for cloud-era readers
    await until(lambda: local_bucket_file(hub.server, CH, sha1).exists(), within=WAIT_S,
                what="the whole object in the bucket")


async def test_a_large_file_gone_from_the_bucket_is_requested_and_streamed_by_chunk(
        hub, nursery, tmp_path):
    """A reader that knows the manifest (given in the path) and finds the bucket empty
    requests the file, and reads its chunks as they come."""
    data, sha1, manifest = large_file()
    _, release = await streaming_writer(hub, nursery, tmp_path, data)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        assert await read_range(fs, attrs.st_ino, 2 * CHUNK + 3, 10) == data[
            2 * CHUNK + 3:2 * CHUNK + 13]
    assert ranged_gets(requests, manifest.chunks[2].sha1) == [f"bytes=0-{CHUNK - 1}"]
    assert ranged_gets(requests, sha1) == []
    release.set()


def cut_stream_at_chunk_2(writer_parts, monkeypatch) -> None:
    """The writer's upload of chunk 2 on fails: its streaming stops there."""
    upload_part = writer_parts.uploader.upload_part

    async def failing(channel, h, size, *, source, start):
        if start >= 2 * CHUNK:
            raise IntegrityError("the bucket refused it")
        return await upload_part(channel, h, size, source=source, start=start)

    monkeypatch.setattr(writer_parts.uploader, "upload_part", failing)


async def test_a_stream_cut_short_is_read_on_from_the_whole_object(
        hub, nursery, tmp_path, monkeypatch):
    data, sha1, manifest = large_file()
    writer_parts, release = await streaming_writer(hub, nursery, tmp_path, data)
    cut_stream_at_chunk_2(writer_parts, monkeypatch)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 0, 2 * CHUNK) == data[:2 * CHUNK]  # streamed
        assert ranged_gets(requests, sha1) == []
        release.set()  # the whole upload: the rest is read from there
        assert await fs.ops.read(fh, 2 * CHUNK, len(data)) == data[2 * CHUNK:]
        await fs.ops.release(fh)
    assert ranged_gets(requests, sha1) == [
        f"bytes={c.start}-{c.end - 1}" for c in manifest.chunks[2:]]


async def test_a_streamed_request_that_fails_is_asked_again_by_the_next_chunk_read(
        hub, nursery, tmp_path, monkeypatch):
    data, sha1, manifest = large_file()
    writer_parts, _ = await streaming_writer(hub, nursery, tmp_path, data)
    cut_stream_at_chunk_2(writer_parts, monkeypatch)
    fail = trio.Event()
    upload_now = writer_parts.uploader.upload_now

    async def failing_whole(channel, h, size, **kwargs):
        if h != sha1:  # the manifest
            return await upload_now(channel, h, size, **kwargs)
        await fail.wait()
        raise KacheryError("the provider's disk went away")

    monkeypatch.setattr(writer_parts.uploader, "upload_now", failing_whole)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 0, 100) == data[:100]  # streamed
        fail.set()
        # No provider can bring the rest: the request fails, and so does a read of it.
        assert await fuse_errno(fs.ops.read(fh, 2 * CHUNK, 100)) == errno.ENOENT
        await in_bucket(hub, data)  # later, the file comes into the bucket another way
        # The open file reads on: its next chunk asks again, and the hub says it is there.
        assert await fs.ops.read(fh, 3 * CHUNK, 100) == data[3 * CHUNK:3 * CHUNK + 100]
        await fs.ops.release(fh)


async def test_readers_of_chunks_gone_from_the_bucket_hold_no_buffer_while_they_wait(
        hub, nursery, tmp_path):
    data, sha1, manifest = large_file()
    _, release = await streaming_writer(hub, nursery, tmp_path, data)
    other, other_sha1, other_manifest = await large_file_in_bucket(hub)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 0, 10) == data[:10]
    gone = manifest.chunks[1:5]  # reported in the bucket, and then not there (evicted)
    [request] = fs.ops.resolver.requests()
    await until(lambda: request.chunks == len(manifest.chunks), within=WAIT_S,
                what="every chunk reported in the bucket")
    for chunk in gone:
        local_bucket_file(hub.server, CH, chunk.sha1).unlink()
    served = {}

    async def read(chunk):
        served[chunk.start] = await fs.ops.read(fh, chunk.start, 10)

    async with trio.open_nursery() as readers:
        for chunk in gone:  # as many waiting reads as the resolver has chunk buffers
            readers.start_soon(read, chunk)
        await trio.sleep(0.5)
        with trio.fail_after(WAIT_S):  # another large file reads by chunk meanwhile
            name = f"{other_sha1}?manifest={other_manifest.hash}"
            other_attrs = await fs.lookup(name)
            assert await read_range(fs, other_attrs.st_ino, CHUNK, 10) == other[
                CHUNK:CHUNK + 10]
        release.set()  # the whole object: the waiting reads are served from it
    assert served == {c.start: data[c.start:c.start + 10] for c in gone}
    await fs.ops.release(fh)


async def test_a_manifest_named_for_one_read_is_not_used_by_a_plain_open(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub)
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    with trio.fail_after(WAIT_S):
        named = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh_named = (await fs.ops.open(named.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh_named, 0, 10) == data[:10]
        plain = await fs.lookup(sha1)
        fh = (await fs.ops.open(plain.st_ino, os.O_RDONLY, CTX)).fh
        assert not isinstance(fs.ops._handles[fh].content, SharedChunks)  # read whole
        assert await fs.ops.read(fh, CHUNK, 10) == data[CHUNK:CHUNK + 10]
        await fs.ops.release(fh)
        await fs.ops.release(fh_named)


# -- what a fault or a liar can and cannot do ---------------------------------------------------




async def test_a_reader_of_every_chunk_never_gets_the_last_of_a_lie_without_a_partial_file(
        hub, nursery, monkeypatch):
    data, sha1, manifest = large_file(4.5)
    for chunk in {c.sha1: c for c in manifest.chunks}.values():
        await in_bucket(hub, data[chunk.start:chunk.end])
    liar = swapped_liar(data, manifest)
    await in_bucket(hub, liar.to_bytes())

    def no_room(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(partial_module.PartialFile, "open", no_room)  # nothing kept on disk
    monkeypatch.setattr(chunks_module, "KEPT_CHUNKS", 1)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={liar.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        await fs.ops.read(fh, 3 * CHUNK, 10)  # out of order: before the whole check is there
        served, code = await read_in_order(fs, fh, len(data))
        await fs.ops.release(fh)
    assert code == errno.EIO and served == liar.chunks[-1].start


async def test_a_broken_index_or_disk_in_the_background_never_takes_the_mount_down(
        hub, nursery, monkeypatch, caplog):
    data, sha1, manifest = await large_file_in_bucket(hub, 2.5)

    def index_full(self, i, chunk):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(partial_module.PartialFile, "add_chunk", index_full)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 0, 100) == data[:100]
        assert await fs.ops.read(fh, 100, 100) == data[100:200]  # read-ahead runs too
        got, offset = [], 0
        while offset < len(data):
            got.append(await fs.ops.read(fh, offset, CHUNK))
            offset += len(got[-1])
        assert b"".join(got) == data  # served from memory, checked whole
        await fs.ops.release(fh)
    assert any("without being kept" in r.getMessage() for r in caplog.records)


async def test_a_failed_read_ahead_does_not_fail_the_read_that_follows(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub, 4.5)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(f"{sha1}?manifest={manifest.hash}")
        fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
        assert await fs.ops.read(fh, 0, 100) == data[:100]
        rule = hub.faults.add(lambda method, path, kind: method == "GET"
                              and path.endswith(sha1), 503, times=8)
        assert await fs.ops.read(fh, 100, 100) == data[100:200]  # read-ahead of 1, 2: fails
        await until(lambda: rule.hits == 8, within=WAIT_S, what="the read-ahead to fail")
        assert await fs.ops.read(fh, CHUNK, 100) == data[CHUNK:CHUNK + 100]  # tried again
        await fs.ops.release(fh)


async def test_a_named_manifest_too_large_to_be_one_is_refused_before_it_is_fetched(
        hub, nursery, monkeypatch):
    data, sha1, manifest = large_file(2.5)
    await in_bucket(hub, data)
    big = await in_bucket(hub, os.urandom(300_000))
    monkeypatch.setattr(manifest_module, "MAX_BYTES", 100_000)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        assert await fuse_errno(fs.lookup(f"{sha1}?manifest={big}")) == errno.EIO
    assert not [t for method, t, _ in requests.seen if method == "GET" and t.endswith(big)]


async def test_a_manifest_another_channels_hub_vouched_for_is_not_trusted_here(hub, nursery):
    data, sha1, manifest = await large_file_in_bucket(hub, 2.5)
    reader = await make_node(hub, "reader")
    reader.store.cache.note_manifest(sha1, manifest.hash, cache.vouched_by_hub("elsewhere"))
    fs = await mount_in_process(reader, nursery)
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        attrs = await fs.lookup(sha1)
        assert await read_range(fs, attrs.st_ino, CHUNK, 10) == data[CHUNK:CHUNK + 10]
    # Read whole (ranged GETs of the download's own pieces), not by the manifest's chunks.
    assert f"bytes={CHUNK}-{2 * CHUNK - 1}" not in ranged_gets(requests, sha1)
    await until(lambda: reader.store.has(sha1), within=WAIT_S, what="the download")


async def test_a_background_task_that_outlives_the_last_reader_ends_quietly(hub, nursery,
                                                                           caplog):
    data, sha1, manifest, reader, name = await chunk_1_kept(hub, nursery)
    # Another process: chunk 1 is in the partial file, not yet read back by this one.
    res = (await parts.start(reader, nursery)).resolver
    with trio.fail_after(WAIT_S):
        handle = await res.open(CH, sha1, manifest=manifest.hash)
    content = handle.chunked
    handle.close()  # the last reader: the partial file's descriptor is closed
    with trio.fail_after(WAIT_S):  # a read-ahead or a whole check that starts only now
        await content._fetch_ahead(1, trio.CancelScope())
        await content._check_whole_in_background()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
