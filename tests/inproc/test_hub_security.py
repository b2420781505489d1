"""Attacks on the hub by outsiders and by channel members, each refused.

The hub runs in process (its real ASGI app over httpx.ASGITransport, tests/util.py), or as
a real server on 127.0.0.1 where the attack is on the HTTP layer itself.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from kachery_fs import resumable
from kachery_fs.errors import Conflict, IntegrityError
from kachery_fs.protocol import object_key

from ..util import hub_in_process

#: The hub suite: each test on a hub whose state is in SQLite, and in PostgreSQL.
HUB_DATABASES = ("sqlite", "postgresql")

CH = "lab.data"


@pytest.fixture
async def env(tmp_path, hub_database):
    async with hub_in_process(tmp_path / "hub", hub_database) as env:
        server, owner, other, client = env
        await owner.create_channel(CH)
        for node in (owner, other):
            await owner.authorize_node(CH, node.key.node_id, ["provideFiles", "requestFiles"])
        yield env


async def upload(server, client, node, data: bytes) -> str:
    sha1 = hashlib.sha1(data).hexdigest()
    signed = await node.initiate_upload(CH, sha1, len(data))
    if signed is not None:
        session = await resumable.start_session(client, signed)
        path = server.directory / f"payload-{sha1}"
        path.write_bytes(data)
        await resumable.upload(client, session, path, len(data))
        await node.finalize_upload(CH, sha1, len(data))
    return sha1


def in_bucket(server, sha1: str) -> bool:
    return server.local.stat("kachery", object_key(CH, sha1)) is not None


def put_behind_the_hubs_back(server, data: bytes) -> str:
    """An object in the bucket that the hub has no record of (its finalize was lost)."""
    sha1 = hashlib.sha1(data).hexdigest()
    src = server.local.temp_path()
    src.write_bytes(data)
    server.local.install(src, "kachery", object_key(CH, sha1), generation_match=None)
    return sha1


async def test_a_members_size_claims_never_delete_a_verified_object(env):
    server, owner, other, client = env
    data = b"verified content " * 500
    sha1 = await upload(server, client, owner, data)
    assert in_bucket(server, sha1)

    with pytest.raises(Conflict, match=f"{len(data)} bytes, not {len(data) + 1}"):
        await other.initiate_upload(CH, sha1, len(data) + 1)
    assert in_bucket(server, sha1)
    with pytest.raises(Conflict, match=f"{len(data)} bytes, not {len(data) - 1}"):
        await other.finalize_upload(CH, sha1, len(data) - 1)
    assert in_bucket(server, sha1)
    assert server.hub.cache.size_of(CH, sha1) == len(data)
    # and the honest claim still finds it there
    assert await other.initiate_upload(CH, sha1, len(data)) is None


async def test_an_unrecorded_object_that_checks_is_recorded_not_deleted(env):
    server, _, other, _ = env
    data = b"finalize was lost " * 300
    sha1 = put_behind_the_hubs_back(server, data)
    with pytest.raises(Conflict):
        await other.initiate_upload(CH, sha1, len(data) + 7)
    assert in_bucket(server, sha1)
    assert server.hub.cache.size_of(CH, sha1) == len(data)

    sha1b = put_behind_the_hubs_back(server, b"another lost finalize" * 40)
    with pytest.raises(Conflict):
        await other.finalize_upload(CH, sha1b, 3)
    assert in_bucket(server, sha1b) and server.hub.cache.size_of(CH, sha1b) is not None


async def test_an_unrecorded_bad_object_is_replaced(env):
    server, _, other, _ = env
    claimed = hashlib.sha1(b"the real content").hexdigest()
    src = server.local.temp_path()
    src.write_bytes(b"garbage of another length")
    server.local.install(src, "kachery", object_key(CH, claimed), generation_match=None)
    # proven bad by its hash: deleted, and the honest uploader gets a URL
    assert await other.initiate_upload(CH, claimed, len(b"the real content")) is not None
    assert not in_bucket(server, claimed)
    src = server.local.temp_path()
    src.write_bytes(b"more garbage")
    server.local.install(src, "kachery", object_key(CH, claimed), generation_match=None)
    with pytest.raises(IntegrityError, match="hashes to"):
        await other.finalize_upload(CH, claimed, len(b"more garbage"))
    assert not in_bucket(server, claimed)


# -- feeds ------------------------------------------------------------------------------------

@pytest.fixture
async def feed_env(tmp_path):
    """A hub in process; node A owns a feed and publishes it, node M is another member with
    every feed permission, both Nodes talking to the hub through the same ASGI client."""
    from kachery_fs.feeds import FeedStore, FeedSync
    from kachery_fs.node import Node

    from ..util import IN_PROCESS_HUB_URL as URL

    async with hub_in_process(tmp_path / "hub") as (server, owner, other, client):
        await owner.create_channel(CH)
        nodes = []
        for name, hc in (("a", owner), ("m", other)):
            await owner.authorize_node(CH, hc.key.node_id, list(PERMS))
            hc.key.save(tmp_path / name)
            node = Node(tmp_path / name, client=client)
            node.db.add_channel(CH, URL, f"{URL}/kachery", set(PERMS))
            nodes.append(node)
        a, m = nodes
        store_a = FeedStore(a.dir / "feeds.db")
        store_m = FeedStore(m.dir / "feeds.db")
        feed = store_a.create_feed("results")
        try:
            yield (server, client, FeedSync(a.channels, store_a, client),
                   FeedSync(m.channels, store_m, client), feed)
        finally:
            store_a.close()
            store_m.close()
            for node in nodes:
                node.db.close()


PERMS = ("requestFiles", "provideFiles", "requestFeeds", "provideFeeds")


def recording(client, seen: list):
    """Wrap the client's post so that every envelope sent is recorded (a wire tap)."""
    post = client.post

    async def tapped(url, *args, **kwargs):
        if "json" in kwargs:
            seen.append(kwargs["json"])
        return await post(url, *args, **kwargs)
    client.post = tapped


