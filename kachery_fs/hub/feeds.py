"""Feeds at the hub: how many messages each subfeed has in a channel's bucket, and who is
waiting to hear of more.

The hub never carries messages. A feed's owner uploads them to the bucket in kachery's
layout through URLs the hub signs (a batch at a time), then tells the hub the new count;
the hub wakes every node long-polling that subfeed (``watchFeeds``), and they fetch the new
messages from the bucket and verify them. No polling loops anywhere.

Only the holder of the feed's private key gets upload URLs for it: the request carries a
signature by the feed key over the whole request and the caller's node id, besides the
node's own signature. A count is taken only once the bucket holds its last message.
"""

from __future__ import annotations

import time

import trio

SCHEMA = """
CREATE TABLE IF NOT EXISTS subfeeds (
    channel TEXT NOT NULL,
    feed_id TEXT NOT NULL,
    subfeed_hash TEXT NOT NULL,
    message_count INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (channel, feed_id, subfeed_hash)
);
"""

#: Longest a watch long-poll is held.
MAX_WATCH_S = 25.0


class FeedIndex:
    def __init__(self, db):
        self._db = db
        db.executescript(SCHEMA)
        self._changed: dict[tuple[str, str, str], trio.Event] = {}

    def count(self, channel: str, feed_id: str, subfeed_hash: str) -> int:
        row = self._db.execute(
            "SELECT message_count FROM subfeeds WHERE channel = ? AND feed_id = ?"
            " AND subfeed_hash = ?", (channel, feed_id, subfeed_hash)).fetchone()
        return row[0] if row else 0

    def set_count(self, channel: str, feed_id: str, subfeed_hash: str, count: int, *,
                  lower: bool = False) -> int:
        """Record a new message count (counts only grow, unless ``lower``: an owner's
        repair); wake the watchers. Returns the count."""
        current = self.count(channel, feed_id, subfeed_hash)
        if count == current or (count < current and not lower):
            return current
        self._db.execute(
            "INSERT INTO subfeeds (channel, feed_id, subfeed_hash, message_count, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT(channel, feed_id, subfeed_hash) DO UPDATE"
            " SET message_count = excluded.message_count, updated_at = excluded.updated_at",
            (channel, feed_id, subfeed_hash, count, time.time()))
        event = self._changed.pop((channel, feed_id, subfeed_hash), None)
        if event is not None:
            event.set()
        return count

    async def watch(self, channel: str, subscriptions: list[tuple[str, str, int]],
                    wait_s: float) -> list[dict]:
        """Counts of the subscribed subfeeds that are beyond the position given, at once
        if any, else as soon as one is (or ``[]`` after ``wait_s``)."""
        deadline = trio.current_time() + min(max(wait_s, 0.0), MAX_WATCH_S)
        while True:
            updates = []
            for feed_id, subfeed_hash, position in subscriptions:
                count = self.count(channel, feed_id, subfeed_hash)
                if count > position:
                    updates.append({"feedId": feed_id, "subfeedHash": subfeed_hash,
                                    "messageCount": count})
            remaining = deadline - trio.current_time()
            if updates or remaining <= 0:
                return updates
            any_changed = trio.Event()
            keys = [(channel, f, s) for f, s, _ in subscriptions]

            async def relay(key, done=any_changed):
                event = self._changed.setdefault(key, trio.Event())
                await event.wait()
                done.set()

            with trio.move_on_after(remaining):
                async with trio.open_nursery() as nursery:
                    for key in keys:
                        nursery.start_soon(relay, key)
                    await any_changed.wait()
                    nursery.cancel_scope.cancel()
