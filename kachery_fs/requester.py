"""The requester side of file requests: ask the hub for a hash no bucket has, and wait.

:class:`FileRequest` starts (or joins) the hub's request for one hash on one channel and
follows it by long-polling its state. It gives up only when nothing has moved for
``stall_timeout`` seconds (no fixed total: a provider uploading a multi-gigabyte file
keeps it alive by making progress), or when the hub says the request failed (no provider
online, every provider declined or failed) or this node may not ask. While it runs,
``size`` becomes known as soon as a provider accepts, so a ``stat`` need not wait for the
whole upload. Every wait of a request (the first answer, long-polls, retries) is under one
deadline, ``stall_timeout`` after the last progress, so a request never outlives it by an
HTTP timeout: a hub that stops answering fails it with ``DeadlineExceeded`` (``ETIMEDOUT``
through the mount) at that deadline.

If the hub is unreachable when the request starts, the request is retried a few times with
backoff (one transient failure is not an error) and then fails with a clear error; if the
hub goes away during a request, the request keeps retrying until the stall timeout, so a
hub restart does not break a transfer in progress.

A provider that streams a large file (:mod:`kachery_fs.provider`) names its manifest when
it accepts (:attr:`FileRequest.manifest`) and reports how many chunks from the first are
in the bucket as objects of their own; :meth:`FileRequest.wait_chunk` waits for one, so
that a reader can fetch it before the request has finished.
"""

from __future__ import annotations

import logging
from functools import partial

import trio

