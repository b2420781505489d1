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
  at a time), files apart from feeds (each needs its own permission); while one is in
  progress, the next gathers keys. :meth:`ReadUrls.prefetch` signs a list known in advance.
- **A URL is renewed** once less than a third of its life is left, so a long stream never
  meets an expired URL. A renewal is one short try: if the hub does not answer, the URLs in
  hand are used until they expire, and it is asked again some seconds later. If the hub
  *refuses* (this node lost the permission), every URL of that kind held for the channel
  is dropped and the read fails with ``PermissionDenied`` (``EACCES`` through the mount)
  and a log line.
- **A refused read is asked again once**: a signed URL the bucket refused when it was no
  longer young (expired, on a skewed clock) is replaced by a fresh one; an anonymous read
  the bucket refused makes the node ask the hub whether the channel became private (once
  per few seconds, however many reads are refused), and if so read it signed.
- **A signed URL is never shown**: ``str(ObjectUrl)`` is the object's unsigned address, and
  that is what every log line and error message names.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import trio
import trio.lowlevel
from cachetools import TLRUCache

from .channels import PERMISSIONS_TTL_S, Channels
from .errors import DeadlineExceeded, KacheryError, PermissionDenied
from .retry import retrying

log = logging.getLogger(__name__)

#: The most keys one ``signReads`` asks for (the hub's limit).
BATCH = 500
#: How long signing may wait for the hub when no URL in hand is still good.
SIGN_DEADLINE_S = 15.0
#: How long a renewal (one try) may wait for the hub while the URL in hand is still good.
RENEW_WAIT_S = 2.0
#: After a failed renewal, the URLs in hand are used for this long before the hub is asked
#: again.
RENEW_PAUSE_S = 10.0
#: A URL with less life left than this (a tenth of its lifetime, if less, but never less
#: than :data:`MIN_MARGIN_S`) is not handed out: a request must start with it.
MARGIN_S = 5.0
MIN_MARGIN_S = 0.5
#: Taken off every lifetime: a signature's date is in whole seconds.
DATE_SLACK_S = 1.0
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
    signed_at: float


def _margin(held: _Held) -> float:
    return max(MIN_MARGIN_S, min(MARGIN_S, held.lifetime / 10))


#: What is signed together: the objects of one channel that one permission covers,
#: ``(channel, "files")`` (requestFiles) or ``(channel, "feeds")`` (requestFeeds), so that
#: a refusal of one kind leaves the other's URLs alone.
_Group = tuple[str, str]


def _group(channel: str, key: str) -> _Group:
    return channel, "feeds" if key.startswith(f"{channel}/feeds/") else "files"


