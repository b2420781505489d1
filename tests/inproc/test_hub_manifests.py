"""The hub vouches for the manifests of large files (hub.manifests): a node vouches for a
manifest at its file's finalize, the hub checks it (on the local bucket, every chunk
against the file's bytes) and records it, any member that may request files looks it up,
and a reader that found it lying reports it. Against a real hub and local bucket on
127.0.0.1 (and fake-gcs-server for gs://); the chunk size is made small so the files are.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import httpx
import pytest
import trio

from kachery_fs import manifest as manifest_module
from kachery_fs import parts, resumable
from kachery_fs.cache import MANIFEST_HERE, vouched_by_hub
from kachery_fs.cli.hub import render_channel_stats
from kachery_fs.errors import InvalidInput, PermissionDenied
from kachery_fs.hub import service
from kachery_fs.hub.cache import DEFAULT_PRICES, monthly_cost
from kachery_fs.hub.manifests import MAX_MANIFEST_BYTES
from kachery_fs.hub_client import HubClient
from kachery_fs.identity import NodeKey
from kachery_fs.manifest import Chunk, Manifest, manifest_of
from kachery_fs.protocol import object_key

from ..gcs import BUCKET
from ..util import local_bucket_file, until
from . import test_faults, test_gcs
from .test_faults import CH, in_bucket, make_node

#: The hub suite: each test on a hub whose state is in SQLite, and in PostgreSQL.
HUB_DATABASES = ("sqlite", "postgresql")

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
CHUNK = 256 * 1024
WAIT_S = 30


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(manifest_module, "CHUNK_SIZE", CHUNK)


def large_file(chunks: float = 4.5) -> tuple[bytes, str, Manifest]:
    data = os.urandom(int(chunks * CHUNK))
    sha1, manifest = manifest_of([data])
    assert manifest is not None
    return data, sha1, manifest


async def upload(client: HubClient, base: Path, data: bytes, *,
                 manifest: str | None = None, channel: str = CH,
                 web: httpx.AsyncClient | None = None) -> str | None:
    """Upload ``data`` as ``client``'s node (through ``web`` to the bucket, or the hub's
    client) and finalize it, vouching for ``manifest``; the hub's word on the vouch."""
    sha1 = hashlib.sha1(data).hexdigest()
    web = web or client.client
    signed = await client.initiate_upload(channel, sha1, len(data))
    if signed is not None:
        session = await resumable.start_session(web, signed)
        path = base / f"payload-{sha1}"
        path.write_bytes(data)
        await resumable.upload(web, session, path, len(data))
    with trio.fail_after(WAIT_S):
        return await client.finalize_upload(channel, sha1, len(data), manifest=manifest)


async def writer(hub) -> tuple[str, HubClient]:
    """A member that may provide and request files: its node id and hub client."""
    node = await make_node(hub, f"writer-{os.urandom(3).hex()}")
    return node.node_id, node.channels.hub(hub.url)


def refusals(caplog, node_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and f"{node_id[:12]}… vouched for manifest" in r.getMessage()
            and "refused" in r.getMessage()]


async def test_a_vouch_is_checked_recorded_and_answered(hub, monkeypatch):
    data, sha1, manifest = large_file()
    node_id, client = await writer(hub)
    await in_bucket(hub, manifest.to_bytes())
    assert await client.get_manifest(CH, sha1) is None
    assert await upload(client, hub.base, data, manifest=manifest.hash) == "vouched"
    assert hub.server.hub.cache.size_of(CH, sha1) == len(data)
    assert await client.get_manifest(CH, sha1) == manifest.hash
    _, reader = await writer(hub)
    assert await reader.get_manifest(CH, sha1.upper()) == manifest.hash
    assert await reader.get_manifest(CH, "0" * 40) is None

    # On record: another vouch for it is not checked again (the check would fail now).
    async def no_check(*args):
        raise AssertionError("checked again")
    monkeypatch.setattr(service, "check_manifest", no_check)
    assert await client.finalize_upload(CH, sha1, len(data), manifest=manifest.hash) == \
        "vouched"
    stats = await hub.owner.channel_stats(CH)
    assert stats["manifests"] == 1
    assert stats["vouchers"] == {node_id: {"vouched": 1, "refused": 0, "disputed": 0}}
    # A finalize without a manifest says nothing about one.
    assert await client.finalize_upload(CH, sha1, len(data)) is None


