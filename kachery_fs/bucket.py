"""Reading from a channel bucket: public ``HEAD`` and parallel ranged ``GET``s, verified.

A :class:`Download` fetches one object into a temp file of the local store with several
ranged GETs at once, hashes the bytes in order as they land, and lets readers read any
byte that has landed (read-while-downloading). Two rules keep every served byte honest:

* Any answer other than ``206`` with the exact ``Content-Range`` asked for, or a body
  of any other length, fails the download (``ProtocolError``/``IntegrityError``): a
  server that ignores ``Range`` cannot slip wrong bytes in.
* The last chunk of the file is only released to readers after the SHA-1 of the whole
  file has matched. So no reader ever reaches end-of-file on content that failed its
  check; it gets ``EIO`` instead, and nothing is cached into the store.

Memory is bounded: at most ``window`` chunks are held between fetch and hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable

import httpx
import trio

from ._http import Backoff, check_response, error_for_exception, error_for_response
from .errors import (
    DeadlineExceeded,
    IntegrityError,
    KacheryError,
    NotFound,
    ProtocolError,
    Unavailable,
)
from .protocol import object_key
from .store import Store

log = logging.getLogger(__name__)

CHUNK_SIZE = 8 << 20
PARALLEL = 4
EMPTY_SHA1 = hashlib.sha1(b"").hexdigest()


def object_url(base_url: str, channel: str, sha1: str) -> str:
    return f"{base_url.rstrip('/')}/{object_key(channel, sha1)}"


async def head_size(client: httpx.AsyncClient, url: str) -> int:
    """The size of a public object; ``NotFound`` if absent."""
    what = f"HEAD {url}"
    try:
        response = await client.head(url)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None
    check_response(response, what)
    length = response.headers.get("x-goog-stored-content-length") or response.headers.get(
        "content-length")
    if length is None or not length.isdigit():
        raise ProtocolError(f"{what}: no content length in the answer")
    return int(length)


async def get_range(client: httpx.AsyncClient, url: str, start: int, end: int) -> bytes:
    """Bytes ``[start, end)`` of an object; anything but an exact ``206`` is an error."""
    what = f"GET {url} bytes {start}-{end - 1}"
    try:
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
                got += len(piece)
                if got > end - start:
                    raise IntegrityError(f"{what}: server sent more bytes than asked for")
                parts.append(piece)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None
    if got != end - start:
        raise IntegrityError(f"{what}: truncated ({got} of {end - start} bytes)")
    return b"".join(parts)


class Download:
    """One object being fetched into the local store; shared by every reader of that hash."""

    def __init__(self, client: httpx.AsyncClient, url: str, sha1: str, size: int, store: Store,
                 *, chunk_size: int = CHUNK_SIZE, parallel: int = PARALLEL,
                 attempts: int = 4, on_finish: Callable[[Download], None] | None = None):
        self.client = client
        self.url = url
        self.sha1 = sha1
        self.size = size
        self.store = store
        self.chunk_size = chunk_size
        self.parallel = parallel
        self.attempts = attempts
        self.on_finish = on_finish
        self.available = 0  # readers may read [0, available)
        self.error: KacheryError | None = None
        self.done = trio.Event()
        self._progress = trio.Event()
        self.temp_path = store.new_temp_path()
        self.fd = os.open(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.readers = 0

    def _bump(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def run(self) -> None:
        """Fetch, verify and install. Never raises: the outcome is ``self.error`` / ``done``."""
        try:
            await self._fetch_all()
        except KacheryError as exc:
            self.error = exc
        except Exception as exc:  # a bug: keep readers from hanging, and show it
            log.exception("download of %s failed unexpectedly", self.sha1)
            self.error = Unavailable(f"download of sha1://{self.sha1} failed: {exc!r}")
        finally:
            if self.error is not None:
                log.error("download of sha1://%s from %s failed: %s", self.sha1, self.url,
                          self.error)
                self.available = min(self.available, self._held_back_start())
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

    def _held_back_start(self) -> int:
        """Where the last chunk begins: bytes from here on wait for verification."""
        if self.size == 0:
            return 0
        return ((self.size - 1) // self.chunk_size) * self.chunk_size

    async def _fetch_all(self) -> None:
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
            held_back = self._held_back_start()
            for index, (_start, end) in enumerate(ranges):
                await landed[index].wait()
                data = buffers.pop(index)
                await trio.to_thread.run_sync(hasher.update, data)
                window.release()
                if end <= held_back:
                    self.available = end
                    self._bump()
        digest = hasher.hexdigest()
        if digest != self.sha1:
            raise IntegrityError(
                f"bucket object {self.url} hashes to {digest}, not {self.sha1}; not cached")
        await trio.to_thread.run_sync(self._install, digest)
        self.available = self.size
        self._bump()

    def _install(self, digest: str) -> None:
        os.fsync(self.fd)
        self.store.install_verified(self.temp_path, self.sha1, actual_sha1=digest)

    async def _fetch_with_retry(self, start: int, end: int) -> bytes:
        backoff = Backoff()
        while True:
            try:
                return await get_range(self.client, self.url, start, end)
            except (Unavailable, IntegrityError) as exc:
                # Transient, or a truncated body: try again a few times.
                if backoff.attempt + 1 >= self.attempts:
                    raise
                delay = backoff.next_delay(getattr(exc, "retry_after", None))
                log.warning("%s; retrying in %.1f s", exc, delay)
                await trio.sleep(delay)

    async def wait_readable(self, end: int, *, stall_timeout: float) -> None:
        """Wait until bytes ``[0, end)`` may be read; raise the download's error if it failed.

        Gives up with ``DeadlineExceeded`` when the download makes no progress for
        ``stall_timeout`` seconds (judged by progress, not by total time).
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


async def fetch_to_store(client: httpx.AsyncClient, base_url: str, channel: str, sha1: str,
                         store: Store) -> int:
    """Download ``sha1`` from a channel bucket into ``store`` (verified); returns its size."""
    url = object_url(base_url, channel, sha1)
    size = await head_size(client, url)
    download = Download(client, url, sha1, size, store)
    await download.run()
    if download.error is not None:
        raise download.error
    return size


__all__ = ["Download", "NotFound", "fetch_to_store", "get_range", "head_size", "object_url"]