async def test_a_feed_cosignature_seen_on_the_wire_authorizes_nothing_else(feed_env):
    from kachery_fs.errors import PermissionDenied
    from kachery_fs.feeds import subfeed_hash

    server, client, sync_a, sync_m, feed = feed_env
    seen: list = []
    recording(client, seen)
    sync_a.store.append(feed, "log", [{"step": 1}])
    await sync_a.publish(CH, feed, subfeed_hash("log"))
    captured = [e["body"] for e in seen if "feedSignature" in e["body"]]
    assert captured
    hub_m = sync_m.channels.hub_of(CH)
    h = subfeed_hash("log")
    for body in captured:
        for kind, fields in (("feedUploadUrls", {"start": 0, "sizes": [10], "indexSize": 20}),
                             ("feedUpdated", {"messageCount": 2**53 - 1})):
            envelope = hub_m.envelope(kind, {"channel": CH, "feedId": feed,
                                             "subfeedHash": h, **fields})
            # the owner's nonce too: nonces are remembered per calling node
            envelope["body"]["nonce"] = body["nonce"]
            envelope["body"]["feedSignature"] = body["feedSignature"]
            envelope["signature"] = hub_m.key.sign(envelope["body"])
            r = await client.post("/api/node", json=envelope)
            # refused for the feed signature; the second time, for the nonce M used once
            assert r.status_code == (403 if kind == "feedUploadUrls" else 401), r.text
        # the owner's whole body, re-signed by M: its nodeId is A's, which M cannot sign for
        stolen = {k: v for k, v in body.items() if k not in ("nonce", "timestamp")}
        envelope = hub_m.envelope(stolen.pop("type"), stolen)
        r = await client.post("/api/node", json=envelope)
        assert r.status_code in (401, 403), r.text
    assert server.hub.feeds.count(CH, feed, h) == 1
    with pytest.raises(PermissionDenied):
        await hub_m.call("feedUpdated", cosign=hub_m.key, channel=CH, feedId=feed,
                         subfeedHash=h, messageCount=2)


async def test_a_count_is_taken_only_for_published_messages_and_an_owner_repairs_one(feed_env):
    from kachery_fs.errors import InvalidInput
    from kachery_fs.feeds import subfeed_hash

    server, client, sync_a, _, feed = feed_env
    h = subfeed_hash("log")
    hub_a = sync_a.channels.hub_of(CH)
    key = sync_a.store.key(feed)
    ids = {"channel": CH, "feedId": feed, "subfeedHash": h}
    with pytest.raises(InvalidInput, match="not in the bucket"):
        await hub_a.call("feedUpdated", cosign=key, messageCount=3, **ids)
    with pytest.raises(InvalidInput, match="messageCount"):
        await hub_a.call("feedUpdated", cosign=key, messageCount=2**53 - 1, **ids)
    assert server.hub.feeds.count(CH, feed, h) == 0

    sync_a.store.append(feed, "log", [{"step": i} for i in range(3)])
    assert await sync_a.publish(CH, feed, h) == (0, 3)
    # a count pushed up by an earlier hub that believed anyone: the owner's next publish
    # puts it right, and the new message goes up
    server.hub.feeds.set_count(CH, feed, h, 2**53 - 1)
    sync_a.store.append(feed, "log", [{"step": 3}])
    assert await sync_a.publish(CH, feed, h) == (0, 4)  # announced again from 0
    assert server.hub.feeds.count(CH, feed, h) == 4