def lying(data: bytes, manifest: Manifest) -> Manifest:
    """A well-formed manifest of the file whose chunk 1 has the SHA-1 of chunk 0's bytes."""
    a = manifest.chunks[0]
    wrong = hashlib.sha1(data[a.start:a.end]).hexdigest()
    chunks = list(manifest.chunks)
    chunks[1] = Chunk(chunks[1].start, chunks[1].end, wrong)
    return Manifest(manifest.size, manifest.sha1, tuple(chunks))


async def test_a_manifest_that_lies_about_a_chunk_is_refused_on_the_local_bucket(
        hub, caplog):
    data, sha1, manifest = large_file()
    liar = lying(data, manifest)
    node_id, client = await writer(hub)
    await in_bucket(hub, liar.to_bytes())
    said = await upload(client, hub.base, data, manifest=liar.hash)
    assert said is not None and said.startswith("refused: chunk 1 (bytes 262,144 to 524,288)")
    assert hub.server.hub.cache.size_of(CH, sha1) == len(data)  # the finalize stands
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
    assert await client.get_manifest(CH, sha1) is None  # nothing recorded
    [line] = refusals(caplog, node_id)
    assert liar.hash in line and sha1 in line and "chunk 1" in line

    # Asked again, the same refusal without reading the file again; then the true one.
    assert await client.finalize_upload(CH, sha1, len(data), manifest=liar.hash) == said
    await in_bucket(hub, manifest.to_bytes())
    assert await client.finalize_upload(CH, sha1, len(data), manifest=manifest.hash) == \
        "vouched"
    # Once one is on record, another is refused unread.
    said = await client.finalize_upload(CH, sha1, len(data), manifest=liar.hash)
    assert said == f"refused: manifest {manifest.hash} is on record for it"
    assert (await hub.owner.channel_stats(CH))["vouchers"][node_id] == {
        "vouched": 1, "refused": 3, "disputed": 0}


async def test_a_manifest_of_another_size_or_file_or_missing_or_bad_is_refused(hub, caplog):
    data, sha1, manifest = large_file()
    node_id, client = await writer(hub)
    # Of the file's SHA-1, but of one byte less (a well-formed manifest of that size).
    short = Manifest(manifest.size - 1, sha1, (*manifest.chunks[:-1], Chunk(
        manifest.chunks[-1].start, manifest.size - 1, manifest.chunks[-1].sha1)))
    await in_bucket(hub, short.to_bytes())
    assert await upload(client, hub.base, data, manifest=short.hash) == \
        f"refused: it is a manifest of {len(data) - 1:,} bytes, not of {len(data):,}"
    # The manifest of another file.
    _, other_sha1, other = large_file()
    await in_bucket(hub, other.to_bytes())
    assert await client.finalize_upload(CH, sha1, len(data), manifest=other.hash) == \
        f"refused: the manifest is of sha1://{other_sha1}, not of sha1://{sha1}"
    # Not in the bucket at all.
    said = await client.finalize_upload(CH, sha1, len(data), manifest=manifest.hash)
    assert said == (f"refused: the manifest sha1://{manifest.hash} is not in the bucket"
                    " (upload it before the file it describes)")
    # Not a manifest; and an object that does not hash to its name (put there behind the
    # hub's back).
    junk = b"not a manifest"
    await in_bucket(hub, junk)
    said = await client.finalize_upload(CH, sha1, len(data),
                                        manifest=hashlib.sha1(junk).hexdigest())
    assert said == "refused: not a kachery manifest: not JSON"
    nested = b"[" * 100_000
    await in_bucket(hub, nested)
    said = await client.finalize_upload(CH, sha1, len(data),
                                        manifest=hashlib.sha1(nested).hexdigest())
    assert said is not None and said.startswith("refused: not a kachery manifest")
    src = hub.server.local.temp_path()
    src.write_bytes(manifest.to_bytes() + b" ")
    hub.server.local.install(src, "kachery", object_key(CH, manifest.hash),
                             generation_match=None)
    said = await client.finalize_upload(CH, sha1, len(data), manifest=manifest.hash)
    assert said is not None and said.startswith("refused: the manifest object hashes to")
    # Too large to be read.
    big = os.urandom(MAX_MANIFEST_BYTES + 1)
    await in_bucket(hub, big)
    said = await client.finalize_upload(CH, sha1, len(data),
                                        manifest=hashlib.sha1(big).hexdigest())
    assert said == (f"refused: the manifest object has {MAX_MANIFEST_BYTES + 1:,} bytes, more"
                    f" than the {MAX_MANIFEST_BYTES:,} the hub reads")
    assert await client.get_manifest(CH, sha1) is None
    assert len(refusals(caplog, node_id)) == 7
    assert hub.server.hub.cache.size_of(CH, sha1) == len(data)
    # A malformed manifest field is a malformed request.
    with pytest.raises(InvalidInput, match="invalid manifest 'abc'"):
        await client.finalize_upload(CH, sha1, len(data), manifest="abc")


