"""Feeds in the mount: ``<channel>/feeds/<feed-id>/<subfeed>`` as growing text files.

A subfeed file holds one line per message: the message's JSON, compact. Files of feeds this
node does not own are fetched from the channel's bucket when first looked up, then kept
current by one long-poll per channel (``watchFeeds``): the hub answers when the owner has
published more, the node fetches and verifies the new messages, and the file grows, which
``tail -f`` sees. For the feed's owner, appending a line to the file appends a signed message
and publishes it (in the background, coalesced per subfeed).

Retries follow :mod:`kachery_fs.retry`. Publishing and uploading the single-message objects
are background loops (:func:`~kachery_fs.retry.background` backoff): they try again after
a transient error (:func:`~kachery_fs.retry.is_transient`) and, since nobody waits on them,
after a protocol violation (an answer such as a proxy's error page, which the next try may
not meet); any other error is logged as a refusal, and the next append tries again. The
watch long-poll is a loop that readers wait on (:func:`~kachery_fs.retry.foreground`
backoff) and never stops: after a refusal of the requestFeeds permission it asks again
in :data:`PERMISSION_WAIT_S`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import httpx
import trio

from ..channels import Channels
from ..errors import (
    DeadlineExceeded,
    InvalidInput,
    KacheryError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Unavailable,
)
from ..readurls import ReadUrls
from ..retry import Backoff, background, foreground, is_transient, pause
from ..state import NodeDB
from .db import FeedStore
from .messages import message_line, parse_line
from .sync import FeedSync
from .uri import subfeed_hash

log = logging.getLogger(__name__)

#: Longest watch long-poll.
WATCH_WAIT_S = 20.0
#: How long the watch waits after the hub refused this node the requestFeeds permission.
PERMISSION_WAIT_S = 30.0


def _worth_retrying(exc: KacheryError) -> bool:
    """Whether a background publication is tried again after ``exc`` (module docstring)."""
    return is_transient(exc) or isinstance(exc, ProtocolError)


class FeedFiles:
    def __init__(self, channels: Channels, node_db: NodeDB, store: FeedStore,
                 client: httpx.AsyncClient, nursery: trio.Nursery,
                 on_grow: Callable[[str, str, str, int, bytes], Awaitable[None]] | None = None,
                 *, urls: ReadUrls | None = None):
        """The feeds of ``store`` (closed by :meth:`close`) in the channels of ``channels``;
        ``node_db`` keeps what is left to publish across mounts, ``client`` talks to the
        hubs' buckets (at the URLs ``urls`` gives), and background tasks run in
        ``nursery``.

        ``on_grow(channel, feed id, name, old size, new bytes)`` is awaited when a
        watched file grows (the mount tells the kernel its new size and bytes)."""
        self.channels = channels
        self.node_db = node_db
        self.nursery = nursery
        self.on_grow = on_grow
        self.store = store
        self.sync = FeedSync(channels, store, client, urls)
        # channel -> {(feed id, subfeed hash): name}: subfeeds to keep current
        self._watched: dict[str, dict[tuple[str, str], str]] = {}
        self._watch_changed: dict[str, trio.Event] = {}
        self._cache: dict[tuple[str, str], tuple[int, bytes]] = {}
        self._publish_pending: dict[tuple[str, str, str], trio.Event] = {}
        self._singles_queue: dict[tuple[str, str, str], list[tuple[int, int]]] = {}
        self._fetch_locks: dict[tuple[str, str, str], trio.Lock] = {}
        # Subfeeds of owned feeds created (opened for appending) but still empty.
        self._created: set[tuple[str, str]] = set()
        # The size of each watched file as the kernel was last told it.
        self._known: dict[tuple[str, str], int] = {}

    def created(self, feed_id: str, name: str) -> None:
        self._created.add((feed_id, subfeed_hash(name)))

    def close(self) -> None:
        self.store.close()

    # -- listing and content ----------------------------------------------------------------

    def feed_ids(self) -> list[str]:
        return [f.feed_id for f in self.store.feeds()]

    def subfeed_names(self, feed_id: str) -> list[str]:
        try:
            infos = self.store.subfeeds(feed_id)
        except (NotFound, InvalidInput):
            return []
        return [i.name if i.name is not None else f"~{i.subfeed_hash}" for i in infos]

    def owned(self, feed_id: str) -> bool:
        return self.store.owned(feed_id)

    def content(self, feed_id: str, name: str) -> bytes:
        """The file's bytes: one line per stored (verified) message."""
        h = subfeed_hash(name)
        count = self.store.count(feed_id, h)
        cached = self._cache.get((feed_id, h))
        if cached is not None and cached[0] == count:
            return cached[1]
        if cached is not None and cached[0] < count:
            data = cached[1] + b"".join(message_line(m) for m in
                                        self.store.messages(feed_id, h, cached[0], count))
        else:
            data = b"".join(message_line(m) for m in self.store.messages(feed_id, h, 0, count))
        self._cache[(feed_id, h)] = (count, data)
        return data

    async def size(self, channel: str, feed_id: str, name: str) -> int:
        """The file's size; fetches a subfeed seen for the first time. NotFound if the
        subfeed exists neither here nor in the channel's bucket."""
        h = subfeed_hash(name)
        if not self.owned(feed_id):
            key = (channel, feed_id, h)
            if key not in self._fetch_locks:
                self._fetch_locks[key] = trio.Lock()
            async with self._fetch_locks[key]:
                if (feed_id, h) not in self._watched.get(channel, {}):
                    await self._first_fetch(channel, feed_id, h, name)
        elif (self.store.count(feed_id, h) == 0 and (feed_id, h) not in self._created
              and name not in self.subfeed_names(feed_id)):
            raise NotFound(f"feed {feed_id[:12]}… has no subfeed {name!r} yet")
        elif "requestFeeds" in self.channels.get(channel).permissions:
            # The owner watches too: lines appended by another process (`kachery-fs feed
            # append`) then show in this mount when they are published.
            self._watch(channel, feed_id, h, name)
        size = len(self.content(feed_id, name))
        self._known[(feed_id, h)] = size
        return size

    async def _first_fetch(self, channel: str, feed_id: str, h: str, name: str) -> None:
        try:
            await self.sync.fetch(channel, feed_id, h,
                                  name=None if name.startswith("~") else name)
        except NotFound:
            if self.store.count(feed_id, h) == 0:
                raise
        except Unavailable as exc:
            if self.store.count(feed_id, h) == 0:
                raise
            log.warning("feed %s…: %s; showing the %d message(s) stored here", feed_id[:12],
                        exc, self.store.count(feed_id, h))
        self._watch(channel, feed_id, h, name)

    # -- keeping current -----------------------------------------------------------------

    def _watch(self, channel: str, feed_id: str, h: str, name: str) -> None:
        watched = self._watched.setdefault(channel, {})
        if (feed_id, h) in watched:
            return
        watched[(feed_id, h)] = name
        if channel not in self._watch_changed:
            self._watch_changed[channel] = trio.Event()
            self.nursery.start_soon(self._watch_channel, channel)
        else:
            self._watch_changed[channel].set()

    async def _watch_channel(self, channel: str) -> None:
        hub = self.channels.hub_of(channel)
        backoff = foreground()
        while True:
            changed = self._watch_changed[channel] = trio.Event()
            subs = [{"feedId": f, "subfeedHash": h, "position": self.store.count(f, h)}
                    for (f, h) in self._watched[channel]]
            answer = await self._poll(hub, channel, subs, changed, backoff)
            for update in (answer or {}).get("updates", []):
                key = (update.get("feedId"), update.get("subfeedHash"))
                name = self._watched[channel].get(key)
                if name is None:
                    continue
                old = self._known.get(key, len(self.content(key[0], name)))
                if not self.owned(key[0]):
                    try:
                        await self.sync.fetch(channel, key[0], key[1],
                                              name=None if name.startswith("~") else name,
                                              hub_count=update.get("messageCount"))
                    except KacheryError as exc:
                        log.warning("fetching feed %s… subfeed %s: %s", key[0][:12], name, exc)
                new = self.content(key[0], name)
                if len(new) > old and self.on_grow is not None:
                    self._known[key] = len(new)
                    await self.on_grow(channel, key[0], name, old, new[old:])

    async def _poll(self, hub, channel: str, subs: list, changed: trio.Event,
                    backoff: Backoff) -> dict | None:
        """One watch long-poll; cut short (None) when the subscriptions change. After a
        failure it waits (``backoff``, reset by an answer) and returns None."""
        answer = None
        async with trio.open_nursery() as nursery:
            async def poll():
                nonlocal answer
                try:
                    with trio.fail_after(WATCH_WAIT_S + 30):
                        answer = await hub.watch_feeds(channel, subs, wait_s=WATCH_WAIT_S)
                except PermissionDenied as exc:  # until the owner grants requestFeeds
                    log.warning("watching feeds on %s: %s; trying again in %.0f s", channel,
                                exc, PERMISSION_WAIT_S)
                    await trio.sleep(PERMISSION_WAIT_S)
                except trio.TooSlowError:
                    await pause(backoff, DeadlineExceeded(
                        f"hub {hub.url} did not answer within {WATCH_WAIT_S + 30:g} s"),
                        what=f"watching feeds on {channel}")
                except KacheryError as exc:
                    await pause(backoff, exc, what=f"watching feeds on {channel}")
                else:
                    backoff.reset()
                nursery.cancel_scope.cancel()

            async def restart():
                await changed.wait()  # a new subscription: ask again at once
                nursery.cancel_scope.cancel()

            nursery.start_soon(poll)
            nursery.start_soon(restart)
        return answer

    # -- appending (the owner) ---------------------------------------------------------------

    async def append_lines(self, channel: str, feed_id: str, name: str, data: bytes) -> None:
        """Append each complete line of ``data`` as a message; all or nothing.

        InvalidInput (EINVAL for the writer, and a warning in the log) for a line that is
        not one JSON object or array, naming the subfeed and the line."""
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        values = []
        for i, line in enumerate(lines):  # InvalidInput before anything is kept
            try:
                values.append(parse_line(line))
            except InvalidInput as exc:
                where = f"line {i + 1} of the write: " if len(lines) > 1 else ""
                raise InvalidInput(f"feed {feed_id[:12]}… subfeed {name!r}: nothing appended:"
                                   f" {where}{exc}") from None
        if not values:
            return
        await trio.to_thread.run_sync(self.store.append, feed_id, name, values)
        h = subfeed_hash(name)
        self._known[(feed_id, h)] = len(self.content(feed_id, name))  # the kernel saw them
        self._publish_soon(channel, feed_id, h)

    def _singles_later(self, key: tuple[str, str, str], start: int, end: int) -> None:
        """Queue the single-message objects ``start..end-1``: they go up after the batches,
        one range at a time per subfeed, so that new messages are never held behind them."""
        self.node_db.feed_singles_due(*key, start, end)
        queue = self._singles_queue.setdefault(key, [])
        queue.append((start, end))
        if len(queue) == 1:
            self.nursery.start_soon(self._singles_worker, key)

    async def _singles_worker(self, key: tuple[str, str, str]) -> None:
        channel, feed_id, h = key
        queue = self._singles_queue[key]
        backoff = background()
        while queue:
            start, end = queue[0]
            try:
                await self.sync.upload_singles(channel, feed_id, h, start, end)
            except KacheryError as exc:
                if _worth_retrying(exc):
                    await pause(backoff, exc, level=logging.WARNING, what=(
                        f"uploading single messages of feed {feed_id[:12]}… to {channel}"))
                    continue
                log.error("uploading single messages of feed %s… to %s refused: %s",
                          feed_id[:12], channel, exc)
            else:
                self.node_db.feed_singles_done(*key, end)
            backoff.reset()
            queue.pop(0)

    def resume_publishing(self) -> None:
        """At mount: finish what a stopped mount left of publishing its owned subfeeds (a
        batch not yet announced, single objects not yet uploaded)."""
        for channel, feed_id, h, done, target in self.node_db.feed_singles():
            if not self.owned(feed_id):
                continue
            if done < target:
                log.info("feed %s…: uploading the single objects of messages %d..%d",
                         feed_id[:12], done, target - 1)
                self._singles_later((channel, feed_id, h), done, target)
            self._publish_soon(channel, feed_id, h)  # one hub call when nothing is left

    def _publish_soon(self, channel: str, feed_id: str, h: str) -> None:
        key = (channel, feed_id, h)
        pending = self._publish_pending.get(key)
        if pending is not None:
            pending.set()  # the running publisher goes round once more
            return
        self._publish_pending[key] = trio.Event()
        self.nursery.start_soon(self._publisher, key)

    async def _publisher(self, key: tuple[str, str, str]) -> None:
        channel, feed_id, h = key
        backoff = background()
        try:
            while True:
                self._publish_pending[key] = again = trio.Event()
                try:
                    before, after = await self.sync.publish(
                        channel, feed_id, h, singles=False,
                        on_announced=partial(self.node_db.feed_singles_due, *key))
                    if after > before:
                        self._singles_later(key, before, after)
                except KacheryError as exc:
                    if _worth_retrying(exc):  # the hub or bucket is away
                        await pause(backoff, exc, level=logging.WARNING,
                                    what=f"publishing feed {feed_id[:12]}… to {channel}")
                        continue
                    log.error("publishing feed %s… to %s refused: %s (the messages stay in"
                              " this node's database; the next append retries)", feed_id[:12],
                              channel, exc)
                    return
                backoff.reset()
                if not again.is_set():
                    return
        finally:
            self._publish_pending.pop(key, None)