from . import metrics
from .channels import Channels
from .errors import (
    DeadlineExceeded,
    KacheryError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from .retry import foreground, pause, retrying
from .uris import is_sha1

log = logging.getLogger(__name__)

#: Default: give up on a request when it has made no progress for this long.
DEFAULT_STALL_TIMEOUT_S = 60.0
#: Longest single long-poll.
POLL_WAIT_S = 20.0


class RequestFailed(NotFound):
    """The hub could not get the file from any provider."""


class FileRequest:
    def __init__(self, channels: Channels, channel: str, sha1: str, *,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT_S, bad: bool = False):
        self.channels = channels
        self.channel = channel
        self.sha1 = sha1
        self.stall_timeout = stall_timeout
        self.bad = bad  # the bucket's object failed verification: the hub is to check it
        self.state: dict = {}
        self.size: int | None = None
        self.error: KacheryError | None = None
        self.size_known = trio.Event()
        self.done = trio.Event()
        #: A streaming provider's manifest of the file, and how many chunks from the first
        #: it has put in the bucket (only ever grows, for that manifest).
        self.manifest: str | None = None
        self.chunks = 0
        self._news = trio.Event()

    def __repr__(self) -> str:
        return f"<FileRequest {self.channel}/{self.sha1[:12]} {self.state.get('state')}>"

    async def wait_size(self) -> int:
        await self.size_known.wait()
        if self.size is None:
            assert self.error is not None
            raise self.error
        return self.size

    async def wait_chunk(self, manifest: str, i: int) -> bool:
        """Wait until chunk ``i`` of the file by ``manifest`` is in the bucket as an object
        of its own (True), or the request has finished without that (False: the whole
        object is there, read the chunk from it). Raises the request's error; bounded by
        the request's stall deadline, as every wait of it is."""
        while True:
            if self.manifest == manifest and self.chunks > i:
                return True
            if self.done.is_set():
                if self.error is not None:
                    raise self.error
                return False
            await self._news.wait()

    async def wait_done(self) -> int:
        await self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.size is not None
        return self.size

    async def run(self) -> None:
        """Follow the request to its end; never raises (see :attr:`error`)."""
        try:
            self.size = await self._follow()
            metrics.FILE_REQUESTS.labels("done").inc()
            log.info("sha1://%s is in the bucket of %s (requested)", self.sha1, self.channel)
        except KacheryError as exc:
            metrics.FILE_REQUESTS.labels("failed").inc()
            self.error = exc
            log.info("request for sha1://%s on channel %s failed: %s", self.sha1,
                        self.channel, exc)
        except Exception as exc:  # a bug: report it to the waiters, never hang them
            log.exception("request for sha1://%s failed unexpectedly", self.sha1)
            self.error = KacheryError(f"internal error: {exc!r}")
        finally:
            self.size_known.set()
            self.done.set()
            self._news.set()

    def _update(self, state: dict) -> bool:
        """Adopt a state answer; True if it shows progress."""
        old = self.state
        self.state = state
        size = state.get("size")
        manifest, chunks = state.get("manifest"), state.get("chunks")
        if isinstance(size, int) and size >= 0 and self.size is None:
            if isinstance(manifest, str) and is_sha1(manifest):
                self.manifest = manifest.lower()  # known with the size: before an open
            self.size = size
            self.size_known.set()
        if isinstance(manifest, str) and manifest.lower() == self.manifest and \
                isinstance(chunks, int) and chunks > self.chunks:
            self.chunks = chunks
            self._news.set()
            self._news = trio.Event()
        keys = ("state", "bytes", "provider", "version", "chunks")
        return any(old.get(k) != state.get(k) for k in keys)

    async def _follow(self) -> int:
        ch = self.channels.get(self.channel)
        perms = await self.channels.permissions(self.channel)  # waits 2 s at most
        if "requestFiles" not in perms:
            raise PermissionDenied(
                f"sha1://{self.sha1} is in neither the local store nor the bucket of channel"
                f" {self.channel!r}, and this node lacks the requestFiles permission to ask"
                " other nodes for it")
        hub = self.channels.hub(ch.hub_url)
        # Every wait from here on is under one deadline that moves with progress, so the
        # request ends stall_timeout after its last progress whatever it is waiting for: a
        # retry, a long-poll (whose HTTP timeout is later), a hub that never answers.
        watch = trio.CancelScope(deadline=trio.current_time() + self.stall_timeout)
        with watch:
            return await self._poll(hub, watch)
        if not self.state:
            raise DeadlineExceeded(f"cannot request sha1://{self.sha1} from other nodes: hub"
                                   f" {ch.hub_url} did not answer within"
                                   f" {self.stall_timeout:g} s")
        raise DeadlineExceeded(
            f"request for sha1://{self.sha1} made no progress for {self.stall_timeout:g} s"
            f" (last state: {self.state.get('state')}, {self.state.get('bytes', 0)} bytes"
            " uploaded)")

    async def _poll(self, hub, watch: trio.CancelScope) -> int:
        """Start the request and long-poll its state to the end; ``watch`` is the deadline,
        moved on at every progress."""
        try:
            # One bad answer (a 503, a dropped connection) is retried; only a hub that
            # stays unreachable fails the request.
            self._update(await retrying(partial(hub.request_file, self.channel, self.sha1,
                                                bad=self.bad),
                                        what=f"requesting sha1://{self.sha1}"))
        except Unavailable as exc:
            kind = DeadlineExceeded if isinstance(exc, DeadlineExceeded) else Unavailable
            raise kind(f"cannot request sha1://{self.sha1} from other nodes: hub"
                       f" unreachable ({exc})") from None
        watch.deadline = trio.current_time() + self.stall_timeout
        log.info("requested sha1://%s on channel %s through the hub", self.sha1, self.channel)
        backoff = foreground()
        while True:
            state = self.state.get("state")
            if state == "finished" and self.size is not None:
                return self.size
            if state == "failed":
                raise RequestFailed(f"no node could provide sha1://{self.sha1} on channel"
                                    f" {self.channel!r}: {self.state.get('error', 'failed')}")
            remaining = watch.deadline - trio.current_time()
            try:
                try:
                    answer = await hub.request_file(self.channel, self.sha1,
                                                    version=self.state.get("version"),
                                                    wait_s=min(POLL_WAIT_S, max(remaining, 0.5)))
                except NotFound:
                    # The hub forgot the request (it expired, or its state was lost): ask
                    # again.
                    answer = await hub.request_file(self.channel, self.sha1)
            except Unavailable as exc:  # DeadlineExceeded too: an HTTP timeout
                # No later than the watch's deadline, which then reports the stall.
                await pause(backoff, exc, what=f"hub unreachable while waiting for"
                            f" sha1://{self.sha1}", at_deadline="wait")
                continue
            backoff.reset()
            if self._update(answer):
                watch.deadline = trio.current_time() + self.stall_timeout