async def test_only_members_that_may_request_files_look_up_and_report(hub):
    data, sha1, manifest = large_file()
    _, client = await writer(hub)
    await in_bucket(hub, manifest.to_bytes())
    assert await upload(client, hub.base, data, manifest=manifest.hash) == "vouched"
    stranger = HubClient(hub.url, NodeKey.generate(), hub.owner.client)
    provider_key = NodeKey.generate()
    await hub.owner.authorize_node(CH, provider_key.node_id, ["provideFiles"])
    provider = HubClient(hub.url, provider_key, hub.owner.client)
    for node in (stranger, provider):
        with pytest.raises(PermissionDenied, match="lacks the requestFiles permission"):
            await node.get_manifest(CH, sha1)
        with pytest.raises(PermissionDenied, match="lacks the requestFiles permission"):
            await node.report_manifest(CH, sha1, manifest.hash, "1" * 40)
    with pytest.raises(PermissionDenied, match="lacks the requestFiles permission"):
        await stranger.get_manifest("no.such.channel", sha1)  # the same: names not probed
    # and a member without provideFiles cannot vouch
    reader_key = NodeKey.generate()
    await hub.owner.authorize_node(CH, reader_key.node_id, ["requestFiles"])
    reader = HubClient(hub.url, reader_key, hub.owner.client)
    with pytest.raises(PermissionDenied, match="lacks the provideFiles permission"):
        await reader.finalize_upload(CH, sha1, len(data), manifest=manifest.hash)
    assert await reader.get_manifest(CH, sha1) == manifest.hash


async def test_a_reported_lie_drops_the_record_and_counts_against_the_voucher(hub, caplog):
    data, sha1, manifest = large_file()
    voucher_id, voucher = await writer(hub)
    reporter_id, reporter = await writer(hub)
    await in_bucket(hub, manifest.to_bytes())
    assert await upload(voucher, hub.base, data, manifest=manifest.hash) == "vouched"
    actual = "2" * 40
    with pytest.raises(InvalidInput, match="nothing to report"):
        await reporter.report_manifest(CH, sha1, manifest.hash, sha1)
    # A report of a manifest not on record changes nothing.
    await reporter.report_manifest(CH, sha1, "3" * 40, actual)
    assert await reporter.get_manifest(CH, sha1) == manifest.hash

    caplog.set_level(logging.WARNING)
    await reporter.report_manifest(CH, sha1, manifest.hash, actual)
    assert await reporter.get_manifest(CH, sha1) is None
    [line] = [r.getMessage() for r in caplog.records if "reports that manifest" in r.getMessage()]
    assert voucher_id[:12] in line and reporter_id[:12] in line and actual in line
    await reporter.report_manifest(CH, sha1, manifest.hash, actual)  # gone: counted once

    stats = await hub.owner.channel_stats(CH)
    assert stats["manifests"] == 0
    assert stats["vouchers"] == {voucher_id: {"vouched": 1, "refused": 0, "disputed": 1}}
    shown = render_channel_stats(stats, monthly_cost(stats, DEFAULT_PRICES), DEFAULT_PRICES)
    assert "manifests             0  on record" in shown
    assert f"node {voucher_id[:12]}…  1 vouched, 0 refused, 1 disputed by readers" in shown


# -- the uploader vouches ---------------------------------------------------------------------


async def test_an_upload_of_a_file_with_a_manifest_computed_here_vouches_for_it(
        hub, nursery, tmp_path):
    data, sha1, manifest = large_file(3.5)
    node = await make_node(hub, "node")
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    assert node.store.add_file_with_manifest(src)[2] == manifest  # as put and store add do
    assert node.store.cache.known_manifest(sha1) == (manifest.hash, MANIFEST_HERE)
    uploader = (await parts.start(node, nursery, upload_workers=0)).uploader
    with trio.fail_after(WAIT_S):
        await uploader.upload_now(CH, sha1, len(data))
    assert hub.server.hub.manifests.get(CH, sha1) == manifest.hash
    assert hub.server.hub.manifests.voucher(CH, sha1) == node.node_id
    assert local_bucket_file(hub.server, CH, manifest.hash).read_bytes() == manifest.to_bytes()
    assert node.db.upload(CH, manifest.hash).state == "done"


