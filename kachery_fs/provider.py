"""The provider side of file requests: hold a long-poll open to each hub, answer offers.

For every hub this node has joined a channel on, one task keeps a ``listenRequests``
long-poll open; the hub answers it at once when it offers this node a request. For an offer
the node declines at once if it does not hold the file, otherwise accepts and uploads it
through the same resumable, verified path as its own writes (``Uploader.upload_now``),
reporting progress to the hub, which relays it to the requesters. If the hub gives the
request to another provider meanwhile, the upload here is stopped.

A large file whose manifest this node has (computed here, or trusted when it was read by
chunk) is **streamed**: the manifest object goes to the bucket before the node accepts,
with its hash; then the file's chunks go up as objects of their own (the first alone,
then :data:`STREAM_PARALLEL` at a time, in order), each reported to the hub as soon as it and
every chunk before it are in the bucket, so that requesters read verified chunks while
the rest is still coming; then the whole object, as for any file (cloud-era readers look
for it, and the hub checks the manifest's vouch against it). A chunk that cannot be
uploaded ends the streaming, not the request: requesters wait for the whole object.

When a hub is unreachable the listener retries with backoff and reconnects by itself;
its state is in :attr:`Provider.connections` for ``status``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import trio

from . import manifest as manifest_module
from . import metrics
from .channels import Channels
from .errors import IntegrityError, KacheryError, NotFound, PermissionDenied
from .manifest import Manifest
from .retry import foreground, pause
from .sources import Sources
from .store import Store
from .uploader import Uploader

log = logging.getLogger(__name__)

#: How long one listen long-poll is held open.
LISTEN_WAIT_S = 20.0
#: How often a running upload reports its progress to the hub.
PROGRESS_INTERVAL_S = 0.5
#: With no new bytes (a file being copied in from a kachery store and verified first), the
#: same count is reported this often, so that the hub does not take the request for stalled
#: (it moves on after 15 s without a report).
KEEPALIVE_S = 5.0
#: How often the set of hubs (from joined channels) is re-read.
HUBS_RESCAN_S = 5.0
#: How many chunk objects of a streamed file are uploaded at once (after the first, which
#: goes up alone). More hide each upload's round trips and commits (an fsync each on the
#: local bucket); on a link that is the limit they share it, so none comes sooner.
STREAM_PARALLEL = 4


@dataclass
class Connection:
    state: str = "connecting"  # connecting | connected | unreachable | refused
    since: float = 0.0
    error: str | None = None


class Provider:
    def __init__(self, channels: Channels, store: Store, uploader: Uploader, sources: Sources):
        self.channels = channels
        self.store = store
        self.uploader = uploader
        # Kachery stores on this machine: a file only there is copied in (verified) first.
        self.sources = sources
        self.connections: dict[str, Connection] = {}
        #: Offers being served now: (channel, sha1) -> bytes committed so far.
        self.serving: dict[tuple[str, str], int] = {}
        #: Of a streamed file: how many chunks from the first are in the bucket.
        self.streamed: dict[tuple[str, str], int] = {}
        #: Set when there is news for the hub sooner than the next report (a chunk).
        self._news: dict[tuple[str, str], trio.Event] = {}

    async def run(self) -> None:
        """Listen to every hub of a joined channel, until cancelled."""
        async with trio.open_nursery() as nursery:
            listening: set[str] = set()
            while True:
                for url in {ch.hub_url for ch in self.channels.all()} - listening:
                    listening.add(url)
                    nursery.start_soon(self._listen, url, nursery)
                await trio.sleep(HUBS_RESCAN_S)

    def _set(self, url: str, state: str, error: str | None = None) -> None:
        conn = self.connections.setdefault(url, Connection())
        if conn.state != state:
            if state == "connected":
                log.info("listening for file requests from hub %s", url)
            elif state == "unreachable":
                log.warning("hub %s is unreachable (%s); reconnecting with backoff", url, error)
            elif state == "refused":
                log.warning("hub %s refuses this node's listen: %s", url, error)
            conn.state, conn.since = state, time.time()
        conn.error = error

    async def _listen(self, url: str, nursery: trio.Nursery) -> None:
        hub = self.channels.hub(url)
        backoff = foreground()
        self._set(url, "connecting")
        while True:
            # The first call returns at once, so that "connected" is known without waiting.
            connected = self.connections[url].state == "connected"
            try:
                offers = await hub.listen_requests(LISTEN_WAIT_S if connected else 0)
            except PermissionDenied as exc:
                self._set(url, "refused", str(exc))
                await trio.sleep(10)
                continue
            except KacheryError as exc:
                self._set(url, "unreachable", str(exc))  # logs the change of state
                await pause(backoff, exc, what=f"listening to hub {url}", level=logging.DEBUG)
                continue
            self._set(url, "connected")
            backoff.reset()
            for offer in offers:
                try:
                    key = (str(offer["channel"]), str(offer["sha1"]).lower())
                except (KeyError, TypeError):
                    log.warning("hub %s sent a malformed offer %r", url, offer)
                    continue
                if key not in self.serving:
                    self.serving[key] = 0
                    nursery.start_soon(self._serve, url, *key)

    async def _serve(self, url: str, channel: str, sha1: str) -> None:
        hub = self.channels.hub(url)
        key = (channel, sha1)
        try:
            size = self.store.size(sha1)
            in_sources = self.sources.find(sha1) if size is None else []
            if in_sources:  # copied in (and verified) after accepting, which is due in 5 s
                size = _size_or_none(in_sources[0])
            if size is None:
                await hub.answer_request(channel, sha1, accept=False,
                                         reason="not in its local store")
                return
            try:
                self.channels.get(channel)
            except NotFound:
                await hub.answer_request(channel, sha1, accept=False,
                                         reason="has not joined the channel")
                return
            manifest = None if in_sources else await self._manifest_to_stream(channel, sha1,
                                                                                size)
            await hub.answer_request(channel, sha1, accept=True, size=size,
                                     manifest=manifest.hash if manifest else None)
            log.info("providing sha1://%s (%d bytes) to channel %s on request%s", sha1, size,
                     channel, f", streaming its {len(manifest.chunks)} chunks" if manifest
                     else "")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._report_progress, hub, channel, sha1, nursery)

                def on_progress(committed: int) -> None:
                    # After streamed chunks the count does not go back: the hub takes a
                    # smaller one for no progress.
                    self.serving[key] = max(self.serving.get(key, 0), committed)

                try:
                    if in_sources:
                        size = await trio.to_thread.run_sync(
                            self.sources.copy_into, self.store, sha1, in_sources)
                        if size is None:
                            raise IntegrityError("its copy in a kachery store on the node"
                                                 " is bad")
                    if manifest is not None:
                        await self._stream_chunks(channel, sha1, manifest)
                    await self.uploader.upload_now(channel, sha1, size, on_progress=on_progress)
                    metrics.PROVIDED.labels("uploaded").inc()
                except KacheryError as exc:
                    metrics.PROVIDED.labels("failed").inc()
                    log.warning("could not provide sha1://%s to %s: %s", sha1, channel, exc)
                    await hub.answer_request(channel, sha1, accept=False, reason=str(exc)[:300])
                nursery.cancel_scope.cancel()
        except KacheryError as exc:
            log.info("file request for sha1://%s on %s: %s", sha1, channel, exc)
        finally:
            self.serving.pop(key, None)
            self.streamed.pop(key, None)
            self._news.pop(key, None)

    async def _manifest_to_stream(self, channel: str, sha1: str, size: int) -> Manifest | None:
        """The manifest of stored file ``sha1`` that this node has, put in ``channel``'s
        bucket; None when the file is not large, no manifest is on record or can be
        made, or it cannot be read or uploaded (the file then goes up whole only)."""
        if size <= manifest_module.CHUNK_SIZE:
            return None
        known = await self.uploader.manifest_of(sha1, size)  # made now if none is yet
        if known is None:
            return None
        mhash = known[0]
        try:
            data = await trio.to_thread.run_sync(self.store.read_small, mhash,
                                                 manifest_module.MAX_BYTES)
            manifest = Manifest.parse(data, sha1=sha1)
            if manifest.size != size or manifest.hash != mhash:
                raise IntegrityError(f"it is not the manifest of the {size:,}-byte file")
            await self.uploader.upload_now(channel, mhash, len(data), retry=False)
        except (KacheryError, OSError) as exc:
            log.info("sha1://%s goes up whole, not by chunk: its manifest sha1://%s cannot"
                     " be used (%s)", sha1, mhash, exc)
            return None
        return manifest

    async def _stream_chunks(self, channel: str, sha1: str, manifest: Manifest) -> None:
        """Upload the chunks of ``sha1`` as objects of their own, the first alone, then
        :data:`STREAM_PARALLEL` at a time in order, and tell the hub each time the chunks in
        the bucket from the first grow. Never raises a chunk's error: the streaming stops,
        and the whole upload that follows brings the file."""
        key = (channel, sha1)
        chunks = manifest.chunks
        there: set[int] = set()
        slots = trio.Semaphore(STREAM_PARALLEL)
        failed: list[str] = []

        async def upload(i: int) -> None:
            chunk = chunks[i]
            try:
                await self.uploader.upload_part(channel, chunk.sha1, chunk.size, source=sha1,
                                                start=chunk.start)
            except (KacheryError, OSError) as exc:
                failed.append(f"chunk {i}: {exc}")
                if isinstance(exc, IntegrityError):  # the file is verified: the manifest lies
                    self.store.cache.forget_manifest(sha1, manifest.hash)
                return
            finally:
                slots.release()
            there.add(i)
            ready = self.streamed.get(key, 0)
            while ready in there:
                ready += 1
            if ready > self.streamed.get(key, 0):
                self.streamed[key] = ready
                self.serving[key] = max(self.serving.get(key, 0), chunks[ready - 1].end)
                self._news.setdefault(key, trio.Event()).set()

        async with trio.open_nursery() as nursery:
            for i in range(len(chunks)):
                await slots.acquire()
                if failed:
                    slots.release()
                    break
                if i == 0:  # alone, on all the bandwidth: readers' first byte comes soonest
                    await upload(0)
                else:
                    nursery.start_soon(upload, i)
        if failed:
            log.warning("streaming sha1://%s to %s stopped at %s; it goes up whole", sha1,
                        channel, failed[0])
        else:
            log.info("streamed sha1://%s to %s: its %d chunks are in the bucket; the whole"
                     " object follows", sha1, channel, len(chunks))

    async def _report_progress(self, hub, channel: str, sha1: str,
                               upload: trio.Nursery) -> None:
        key = (channel, sha1)
        last, last_sent = -1, 0.0
        while True:
            news = self._news.setdefault(key, trio.Event())
            with trio.move_on_after(PROGRESS_INTERVAL_S):
                await news.wait()
            if self._news.get(key) is news and news.is_set():
                self._news[key] = trio.Event()
            nbytes = self.serving.get(key, 0)
            if nbytes == last and trio.current_time() - last_sent < KEEPALIVE_S:
                continue
            last, last_sent = nbytes, trio.current_time()
            try:
                go_on = await hub.report_progress(channel, sha1, nbytes,
                                                  self.streamed.get(key))
            except KacheryError as exc:
                log.debug("progress report failed: %s", exc)
                continue
            if not go_on:
                log.info("the hub no longer needs this node's upload of sha1://%s (the"
                         " request has finished, or another node has it); stopping", sha1)
                upload.cancel_scope.cancel()
                return


def _size_or_none(path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None
