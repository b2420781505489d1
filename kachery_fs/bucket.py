"""Reading from a channel bucket: ``HEAD`` and parallel ranged ``GET``s, verified.

A :class:`Download` fetches one object into a temp file of the local store with several
ranged GETs at once and hashes the bytes in order as they land. The rule is that every
byte served is verified against its SHA-1:

* Any answer other than ``206`` with the exact ``Content-Range`` asked for, or a body
  of any other length, fails the download (``ProtocolError``/``IntegrityError``): a
  server that ignores ``Range`` cannot slip wrong bytes in.
* No byte is released to readers before the SHA-1 of the whole file has matched and
  the file is installed in the store: readers of a download wait for all of it, then
  read verified bytes. Content that fails its check is never read (readers get the
  error, ``EIO`` through the mount) and nothing is cached into the store.

While readers wait, bytes arriving count as progress: a reader gives up only when the
download stalls, not because a big file takes long. The download itself gives up too, with
``DeadlineExceeded``, once no bytes have arrived for ``stall_timeout`` (retries and HTTP
timeouts included): a reader that comes to a stalled download later, or reads again after
a timeout, gets that error at once instead of waiting a deadline of its own on bytes that
are not coming.

The temp file is held under an exclusive ``flock`` for as long as the download uses it,
so :meth:`Store.sweep_temp` of another process never removes it.

Memory is bounded: at most ``window`` chunks are held between fetch and hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from functools import partial
from typing import Literal

import httpx
import trio

from . import metrics
from ._http import check_response, error_for_exception, error_for_response
from .errors import (
    DeadlineExceeded,
    IntegrityError,
    KacheryError,
    NotFound,
    ProtocolError,
    Unavailable,
    leaves,
)
from .protocol import object_key
from .readurls import Source, is_signed, source_of
from .retry import retrying
from .store import Store

log = logging.getLogger(__name__)

CHUNK_SIZE = 8 << 20
PARALLEL = 4
#: A download that receives no bytes for this long fails (``DeadlineExceeded``).
STALL_TIMEOUT_S = 60.0
#: While bytes arrive, waiting readers are woken (told of progress) at most this often.
_DATA_BUMP_INTERVAL_S = 0.5
EMPTY_SHA1 = hashlib.sha1(b"").hexdigest()


def object_url(base_url: str, channel: str, sha1: str) -> str:
    return f"{base_url.rstrip('/')}/{object_key(channel, sha1)}"


async def head_size(client: httpx.AsyncClient, where: Source | str) -> int:
    """The size of an object; ``NotFound`` if absent.

    A public object is asked with ``HEAD``; a private one with a ranged ``GET`` of its
    first byte, since the signed URL it is read at is for ``GET`` (the size is in the
    answer's ``Content-Range``). A transient failure (a 503, a dropped connection, a
    timeout) is retried with backoff, within the caller's deadline
    (:func:`kachery_fs.retry.retrying`): one bad answer does not fail a lookup.
    """
    source = source_of(where)
    what = f"HEAD {source}"

    async def at(url: str) -> int:
        if is_signed(url):
            return await _size_by_get(client, url, what)
        response = await client.head(url)
        check_response(response, what)
        length = response.headers.get("x-goog-stored-content-length") or response.headers.get(
            "content-length")
        if length is None or not length.isdigit():
            raise ProtocolError(f"{what}: no content length in the answer")
        return int(length)

    return await retrying(lambda: source.using(at), what=what)


async def _size_by_get(client: httpx.AsyncClient, url: str, what: str) -> int:
    """The size of the object at ``url`` from a ``GET`` of its first byte (an empty
    object: ``416``, or ``200`` with no body)."""
    async with client.stream("GET", url, headers={"range": "bytes=0-0"}) as r:
        total = r.headers.get("content-range", "").rpartition("/")[2]
        if r.status_code in (206, 416) and total.isdigit():
            if r.status_code == 416 and total != "0":
                raise ProtocolError(f"{what}: refused the range of the first byte of"
                                    f" {total} bytes")
            if len(await r.aread()) > 1:  # read (a byte), so that the connection is kept
                raise ProtocolError(f"{what}: more than the one byte asked for")
            return int(total)
        length = r.headers.get("content-length", "")
        if r.status_code == 200 and length.isdigit():  # ignored the Range: no body read
            return int(length)
        if r.status_code in (200, 206, 416):
            raise ProtocolError(f"{what}: no size in the answer")
        await r.aread()
        raise error_for_response(r, what)


async def get_range(client: httpx.AsyncClient, where: Source | str, start: int, end: int, *,
                    on_data: Callable[[int], None] | None = None) -> bytes:
    """Bytes ``[start, end)`` of an object; anything but an exact ``206`` is an error.

    ``on_data(n)`` is called as each piece of ``n`` bytes arrives (progress, unverified).
    (The chunks of large files are fetched into buffers by :mod:`kachery_fs.ranges`,
    which checks the answer the same way.)
    """
    source = source_of(where)
    what = f"GET {source} bytes {start}-{end - 1}"

    async def at(url: str) -> bytes:
        async with client.stream("GET", url, headers={"range": f"bytes={start}-{end - 1}"}) as r:
            if r.status_code != 206:
                await r.aread()
                if r.status_code == 200:
                    raise ProtocolError(f"{what}: server answered 200 to a Range request")
                raise error_for_response(r, what)
            expected = f"bytes {start}-{end - 1}/"
            if not r.headers.get("content-range", "").startswith(expected):
                raise ProtocolError(f"{what}: wrong Content-Range {r.headers.get('content-range')!r}")
            parts = []
            got = 0
            async for piece in r.aiter_raw():
                if got + len(piece) > end - start:
                    raise IntegrityError(f"{what}: server sent more bytes than asked for")
                parts.append(piece)
                got += len(piece)
                if on_data is not None:
                    on_data(len(piece))
        if got != end - start:
            raise IntegrityError(f"{what}: truncated ({got} of {end - start} bytes)")
        return b"".join(parts)

    try:
        return await source.using(at)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None


async def fetch_range(client: httpx.AsyncClient, where: Source | str, start: int, end: int, *,
                      attempts: int = 4, on_data: Callable[[int], None] | None = None,
                      at_deadline: Literal["raise", "wait"] = "raise") -> bytes:
    """:func:`get_range`, tried again on a transient error or a truncated body, a few
    times (:func:`kachery_fs.retry.retrying`; ``at_deadline`` as there)."""
    source = source_of(where)
    return await retrying(partial(get_range, client, source, start, end, on_data=on_data),
                          what=f"GET {source} bytes {start}-{end - 1}", attempts=attempts,
                          also=(IntegrityError,), at_deadline=at_deadline)


class Download:
    """One object being fetched into the local store; shared by every reader of that hash."""

    def __init__(self, client: httpx.AsyncClient, url: Source | str, sha1: str, size: int,
                 store: Store,
                 *, chunk_size: int = CHUNK_SIZE, parallel: int = PARALLEL,
                 attempts: int = 4, stall_timeout: float = STALL_TIMEOUT_S,
                 on_finish: Callable[[Download], None] | None = None):
        self.client = client
        #: Where the object is read (its ``str()``, the unsigned address, is what logs show).
        self.url = source_of(url)
        self.sha1 = sha1
        self.size = size
        self.store = store
        self.chunk_size = chunk_size
        self.parallel = parallel
        self.attempts = attempts
        self.stall_timeout = stall_timeout
        self.on_finish = on_finish
        # Readers may read [0, available): nothing until the whole file is verified and
        # installed, then all of it.
        self.available = 0
        self.error: KacheryError | None = None
        #: Bytes hashed so far, in order (progress; nothing is readable before the end).
        self.hashed = 0
        self.done = trio.Event()
        self._progress = trio.Event()
        self._last_bump = 0.0
        # Cancels the fetch once no bytes have arrived for stall_timeout (see _fetch_all).
        self._stall_scope: trio.CancelScope | None = None
        self._installed = False
        # Created and flock'ed by the store; the lock lasts as long as the fd is open.
        self.temp_path, self.fd = store.new_temp_file()
        self.readers = 0

    def _bump(self) -> None:
        """Wake the readers: something happened (progress, completion, failure)."""
        self._progress.set()
        self._progress = trio.Event()
        self._last_bump = trio.current_time()

    def _progressed(self) -> None:
        """Bytes arrived or were hashed: push the download's own deadline back."""
        if self._stall_scope is not None:
            self._stall_scope.deadline = trio.current_time() + self.stall_timeout

    def _on_data(self, _n: int) -> None:
        # Bytes arriving are progress; wake waiting readers at most a few times a second.
        self._progressed()
        if trio.current_time() - self._last_bump >= _DATA_BUMP_INTERVAL_S:
            self._bump()

    async def run(self) -> None:
        """Fetch, verify and install. Never raises: the outcome is ``self.error`` / ``done``."""
        try:
            await self._fetch_all()
        except Exception as exc:
            # Errors of the fetch workers arrive wrapped in (nested) exception groups:
            # the download's error is the project error inside, as if raised directly.
            found = list(leaves(exc))
            error = next((e for e in found if isinstance(e, KacheryError)), None)
            if not all(isinstance(e, KacheryError) for e in found):
                # A bug: show it, and keep readers from hanging.
                log.exception("download of sha1://%s from %s failed unexpectedly", self.sha1,
                              self.url)
            if error is None:
                error = Unavailable(f"download of sha1://{self.sha1} failed: internal error"
                                    f" ({type(found[0]).__name__}: {found[0]})")
            else:
                log.warning("download of sha1://%s from %s failed: %s", self.sha1, self.url,
                            error)
            self.error = error
        finally:
            if self.error is None and not self._installed:  # cancelled
                self.error = Unavailable(f"download of sha1://{self.sha1} was interrupted")
            if self.error is not None:
                self.available = 0
                try:
                    os.unlink(self.temp_path)
                except FileNotFoundError:
                    pass
            self.done.set()
            self._bump()
            if self.on_finish is not None:
                self.on_finish(self)
            if self.readers == 0:
                self.close_fd()

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    async def _fetch_all(self) -> None:
        with trio.CancelScope(deadline=trio.current_time() + self.stall_timeout) as scope:
            self._stall_scope = scope
            try:
                digest = await self._fetch_and_hash()
            finally:
                self._stall_scope = None
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"download of sha1://{self.sha1} from {self.url} made no"
                                   f" progress for {self.stall_timeout:g} s")
        if digest != self.sha1:
            metrics.REFUSED_BYTES.labels("sha1").inc(self.size)
            raise IntegrityError(
                f"bucket object {self.url} hashes to {digest}, not {self.sha1}; not cached")
        metrics.VERIFIED_BYTES.labels("whole").inc(self.size)
        # Verified: readers may have it now, from the temp file's descriptor, while it is
        # made durable (fsync) and renamed into the store, which can take a while on a
        # slow disk (no deadline: that is local work, and it is not waited for).
        self.available = self.size
        self._bump()
        await trio.to_thread.run_sync(self._install, digest)
        self._installed = True

    async def _fetch_and_hash(self) -> str:
        """Fetch every chunk (in parallel) and hash them in order; the hex digest."""
        ranges = [(s, min(s + self.chunk_size, self.size))
                  for s in range(0, self.size, self.chunk_size)]
        hasher = hashlib.sha1()
        buffers: dict[int, bytes] = {}
        landed = [trio.Event() for _ in ranges]
        window = trio.Semaphore(self.parallel + 2)

        async def fetch_worker(todo):
            async with todo:
                async for index in todo:
                    start, end = ranges[index]
                    data = await self._fetch_with_retry(start, end)
                    metrics.FETCHED_BYTES.labels("whole").inc(len(data))
                    await trio.to_thread.run_sync(os.pwrite, self.fd, data, start)
                    buffers[index] = data
                    landed[index].set()

        async def feeder():
            # Hands chunks to the workers in order, never more than the window ahead of hashing.
            async with trio.open_nursery() as workers:
                send, recv = trio.open_memory_channel(0)
                async with recv:
                    for _ in range(min(self.parallel, len(ranges))):
                        workers.start_soon(fetch_worker, recv.clone())
                async with send:
                    for index in range(len(ranges)):
                        await window.acquire()
                        await send.send(index)

        async with trio.open_nursery() as nursery:
            if ranges:
                nursery.start_soon(feeder)
            for index in range(len(ranges)):
                await landed[index].wait()
                data = buffers.pop(index)
                await trio.to_thread.run_sync(hasher.update, data)
                self.hashed += len(data)
                window.release()
                self._progressed()
                self._bump()  # progress, though nothing is readable before the end
        return hasher.hexdigest()

    def _install(self, digest: str) -> None:
        self.store.install_verified(self.temp_path, self.sha1, actual_sha1=digest)  # fsyncs

    async def _fetch_with_retry(self, start: int, end: int) -> bytes:
        # Transient, or a truncated body: try again a few times. The download's stall
        # deadline (which other chunks' progress moves on) ends a wait, and says why.
        return await fetch_range(self.client, self.url, start, end, attempts=self.attempts,
                                 on_data=self._on_data, at_deadline="wait")

    async def wait_readable(self, end: int, *, stall_timeout: float) -> None:
        """Wait until bytes ``[0, end)`` may be read; raise the download's error if it failed.

        Bytes become readable only once the whole file is verified, so this waits for
        the end of the download. It gives up with ``DeadlineExceeded`` when the download
        makes no progress (no bytes arriving, no chunk hashed) for ``stall_timeout``
        seconds: judged by progress, not by total time.
        """
        end = min(end, self.size)
        while self.available < end:
            if self.error is not None:
                raise self.error
            if self.done.is_set() and self.available < end:
                raise self.error or IntegrityError(f"download of sha1://{self.sha1} incomplete")
            progress = self._progress
            with trio.move_on_after(stall_timeout) as scope:
                await progress.wait()
            if scope.cancelled_caught:
                raise DeadlineExceeded(
                    f"download of sha1://{self.sha1} made no progress for {stall_timeout:.0f} s")
        if self.error is not None and end > self.available:
            raise self.error


__all__ = ["Download", "NotFound", "fetch_range", "get_range", "head_size", "object_url"]