async def test_a_file_committed_without_a_manifest_gets_one_made_and_vouched_at_upload(
        hub, nursery, monkeypatch):
    """As the mount commits a large file: no manifest at the commit. The background upload
    makes it from the stored file (once, however many ask at the same time), puts it in
    the bucket and vouches for it."""
    data, sha1, manifest = large_file(3.5)
    node = await make_node(hub, "node")
    assert node.store.add_bytes(data) == sha1
    assert node.store.cache.known_manifest(sha1) is None
    made = []
    real = node.store.make_manifest

    def counted(sha1, **kw):
        made.append(sha1)
        return real(sha1, **kw)

    monkeypatch.setattr(node.store, "make_manifest", counted)
    uploader = (await parts.start(node, nursery)).uploader
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as askers:  # user.kachery.uri, a request, ...
            for _ in range(3):
                askers.start_soon(uploader.manifest_of, sha1, len(data))
    assert made == [sha1]
    assert await uploader.manifest_of(sha1, len(data)) == (manifest.hash, MANIFEST_HERE)
    uploader.enqueue(CH, sha1, len(data))
    await until(lambda: hub.server.hub.manifests.get(CH, sha1) is not None, within=WAIT_S,
                what="the upload's vouch")
    assert hub.server.hub.manifests.get(CH, sha1) == manifest.hash
    assert local_bucket_file(hub.server, CH, manifest.hash).read_bytes() == manifest.to_bytes()
    assert made == [sha1]  # the upload used the one on record
    # Another large file, only enqueued: the upload makes its manifest itself.
    data2, sha2, manifest2 = large_file(2.5)
    assert node.store.add_bytes(data2) == sha2
    uploader.enqueue(CH, sha2, len(data2))
    await until(lambda: hub.server.hub.manifests.get(CH, sha2) is not None, within=WAIT_S,
                what="the upload's vouch")
    assert hub.server.hub.manifests.get(CH, sha2) == manifest2.hash
    assert made == [sha1, sha2]
    # A caller that stops waiting (getxattr's deadline) does not stop the computation.
    data3, sha3, manifest3 = large_file(2.5)
    assert node.store.add_bytes(data3) == sha3
    with trio.move_on_after(0):
        await uploader.manifest_of(sha3, len(data3))
    await until(lambda: node.store.cache.known_manifest(sha3) is not None, within=WAIT_S,
                what="the manifest made in the background")
    assert node.store.cache.known_manifest(sha3) == (manifest3.hash, MANIFEST_HERE)
    assert made == [sha1, sha2, sha3]
    # A small file gets none, and nothing is computed for it.
    small = node.store.add_bytes(b"small")
    assert await uploader.manifest_of(small, 5) is None and made == [sha1, sha2, sha3]


async def test_an_upload_with_a_manifest_from_the_hub_or_gone_vouches_for_nothing(
        hub, nursery, caplog):
    node = await make_node(hub, "node")
    uploader = (await parts.start(node, nursery, upload_workers=0)).uploader
    # Vouched for by the hub (for another channel, say): not this node's word to relay.
    data, sha1, manifest = large_file(2.5)
    node.store.add_bytes(data)
    node.store.add_bytes(manifest.to_bytes())
    node.store.cache.note_manifest(sha1, manifest.hash, vouched_by_hub(CH))
    with trio.fail_after(WAIT_S):
        await uploader.upload_now(CH, sha1, len(data))
    assert hub.server.hub.cache.size_of(CH, sha1) == len(data)
    assert hub.server.hub.manifests.get(CH, sha1) is None
    assert node.db.upload(CH, manifest.hash) is None  # not uploaded either
    # Computed here, but its content is gone from the store: finalized without a vouch.
    data, sha1, manifest = large_file(2.5)
    node.store.add_bytes(data)
    node.store.cache.note_manifest(sha1, manifest.hash, MANIFEST_HERE)
    with trio.fail_after(WAIT_S):
        await uploader.upload_now(CH, sha1, len(data))
    assert node.db.upload(CH, sha1).state == "done"
    assert hub.server.hub.manifests.get(CH, sha1) is None
    assert any("no longer in the local store" in r.getMessage() for r in caplog.records)


