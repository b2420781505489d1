"""Publishing a feed when the owner stops mid-way, against a real hub and local bucket on
127.0.0.1: what the owner must remember so that the next mount finishes the job."""

from __future__ import annotations

from functools import partial

import trio

from kachery_fs.feeds import FeedStore, FeedSync
from kachery_fs.protocol import PERMISSIONS

from ..util import until
from . import test_faults
from .test_faults import CH, make_node

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1


async def test_the_single_objects_of_a_batch_are_due_before_its_announce(hub):
    """A stop while the hub takes an announce (it may count the batch, the owner never
    hears so) must not leave that batch's single objects forgotten: they are recorded as
    due before the announce is sent."""
    node = await make_node(hub, "owner")
    await hub.owner.authorize_node(CH, node.node_id, list(PERMISSIONS))
    info = await node.channels.hub(hub.url).get_channel(CH)
    node.db.add_channel(CH, hub.url, info["bucketBaseUrl"], set(info["permissions"]))
    store = FeedStore.for_node(node.dir)
    try:
        feed = store.create_feed()
        await trio.to_thread.run_sync(store.append, feed, "s", [{"n": i} for i in range(700)])
        h = store.subfeeds(feed)[0].subfeed_hash
        seen = []

        def second_announce(method, path, kind):
            if kind == "feedUpdated":
                seen.append(kind)
                return len(seen) == 3  # the count asked for, batch 0..500, then this
            return False

        hub.faults.add(second_announce, None)  # the hub never answers it
        due = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(
                FeedSync(node.channels, store, node.client).publish, CH, feed, h,
                singles=False, on_announced=lambda a, b: due.append((a, b))))
            await until(lambda: len(seen) == 3, within=30, what="the second announce")
            nursery.cancel_scope.cancel()  # the owner stops while the hub has it
        assert due == [(0, 500), (500, 700)]
    finally:
        store.close()
