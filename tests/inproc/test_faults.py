"""Fault injection on the read path: transient errors and stalls of the bucket and the hub,
seen through the FUSE operations called directly (no mount).

A real hub (API and local bucket) serves on 127.0.0.1 through hypercorn, behind
:class:`Faults`, an ASGI layer that answers chosen requests with an error or never answers
them. Nodes run in this process with their real HTTP clients, so HTTP timeouts, retries
and deadlines all happen as in a mount.

The clock is trio's MockClock running at real speed; a test that waits out a stall turns
on autojump from the moment the stall begins (:func:`autojump_from_here`), so a 60 s
deadline passes in a moment and is measured exactly. Not before: autojump also jumps
while a task waits for a worker thread (the local bucket opens files in threads), and a
jump then would end a wait that is not the one under test.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pyfuse3
import pytest
import trio
import trio.testing

from kachery_fs import _http, parts, resumable
from kachery_fs.fs.mount import operations
from kachery_fs.fs.namespace import ROOT_INODE
from kachery_fs.fs.operations import Operations
from kachery_fs.hub.serve import HubServer
from kachery_fs.hub_client import HubClient
from kachery_fs.identity import NodeKey
from kachery_fs.node import Node
from kachery_fs.resolver import STALL_TIMEOUT_S

CH = "chan"
PERMS = ["requestFiles", "provideFiles"]
CTX = SimpleNamespace(uid=0, gid=0, pid=0, umask=0o022)
#: Slack on a deadline contract ("returned by the deadline"), in (virtual) seconds.
SLACK_S = 1.0


# -- fault injection --------------------------------------------------------------------------


@dataclass
class Rule:
    """Requests that ``match`` get ``status`` (or, with ``status=None``, no answer ever);
    ``times`` of them, or all while the rule stands."""

    match: Callable[[str, str, str | None], bool]  # (method, path, hub request type)
    status: int | None
    times: float = math.inf
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    hits: int = 0
    on_hit: Callable[[], None] | None = None


class Faults:
    """ASGI middleware in front of the hub's app; see the module docstring."""

    def __init__(self, app):
        self.app = app
        self.rules: list[Rule] = []

    def add(self, match, status: int | None, *, times: float = math.inf,
            retry_after: str | None = None, on_hit: Callable[[], None] | None = None) -> Rule:
        headers = [(b"retry-after", retry_after.encode())] if retry_after else []
        rule = Rule(match, status, times, headers, on_hit=on_hit)
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = None
        if scope["path"] == "/api/node":  # read the body to know the request's type
            parts = []
            while True:
                message = await receive()
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    break
            raw = b"".join(parts)
            try:
                kind = json.loads(raw)["body"]["type"]
            except (ValueError, KeyError, TypeError):
                pass
            receive = _replaying(raw, receive)
        for rule in self.rules:
            if rule.hits < rule.times and rule.match(scope["method"], scope["path"], kind):
                rule.hits += 1
                if rule.on_hit is not None:
                    rule.on_hit()
                if rule.status is None:
                    await trio.sleep_forever()  # a stalled server: connection open, no answer
                await send({"type": "http.response.start", "status": rule.status,
                            "headers": [(b"content-length", b"0"), *rule.headers]})
                await send({"type": "http.response.body", "body": b""})
                return
        await self.app(scope, receive, send)


def _replaying(raw: bytes, receive):
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()
    return replay


def object_head(method, path, kind):
    return method == "HEAD" and "/sha1/" in path


def object_get(method, path, kind):
    return method == "GET" and "/sha1/" in path


def request_file(method, path, kind):
    return kind == "requestFile"


# -- a hub, nodes, and their file systems -------------------------------------------------------


@pytest.fixture
def clock():
    # Real speed (hypercorn, SQLite and worker threads need it) until a test turns on autojump.
    return trio.testing.MockClock(rate=1.0)


def autojump_from_here(clock: trio.testing.MockClock):
    """An ``on_hit`` that turns on autojump: from the stall on, every task only waits for
    timers (no thread is busy), so virtual time may jump to the next one."""
    def on():
        clock.autojump_threshold = 0.02
    return on


@dataclass
class Hub:
    server: HubServer
    faults: Faults
    url: str
    owner: HubClient
    base: Path
    nodes: list[Node] = field(default_factory=list)  # made by make_node: closed at teardown


