"""Private channels, the hub's and the local bucket's side: a private channel's objects are
not readable anonymously, and the hub signs short-lived ``GET`` URLs of them, one object
each, for members that may read them. Against a real hub and its local bucket on 127.0.0.1,
whose V4 signature check is strict (as GCS's is); plain HTTP from outside, as an attacker
who learnt a bucket name or a URL would send it.
"""

from __future__ import annotations

import os
import shutil
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import trio

from kachery_fs import parts
from kachery_fs.bucket import object_url
from kachery_fs.errors import InvalidInput, PermissionDenied
from kachery_fs.hub_client import HubClient
from kachery_fs.identity import NodeKey
from kachery_fs.protocol import feed_prefix, object_key

from ..util import local_bucket_file
from . import test_faults
from .test_faults import CH, make_node

#: The hub suite: each test on a hub whose state is in SQLite, and in PostgreSQL.
HUB_DATABASES = ("sqlite", "postgresql")

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
WAIT_S = 30
OTHER = "other-lab"


async def stored(hub, node, data: bytes, channel: str = CH) -> str:
    """``data`` uploaded by ``node`` to ``channel``'s bucket; its SHA-1."""
    sha1 = node.store.add_bytes(data)
    uploader = (await parts.start(node, hub.nursery, upload_workers=0)).uploader
    with trio.fail_after(WAIT_S):
        await uploader.upload_now(channel, sha1, len(data))
    return sha1


def with_query(url: str, **changes: str) -> str:
    split = urlsplit(url)
    query = dict(parse_qsl(split.query))
    query.update(changes)
    return urlunsplit(split._replace(query=urlencode(query)))


@pytest.fixture
async def setup(hub, nursery):
    hub.nursery = nursery
    node = await make_node(hub, "reader")
    data = os.urandom(100_000)
    sha1 = await stored(hub, node, data)
    other = await stored(hub, node, os.urandom(5_000))
    base = node.db.channel(CH).bucket_base_url
    hub.server.db.set_private(CH, True)
    web = httpx.AsyncClient(trust_env=False)
    try:
        yield hub, node, data, sha1, other, base, web
    finally:
        await web.aclose()


async def test_an_anonymous_read_of_a_private_channels_object_is_refused(setup):
    hub, node, data, sha1, _, base, web = setup
    url = object_url(base, CH, sha1)
    for method in ("GET", "HEAD"):
        answer = await web.request(method, url, headers={"range": "bytes=0-9"})
        assert answer.status_code == 403, method
    assert b"AccessDenied" in (await web.get(url)).content
    # Nor under another spelling of its name (a file system that ignores case would open
    # the same file), nor under the name of no channel.
    await hub.owner.create_channel("Lab")
    hub.server.db.set_private("Lab", True)
    for name in ("lab", "LAB", "no-such-channel"):
        there = local_bucket_file(hub.server, name, sha1)
        there.parent.mkdir(parents=True)
        shutil.copyfile(local_bucket_file(hub.server, CH, sha1), there)
        assert (await web.get(object_url(base, name, sha1))).status_code == 403, name
    await hub.owner.create_channel("lab")  # public, but a private "Lab" exists
    assert (await web.get(object_url(base, "lab", sha1))).status_code == 403
    # Public again: read as before.
    hub.server.db.set_private(CH, False)
    assert (await web.get(url)).content == data


