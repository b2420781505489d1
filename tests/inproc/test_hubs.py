"""Two hub processes on one PostgreSQL database: real hubs (HTTP on 127.0.0.1, each with its
own connections and its own LISTEN thread, as two processes would have), a real
PostgreSQL cluster, and fake-gcs-server as the bucket they share.

The long-polls here are held for longer than the hub's own re-reading of the rows
(``RECHECK_S``, made longer than the test's waits): what wakes them is the other hub's
notification, or nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import httpx
import pytest
import trio

from kachery_fs import _http, resumable
from kachery_fs.hub import feeds as hub_feeds
from kachery_fs.hub import requests as hub_requests
from kachery_fs.hub.serve import HubServer
from kachery_fs.hub_client import HubClient
from kachery_fs.identity import NodeKey
from kachery_fs.protocol import Request

from ..gcs import BUCKET, random_file, service_account_key
from ..util import until
from .test_gcs import GoogleCloudStorage

CH = "two.hubs"
PERMS = ["requestFiles", "provideFiles", "requestFeeds", "provideFeeds"]
#: A bound on every wait here; far below the long-polls' own length.
WAIT_S = 20


@dataclass
class TwoHubs:
    servers: tuple[HubServer, HubServer]
    urls: tuple[str, str]
    owner: NodeKey
    client: httpx.AsyncClient
    database: str

    def node(self, key: NodeKey, hub: int) -> HubClient:
        """``key``'s client of hub ``hub`` (0 or 1)."""
        return HubClient(self.urls[hub], key, self.client)


@pytest.fixture
async def hubs(tmp_path, nursery, postgres_cluster, fake_gcs, monkeypatch):
    monkeypatch.setattr(hub_requests, "RECHECK_S", 120.0)
    monkeypatch.setattr(hub_feeds, "RECHECK_S", 120.0)
    database = postgres_cluster.database()
    key_file = service_account_key(tmp_path / "gcs-key.json")
    owner = NodeKey.generate()
    servers, urls = [], []
    for i in range(2):
        gcs = GoogleCloudStorage.from_environment(
            key_file, environ={"STORAGE_EMULATOR_HOST": fake_gcs.url})
        server = HubServer(tmp_path / f"hub{i}", owner_id=owner.node_id, local_bucket=False,
                           gcs=gcs, database=database)
        servers.append(server)
        urls.append(await nursery.start(partial(server.run, host="127.0.0.1", port=0)))
    client = _http.create_client()
    both = TwoHubs((servers[0], servers[1]), (urls[0], urls[1]), owner, client, database)
    admin = both.node(owner, 0)
    await admin.create_channel(CH, f"gs://{BUCKET}")
    await admin.authorize_node(CH, owner.node_id, PERMS)
    try:
        yield both
    finally:
        await client.aclose()
        for server in servers:
            server.close()


async def member(hubs: TwoHubs, perms=PERMS) -> NodeKey:
    key = NodeKey.generate()
    await hubs.node(hubs.owner, 1).authorize_node(CH, key.node_id, list(perms))
    return key


async def woken_across(hubs: TwoHubs, watcher: HubClient, feed: str, subfeed: str,
                       count: int) -> int:
    """``watcher`` (of hub 0) watches a subfeed; hub 1 sets its count: the count the
    watch answers with."""
    answers: list = []
    async with trio.open_nursery() as nursery:
        async def watch():
            answers.append(await watcher.watch_feeds(
                CH, [{"feedId": feed, "subfeedHash": subfeed, "position": 0}], wait_s=WAIT_S))

        nursery.start_soon(watch)
        await trio.sleep(0.3)
        hubs.servers[1].hub.feeds.set_count(CH, feed, subfeed, count)
    return answers[0]["updates"][0]["messageCount"]


async def test_a_nonce_used_on_one_hub_is_refused_by_the_other(hubs):
    owner = hubs.node(hubs.owner, 0)
    envelope = owner.envelope(Request.GET_CHANNEL, {"channel": CH})
    first = await hubs.client.post(f"{hubs.urls[0]}/api/node", json=envelope)
    assert first.status_code == 200, first.text
    again = await hubs.client.post(f"{hubs.urls[1]}/api/node", json=envelope)
    assert again.status_code == 401 and "replayed" in again.text, again.text
    # and on the first one too
    again = await hubs.client.post(f"{hubs.urls[0]}/api/node", json=envelope)
    assert again.status_code == 401 and "replayed" in again.text


async def test_channels_and_permissions_set_on_one_hub_hold_on_the_other(hubs):
    key = await member(hubs, ["requestFiles"])
    info = await hubs.node(key, 0).get_channel(CH)
    assert info["permissions"] == ["requestFiles"]
    await hubs.node(hubs.owner, 0).authorize_node(CH, key.node_id, [])
    assert (await hubs.node(key, 1).get_channel(CH))["permissions"] == []