async def test_a_reader_never_fetches_beyond_the_hubs_count(feed_env):
    from kachery_fs.feeds import subfeed_hash
    from kachery_fs.protocol import feed_prefix

    server, client, sync_a, sync_m, feed = feed_env
    h = subfeed_hash("log")
    sync_a.store.append(feed, "log", [{"step": i} for i in range(3)])
    await sync_a.publish(CH, feed, h)
    sync_m.store.add_feed(feed)
    # the index in the bucket claims 50,000 messages (as one with the bucket's keys could)
    src = server.local.temp_path()
    src.write_bytes(b'{"messageCount":50000}')
    server.local.install(src, "kachery", f"{feed_prefix(CH, feed, h)}/subfeed.json",
                         generation_match=None)
    gets: list = []
    get = client.get

    async def counting(url, *args, **kwargs):
        gets.append(url)
        return await get(url, *args, **kwargs)
    client.get = counting
    added, problem = await sync_m.fetch(CH, feed, h)
    assert (added, problem) == (3, None)
    assert len(gets) <= 5, gets
    # where the hub knows no count (a subfeed an earlier kachery published), the singles
    # are read up to the first gap, in a small window
    server.hub.feeds.set_count(CH, feed, h, 0, lower=True)
    sync_m.store.close()
    sync_m.store = type(sync_m.store)(sync_m.store.path.parent / "feeds2.db")
    sync_m.store.add_feed(feed)
    gets.clear()
    added, _ = await sync_m.fetch(CH, feed, h)
    assert added == 3 and len(gets) <= 40, len(gets)


# -- requests that cost the hub ------------------------------------------------------------

# httpx's in-process transport leaves the body it was sending unfinished when the app
# stops reading it, which is what this test checks the hub does.
@pytest.mark.filterwarnings("ignore:Async generator 'httpx._content.AsyncIteratorByteStream"
                            ".__aiter__' was garbage collected:ResourceWarning")
async def test_an_oversized_body_is_refused_before_it_is_read(env):
    server, owner, _, client = env
    r = await client.post("/api/node", content=b"x",
                          headers={"content-length": str(256 << 20)})
    assert r.status_code == 413 and "too_large" in r.text
    sent = 0

    async def endless():  # no Content-Length: refused as the running total passes 1 MiB
        nonlocal sent
        while sent < 64 << 20:
            sent += 64 << 10
            yield b" " * (64 << 10)
    r = await client.post("/api/node", content=endless())
    assert r.status_code == 413
    assert sent <= 2 << 20  # the hub stopped reading


async def test_json_nested_thousands_deep_is_a_clear_400(env):
    _, _, _, client = env
    r = await client.post("/api/node", content=b"[" * 5000 + b"]" * 5000)
    assert r.status_code == 400 and "not JSON" in r.text


async def test_feed_watches_are_bounded_per_node_and_wake_at_the_cost_of_what_changed(env):
    import trio

    from kachery_fs.errors import Unavailable
    from kachery_fs.hub.service import MAX_WATCHES

    server, owner, other, _ = env
    await owner.authorize_node(CH, other.key.node_id, ["requestFeeds"])
    await owner.authorize_node(CH, owner.key.node_id, ["requestFeeds"])
    feed = "ab" * 32
    subs = [{"feedId": feed, "subfeedHash": f"{i:040x}", "position": 0} for i in range(1000)]
    results = []
    feeds = server.hub.feeds
    async with trio.open_nursery() as nursery:
        async def watch():
            results.append(await other.call("watchFeeds", wait_s=20, channel=CH,
                                            subscriptions=subs))
        for _ in range(MAX_WATCHES):
            nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked(0.05)
        with pytest.raises(Unavailable, match="long-polls"):
            await other.call("watchFeeds", wait_s=20, channel=CH, subscriptions=subs)
        # another node is not held back by that one
        assert (await owner.call("watchFeeds", channel=CH, subscriptions=subs[:1])
                )["updates"] == []
        statements = []
        database = server.db.database
        execute = database.execute

        def counted(sql, params=()):
            statements.append(sql)
            return execute(sql, params)

        database.execute = counted  # the statements of the hub's parts, on either engine
        try:
            feeds.set_count(CH, feed, f"{7:040x}", 3)
            await trio.testing.wait_all_tasks_blocked(0.05)
        finally:
            del database.execute
    assert len(results) == MAX_WATCHES
    for answer in results:
        assert answer["updates"] == [{"feedId": feed, "subfeedHash": f"{7:040x}",
                                      "messageCount": 3}]
    # the count's write (and its notification), then per woken watch its count and its
    # channel's bucket: not one query per subscription
    assert len(statements) <= 2 + 2 * MAX_WATCHES, statements
    assert feeds._watches == {} and server.hub._polls == {}


