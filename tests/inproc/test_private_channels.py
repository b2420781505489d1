"""Private channels, the node's side: a node reads a private channel's files and feeds
through URLs its hub signs, one signature per object (not per range), renewed before they
expire; a node that loses its permission reads nothing new; no signed URL reaches a log.
Against a real hub and its local bucket on 127.0.0.1 (which checks signatures as GCS
does), with the parts a mount runs (``parts.start``).
"""

from __future__ import annotations

import errno
import logging
import os

import httpx
import pytest
import trio

from kachery_fs import parts, readurls
from kachery_fs.errors import DeadlineExceeded, PermissionDenied, Unavailable
from kachery_fs.feeds import FeedStore, FeedSync
from kachery_fs.hub import service
from kachery_fs.protocol import PERMISSIONS, feed_prefix, object_key
from kachery_fs.readurls import ReadUrls

from ..util import log_requests
from . import test_faults
from .test_faults import CH, fuse_errno, make_node, mount_in_process
from .test_private_reads import stored

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
WAIT_S = 60
SIGNATURE = "X-Goog-Signature"


async def read_whole(resolver, sha1: str) -> bytes:
    with trio.fail_after(WAIT_S):
        content = await resolver.open(CH, sha1)
        try:
            return await content.read(0, content.size)
        finally:
            content.close()


def count_signing(node) -> list[list[str]]:
    """The keys of each ``signReads`` that ``node`` sends from now on."""
    client = node.channels.hub(node.db.channel(CH).hub_url)
    calls: list[list[str]] = []
    sign_reads = client.sign_reads

    async def counted(channel, keys):
        calls.append(list(keys))
        return await sign_reads(channel, keys)

    client.sign_reads = counted
    return calls


def no_signature_logged(caplog) -> None:
    """No log line of kachery-fs shows a signature. (Those of httpx and httpcore, which
    name each URL they fetch, are held at WARNING by the command line's logging setup.)"""
    ours = [r for r in caplog.records if r.name.startswith("kachery_fs")]
    assert ours, "kachery-fs logged nothing: the check would prove nothing"
    for record in ours:
        assert SIGNATURE not in record.getMessage(), record.getMessage()


@pytest.fixture
async def private(hub, nursery):
    """A private channel holding a small file and a large one (read by chunk, its manifest
    vouched for by the uploader); ``(hub, {sha1: data})``."""
    hub.nursery = nursery
    writer = await make_node(hub, "writer")
    files = {}
    for data in (os.urandom(150_000), os.urandom(45_000_000)):
        files[await stored(hub, writer, data)] = data
    await hub.owner.set_channel(CH, {"private": True})
    return hub, files


async def test_a_member_reads_a_private_channel_with_one_signature_per_object(
        private, nursery, caplog):
    hub, files = private
    caplog.set_level(logging.DEBUG)
    reader = await make_node(hub, "reader")
    assert reader.db.channel(CH).private  # told by the hub as it joined
    signing = count_signing(reader)
    requests = log_requests(hub)
    resolver = (await parts.start(reader, nursery)).resolver
    for sha1, data in files.items():
        assert await resolver.size(CH, sha1) == len(data)
        assert await read_whole(resolver, sha1) == data
    # Every read of the bucket was signed; sizes came from ranged GETs, not HEADs.
    reads = requests.of("GET", f"/{CH}/")
    assert len(reads) >= 4  # two files, a manifest, ranges of the large file
    assert all(SIGNATURE in target for target, _ in reads)
    assert not requests.of("HEAD", f"/{CH}/")
    # One signature per object: the two files and the large one's manifest.
    signed = [key for call in signing for key in call]
    assert len(signed) == len(set(signed)) == 3
    assert {object_key(CH, sha1) for sha1 in files} <= set(signed)
    no_signature_logged(caplog)