@pytest.fixture
async def hub(tmp_path, nursery, hub_database):
    owner = NodeKey.generate()
    server = HubServer(tmp_path / "hub", owner_id=owner.node_id, database=hub_database)
    faults = Faults(server.app)
    server.app = faults
    url = await nursery.start(partial(server.run, host="127.0.0.1", port=0))
    client = _http.create_client()
    owner_client = HubClient(url, owner, client)
    await owner_client.create_channel(CH)
    await owner_client.authorize_node(CH, owner.node_id, PERMS)
    hub = Hub(server, faults, url, owner_client, tmp_path)
    try:
        yield hub
    finally:  # the test's tasks have ended (pytest-trio ends its nursery first)
        for node in hub.nodes:
            await node.aclose()
        await client.aclose()
        server.close()


async def make_node(hub: Hub, name: str) -> Node:
    node = Node(hub.base / name, create=True)
    hub.nodes.append(node)
    await hub.owner.authorize_node(CH, node.node_id, PERMS)
    info = await node.channels.hub(hub.url).get_channel(CH)
    node.db.add_channel(CH, hub.url, info["bucketBaseUrl"], set(info["permissions"]),
                        private=info.get("private") is True)
    return node


@dataclass
class FS:
    node: Node
    ops: Operations

    async def sha1_inode(self) -> int:
        channel = await self.ops.lookup(ROOT_INODE, CH.encode(), CTX)
        return (await self.ops.lookup(channel.st_ino, b"sha1", CTX)).st_ino

    async def lookup(self, sha1: str) -> pyfuse3.EntryAttributes:
        return await self.ops.lookup(await self.sha1_inode(), sha1.encode(), CTX)


async def mount_in_process(node: Node, nursery: trio.Nursery, **options) -> FS:
    """The node's file system operations, as a mount builds them (without the kernel)."""
    return FS(node, operations(await parts.start(node, nursery, **options)))


async def in_bucket(hub: Hub, data: bytes) -> str:
    """Upload ``data`` to the channel's bucket (as the hub's owner); its hash."""
    sha1 = hashlib.sha1(data).hexdigest()
    signed = await hub.owner.initiate_upload(CH, sha1, len(data))
    session = await resumable.start_session(hub.owner.client, signed)
    path = hub.base / f"payload-{sha1}"
    path.write_bytes(data)
    await resumable.upload(hub.owner.client, session, path, len(data))
    await hub.owner.finalize_upload(CH, sha1, len(data))
    return sha1


async def fuse_errno(call) -> int:
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await call
    return caught.value.errno


# -- 11. one transient error is retried ---------------------------------------------------------


async def test_one_503_on_the_lookup_head_is_retried(hub, nursery):
    data = os.urandom(100_000)
    sha1 = await in_bucket(hub, data)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    rule = hub.faults.add(object_head, 503, times=1)
    attrs = await fs.lookup(sha1)
    assert attrs.st_size == len(data)
    assert rule.hits == 1  # the fault was met, and retried


async def test_a_lookup_honours_retry_after_within_its_deadline(hub, nursery):
    data = os.urandom(1000)
    sha1 = await in_bucket(hub, data)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    hub.faults.add(object_head, 503, times=1, retry_after="2")
    start = trio.current_time()
    assert (await fs.lookup(sha1)).st_size == len(data)
    assert trio.current_time() - start >= 2  # the server's Retry-After, not our 0.2 s
    # A Retry-After past the lookup's deadline is not waited for: the 503 is the answer.
    other = await in_bucket(hub, os.urandom(1000))
    hub.faults.add(object_head, 503, times=1, retry_after="3600")
    start = trio.current_time()
    assert await fuse_errno(fs.lookup(other)) == errno.EIO
    assert trio.current_time() - start < 1


async def connected_provider(hub: Hub, nursery: trio.Nursery) -> Node:
    """A node that answers file requests, once the hub has its listen."""
    node = await make_node(hub, "provider")
    provider = (await parts.start(node, nursery, provide=True)).provider
    with trio.fail_after(30):
        # A state no trio event announces: polled.
        while getattr(provider.connections.get(hub.url), "state", None) != "connected":  # noqa: ASYNC110
            await trio.sleep(0.05)
    return node


