"""The hub's file-request broker in process, with a hand-driven clock: who is offered a
request, when it moves on, what requesters see, and what survives a restart."""

import sqlite3

import pytest
import trio

from kachery_fs.errors import NotFound
from kachery_fs.hub import requests as rq
from kachery_fs.hub.requests import FileRequests

H = "ab" * 20
CH = "chan"
R, P1, P2 = "r" * 64, "1" * 64, "2" * 64


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class World:
    def __init__(self, path, providers=(P1, P2)):
        self.clock = Clock()
        self.providers = set(providers)
        self.bucket: dict[tuple[str, str], int] = {}
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None)
        self.broker = self.make()

    def make(self):
        async def object_size(channel, sha1):
            return self.bucket.get((channel, sha1))
        broker = FileRequests(self.db, providers_of=lambda ch: set(self.providers),
                              object_size=object_size, clock=self.clock)
        self.clock.now += rq.STARTUP_GRACE_S + 1  # past the start-up grace
        return broker

    def restart(self):
        self.db.close()
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.broker = self.make()

    async def connect(self, *nodes):
        """Each node makes one listen call and returns: it counts as connected a while."""
        for node in nodes:
            await self.broker.listen(node, 0)

    def offered_to(self):
        return {n for n in (P1, P2) if any(
            r.provider == n and r.state == "offered" for r in self.broker.records())}


@pytest.fixture
def world(tmp_path):
    return World(tmp_path / "hub.db")


async def test_in_bucket_is_finished_at_once(world):
    world.bucket[(CH, H)] = 10
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert state["state"] == "finished" and state["size"] == 10


async def test_no_provider_online_fails_at_once_with_the_reason(world):
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert state["state"] == "failed"
    assert "no provider online" in state["error"]
    world.providers.clear()
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)  # asks afresh
    assert "no node may provide" in state["error"]


async def test_one_provider_at_a_time_then_the_next(world):
    await world.connect(P1, P2)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert state["state"] == "offered"
    first = state["provider"]
    assert world.offered_to() == {first}
    second = P2 if first == P1 else P1
    assert await world.broker.listen(first, 0) == [{"channel": CH, "sha1": H,
                                                    "version": state["version"]}]
    assert await world.broker.listen(second, 0) == []
    world.broker.answer(first, CH, H, accept=False, size=None, reason="not in its store")
    assert world.offered_to() == {second}
    world.broker.answer(second, CH, H, accept=True, size=123, reason=None)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert state["state"] == "uploading" and state["size"] == 123
    assert world.broker.progress(second, CH, H, 50)
    world.broker.object_finalized(CH, H, 123)
    state = await world.broker.request(R, CH, H, version=state["version"], wait_s=0)
    assert state["state"] == "finished"
    # All providers declining fails the request, saying so.
    other = "cd" * 20
    await world.connect(P1, P2)
    await world.broker.request(R, CH, other, version=None, wait_s=0)
    for _ in range(2):
        node = world.offered_to().pop()
        world.broker.answer(node, CH, other, accept=False, size=None, reason="nope")
    state = await world.broker.request(R, CH, other, version=0, wait_s=0)
    assert state["state"] == "failed" and "no other provider" in state["error"]
    assert any("nope" in e for e in state["errors"])


async def test_unanswered_offer_stalled_upload_and_disconnect_move_on(world):
    await world.connect(P1, P2)
    await world.broker.request(R, CH, H, version=None, wait_s=0)
    first = world.offered_to().pop()
    world.clock.now += rq.OFFER_TIMEOUT_S + 0.1
    await world.connect(P1, P2)
    world.broker.tick()
    second = world.offered_to().pop()
    assert second != first
    world.broker.answer(second, CH, H, accept=True, size=5, reason=None)
    # progress keeps it alive past the stall timeout, silence does not
    for _ in range(3):
        world.clock.now += rq.PROVIDER_STALL_S * 0.6
        await world.connect(second)
        assert world.broker.progress(second, CH, H, int(world.clock.now))
        world.broker.tick()
        assert world.broker.get(CH, H).provider == second
    world.clock.now += rq.PROVIDER_STALL_S + 1
    await world.connect(second)
    world.broker.tick()
    req = world.broker.get(CH, H)
    assert req.state == "failed" and "made no progress" in " ".join(req.errors)
    # a provider told to stop learns it from its next progress report
    assert world.broker.progress(second, CH, H, 10**9) is False