async def test_an_upload_whose_vouch_is_refused_is_done_with_a_warning(hub, nursery, caplog):
    node = await make_node(hub, "node")
    uploader = (await parts.start(node, nursery, upload_workers=0)).uploader
    data, sha1, manifest = large_file(2.5)
    liar = lying(data, manifest)
    node.store.add_bytes(data)
    node.store.add_bytes(liar.to_bytes())
    node.store.cache.note_manifest(sha1, liar.hash, MANIFEST_HERE)  # a bug here, say
    with trio.fail_after(WAIT_S):
        await uploader.upload_now(CH, sha1, len(data))
    assert node.db.upload(CH, sha1).state == "done"
    assert hub.server.hub.manifests.get(CH, sha1) is None
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                 and r.name == "kachery_fs.uploader"]
    assert f"did not take this node's manifest {liar.hash} of sha1://{sha1}: chunk 1" in \
        warning


# -- gs:// : the hub checks the manifest object only ------------------------------------------

gcs_hub = test_gcs.hub  # an in-process hub with gs:// on fake-gcs-server


async def test_on_gcs_the_manifest_object_is_checked_not_the_chunks(gcs_hub, tmp_path):
    server, owner, web = gcs_hub
    channel = "gcs.test"
    await owner.create_channel(channel, f"gs://{BUCKET}")
    await owner.authorize_node(channel, owner.key.node_id, ["provideFiles", "requestFiles"])
    data, sha1, manifest = large_file(2.5)
    liar = lying(data, manifest)
    await upload(owner, tmp_path, liar.to_bytes(), channel=channel, web=web)
    await upload(owner, tmp_path, b"not a manifest", channel=channel, web=web)
    assert await upload(owner, tmp_path, data, manifest=hashlib.sha1(
        b"not a manifest").hexdigest(), channel=channel, web=web) == \
        "refused: not a kachery manifest: not JSON"
    # The hub cannot read the file's chunks on GCS: a lie about one goes on record, to be
    # reported by the first reader it fails.
    assert await owner.finalize_upload(channel, sha1, len(data), manifest=liar.hash) == \
        "vouched"
    assert await owner.get_manifest(channel, sha1) == liar.hash
    await owner.report_manifest(channel, sha1, liar.hash, "4" * 40)
    assert await owner.get_manifest(channel, sha1) is None


async def test_only_the_node_whose_upload_put_the_file_there_may_vouch(hub, caplog):
    data, sha1, manifest = large_file()
    await in_bucket(hub, manifest.to_bytes())
    await in_bucket(hub, data)  # put there by the owner, without a manifest
    other_id, other = await writer(hub)
    said = await other.finalize_upload(CH, sha1, len(data), manifest=manifest.hash)
    assert said == "refused: only the node whose upload put the file there may vouch for" \
        " its manifest"
    assert await other.get_manifest(CH, sha1) is None
    assert refusals(caplog, other_id)
    # The owner, whose finalize put it on record, may.
    assert await hub.owner.finalize_upload(CH, sha1, len(data), manifest=manifest.hash) == \
        "vouched"


async def test_the_file_is_read_once_for_the_checks_of_several_manifests(hub, monkeypatch):
    from kachery_fs.hub import backends

    reads = []
    real = backends.LocalBucketBackend.range_sha1s

    async def counted(self, key, ranges):
        reads.append(key)
        return await real(self, key, ranges)

    monkeypatch.setattr(backends.LocalBucketBackend, "range_sha1s", counted)
    data, sha1, manifest = large_file()
    liars = [lying(data, manifest)]
    a, b = manifest.chunks[:2]
    liars.append(Manifest(manifest.size, sha1, (Chunk(a.start, a.end, b.sha1),
                                                *manifest.chunks[1:])))
    _, client = await writer(hub)
    for liar in liars:
        await in_bucket(hub, liar.to_bytes())
    await in_bucket(hub, manifest.to_bytes())
    assert (await upload(client, hub.base, data, manifest=liars[0].hash)).startswith("refused")
    assert (await client.finalize_upload(CH, sha1, len(data), manifest=liars[1].hash)
            ).startswith("refused: chunk 0")
    assert await client.finalize_upload(CH, sha1, len(data), manifest=manifest.hash) == \
        "vouched"
    assert len(reads) == 1
