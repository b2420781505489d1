"""The Provider (file requests, Q in developer-notes/read-path.md) against a real hub and
local bucket on 127.0.0.1: node A answers the hub's offers, node B asks through its
Resolver for a hash that no bucket has. Both nodes' parts are built by the composition
root (``parts.start``; A with ``provide=True``).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from kachery_fs import parts, settings
from kachery_fs.node import Node
from kachery_fs.provider import Provider
from kachery_fs.requester import RequestFailed

from ..util import bucket_head, local_bucket_file, past_startup_grace, until
from . import test_faults
from .test_faults import CH, Hub, connected_provider, make_node
from .test_resolver import read_all

#: The hub suite: each test on a hub whose state is in SQLite, and in PostgreSQL.
HUB_DATABASES = ("sqlite", "postgresql")

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
#: A bound on any one wait here (loopback, files of a few hundred KB).
WAIT_S = 30


async def provider_with_sources(hub: Hub, nursery: trio.Nursery, name: str,
                                sources: list[str]) -> tuple[Node, Provider]:
    """A providing node that reads the kachery stores ``sources``, once the hub has its
    listen (as ``connected_provider``, with sources set before its parts start)."""
    node = await make_node(hub, name)
    settings.update(node.dir, sources=sources, auto_sources=False)
    provider = (await parts.start(node, nursery, provide=True)).provider
    await until(lambda: getattr(provider.connections.get(hub.url), "state", None)
                == "connected", within=WAIT_S, what="the provider's listen")
    return node, provider


async def test_a_file_only_on_a_provider_is_uploaded_and_read_verified(hub, nursery):
    a = await connected_provider(hub, nursery)
    data = os.urandom(400_000)
    sha1 = a.store.add_bytes(data)  # in A's store only: in no bucket
    b = await make_node(hub, "requester")
    res = (await parts.start(b, nursery)).resolver
    assert (await bucket_head(b, CH, sha1)).status_code == 404

    with trio.fail_after(WAIT_S):
        assert await res.size(CH, sha1) == len(data)  # known once A accepts
        assert await read_all(await res.open(CH, sha1)) == data
    # A uploaded it through its queue; the bucket has the verified object; B cached it.
    assert a.db.upload(CH, sha1).state == "done"
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
    await until(lambda: b.store.has(sha1), within=10, what="B's download to install")
    assert hashlib.sha1(b.store.path(sha1).read_bytes()).hexdigest() == sha1
    record = hub.server.hub.requests.get(CH, sha1)
    assert record.state == "finished" and record.tried == [] and record.provider == a.node_id


async def test_a_provider_without_the_file_declines_and_the_open_fails_clearly(hub, nursery):
    a = await connected_provider(hub, nursery)
    past_startup_grace(hub.server)
    request_timeout = 10.0
    b = await make_node(hub, "requester")
    res = (await parts.start(b, nursery, request_timeout=request_timeout)).resolver
    sha1 = hashlib.sha1(b"on no node").hexdigest()
    start = trio.current_time()
    with trio.fail_after(request_timeout + 5), pytest.raises(RequestFailed) as caught:
        await res.open(CH, sha1)
    assert trio.current_time() - start < request_timeout  # the hub's answer, not a stall
    message = str(caught.value)
    assert f"no node could provide sha1://{sha1}" in message and CH in message, message
    # The hub offered it to A, which declined as it does not hold the file.
    record = hub.server.hub.requests.get(CH, sha1)
    assert record.state == "failed" and record.tried == [a.node_id]
    assert any("not in its local store" in e for e in record.errors), record.errors
    assert a.db.upload(CH, sha1) is None  # A uploaded nothing
    assert not b.store.has(sha1)


async def test_a_provider_serves_a_file_it_has_only_in_a_kachery_store(
        hub, nursery, tmp_path):
    data = os.urandom(100_000)
    sha1 = hashlib.sha1(data).hexdigest()
    source = tmp_path / "kachery-storage"
    path = source / "sha1" / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    a, _ = await provider_with_sources(hub, nursery, "provider", [str(source)])
    assert not a.store.has(sha1)
    b = await make_node(hub, "requester")
    res = (await parts.start(b, nursery)).resolver
    assert await read_all(await res.open(CH, sha1)) == data
    assert a.store.path(sha1).read_bytes() == data  # copied in, verified, then uploaded
    assert path.read_bytes() == data  # the kachery store is only read
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
