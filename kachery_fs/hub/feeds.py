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
from .wakeups import RECHECK_S, Wakeups

#: Longest a watch long-poll is held.
MAX_WATCH_S = 25.0


class _Watch:
    """One waiting watchFeeds call: woken with the keys of the subfeeds that changed."""

    __slots__ = ("changed", "event", "keys")

    def __init__(self, keys):
        self.event = trio.Event()
        self.keys = keys
        #: subfeed -> its new count as the wake-up said (None: to be read again)
        self.changed: dict[tuple[str, str, str], int | None] = {}


class FeedIndex:
    """Subfeed counts, and the watches waiting on them.

    A watch registers itself under each subfeed it subscribes to; a new count wakes only
    the watches of that subfeed and tells them which one changed, so a wake-up costs what
    changed, not one query per subscription, and a waiting watch costs no task. A count
    set by another hub process on the database wakes them the same way (``hub.wakeups``).
    """

    def __init__(self, db, *, wakeups: Wakeups | None = None):
        self._db = storage.as_database(db)
        self._watches: dict[tuple[str, str, str], set[_Watch]] = {}
        self._wakeups = wakeups if wakeups is not None else Wakeups()
        self._wakeups.on("f", self._woken, wake_all=self._wake_all)

    def count(self, channel: str, feed_id: str, subfeed_hash: str) -> int:
        row = self._db.execute(
            "SELECT message_count FROM subfeeds WHERE channel = ? AND feed_id = ?"
            " AND subfeed_hash = ?", (channel, feed_id, subfeed_hash)).fetchone()
        return row[0] if row else 0

    def set_count(self, channel: str, feed_id: str, subfeed_hash: str, count: int, *,
                  lower: bool = False) -> int:
        """Record a new message count (counts only grow, unless ``lower``: an owner's
        repair); wake the watchers. Returns the count."""
        # One statement: another hub process may be setting this count at the same time.
        changed = self._db.execute(
            "INSERT INTO subfeeds (channel, feed_id, subfeed_hash, message_count, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (channel, feed_id, subfeed_hash) DO UPDATE"
            " SET message_count = excluded.message_count, updated_at = excluded.updated_at"
            " WHERE subfeeds.message_count " + ("<>" if lower else "<")
            + " excluded.message_count",
            (channel, feed_id, subfeed_hash, count, time.time())).rowcount
        if changed:
            self._wakeups.send("f", f"{channel}/{feed_id}/{subfeed_hash}")
            return count
        return self.count(channel, feed_id, subfeed_hash)

    def _woken(self, text: str) -> None:
        """Subfeed ``channel/feed/subfeed`` has a new count: its row is read once, here,
        for every watch it wakes (a wake-up says which subfeed, never what its count is:
        the rows are the truth, whoever sent it)."""
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"not a subfeed: {text[:100]!r}")
        key = (parts[0], parts[1], parts[2])
        watches = self._watches.get(key)
        if not watches:
            return
        count = self.count(*key)
        for watch in watches:
            watch.changed[key] = count
            watch.event.set()

    def _wake_all(self) -> None:
        for watches in self._watches.values():
            for watch in watches:
                watch.changed.update(dict.fromkeys(watch.keys))
                watch.event.set()

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
        watch = _Watch(positions.keys())
        for key in positions:
            self._watches.setdefault(key, set()).add(watch)
        try:
            deadline = trio.current_time() + min(wait_s, MAX_WATCH_S)
            while True:
                with trio.move_on_after(min(deadline - trio.current_time(), RECHECK_S)):
                    await watch.event.wait()
                if watch.changed:
                    if updates := beyond(self._known(channel, watch.changed)):
                        return updates
                    # woken for a count already seen (another process's late wake-up,
                    # or every watch woken after the listening connection was lost)
                    watch.changed.clear()
                    watch.event = trio.Event()
                elif updates := beyond(self._counts(channel, positions)):
                    return updates  # no wake-up, but the rows say (one was missed)
                if trio.current_time() >= deadline:
                    return []
        finally:
            for key in positions:
                waiting = self._watches[key]
                waiting.discard(watch)
                if not waiting:
                    del self._watches[key]

    def _known(self, channel: str, changed: dict) -> dict[tuple[str, str, str], int]:
        """The counts of the subfeeds of a wake-up: as read when it came, else read now."""
        known = {k: n for k, n in changed.items() if n is not None}
        unknown = [k for k, n in changed.items() if n is None]
        if len(unknown) > 20:
            known |= self._counts(channel, unknown)
        else:
            known |= {k: self.count(*k) for k in unknown}
        return known