async def test_a_channel_made_private_after_a_node_joined_is_read_signed(private, nursery):
    hub, files = private
    await hub.owner.set_channel(CH, {"private": False})
    reader = await make_node(hub, "reader")
    assert not reader.db.channel(CH).private
    await hub.owner.set_channel(CH, {"private": True})
    resolver = (await parts.start(reader, nursery)).resolver
    sha1 = min(files, key=lambda h: len(files[h]))
    # Its anonymous read is refused; it asks the hub, learns, and reads signed.
    assert await read_whole(resolver, sha1) == files[sha1]
    assert reader.db.channel(CH).private


async def test_a_revoked_member_reads_nothing_new(private, nursery, caplog):
    hub, files = private
    small, large = sorted(files, key=lambda h: len(files[h]))
    reader = await make_node(hub, "reader")
    fs = await mount_in_process(reader, nursery)
    await fs.lookup(small)
    await hub.owner.authorize_node(CH, reader.node_id, [])
    with trio.fail_after(5):  # at once: no timeout, no retry loop
        assert await fuse_errno(fs.lookup(large)) == errno.EACCES
    assert any("refuses this node signed reads" in r.getMessage() for r in caplog.records)
    no_signature_logged(caplog)


async def test_read_urls_are_kept_renewed_and_dropped_when_refused(private):
    hub, files = private
    reader = await make_node(hub, "reader")
    now = [1000.0]
    urls = ReadUrls(reader.channels, clock=lambda: now[0])
    signing = count_signing(reader)
    small, large = sorted(files, key=lambda h: len(files[h]))
    key = object_key(CH, small)
    hub.server.hub.read_url_expiry_s = 90
    first = await urls.url(CH, key)
    now[0] += 59  # more than a third of its life left: kept
    assert await urls.url(CH, key) == first
    assert len(signing) == 1
    now[0] += 2  # less: renewed
    await urls.url(CH, key)  # (the same URL when signed within the same second)
    assert len(signing) == 2
    # Reads that want URLs at the same moment share one signReads.
    keys = [object_key(CH, small), object_key(CH, large)]
    now[0] += 1000
    got = [None, None]

    async def want(i):
        got[i] = await urls.url(CH, keys[i])

    async with trio.open_nursery() as n:
        for i in range(2):
            n.start_soon(want, i)
    assert len(signing) == 3 and sorted(signing[-1]) == sorted(keys)
    # The hub stops signing: nothing held is handed out any more.
    await hub.owner.authorize_node(CH, reader.node_id, [])
    now[0] += 61
    with pytest.raises(PermissionDenied):
        await urls.url(CH, keys[0])
    with pytest.raises(PermissionDenied):
        await urls.url(CH, keys[1])
    # A public channel's objects need no signature (the hub tells members only).
    await hub.owner.authorize_node(CH, reader.node_id, test_faults.PERMS)
    await hub.owner.set_channel(CH, {"private": False})
    await reader.channels.refresh(CH)
    assert "?" not in await urls.url(CH, key)


async def test_feeds_of_a_private_channel_are_published_and_read_signed(hub):
    owner = await make_node(hub, "owner")
    await hub.owner.authorize_node(CH, owner.node_id, list(PERMISSIONS))
    await hub.owner.set_channel(CH, {"private": True})
    await owner.channels.refresh(CH)
    store = FeedStore.for_node(owner.dir)
    reader = await make_node(hub, "feed-reader")
    await hub.owner.authorize_node(CH, reader.node_id, ["requestFeeds"])  # no files
    await reader.channels.refresh(CH)
    reader_store = FeedStore.for_node(reader.dir)
    try:
        feed = store.create_feed()
        await trio.to_thread.run_sync(store.append, feed, "s", [{"n": i} for i in range(700)])
        h = store.subfeeds(feed)[0].subfeed_hash
        with trio.fail_after(WAIT_S):
            assert await FeedSync(owner.channels, store, owner.client, owner.urls).publish(
                CH, feed, h) == (0, 700)
        signing = count_signing(reader)
        requests = log_requests(hub)
        with trio.fail_after(WAIT_S):
            added, problem = await FeedSync(reader.channels, reader_store, reader.client,
                                            reader.urls).fetch(CH, feed, h)
        assert (added, problem) == (700, None)
        reads = requests.of("GET", f"/{CH}/feeds/")
        assert reads and all(SIGNATURE in target for target, _ in reads)
        assert len(signing) == 2  # the index; then the two batches together
        # Anonymous reads of the feed's objects are refused.
        async with httpx.AsyncClient(trust_env=False) as web:
            target, _ = reads[0]
            answer = await web.get(f"{hub.url}{target.partition('?')[0]}")
        assert answer.status_code == 403
    finally:
        store.close()
        reader_store.close()