# -- local users ----------------------------------------------------------------------------

def test_node_and_hub_directories_are_private_and_old_ones_are_fixed(tmp_path, caplog):
    import os
    import stat

    from kachery_fs.hub.serve import HubServer
    from kachery_fs.identity import NodeKey
    from kachery_fs.node import Node, init_node

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    old = os.umask(0o022)
    try:
        node_dir, hub_dir = tmp_path / "node", tmp_path / "hub"
        init_node(node_dir)
        node = Node(node_dir)
        node.db.close()
        server = HubServer(hub_dir, owner_id=NodeKey.generate().node_id)
        server.close()
        assert mode(node_dir) == 0o700 and mode(hub_dir) == 0o700
        assert mode(node_dir / "node.db") == 0o600 and mode(hub_dir / "hub.db") == 0o600
        # as an earlier version left them: fixed at the next start, and said so
        for d, db in ((node_dir, "node.db"), (hub_dir, "hub.db")):
            os.chmod(d, 0o755)
            os.chmod(d / db, 0o644)
        caplog.set_level("WARNING")
        Node(node_dir).db.close()
        HubServer(hub_dir, owner_id=NodeKey.generate().node_id).close()
        assert mode(node_dir) == 0o700 and mode(hub_dir) == 0o700
        assert mode(node_dir / "node.db") == 0o600 and mode(hub_dir / "hub.db") == 0o600
        assert sum("made" in r.message and "private" in r.message for r in caplog.records) == 2
    finally:
        os.umask(old)


async def test_a_body_that_trickles_in_is_given_up(env, monkeypatch):
    import trio

    from kachery_fs.hub import app

    monkeypatch.setattr(app, "BODY_TIMEOUT_S", 0.5)
    _, _, _, client = env

    async def trickle():
        for _ in range(100):
            yield b" "
            await trio.sleep(0.1)
    with trio.fail_after(5):
        r = await client.post("/api/node", content=trickle())
    assert r.status_code == 408 and "not received within" in r.text


async def test_a_subfeed_named_by_an_upper_case_hash_goes_through_the_hub_as_written(feed_env):
    from kachery_fs.feeds import subfeed_hash
    from kachery_fs.protocol import feed_prefix

    server, _, sync_a, sync_m, feed = feed_env
    name = "~" + "AB12" * 10
    h = subfeed_hash(name)
    assert h == "AB12" * 10
    sync_a.store.append(feed, name, [{"step": 1}, {"step": 2}])
    assert await sync_a.publish(CH, feed, h) == (0, 2)
    assert server.local.stat("kachery", f"{feed_prefix(CH, feed, h)}/1") is not None
    sync_m.store.add_feed(feed)
    assert await sync_m.fetch(CH, feed, h) == (2, None)
    assert server.hub.feeds.count(CH, feed, h) == 2


async def test_small_holes(env):
    from kachery_fs.errors import InvalidInput
    from kachery_fs.hub.service import check_channel_name

    server, owner, other, client = env
    with pytest.raises(InvalidInput):
        check_channel_name("lab.data\n")
    with pytest.raises(InvalidInput, match="label"):
        await owner.authorize_node(CH, other.key.node_id, ["requestFiles"], label=["x"])
    r = await client.post("/api/node", json=owner.envelope("authorizeNode", {
        "channel": CH, "targetNodeId": other.key.node_id, "permissions": [], "label": 5}))
    assert r.status_code == 400
    # download claims count only for objects on record, for at most their size
    data = b"downloaded " * 100
    sha1 = await upload(server, client, owner, data)
    await other.call("reportDownloads", channel=CH, downloads=[
        [sha1, 5 * 1024**4], [sha1, 5 * 1024**4], ["0" * 40, 5 * 1024**4]])
    stats = server.hub.cache.stats(CH)
    assert stats["downloads"]["bytes"] == len(data), stats