async def test_a_member_reads_through_a_signed_url_of_that_object_only(setup):
    hub, node, data, sha1, other, base, web = setup
    client = node.channels.hub(hub.url)
    assert (await client.get_channel(CH))["private"] is True
    [url], expires_in = await client.sign_reads(CH, [object_key(CH, sha1)])
    assert expires_in == hub.server.hub.read_url_expiry_s == 300
    assert url.startswith(object_url(base, CH, sha1) + "?")
    assert (await web.get(url)).content == data
    ranged = await web.get(url, headers={"range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == data[10:20]
    # The same signature on another object, or with another method: refused.
    moved = url.replace(sha1, other)
    assert (await web.get(moved)).status_code == 403
    await hub.owner.create_channel(OTHER)
    hub.server.db.set_private(OTHER, True)
    there = local_bucket_file(hub.server, OTHER, sha1)  # the same object in another channel
    there.parent.mkdir(parents=True)
    shutil.copyfile(local_bucket_file(hub.server, CH, sha1), there)
    elsewhere = url.replace(f"/{CH}/", f"/{OTHER}/")
    assert elsewhere != url and (await web.get(elsewhere)).status_code == 403
    assert (await web.head(url)).status_code == 403  # signed for GET only, as GCS
    # Tampered: one hex digit of the signature changed, or the expiry stretched.
    signature = dict(parse_qsl(urlsplit(url).query))["X-Goog-Signature"]
    flipped = ("0" if signature[-1] != "0" else "1")
    assert (await web.get(with_query(url, **{"X-Goog-Signature": signature[:-1] + flipped}))
            ).status_code == 403
    assert (await web.get(with_query(url, **{"X-Goog-Expires": "3600"}))).status_code == 403


async def test_an_expired_signed_url_is_refused(setup):
    hub, node, data, sha1, _, base, web = setup
    client = node.channels.hub(hub.url)
    [url], expires_in = await client.sign_reads(CH, [object_key(CH, sha1)])
    local = hub.server.local
    now = local.clock()
    local.clock = lambda: now + expires_in + 1
    answer = await web.get(url)
    assert answer.status_code == 400 and b"ExpiredToken" in answer.content


async def test_urls_are_signed_only_for_members_with_the_permission_and_the_channels_keys(
        setup):
    hub, node, data, sha1, _, base, web = setup
    stranger = await make_node(hub, "stranger")
    await hub.owner.authorize_node(CH, stranger.node_id, ["provideFiles"])  # no requests
    client = stranger.channels.hub(hub.url)
    with pytest.raises(PermissionDenied, match="requestFiles"):
        await client.sign_reads(CH, [object_key(CH, sha1)])
    feed_key = f"{feed_prefix(CH, 'a' * 64, 'b' * 40)}/subfeed.json"
    with pytest.raises(PermissionDenied, match="requestFeeds"):
        await client.sign_reads(CH, [feed_key])
    await hub.owner.authorize_node(CH, stranger.node_id, ["requestFeeds"])
    [url], _ = await client.sign_reads(CH, [feed_key])  # feeds only
    with pytest.raises(PermissionDenied, match="requestFiles"):
        await client.sign_reads(CH, [feed_key, object_key(CH, sha1)])
    # A node that is no member of the channel at all.
    outsider = NodeKey.generate()
    async with httpx.AsyncClient(trust_env=False) as raw:
        with pytest.raises(PermissionDenied):
            await HubClient(hub.url, outsider, raw).sign_reads(CH, [object_key(CH, sha1)])

    reader = node.channels.hub(hub.url)
    await hub.owner.create_channel(OTHER)
    bad_keys = [object_key(OTHER, sha1),  # another channel's object
                f"{CH}/sha1/{sha1}",  # not the layout
                f"{CH}/feeds/../sha1/{sha1}",  # out of the feeds
                f"{CH}/hub.db", "", 7]
    for key in bad_keys:
        with pytest.raises(InvalidInput):
            await reader.sign_reads(CH, [key])
    with pytest.raises(InvalidInput):
        await reader.sign_reads(CH, [])
    with pytest.raises(InvalidInput):
        await reader.sign_reads(CH, [object_key(CH, sha1)] * 501)


async def test_a_revoked_member_gets_no_new_urls(setup):
    hub, node, data, sha1, _, base, web = setup
    client = node.channels.hub(hub.url)
    [url], _ = await client.sign_reads(CH, [object_key(CH, sha1)])
    await hub.owner.authorize_node(CH, node.node_id, [])  # revoked
    with pytest.raises(PermissionDenied):
        await client.sign_reads(CH, [object_key(CH, sha1)])
    # What it holds reads until it expires (the configured lifetime bounds it).
    assert (await web.get(url)).content == data