async def test_a_request_made_through_one_hub_is_provided_through_the_other(hubs, tmp_path):
    provider_key, requester_key = await member(hubs), await member(hubs, ["requestFiles"])
    provider, requester = hubs.node(provider_key, 1), hubs.node(requester_key, 0)
    data, sha1 = random_file(tmp_path / "f.bin", 300_000)
    offers: list = []
    async with trio.open_nursery() as nursery:
        async def listen():
            offers.extend(await provider.listen_requests(WAIT_S))

        nursery.start_soon(listen)
        # the provider's listen on hub 1 is known to hub 0 (published presence)
        await until(lambda: hubs.servers[0].hub.requests.connected(provider_key.node_id),
                    within=WAIT_S, what="hub 0 to know of the provider listening on hub 1")
        state = await requester.request_file(CH, sha1)
        assert state["state"] == "offered" and state["provider"] == provider_key.node_id
    # woken by hub 0's notification, well before the long-poll's end
    assert [o["sha1"] for o in offers] == [sha1]

    seen: list = []
    async with trio.open_nursery() as nursery:
        async def wait_for_change():
            seen.append(await requester.request_file(CH, sha1, version=state["version"],
                                                     wait_s=WAIT_S))

        nursery.start_soon(wait_for_change)
        await trio.sleep(0.2)
        await provider.answer_request(CH, sha1, accept=True, size=len(data))
    assert seen[0]["state"] == "uploading" and seen[0]["size"] == len(data)

    seen.clear()
    async with trio.open_nursery() as nursery:
        async def wait_for_progress():
            seen.append(await requester.request_file(CH, sha1, version=seen_version,
                                                     wait_s=WAIT_S))

        seen_version = (await requester.request_file(CH, sha1))["version"]
        nursery.start_soon(wait_for_progress)
        await trio.sleep(0.2)
        assert await provider.report_progress(CH, sha1, 100_000)
    assert seen[0]["bytes"] == 100_000

    # the upload: initiated through hub 1, finalized through hub 0 (upload records are
    # shared), and the request through hub 0 is finished
    signed = await provider.initiate_upload(CH, sha1, len(data))
    async with httpx.AsyncClient(trust_env=False, timeout=30) as web:
        session = await resumable.start_session(web, signed)
        await resumable.upload(web, session, tmp_path / "f.bin", len(data), sha1=sha1)
    assert hubs.servers[0].hub.cache.uploading_node(CH, sha1) == provider_key.node_id
    await hubs.node(provider_key, 0).finalize_upload(CH, sha1, len(data))
    state = await requester.request_file(CH, sha1)
    assert state["state"] == "finished" and state["size"] == len(data)
    assert hubs.servers[1].hub.cache.stats(CH)["inFlight"] == 0


async def test_a_feed_count_set_on_one_hub_wakes_the_watchers_on_the_other(hubs):
    watcher = hubs.node(await member(hubs, ["requestFeeds"]), 0)
    feed, subfeed = "ab" * 32, "cd" * 20
    subs = [{"feedId": feed, "subfeedHash": subfeed, "position": 0}]
    answers: list = []
    async with trio.open_nursery() as nursery:
        async def watch():
            answers.append(await watcher.watch_feeds(CH, subs, wait_s=WAIT_S))

        for _ in range(3):
            nursery.start_soon(watch)
        await trio.sleep(0.3)
        hubs.servers[1].hub.feeds.set_count(CH, feed, subfeed, 4)
    assert [a["updates"] for a in answers] == [
        [{"feedId": feed, "subfeedHash": subfeed, "messageCount": 4}]] * 3
    # counts only grow, whichever hub is told
    assert hubs.servers[0].hub.feeds.set_count(CH, feed, subfeed, 2) == 4


async def test_a_hub_whose_listening_connection_is_cut_listens_again(hubs, caplog):
    import psycopg

    caplog.set_level(logging.INFO, "kachery_fs.hub.wakeups")
    watcher = hubs.node(await member(hubs, ["requestFeeds"]), 0)
    with psycopg.connect(hubs.database, autocommit=True) as db:
        cut = db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                         " application_name = 'kachery-fs hub (listen)'").fetchall()
    assert len(cut) == 2 and all(ok for (ok,) in cut)
    await until(lambda: caplog.text.count("listening for other hub processes' wake-ups"
                                          " again") == 2, within=WAIT_S, what="the cut")
    assert caplog.text.count("listening for other hub processes' wake-ups failed") == 2
    assert await woken_across(hubs, watcher, "ef" * 32, "01" * 20, 1) == 1


async def test_a_hub_that_lost_its_database_answers_unavailable_and_recovers(hubs):
    import time

    import psycopg

    from kachery_fs.errors import Unavailable

    key = await member(hubs, ["requestFiles"])
    database = hubs.servers[0].db.database
    with psycopg.connect(hubs.database, autocommit=True) as db:
        (pid,) = db.execute("SELECT pg_backend_pid()").fetchone()
        db.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE"
                   " application_name = 'kachery-fs hub' AND pid <> %s", (pid,))
    # No checkpoint from here until the hub meets the lost connection (its own tick
    # cannot meet it first): the statement that does fails as a retry-able error.
    deadline = time.monotonic() + 10
    with pytest.raises(Unavailable, match="database"):
        while time.monotonic() < deadline:
            database.execute("SELECT 1")
            time.sleep(0.02)  # noqa: ASYNC251 (on purpose: no checkpoint)
    # and the next call is answered on a new connection
    assert (await hubs.node(key, 0).get_channel(CH))["permissions"] == ["requestFiles"]


async def test_a_notification_that_is_no_wake_up_is_ignored(hubs, caplog):
    import psycopg

    watcher = hubs.node(await member(hubs, ["requestFeeds"]), 0)
    with psycopg.connect(hubs.database, autocommit=True) as db:
        for junk in ("x fjunk", "x f/a/b/c/d", "x ", "x zzz", "x r", "x o"):
            db.execute("SELECT pg_notify('kachery_fs_hub', %s)", (junk,))
    # the listening went on: the real wake-up came through
    assert await woken_across(hubs, watcher, "12" * 32, "34" * 20, 2) == 2
    assert "not a kachery-fs hub's wake-up" in caplog.text