async def test_strangers_cannot_make_the_hub_check_big_signatures_or_probe_names(env):
    from kachery_fs.errors import PermissionDenied
    from kachery_fs.hub_client import HubClient
    from kachery_fs.identity import NodeKey

    server, owner, other, client = env
    stranger = HubClient(owner.url, NodeKey.generate(), client)
    big = {"channel": CH, "pad": [1.5] * 5000}
    r = await client.post("/api/node", json=stranger.envelope("getChannel", big))
    assert r.status_code == 401 and "not authorized on any channel" in r.text
    assert (await other.call("getChannel", **big))["permissions"]  # a member may
    assert (await stranger.get_channel(CH))["permissions"] == []  # small requests: fine
    # a nonce that SQLite cannot store is a clear refusal, not a 500
    envelope = stranger.envelope("getChannel", {"channel": CH})
    envelope["body"]["nonce"] = "\ud800" * 20
    r = await client.post("/api/node", content=json.dumps(envelope).encode())
    assert r.status_code == 400 and "surrogate" in r.text
    envelope["body"]["nonce"] = "é" * 20
    r = await client.post("/api/node", content=json.dumps(envelope).encode())
    assert r.status_code == 401 and "nonce" in r.text
    # a channel that exists and one that does not are refused alike
    messages = set()
    for name in (CH, "no.such.channel"):
        with pytest.raises(PermissionDenied) as info:
            await stranger.call("requestFile", channel=name, sha1="0" * 40)
        messages.add(str(info.value).replace(name, "NAME"))
    assert len(messages) == 1


async def test_more_odd_input_is_a_clear_400_and_finalize_again_costs_nothing(env):
    from kachery_fs.errors import InvalidInput
    from kachery_fs.localbucket import select_range

    server, owner, other, client = env
    with pytest.raises(InvalidInput, match="permissions"):
        await owner.call("authorizeNode", channel=CH, targetNodeId=other.key.node_id,
                         permissions=[[1]])
    envelope = owner.envelope("authorizeNode", {"channel": CH, "permissions": [],
                                                "targetNodeId": other.key.node_id,
                                                "label": "\ud800x"})
    r = await client.post("/api/node", content=json.dumps(envelope).encode())
    assert r.status_code == 400 and "surrogate" in r.text
    with pytest.raises(InvalidInput, match="label"):
        await owner.authorize_node(CH, other.key.node_id, ["requestFiles"], label="a\nb")
    with pytest.raises(InvalidInput, match="allocation"):
        await owner.call("createChannel", channel="big.alloc", allocation=2**63)
    with pytest.raises(InvalidInput, match="allocation"):
        await owner.call("setChannel", channel=CH, allocation=2**63)
    assert "big.alloc" not in [c["channel"] for c in await owner.list_channels()]
    assert select_range("bytes=" + "9" * 5000 + "-", 100) is None  # malformed: whole object
    await owner.call("setChannel", channel=CH, allocation=1000)
    with pytest.raises(InvalidInput, match="more than the allocation"):
        await other.initiate_upload(CH, "ab" * 20, 1001)
    await owner.call("setChannel", channel=CH, allocation=None)
    # a finalize repeated on an object on record neither hashes it again nor counts it
    data = b"finalized once " * 100
    sha1 = await upload(server, client, owner, data)
    hashed = []
    server.local.sha1 = lambda *a, real=server.local.sha1: hashed.append(a) or real(*a)
    for _ in range(3):
        await other.finalize_upload(CH, sha1, len(data))
    assert hashed == [] and server.hub.cache.stats(CH)["uploads"]["count"] == 1


async def test_a_node_cannot_make_the_hub_remember_unfinished_uploads_without_bound(
        env, monkeypatch):
    from kachery_fs.errors import Unavailable
    from kachery_fs.hub import cache

    server, owner, other, client = env
    monkeypatch.setattr(cache, "MAX_UPLOADS_IN_FLIGHT", 3)
    hashes = [hashlib.sha1(bytes([i])).hexdigest() for i in range(4)]
    for h in hashes[:3]:
        assert await other.initiate_upload(CH, h, 1) is not None
    assert await other.initiate_upload(CH, hashes[0], 1) is not None  # again: not counted
    with pytest.raises(Unavailable, match="started and not finished"):
        await other.initiate_upload(CH, hashes[3], 1)
    assert await owner.initiate_upload(CH, hashes[3], 1) is not None  # others are not held
    # a finished upload frees its place
    await upload(server, client, other, bytes([0]))
    assert await other.initiate_upload(CH, hashlib.sha1(b"next").hexdigest(), 4) is not None
    assert server.hub.cache.stats(CH)["inFlight"] == 4  # the other node's 3, the owner's 1
