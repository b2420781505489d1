"""The hub in process: the real ASGI app (API + local bucket) over httpx.ASGITransport."""

from __future__ import annotations

import hashlib
import time

import pytest

from kachery_fs import resumable
from kachery_fs.errors import (
    IntegrityError,
    InvalidInput,
    NotFound,
    PermissionDenied,
)
from kachery_fs.protocol import object_key

from ..util import IN_PROCESS_HUB_URL as URL
from ..util import hub_in_process

#: The hub suite: each test on a hub whose state is in SQLite, and in PostgreSQL.
HUB_DATABASES = ("sqlite", "postgresql")


@pytest.fixture
async def env(tmp_path, hub_database):
    async with hub_in_process(tmp_path / "hub", hub_database) as env:
        yield env


async def test_channel_administration_is_for_the_owner(env):
    server, owner, other, _ = env
    await owner.create_channel("lab.data")
    with pytest.raises(PermissionDenied, match="owner"):
        await other.create_channel("mine")
    with pytest.raises(PermissionDenied):
        await other.authorize_node("lab.data", other.key.node_id, ["provideFiles"])
    with pytest.raises(InvalidInput):
        await owner.create_channel("x")  # too short
    with pytest.raises(InvalidInput):
        await owner.authorize_node("lab.data", other.key.node_id, ["flyPlanes"])
    info = await other.get_channel("lab.data")
    # a non-member learns nothing of the channel, not even whether it exists
    assert info == {"channel": "lab.data", "permissions": [], "isOwner": False}
    assert await other.get_channel("no.such") == {"channel": "no.such", "permissions": [],
                                                  "isOwner": False}
    await owner.authorize_node("lab.data", other.key.node_id, ["requestFiles"])
    info = await other.get_channel("lab.data")
    assert info["permissions"] == ["requestFiles"] and info["bucketBaseUrl"] == f"{URL}/kachery"
    with pytest.raises(NotFound):
        await owner.get_channel("no.such")


async def test_stale_replayed_and_forged_requests_are_refused(env):
    server, owner, other, client = env
    await owner.create_channel("chan")

    async def send(envelope):
        r = await client.post("/api/node", json=envelope)
        return r.status_code, r.json()

    env_ok = owner.envelope("getChannel", {"channel": "chan"})
    assert (await send(env_ok))[0] == 200
    status, body = await send(env_ok)  # the same request again
    assert status == 401 and "replayed" in body["error"]["message"]

    stale = owner.envelope("getChannel", {"channel": "chan"})
    stale["body"]["timestamp"] = int((time.time() - 3600) * 1000)
    stale["signature"] = owner.key.sign(stale["body"])
    status, body = await send(stale)
    assert status == 401 and "stale" in body["error"]["message"]

    forged = owner.envelope("createChannel", {"channel": "forged"})
    forged["nodeId"] = other.key.node_id  # claims to be someone else
    assert (await send(forged))[0] == 401

    tampered = owner.envelope("getChannel", {"channel": "chan"})
    tampered["body"]["channel"] = "other"
    assert (await send(tampered))[0] == 401


async def test_upload_flow_and_permissions_apply_at_once(env):
    server, owner, other, client = env
    await owner.create_channel("chan")
    data = b"some bytes to upload" * 1000
    sha1 = hashlib.sha1(data).hexdigest()
    with pytest.raises(PermissionDenied, match="provideFiles"):
        await other.initiate_upload("chan", sha1, len(data))
    await owner.authorize_node("chan", other.key.node_id, ["provideFiles"])
    signed = await other.initiate_upload("chan", sha1, len(data))
    assert signed is not None and signed.method == "POST"
    assert object_key("chan", sha1) in signed.url
    session = await resumable.start_session(client, signed)
    with pytest.raises(NotFound):
        await other.finalize_upload("chan", sha1, len(data))  # nothing there yet
    path = server.directory / "payload"
    path.write_bytes(data)
    await resumable.upload(client, session, path, len(data))
    await other.finalize_upload("chan", sha1, len(data))
    assert server.hub.cache.size_of("chan", sha1) == len(data)
    assert await other.initiate_upload("chan", sha1, len(data)) is None  # already present
    await owner.authorize_node("chan", other.key.node_id, [])
    with pytest.raises(PermissionDenied):
        await other.initiate_upload("chan", sha1, len(data))


async def test_bad_upload_is_deleted_at_finalize(env):
    server, owner, _, client = env
    await owner.create_channel("chan")
    await owner.authorize_node("chan", owner.key.node_id, ["provideFiles"])
    claimed = hashlib.sha1(b"what I claim").hexdigest()
    wrong = b"something else"
    signed = await owner.initiate_upload("chan", claimed, len(wrong))
    session = await resumable.start_session(client, signed)
    path = server.directory / "payload"
    path.write_bytes(wrong)
    await resumable.upload(client, session, path, len(wrong))
    assert server.local.stat("kachery", object_key("chan", claimed)) is not None
    with pytest.raises(IntegrityError, match="hashes to"):
        await owner.finalize_upload("chan", claimed, len(wrong))
    assert server.local.stat("kachery", object_key("chan", claimed)) is None
    assert server.hub.cache.size_of("chan", claimed) is None


async def test_info_is_public(env):
    server, owner, _, client = env
    r = await client.get("/api/info")
    assert r.json()["ownerId"] == owner.key.node_id


@pytest.mark.parametrize("manifest", ["nope", "ab" * 19, 5, ["ab" * 20]])
async def test_an_answer_with_a_bad_manifest_is_refused(env, manifest):
    _, owner, other, _ = env
    await owner.create_channel("chan")
    await owner.authorize_node("chan", other.key.node_id, ["provideFiles"])
    with pytest.raises(InvalidInput, match="invalid manifest"):
        await other.call("answerRequest", channel="chan", sha1="ab" * 20, accept=True,
                         size=5, manifest=manifest)