def signing_stalls(method, path, kind):
    return kind == "signReads"


async def test_a_hub_that_does_not_sign_delays_reads_a_little_and_fails_none(
        private, monkeypatch):
    hub, files = private
    reader = await make_node(hub, "reader")
    now = [1000.0]
    urls = ReadUrls(reader.channels, clock=lambda: now[0])
    small, large = sorted(files, key=lambda h: len(files[h]))
    key = object_key(CH, small)
    held = await urls.url(CH, key)
    signing = count_signing(reader)
    hub.faults.add(signing_stalls, None)  # the hub never answers signReads from here on
    now[0] += 250  # a third of its 300 s life left: renewed, with one short try
    with trio.fail_after(readurls.RENEW_WAIT_S + 1):
        assert await urls.url(CH, key) == held
    with trio.fail_after(0.5):  # then not asked again for a while
        assert await urls.url(CH, key) == held
    assert len(signing) == 1
    # Signing ahead gives up within its deadline, and raises nothing.
    monkeypatch.setattr(readurls, "SIGN_DEADLINE_S", 1.0)
    with trio.fail_after(2):
        await urls.prefetch(CH, [object_key(CH, large)])
    # A URL that cannot be had is an error that says so.
    with pytest.raises(DeadlineExceeded, match="signed no read URL"):
        await urls.url(CH, object_key(CH, large))


async def test_a_refusal_of_one_kind_leaves_the_urls_of_the_other(private):
    hub, files = private
    reader = await make_node(hub, "feed-reader")
    await hub.owner.authorize_node(CH, reader.node_id, ["requestFeeds"])
    urls = ReadUrls(reader.channels)
    feed_key = f"{feed_prefix(CH, 'a' * 64, 'b' * 40)}/subfeed.json"
    held = await urls.url(CH, feed_key)
    signing = count_signing(reader)
    with pytest.raises(PermissionDenied):
        await urls.url(CH, object_key(CH, next(iter(files))))
    assert await urls.url(CH, feed_key) == held  # still held: not asked again
    assert len(signing) == 1


async def test_refused_anonymous_reads_ask_the_hub_once_for_many(hub):
    node = await make_node(hub, "reader")
    urls = ReadUrls(node.channels)
    asked = []
    refresh = node.channels.refresh

    async def counted(channel):
        asked.append(channel)
        return await refresh(channel)

    node.channels.refresh = counted
    key = object_key(CH, "ab" * 20)
    anonymous = await urls.url(CH, key)
    results = []

    async def refused():
        results.append(await urls.refused(CH, key, anonymous))

    async with trio.open_nursery() as n:
        for _ in range(20):  # a public channel whose bucket refuses everyone
            n.start_soon(refused)
    assert results == [False] * 20 and len(asked) == 1


async def test_the_hub_bounds_the_signing_of_one_node(private):
    hub, files = private
    reader = await make_node(hub, "reader")
    client = reader.channels.hub(hub.url)
    key = object_key(CH, next(iter(files)))
    [one, again], _ = await client.sign_reads(CH, [key, key])  # signed once
    assert one == again
    hub.server.hub._signing_by[reader.node_id] = service.MAX_SIGNING_PER_NODE
    with pytest.raises(Unavailable, match="signReads in progress"):
        await client.sign_reads(CH, [key])
