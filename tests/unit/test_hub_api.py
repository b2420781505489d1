"""The hub's API: one list of requests (protocol.Request), one handler each in the hub's
table (hub.service.HANDLERS), a HubClient method for each, and bucket backends that keep
one protocol (hub.backends.BucketBackend)."""

from __future__ import annotations

import inspect

import httpx
import pytest

from kachery_fs.errors import InvalidInput
from kachery_fs.hub.app import create_api
from kachery_fs.hub.backends import BucketBackend, Buckets, LocalBucketBackend
from kachery_fs.hub.gcs import GcsBucketBackend
from kachery_fs.hub.service import HANDLERS, Hub
from kachery_fs.hub.storage import HubDB
from kachery_fs.hub_client import HubClient
from kachery_fs.identity import NodeKey
from kachery_fs.protocol import Request

URL = "http://hub.test"


def test_every_request_has_a_handler_and_every_handler_is_a_request():
    assert set(HANDLERS) == set(Request)
    assert all(type(kind) is Request for kind in HANDLERS)
    handlers = {name: fn for name, fn in inspect.getmembers(Hub, inspect.iscoroutinefunction)
                if name.startswith("_on_")}
    # each handler method is named for its request, and is the one in the table
    assert {name.removeprefix("_on_") for name in handlers} == {str(kind) for kind in Request}
    for name, fn in handlers.items():
        assert HANDLERS[Request(name.removeprefix("_on_"))] is fn


def test_every_request_is_used_by_the_client():
    source = inspect.getsource(HubClient)
    assert [kind for kind in Request if f"Request.{kind.name}" not in source] == []


@pytest.fixture
async def hub(tmp_path):
    db = HubDB(tmp_path / "hub.db")
    owner = NodeKey.generate()
    hub = Hub(db, owner_id=owner.node_id, buckets=Buckets(), default_bucket_uri=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_api(hub)),
                                 base_url=URL) as client:
        yield hub, HubClient(URL, owner, client), client
    db.close()


@pytest.mark.parametrize("kind", ["noSuchRequest", "GET_CHANNEL", "getchannel",
                                  "_on_getChannel", "handle", "authenticate", "", 5, None,
                                  ["getChannel"]])
async def test_an_unknown_request_type_is_refused(hub, kind):
    _, owner, client = hub
    r = await client.post("/api/node", json=owner.envelope(kind, {}))
    assert r.status_code == 400
    assert r.json() == {"error": {"code": "invalid_input",
                                  "message": f"unknown request type {kind!r}"}}
    with pytest.raises(InvalidInput, match="unknown request type"):
        await owner.call(kind)


async def test_a_known_request_is_dispatched(hub):
    _, owner, _ = hub
    assert await owner.list_channels() == []
    assert (await owner.call("listChannels")) == {"channels": []}  # as the wire names it


@pytest.mark.parametrize("backend", [LocalBucketBackend, GcsBucketBackend])
def test_every_backend_keeps_the_protocol(backend):
    assert isinstance(backend.can_hash, bool)
    for name in ("base_url", "stat", "sha1", "read", "range_sha1s", "delete",
                 "resumable_upload", "put"):
        want, got = getattr(BucketBackend, name), getattr(backend, name)
        assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), name
        assert [(p.name, p.kind, p.default) for p in
                inspect.signature(got).parameters.values()] == [
            (p.name, p.kind, p.default) for p in
            inspect.signature(want).parameters.values()], name
