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

from . import storage

#: Longest a watch long-poll is held.
MAX_WATCH_S = 25.0


class _Watch:
    """One waiting watchFeeds call: woken with the keys of the subfeeds that changed."""

    __slots__ = ("changed", "event")

    def __init__(self):
        self.event = trio.Event()
        self.changed: set[tuple[str, str, str]] = set()


class FeedIndex:
    """Subfeed counts, and the watches waiting on them.

    A watch registers itself under each subfeed it subscribes to; a new count wakes only
    the watches of that subfeed and tells them which one changed, so a wake-up costs what
    changed, not one query per subscription, and a waiting watch costs no task.
    """

    def __init__(self, db):
        self._db = db
        storage.SCHEMA.migrate(db)  # a no-op on the hub's connection: the tables are there
        self._watches: dict[tuple[str, str, str], set[_Watch]] = {}

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
        key = (channel, feed_id, subfeed_hash)
        for watch in self._watches.get(key, ()):
            watch.changed.add(key)
            watch.event.set()
        return count

    def _counts(self, channel: str, keys) -> dict[tuple[str, str, str], int]:
        """The counts of the subfeeds ``keys`` of a channel, in one query per 500 feeds."""
        feeds = sorted({k[1] for k in keys})
        counts = {}
        for i in range(0, len(feeds), 500):
            part = feeds[i:i + 500]
            for feed_id, h, n in self._db.execute(
                    "SELECT feed_id, subfeed_hash, message_count FROM subfeeds WHERE channel = ?"
                    f" AND feed_id IN ({','.join('?' * len(part))})", (channel, *part)):
                counts[(channel, feed_id, h)] = n
        return counts

    async def watch(self, channel: str, subscriptions: list[tuple[str, str, int]],
                    wait_s: float) -> list[dict]:
        """Counts of the subscribed subfeeds that are beyond the position given, at once
        if any, else as soon as one is (or ``[]`` after ``wait_s``)."""
        positions = {(channel, f, s): p for f, s, p in subscriptions}

        def beyond(counts):
            return [{"feedId": k[1], "subfeedHash": k[2], "messageCount": n}
                    for k, n in counts.items() if k in positions and n > positions[k]]

        updates = beyond(self._counts(channel, positions))
        if updates or wait_s <= 0:
            return updates
        watch = _Watch()
        for key in positions:
            self._watches.setdefault(key, set()).add(watch)
        try:
            with trio.move_on_after(min(wait_s, MAX_WATCH_S)):
                await watch.event.wait()
        finally:
            for key in positions:
                waiting = self._watches[key]
                waiting.discard(watch)
                if not waiting:
                    del self._watches[key]
        return beyond({k: self.count(*k) for k in watch.changed})
