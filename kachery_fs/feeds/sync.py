"""Feeds between a node and a channel's bucket: the owner publishes, readers fetch.

Bucket layout (kachery's, reference: kachery.md §2.1), under
``<channel>/feeds/<pathify(feedId)>/subfeeds/<pathify(subfeedHash)>/``:

* ``<i>``: signed message ``i`` as JSON, one object each (what every kachery reader reads);
* ``subfeed.json``: ``{"messageCount": N}``, plus ``"batches"``, a list of ``[start, end]``
  for which ``batch/<start>-<end>`` holds messages ``start..end-1`` as one JSON array.
  Batches are our addition (kachery readers ignore them): a reader fetches a 10,000-message
  subfeed in 20 GETs rather than 10,000.

The owner uploads what the bucket lacks through URLs the hub signs (it proves it holds the
feed key by a second signature over the request), then tells the hub the new count; the
hub wakes every node watching the subfeed. Readers verify everything they fetch
(signatures, chain, numbering) and keep only the valid prefix (``FeedStore.add_signed``).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from functools import partial

import httpx
import trio

from .._http import check_response, error_for_exception
from ..canonical import canonical_json
from ..channels import Channels
from ..errors import IntegrityError, NotFound, PermissionDenied, ProtocolError
from ..protocol import SignedRequest, feed_prefix
from ..readurls import ReadUrls, Source, is_signed, source_of
from .db import FeedStore

log = logging.getLogger(__name__)

#: Messages per upload batch (and per batch object).
BATCH = 500
#: Parallel HTTP requests of one publish or fetch.
PARALLEL = 16


async def _put(client: httpx.AsyncClient, signed: SignedRequest, data: bytes) -> None:
    what = f"PUT {signed.url.split('?')[0]}"
    try:
        r = await client.put(signed.url, content=data, headers=signed.headers)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None
    if r.status_code == 412:  # already there (an earlier, interrupted publish)
        return
    check_response(r, what, ok=(200, 201))


async def _get(client: httpx.AsyncClient, where: Source | str, *,
               bust: bool = False) -> bytes | None:
    """The object's bytes, or None if absent. ``bust`` defeats edge caches (mutable) on a
    public object (a signed URL covers its query, and a private object is not cached)."""
    source = source_of(where)
    what = f"GET {source}"

    async def at(url: str) -> bytes | None:
        bust_it = bust and not is_signed(url)
        r = await client.get(url, params={"cb": secrets.token_hex(5)} if bust_it else None)
        if r.status_code == 404:
            return None
        check_response(r, what)
        return r.content

    try:
        return await source.using(at)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None


async def _gather(jobs, limit: int = PARALLEL) -> list:
    """Run the async callables in ``jobs`` with at most ``limit`` at once; results in order."""
    results: list = [None] * len(jobs)
    sem = trio.Semaphore(limit)

    async def run(i, job):
        async with sem:
            results[i] = await job()

    async with trio.open_nursery() as nursery:
        for i, job in enumerate(jobs):
            nursery.start_soon(run, i, job)
    return results


class FeedSync:
    """Publishing and fetching the subfeeds of ``store`` in the channels of ``channels``
    (their records, hubs and this node's permissions), over the HTTP ``client``; ``urls``:
    where the bucket's objects are read (the node's, so that signed URLs are shared)."""

    def __init__(self, channels: Channels, store: FeedStore, client: httpx.AsyncClient,
                 urls: ReadUrls | None = None):
        self.channels = channels
        self.store = store
        self.client = client
        self.urls = urls if urls is not None else ReadUrls(channels)

    # -- the owner ---------------------------------------------------------------------------

    async def publish(self, channel: str, feed_id: str, subfeed_hash: str, *,
                      singles: bool = True,
                      on_announced: Callable[[int, int], None] | None = None
                      ) -> tuple[int, int]:
        """Publish what the bucket lacks, a batch of up to 500 messages at a time: the batch
        object and the index, then tell the hub (watching nodes fetch at once). Then, with
        ``singles``, the single-message objects that kachery's own readers use (else the
        caller runs :meth:`upload_singles` itself, when it suits). Returns the message
        counts in the bucket before and after. ``on_announced(start, end)`` is called just
        before each batch is announced (so that a caller remembers the single objects due,
        even if it is stopped while the hub takes the announce)."""
        ch = self.channels.get(channel)
        hub = self.channels.hub(ch.hub_url)
        key = self.store.key(feed_id)
        sub = (channel, feed_id, subfeed_hash)
        remote = await hub.feed_updated(*sub, owner=key, message_count=0)
        local = self.store.count(feed_id, subfeed_hash)
        if remote > local:
            # Only this key's holder publishes this feed, and it holds every message it
            # signed: a larger count at the hub is wrong (set by an earlier version that
            # took a count from anyone who replayed a co-signature). Repair it: back to 0,
            # which needs no proof, and announce again what is in the bucket (the objects
            # already there are not sent again).
            log.warning("feed %s… subfeed %s…: the hub of %s counts %d message(s), this"
                        " owner has %d; repairing the hub's count", feed_id[:12],
                        subfeed_hash[:12], channel, remote, local)
            remote = await hub.feed_updated(*sub, owner=key, message_count=0, repair=True)
        if local <= remote:
            return remote, remote
        index_key = f"{feed_prefix(channel, feed_id, subfeed_hash)}/subfeed.json"
        if ch.private and "requestFeeds" not in await self.channels.permissions(channel):
            # The hub signs reads of a private channel's feeds only for requestFeeds.
            log.warning("feed %s… subfeed %s…: this node may not read the feeds of private"
                        " channel %s (no requestFeeds), so the new index lists only the"
                        " batches published now (readers read the others message by"
                        " message)", feed_id[:12], subfeed_hash[:12], channel)
            old_index = None
        else:
            old_index = await _get(self.client, self.urls.of(channel, index_key), bust=True)
        batches = _batches_of(old_index)
        for start in range(remote, local, BATCH):
            end = min(start + BATCH, local)
            messages = self.store.messages(feed_id, subfeed_hash, start, end)
            batch_body = ("[" + ",".join(canonical_json(m) for m in messages) + "]").encode()
            batches.append([start, end])
            index = json.dumps({"messageCount": end, "batches": batches},
                               separators=(",", ":")).encode()
            urls = await hub.feed_upload_urls(*sub, owner=key, start=start, sizes=[],
                                              index_size=len(index),
                                              batch=(start, end, len(batch_body)))
            await _put(self.client, SignedRequest.from_json(urls["batch"]), batch_body)
            await _put(self.client, SignedRequest.from_json(urls["index"]), index)
            if on_announced is not None:
                # Before the announce: a stop during it (the hub may count the batch while
                # this end never hears so) must not leave the single objects forgotten.
                on_announced(start, end)
            await hub.feed_updated(*sub, owner=key, message_count=end, batch_start=start)
        log.info("feed %s… subfeed %s…: %d message(s) announced in %s (in its bucket, as"
                 " batches)", feed_id[:12], subfeed_hash[:12], local, channel)
        if singles:
            await self.upload_singles(channel, feed_id, subfeed_hash, remote, local)
        return remote, local

    async def upload_singles(self, channel: str, feed_id: str, subfeed_hash: str, start: int,
                             end: int) -> None:
        """The single-message objects ``start..end-1`` (kachery's layout)."""
        hub = self.channels.hub_of(channel)
        key = self.store.key(feed_id)
        sub = (channel, feed_id, subfeed_hash)
        for a in range(start, end, BATCH):
            b = min(a + BATCH, end)
            bodies = [canonical_json(m).encode()
                      for m in self.store.messages(feed_id, subfeed_hash, a, b)]
            urls = await hub.feed_upload_urls(*sub, owner=key, start=a,
                                              sizes=[len(x) for x in bodies])
            await _gather([partial(_put, self.client, SignedRequest.from_json(u), x)
                           for u, x in zip(urls["messages"], bodies, strict=True)])
        log.info("feed %s… subfeed %s…: %d message(s) in the bucket of %s", feed_id[:12],
                 subfeed_hash[:12], end, channel)

    async def _singles(self, channel: str, prefix: str, start: int, end: int) -> list:
        """Messages ``start..end-1`` from their single objects, up to the first missing one.

        They are fetched in windows that grow from :data:`PARALLEL` to :data:`BATCH`, and
        the first window with a gap is the last: a count that claims more than the bucket
        holds costs one small window of GETs, not one GET per claimed message."""
        out: list = []
        window = PARALLEL
        while start < end:
            stop = min(start + window, end)
            keys = [f"{prefix}/{i}" for i in range(start, stop)]
            await self.urls.prefetch(channel, keys)
            bodies = await _gather([partial(_get, self.client, self.urls.of(channel, key))
                                    for key in keys])
            got = _parse_all(bodies)
            out += got
            if len(got) < stop - start:
                break
            start, window = stop, min(2 * window, BATCH)
        return out

    async def hub_count(self, channel: str, feed_id: str, subfeed_hash: str) -> int:
        """The subfeed's message count at the hub (0 if the hub has heard of none)."""
        hub = self.channels.hub_of(channel)
        answer = await hub.watch_feeds(channel, [
            {"feedId": feed_id, "subfeedHash": subfeed_hash, "position": 0}])
        return max([u.get("messageCount", 0) for u in answer.get("updates", [])
                    if isinstance(u, dict) and isinstance(u.get("messageCount"), int)],
                   default=0)

    # -- readers -----------------------------------------------------------------------------

    async def fetch(self, channel: str, feed_id: str, subfeed_hash: str, *,
                    name: str | None = None,
                    hub_count: int | None = None) -> tuple[int, str | None]:
        """Fetch the messages this node lacks from the bucket and store the valid prefix.
        Returns ``(added, problem)``; a problem (tampering, a fork) is logged.

        Never beyond the hub's count (``hub_count``, asked for when not given), which only
        the feed's owner can raise, and only once the bucket holds the messages. Where the
        hub has heard of no message of the subfeed (one that an earlier kachery published),
        the bucket's index counts, and single messages are read up to the first gap."""
        if "requestFeeds" not in await self.channels.permissions(channel):
            raise PermissionDenied(
                f"this node lacks the requestFeeds permission on channel {channel!r}; the"
                f" channel owner can grant it with `kachery-fs hub channel authorize {channel}"
                f" {self.channels.node_id} --add requestFeeds`")
        prefix = feed_prefix(channel, feed_id, subfeed_hash)
        if not isinstance(hub_count, int) or hub_count < 0:
            hub_count = await self.hub_count(channel, feed_id, subfeed_hash)
        local = self.store.count(feed_id, subfeed_hash)
        if 0 < hub_count <= local:
            return 0, None
        index = await _get(self.client, self.urls.of(channel, f"{prefix}/subfeed.json"),
                           bust=True)
        if index is None and hub_count == 0:
            raise NotFound(f"feed {feed_id} has no subfeed {subfeed_hash} in channel"
                           f" {channel!r}")
        if hub_count:
            count = hub_count
        else:
            assert index is not None  # NotFound was raised above
            count = _count_of(index)
        if count <= local:
            return 0, None
        # The batches that cover what we lack, fetched together; single messages after.
        wanted: list[list[int]] = []
        position = local
        for batch in sorted(_batches_of(index)):
            if batch[0] <= position < batch[1] <= count:
                wanted.append(batch)
                position = batch[1]
        keys = [f"{prefix}/batch/{a}-{b}" for a, b in wanted]
        if keys:
            await self.urls.prefetch(channel, keys)
        bodies = await _gather([partial(_get, self.client, self.urls.of(channel, key))
                                for key in keys])
        messages: list = []
        position = local
        for (a, b), data in zip(wanted, bodies, strict=True):
            try:
                got = json.loads(data) if data is not None else None
            except ValueError:
                got = None
            if not isinstance(got, list) or len(got) != b - a:
                break  # the rest from single objects
            messages.extend(got[position - a:])
            position = b
        if position < count:
            messages += await self._singles(channel, prefix, position, count)
        added, problem = await trio.to_thread.run_sync(
            lambda: self.store.add_signed(feed_id, subfeed_hash, messages, local, name=name))
        if problem and wanted and local + added < position:
            # A bad batch object: the single-message objects may be sound.
            log.warning("feed %s subfeed %s in channel %s: a batch object is bad (%s);"
                        " reading single messages", feed_id, subfeed_hash, channel, problem)
            resume = local + added
            singles = await self._singles(channel, prefix, resume, count)
            more, problem = await trio.to_thread.run_sync(
                lambda: self.store.add_signed(feed_id, subfeed_hash, singles, resume,
                                              name=name))
            added += more
        if problem:
            log.warning("feed %s subfeed %s in channel %s: %s (kept the %d valid message(s)"
                        " before it)", feed_id, subfeed_hash, channel, problem, local + added)
        return added, problem


def _parse_all(bodies: list) -> list:
    """JSON of each body up to the first missing one; unparsable ones become None (which
    ``add_signed`` reports, keeping the prefix before it)."""
    out = []
    for data in bodies:
        if data is None:
            break
        try:
            out.append(json.loads(data))
        except ValueError:
            out.append(None)
    return out


def _count_of(index: bytes) -> int:
    try:
        count = json.loads(index)["messageCount"]
    except (ValueError, KeyError, TypeError):
        raise ProtocolError("subfeed.json is not {\"messageCount\": N}") from None
    if not isinstance(count, int) or count < 0:
        raise IntegrityError(f"subfeed.json has a bad messageCount {count!r}")
    return count


def _batches_of(index: bytes | None) -> list[list[int]]:
    if index is None:
        return []
    try:
        batches = json.loads(index).get("batches", [])
    except (ValueError, AttributeError):
        return []
    return [b for b in batches if isinstance(b, list) and len(b) == 2
            and all(isinstance(x, int) for x in b) and 0 <= b[0] < b[1]]
