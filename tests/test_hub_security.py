"""Attacks on the hub by outsiders and by channel members, each refused.

The hub runs in process (its real ASGI app over httpx.ASGITransport, tests/util.py), or as
a real server on 127.0.0.1 where the attack is on the HTTP layer itself.
"""

from __future__ import annotations

import hashlib

import pytest

from kachery_fs import resumable
from kachery_fs.errors import Conflict, IntegrityError
from kachery_fs.protocol import object_key

from .util import hub_in_process

CH = "lab.data"


@pytest.fixture
async def env(tmp_path):
    async with hub_in_process(tmp_path / "hub") as env:
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