async def test_disconnected_provider_is_replaced(world):
    await world.connect(P1, P2)
    await world.broker.request(R, CH, H, version=None, wait_s=0)
    first = world.offered_to().pop()
    world.broker.answer(first, CH, H, accept=True, size=5, reason=None)
    second = P2 if first == P1 else P1
    world.clock.now += rq.PROVIDER_GRACE_S + 1
    await world.connect(second)  # only the second is still listening
    world.broker.tick()
    req = world.broker.get(CH, H)
    assert req.provider == second and req.state == "offered"
    assert "disconnected" in " ".join(req.errors)


async def test_many_requesters_share_one_request(world):
    await world.connect(P1, P2)
    versions = set()
    for i in range(20):
        node = f"{i:064x}"
        state = await world.broker.request(node, CH, H, version=None, wait_s=0)
        versions.add(state["provider"])
    assert len(world.broker.records()) == 1
    assert len(versions) == 1
    assert len(world.broker.get(CH, H).requesters) == 20


async def test_waiters_wake_on_progress(world):
    await world.connect(P1, P2)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    provider = state["provider"]
    seen = []

    async def waiter():
        seen.append(await world.broker.request(R, CH, H, version=state["version"], wait_s=20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not seen
        world.broker.answer(provider, CH, H, accept=True, size=7, reason=None)
    assert seen[0]["state"] == "uploading" and seen[0]["size"] == 7


async def test_a_streaming_provider_relays_its_manifest_and_chunks(world):
    await world.connect(P1, P2)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    provider, other = state["provider"], ({P1, P2} - {state["provider"]}).pop()
    assert "manifest" not in state
    world.broker.answer(provider, CH, H, accept=True, size=50, reason=None, manifest="cd" * 20)
    state = await world.broker.request(R, CH, H, version=state["version"], wait_s=0)
    assert (state["manifest"], state["chunks"]) == ("cd" * 20, 0)
    assert world.broker.progress(provider, CH, H, 20, 1)
    state = await world.broker.request(R, CH, H, version=state["version"], wait_s=0)
    assert (state["bytes"], state["chunks"]) == (20, 1)
    # Never backwards, never a non-count, never from a node the request is not given to.
    assert world.broker.progress(provider, CH, H, 20, 0)
    assert world.broker.progress(provider, CH, H, 20, True)
    assert not world.broker.progress(other, CH, H, 50, 3)
    assert world.broker.get(CH, H).chunks == 1


async def test_chunks_count_only_with_a_manifest(world):
    await world.connect(P1)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    world.broker.answer(state["provider"], CH, H, accept=True, size=50, reason=None)
    assert world.broker.progress(state["provider"], CH, H, 20, 2)
    state = await world.broker.request(R, CH, H, version=state["version"], wait_s=0)
    assert "manifest" not in state and "chunks" not in state


async def test_listen_wakes_on_a_new_offer(world):
    got = []

    async def provider():
        got.append(await world.broker.listen(P1, 20))

    world.providers = {P1}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider)
        await trio.testing.wait_all_tasks_blocked()
        await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert got == [[{"channel": CH, "sha1": H, "version": 1}]]


async def test_requests_survive_a_restart(world):
    await world.connect(P1, P2)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    provider = state["provider"]
    world.broker.answer(provider, CH, H, accept=True, size=9, reason=None)
    world.restart()
    await world.connect(provider)
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert state["state"] == "uploading" and state["provider"] == provider
    assert world.broker.progress(provider, CH, H, 3)
    world.broker.object_finalized(CH, H, 9)
    assert (await world.broker.request(R, CH, H, version=state["version"], wait_s=0))[
        "state"] == "finished"


async def test_a_pending_request_goes_to_a_provider_that_connects_later(world, tmp_path):
    # Just after a (re)start, no provider has reconnected yet: the request waits for one.
    world.clock.now -= rq.STARTUP_GRACE_S + 1
    world.broker._started = world.clock.now
    state = await world.broker.request(R, CH, H, version=None, wait_s=0)
    assert state["state"] == "pending"
    offers = await world.broker.listen(P1, 0)
    assert offers and offers[0]["sha1"] == H


async def test_expired_requests_are_dropped(world):
    await world.connect(P1)
    await world.broker.request(R, CH, H, version=None, wait_s=0)
    world.clock.now += rq.WAITER_TTL_S + 1
    world.broker.tick()
    assert world.broker.get(CH, H) is None
    with pytest.raises(NotFound, match="expired"):
        await world.broker.request(R, CH, H, version=3, wait_s=0)