@dataclass
class _Batch:
    """Keys of one group to be signed in one go; ``done`` once they are (or not)."""

    keys: set[str] = field(default_factory=set)
    done: trio.Event = field(default_factory=trio.Event)
    error: KacheryError | None = None
    interrupted: bool = False
    retry: bool = True


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
        self._batches: dict[_Group, _Batch] = {}  # the batch of each group being gathered
        self._inflight: dict[_Group, trio.Event] = {}  # set when its signReads has ended
        self._renew_failed_at: dict[_Group, float] = {}
        self._refusal_logged: set[_Group] = set()
        self._refreshing: defaultdict[str, trio.Lock] = defaultdict(trio.Lock)
        self._asked_at: dict[str, float] = {}  # channel -> when a refusal made us ask

    def of(self, channel: str, key: str) -> ObjectUrl:
        """Object ``key`` of ``channel`` (``NotFound`` if this node has not joined it)."""
        base = self.channels.get(channel).bucket_base_url
        return ObjectUrl(self, channel, key, public_url(base, key))

    async def url(self, channel: str, key: str) -> str:
        """A URL to ``GET`` object ``key`` of ``channel`` at, good for a while yet (at
        least :func:`_margin`)."""
        ch = self.channels.get(channel)
        if not ch.private:
            return public_url(ch.bucket_base_url, key)
        group = _group(channel, key)
        held = self._held.get((channel, key))
        now = self._clock()
        if held is not None:
            left = held.expires_at - now
            if left > held.lifetime / 3:
                return held.url
            failed_at = self._renew_failed_at.get(group)
            if (left > _margin(held) and failed_at is not None
                    and now - failed_at < RENEW_PAUSE_S):
                return held.url  # the hub failed a renewal just now: not asked again yet
        usable = held is not None and held.expires_at - now > _margin(held)
        try:
            # A renewal is one short try: the URL in hand serves meanwhile.
            with trio.fail_after(RENEW_WAIT_S if usable else SIGN_DEADLINE_S):
                await self._sign(group, [key], retry=not usable)
        except PermissionDenied:
            raise
        except (KacheryError, trio.TooSlowError) as exc:
            reason = exc if isinstance(exc, KacheryError) else "no answer"
            if not usable:
                if isinstance(exc, trio.TooSlowError):
                    raise DeadlineExceeded(f"the hub of {channel} signed no read URL within"
                                           f" {SIGN_DEADLINE_S:g} s") from None
                raise
            assert held is not None
            self._renew_failed_at[group] = self._clock()
            log.warning("could not renew the read URLs of %s (%s); using those in hand until"
                        " they expire, asking again in %g s", channel, reason, RENEW_PAUSE_S)
            return held.url
        self._renew_failed_at.pop(group, None)
        held = self._held.get((channel, key))
        if held is None:  # signed for less than the date's slack
            raise DeadlineExceeded(f"the hub of {channel} signs read URLs for too short a"
                                   " time (hub serve --read-url-lifetime)")
        return held.url

    async def prefetch(self, channel: str, keys: Iterable[str]) -> None:
        """Sign, in as few ``signReads`` as can be, the objects of ``keys`` that have no
        fresh URL (a private channel; nothing for a public one). Best effort: never raises
        (each read then asks for its own URL, and says why it could not have one)."""
        if not self.channels.get(channel).private:
            return
        now = self._clock()
        todo: defaultdict[_Group, list[str]] = defaultdict(list)
        for key in keys:
            held = self._held.get((channel, key))
            if held is None or held.expires_at - now <= held.lifetime / 3:
                todo[_group(channel, key)].append(key)
        for group, wanted in todo.items():
            with trio.move_on_after(SIGN_DEADLINE_S):
                try:
                    await self._sign(group, wanted, retry=True)
                except KacheryError as exc:
                    log.debug("could not sign %d read URL(s) of %s ahead: %s", len(wanted),
                              channel, exc)

    async def refused(self, channel: str, key: str, url: str) -> bool:
        """The bucket refused a read of ``key`` at ``url``: True if one more try with a new
        URL may succeed. A signed URL: if it was not young (expired, on a skewed clock), a
        fresh one. An anonymous URL: if the hub says the channel has become private (asked
        at most once per :data:`~kachery_fs.channels.PERMISSIONS_TTL_S`)."""
        if is_signed(url):
            held = self._held.get((channel, key))
            if held is not None and held.url == url:
                if self._clock() - held.signed_at < held.lifetime / 3:
                    return False  # not its age: a new signature would be refused the same
                del self._held[(channel, key)]
            return True
        async with self._refreshing[channel]:  # one question at a time, for all the reads
            ch = self.channels.get(channel)
            if ch.private:  # learnt meanwhile
                return True
            asked_at = self._asked_at.get(channel)
            if ((asked_at is not None and self._clock() - asked_at < PERMISSIONS_TTL_S)
                    or self.channels.hub_recently_failed(channel)):
                return False  # the hub said public just now (or is not answering)
            self._asked_at[channel] = self._clock()
            try:
                ch = await self.channels.refresh(channel)
            except KacheryError as exc:
                log.info("the bucket of %s refused an anonymous read, and its hub could not"
                         " say whether the channel is private: %s", channel, exc)
                return False
        if ch.private:
            log.info("channel %s is private now: its objects are read through signed URLs",
                     channel)
        return ch.private

    def forget(self, channel: str, kind: str | None = None) -> None:
        """Drop the URLs held for ``channel`` (``kind``: of its files or its feeds only)."""
        for k in list(self._held.keys()):
            if k[0] == channel and (kind is None or _group(*k)[1] == kind):
                self._held.pop(k, None)

    async def _sign(self, group: _Group, keys: list[str], *, retry: bool) -> None:
        """Have ``keys`` signed: joined to the batch of ``group`` being gathered, or as a
        new batch. A new batch waits a few checkpoints for the keys that other reads want
        now, and for the group's signReads in progress, if one is: one at a time, while
        the next gathers. ``retry``: try transient failures again (not for a renewal)."""
        while True:
            batch = self._batches.get(group)
            if batch is not None:
                batch.keys.update(keys)
                batch.retry |= retry
                await batch.done.wait()
                if batch.interrupted:
                    continue  # its caller was cancelled: sign anew
                if batch.error is not None:
                    raise copy.copy(batch.error)  # one object per raiser: no shared traceback
                return
            batch = self._batches[group] = _Batch(set(keys), retry=retry)
            try:
                try:
                    for _ in range(3):  # let the reads that run now add their keys
                        await trio.lowlevel.checkpoint()
                    while (inflight := self._inflight.get(group)) is not None:
                        await inflight.wait()
                finally:
                    if self._batches.get(group) is batch:
                        del self._batches[group]
                self._inflight[group] = batch.done
                try:
                    await self._sign_batch(group, sorted(batch.keys), retry=batch.retry)
                finally:
                    if self._inflight.get(group) is batch.done:
                        del self._inflight[group]
            except KacheryError as exc:
                batch.error = exc
                raise
            except BaseException:
                batch.interrupted = True
                raise
            finally:
                batch.done.set()
            return

    async def _sign_batch(self, group: _Group, keys: list[str], *, retry: bool) -> None:
        channel, kind = group
        hub = self.channels.hub_of(channel)
        for i in range(0, len(keys), BATCH):
            part = keys[i:i + BATCH]
            asked_at = self._clock()
            call = partial(hub.sign_reads, channel, part)
            try:
                urls, expires_in = await (retrying(call, what=f"hub {hub.url} signReads")
                                          if retry else call())
            except PermissionDenied as exc:
                self.forget(channel, kind)
                if group not in self._refusal_logged:
                    self._refusal_logged.add(group)
                    log.warning("the hub of %s refuses this node signed reads of its %s (%s):"
                                " nothing more of them can be read from its bucket", channel,
                                kind, exc)
                raise
            self._refusal_logged.discard(group)
            lifetime = expires_in - DATE_SLACK_S
            for key, url in zip(part, urls, strict=True):
                self._held[(channel, key)] = _Held(url, asked_at + lifetime, lifetime, asked_at)


__all__ = ["FixedUrl", "ObjectUrl", "ReadUrls", "Source", "is_signed", "public_url",
           "source_of"]
