"""Where a node reads a channel's bucket objects: public URLs, or short-lived signed ones.

A public channel's objects are read anonymously at ``<bucket base URL>/<key>``. A private
channel's bucket refuses anonymous reads: each object is read through a ``GET`` URL the
channel's hub signs for this node (``signReads``: for a node that may request files, a
file's object; for one that may request feeds, a feed's), valid for a few minutes and for
that one object only.

:class:`ReadUrls` is the one place that knows which is which. Every bucket read of a node
(the resolver's size probes and downloads, reads by chunk, feed reads) names the object
by an :class:`ObjectUrl` and asks it for a URL at each attempt, so:

- **Signed URLs are kept** for their lifetime and shared by every read of the object: a
  cold read costs one ``signReads`` for the object, not one per range.
- **Requests are batched**: the objects that reads of one channel want at the same moment
  are signed in one ``signReads`` (up to :data:`~kachery_fs.hub.service.MAX_SIGNED_READS`
  at a time); :meth:`ReadUrls.prefetch` signs a list known in advance.
- **A URL is renewed** once less than a third of its life is left, so a long stream never
  meets an expired URL. If the hub does not answer, the URL in hand is used while it is
  valid; if the hub *refuses* (this node lost its permission), every URL held for the
  channel is dropped and the read fails with ``PermissionDenied`` (``EACCES`` through the
  mount) and a log line.
- **A refused read is asked again once**: a signed URL the bucket refused (expired on a
  skewed clock) is replaced by a fresh one; an anonymous read the bucket refused makes the
  node ask the hub whether the channel became private, and if so read it signed.
- **A signed URL is never shown**: ``str(ObjectUrl)`` is the object's unsigned address, and
  that is what every log line and error message names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import trio
import trio.lowlevel
from cachetools import TLRUCache

from .channels import Channels
from .errors import DeadlineExceeded, KacheryError, PermissionDenied
from .retry import retrying

log = logging.getLogger(__name__)

#: The most keys one ``signReads`` asks for (the hub's limit).
BATCH = 500
#: How long signing may wait for the hub when no URL in hand is still good.
SIGN_DEADLINE_S = 15.0
#: How long a renewal may wait for the hub while the URL in hand is still good; after a
#: failed one, the URL in hand is used for this long before the hub is asked again.
RENEW_WAIT_S = 5.0
#: A URL with less life left than this (or a tenth of its lifetime, if less) is not handed
#: out: a request must start with it.
MARGIN_S = 5.0
#: Signed URLs kept at most (each a few hundred bytes).
MAX_HELD = 50_000

_T = TypeVar("_T")


def public_url(base_url: str, key: str) -> str:
    return f"{base_url.rstrip('/')}/{key}"


def is_signed(url: str) -> bool:
    """True for a signed URL (public object URLs carry no query)."""
    return "?" in url


@dataclass
class _Held:
    url: str
    expires_at: float  # on ReadUrls' clock
    lifetime: float


def _margin(held: _Held) -> float:
    return min(MARGIN_S, held.lifetime / 10)


@dataclass
class _Batch:
    """Keys of one channel to be signed in one go; ``done`` once they are (or not)."""

    keys: set[str] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)
    error: KacheryError | None = None
    interrupted: bool = False


class ObjectUrl:
    """One object of a channel's bucket, to read: :meth:`using` runs an attempt with a URL
    that is good now; ``str()`` is its unsigned address, for messages."""

    def __init__(self, urls: ReadUrls, channel: str, key: str, address: str):
        self.urls = urls
        self.channel = channel
        self.key = key
        self.address = address

    def __str__(self) -> str:
        return self.address

    def __repr__(self) -> str:
        return f"ObjectUrl({self.channel!r}, {self.key!r})"

    async def get(self) -> str:
        return await self.urls.url(self.channel, self.key)

    async def using(self, attempt: Callable[[str], Awaitable[_T]]) -> _T:
        """``attempt(url)``; if the bucket refuses it (``PermissionDenied``), once more with
        a new URL where one may help (see the module docstring)."""
        url = await self.get()
        try:
            return await attempt(url)
        except PermissionDenied:
            if not await self.urls.refused(self.channel, self.key, url):
                raise
        return await attempt(await self.get())


class FixedUrl:
    """An object at a URL that is what it is (a public URL; tests)."""

    def __init__(self, url: str):
        self.url = url

    def __str__(self) -> str:
        return self.url.partition("?")[0]

    async def get(self) -> str:
        return self.url

    async def using(self, attempt: Callable[[str], Awaitable[_T]]) -> _T:
        return await attempt(self.url)


#: What a bucket read is given: an object of a channel, or a URL as it is.
Source = ObjectUrl | FixedUrl


def source_of(where: Source | str) -> Source:
    return FixedUrl(where) if isinstance(where, str) else where


class ReadUrls:
    """The URLs this node reads its channels' bucket objects at (see the module docstring).

    ``clock``: seconds, monotonic (tests pass their own)."""

    def __init__(self, channels: Channels, *, clock: Callable[[], float] = time.monotonic):
        self.channels = channels
        self._clock = clock
        self._held: TLRUCache = TLRUCache(
            maxsize=MAX_HELD, ttu=lambda _k, held, _now: held.expires_at, timer=clock)
        self._batches: dict[str, _Batch] = {}  # channel -> the batch being gathered
        self._renew_failed_at: dict[str, float] = {}
        self._refusal_logged: set[str] = set()

    def of(self, channel: str, key: str) -> ObjectUrl:
        """Object ``key`` of ``channel`` (``NotFound`` if this node has not joined it)."""
        base = self.channels.get(channel).bucket_base_url
        return ObjectUrl(self, channel, key, public_url(base, key))

    async def url(self, channel: str, key: str) -> str:
        """A URL to ``GET`` object ``key`` of ``channel`` at, good for at least
        :data:`MARGIN_S`."""
        ch = self.channels.get(channel)
        if not ch.private:
            return public_url(ch.bucket_base_url, key)
        held = self._held.get((channel, key))
        now = self._clock()
        if held is not None:
            left = held.expires_at - now
            if left > held.lifetime / 3:
                return held.url
            failed_at = self._renew_failed_at.get(channel)
            if (left > _margin(held) and failed_at is not None
                    and now - failed_at < RENEW_WAIT_S):
                return held.url
        usable = held is not None and held.expires_at - now > _margin(held)
        try:
            with trio.fail_after(RENEW_WAIT_S if usable else SIGN_DEADLINE_S):
                await self._sign(channel, [key])
        except PermissionDenied:
            raise
        except (KacheryError, trio.TooSlowError) as exc:
            if not usable:
                if isinstance(exc, trio.TooSlowError):
                    raise DeadlineExceeded(
                        f"the hub of {channel} signed no read of {key} within"
                        f" {SIGN_DEADLINE_S:g} s") from None
                raise
            assert held is not None
            self._renew_failed_at[channel] = self._clock()
            log.warning("could not renew the read URL of %s/%s (%s); using the one in hand,"
                        " good for %.0f s more", channel, key,
                        exc if isinstance(exc, KacheryError) else "no answer",
                        held.expires_at - self._clock())
            return held.url
        self._renew_failed_at.pop(channel, None)
        held = self._held.get((channel, key))
        if held is None:  # signed with a lifetime shorter than the margin
            raise DeadlineExceeded(f"the hub of {channel} signs reads for too short a time")
        return held.url

    async def prefetch(self, channel: str, keys: Iterable[str]) -> None:
        """Sign, in as few ``signReads`` as can be, the objects of ``keys`` that have no
        fresh URL (a private channel; nothing for a public one). Errors are raised."""
        if not self.channels.get(channel).private:
            return
        now = self._clock()
        todo = []
        for key in keys:
            held = self._held.get((channel, key))
            if held is None or held.expires_at - now <= held.lifetime / 3:
                todo.append(key)
        if todo:
            with trio.fail_after(SIGN_DEADLINE_S):
                await self._sign(channel, todo)

    async def refused(self, channel: str, key: str, url: str) -> bool:
        """The bucket refused a read of ``key`` at ``url``: True if one more try with a new
        URL may succeed (a signed one: a fresh signature; an anonymous one: the channel has
        become private)."""
        if is_signed(url):
            held = self._held.get((channel, key))
            if held is not None and held.url == url:
                del self._held[(channel, key)]
            return True
        try:
            ch = await self.channels.refresh(channel)
        except KacheryError as exc:
            log.info("the bucket of %s refused an anonymous read, and its hub could not say"
                     " whether the channel is private: %s", channel, exc)
            return False
        if ch.private:
            log.info("channel %s is private now: its objects are read through signed URLs",
                     channel)
        return ch.private

    def forget(self, channel: str) -> None:
        """Drop every URL held for ``channel``."""
        for k in [k for k in list(self._held.keys()) if k[0] == channel]:
            self._held.pop(k, None)

    async def _sign(self, channel: str, keys: list[str]) -> None:
        """Have ``keys`` signed: joined to the batch of ``channel`` being gathered, or as a
        new batch, which waits a few checkpoints for the keys other reads want now."""
        while True:
            batch = self._batches.get(channel)
            if batch is not None:
                batch.keys.update(keys)
                await batch.done.wait()
                if batch.interrupted:
                    continue  # its caller was cancelled: sign anew
                if batch.error is not None:
                    raise batch.error
                return
            batch = self._batches[channel] = _Batch(set(keys))
            try:
                try:
                    for _ in range(3):  # let the reads that run now add their keys
                        await trio.lowlevel.checkpoint()
                finally:
                    if self._batches.get(channel) is batch:
                        del self._batches[channel]
                await self._sign_batch(channel, sorted(batch.keys))
            except KacheryError as exc:
                batch.error = exc
                raise
            except BaseException:
                batch.interrupted = True
                raise
            finally:
                batch.done.set()
            return

    async def _sign_batch(self, channel: str, keys: list[str]) -> None:
        hub = self.channels.hub_of(channel)
        for i in range(0, len(keys), BATCH):
            part = keys[i:i + BATCH]
            asked_at = self._clock()
            try:
                urls, expires_in = await retrying(partial(hub.sign_reads, channel, part),
                                                  what=f"hub {hub.url} signReads")
            except PermissionDenied as exc:
                self.forget(channel)
                if channel not in self._refusal_logged:
                    self._refusal_logged.add(channel)
                    log.warning("the hub of %s refuses this node signed reads of its bucket"
                                " (%s): nothing more of it can be read from there", channel,
                                exc)
                raise
            self._refusal_logged.discard(channel)
            for key, url in zip(part, urls, strict=True):
                self._held[(channel, key)] = _Held(url, asked_at + expires_in, expires_in)


__all__ = ["FixedUrl", "ObjectUrl", "ReadUrls", "Source", "is_signed", "public_url",
           "source_of"]