async def test_one_503_on_the_first_request_file_is_retried(hub, nursery):
    provider_node = await connected_provider(hub, nursery)
    data = os.urandom(300_000)
    sha1 = provider_node.store.add_bytes(data)  # in its store only, in no bucket
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    rule = hub.faults.add(request_file, 503, times=1)
    with trio.fail_after(60):
        attrs = await fs.lookup(sha1)
    assert attrs.st_size == len(data) and rule.hits == 1


# -- 12. a FUSE call returns by its deadline ----------------------------------------------------


async def test_a_read_from_a_stalled_bucket_times_out_at_its_deadline(hub, nursery, clock):
    data = os.urandom(3 * 1024 * 1024)
    sha1 = await in_bucket(hub, data)
    fs = await mount_in_process(await make_node(hub, "reader"), nursery)
    attrs = await fs.lookup(sha1)
    # The bucket accepts reads and never answers them.
    hub.faults.add(object_get, None, on_hit=autojump_from_here(clock))
    start = trio.current_time()
    fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
    assert await fuse_errno(fs.ops.read(fh, 0, 128 * 1024)) == errno.ETIMEDOUT
    assert trio.current_time() - start <= STALL_TIMEOUT_S + SLACK_S
    # The kernel reads the page again after a failed read-ahead: that read must not wait
    # another deadline of its own on the same stalled download.
    assert await fuse_errno(fs.ops.read(fh, 0, 128 * 1024)) == errno.ETIMEDOUT
    assert trio.current_time() - start <= STALL_TIMEOUT_S + SLACK_S
    await fs.ops.release(fh)
    # Once the bucket answers again, a new open reads it (nothing stale is kept).
    hub.faults.clear()
    clock.autojump_threshold = math.inf
    fh = (await fs.ops.open(attrs.st_ino, os.O_RDONLY, CTX)).fh
    with trio.fail_after(60):
        assert await fs.ops.read(fh, 0, len(data)) == data
    await fs.ops.release(fh)


async def test_a_stalled_hub_gives_etimedout_at_the_request_timeout(hub, nursery, clock):
    """A hash in no bucket is requested through the hub; the hub never answers. The lookup
    ends with ETIMEDOUT at the request timeout, not EIO at the HTTP client's timeout."""
    request_timeout = 45.0  # past the 30 s HTTP timeout: its expiry must not end the wait
    fs = await mount_in_process(await make_node(hub, "reader"), nursery,
                                request_timeout=request_timeout)
    sha1 = hashlib.sha1(b"in no bucket").hexdigest()
    hub.faults.add(request_file, None, on_hit=autojump_from_here(clock))
    start = trio.current_time()
    assert await fuse_errno(fs.lookup(sha1)) == errno.ETIMEDOUT
    assert trio.current_time() - start <= request_timeout + SLACK_S


async def test_a_hub_that_stalls_mid_request_gives_etimedout_at_the_request_timeout(
        hub, nursery, clock):
    """The hub answers the request, then every long-poll that follows stalls: the wait
    ends at the request timeout, not at a long-poll's HTTP timeout after it."""
    await connected_provider(hub, nursery)  # the request is offered to it, not failed
    request_timeout = 30.0  # a long-poll's HTTP timeout is its wait + 15 s: up to 35 s
    fs = await mount_in_process(await make_node(hub, "reader"), nursery,
                                request_timeout=request_timeout)
    sha1 = hashlib.sha1(b"also in no bucket").hexdigest()
    asked = 0

    def after_the_first(method, path, kind):
        nonlocal asked
        asked += kind == "requestFile"
        return kind == "requestFile" and asked > 1

    hub.faults.add(after_the_first, None, on_hit=autojump_from_here(clock))
    start = trio.current_time()
    assert await fuse_errno(fs.lookup(sha1)) == errno.ETIMEDOUT
    assert asked > 1  # it got past the first answer
    assert trio.current_time() - start <= request_timeout + SLACK_S


def test_deadline_exceeded_is_etimedout_even_inside_a_group():
    from kachery_fs.errors import DeadlineExceeded, Unavailable
    from kachery_fs.fs.errno_map import fuse_errors

    for raised, expected in [(DeadlineExceeded("slow"), errno.ETIMEDOUT),
                             (Unavailable("down"), errno.EIO),
                             (ExceptionGroup("g", [DeadlineExceeded("slow")]), errno.ETIMEDOUT)]:
        with pytest.raises(pyfuse3.FUSEError) as caught, fuse_errors("read"):
            raise raised
        assert caught.value.errno == expected
