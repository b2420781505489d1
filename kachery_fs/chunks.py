"""A large file read by chunk, through a manifest whose hash the reader trusts.

:class:`ChunkedContent` serves ``[offset, offset + size)`` of a file by fetching only the
chunks that range overlaps, and verifies each chunk against its SHA-1 in the manifest
before it serves a byte of it. A chunk comes from a ranged ``GET`` of the whole object
when the bucket holds it (as kachery-fs uploads a file), else as a content object of its
own, through the resolver (the bucket under the chunk's hash, as hub-era kachery stores
large files, or a request to the channel's nodes).

Contracts:

* The manifest must be trusted (see the README's trust model): the resolver decides that.
  Verification is then per chunk, on a worker thread.
* Concurrent reads of one chunk fetch it once; a chunk that fails its hash fails the reads
  in that chunk only, and nothing of it is kept.
* A sequential reader (a read that starts where a recent read ended, as the kernel's
  read-ahead and ``cat`` read) gets read-ahead: the next :data:`READ_AHEAD` chunks are
  fetched in the background, in parallel, while it reads. Other reads (an HDF5 library
  reading metadata here and there) fetch only the chunks they touch.
* At most :data:`KEPT_CHUNKS` verified chunks are kept in memory per file.
* **The whole file is checked** whenever its chunks arrive in order (a sequential reader,
  ``cat``): each is added to a running SHA-1 and written to a temp file of the store.
  When the last one lands the whole SHA-1 is compared with the file's before the last
  chunk is served. A match puts the file in the store as ordinary content (later opens
  read it locally); a mismatch means the manifest lied: every later read fails, and
  ``on_lie`` is told (the resolver forgets the manifest and reports it to the hub).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import trio

from .bucket import fetch_range
from .errors import IntegrityError, KacheryError
from .manifest import Manifest
from .store import Store

log = logging.getLogger(__name__)

#: Verified chunks kept in memory per open file (20,000,000 bytes each).
KEPT_CHUNKS = 4
#: How many chunks past the one being read a sequential reader has fetched for it.
READ_AHEAD = 2


class ChunkedContent:
    """Readable bytes of one large file, chunk by chunk (the resolver's ``Content``)."""

    def __init__(self, manifest: Manifest, client: httpx.AsyncClient, *,
                 whole_url: str | None,
                 open_chunk: Callable[[str], Awaitable[bytes]],
                 store: Store | None = None,
                 nursery: trio.Nursery | None = None,
                 on_lie: Callable[[str], None] | None = None,
                 on_complete: Callable[[], None] | None = None,
                 on_fetched: Callable[[int], None] | None = None,
                 on_bad_chunk: Callable[[IntegrityError], None] | None = None):
        """``whole_url``: the whole object in the bucket, or None; ``open_chunk(sha1)``:
        the verified bytes of a chunk as content of its own; ``store``: where a file read
        whole is put; ``nursery``: runs read-ahead (none without it); ``on_lie(actual)``:
        the chunks matched but the whole file hashed to ``actual``; ``on_complete()``: the
        whole file was verified and is in ``store``; ``on_fetched(nbytes)``: bytes came
        from the whole object in the bucket (demand, for the hub's cache);
        ``on_bad_chunk(error)``: a chunk did not match its hash."""
        self.manifest = manifest
        self.size = manifest.size
        self._client = client
        self._whole_url = whole_url
        self._open_chunk = open_chunk
        self._store = store
        self._nursery = nursery
        self._on_lie = on_lie
        self._on_complete = on_complete
        self._on_fetched = on_fetched
        self._on_bad_chunk = on_bad_chunk
        self._kept: OrderedDict[int, bytes] = OrderedDict()
        self._locks: dict[int, trio.Lock] = {}
        self._ends: deque[int] = deque(maxlen=8)  # where recent reads ended
        self._ahead: dict[int, trio.CancelScope] = {}  # read-ahead in flight
        self._whole = hashlib.sha1()
        self._whole_next = 0  # chunks [0, _whole_next) are in _whole (and the temp file)
        self._whole_lock = trio.Lock()
        self._in_order: dict[int, bytes] = {}  # fetched chunks the whole check needs next
        self._temp: tuple[Path, int] | None = None
        self._lie: IntegrityError | None = None
        self._closed = False
        #: How many chunks were fetched (not served from memory).
        self.fetched = 0

    async def read(self, offset: int, size: int) -> bytes:
        if self._lie is not None:
            raise self._lie
        if offset >= self.size or size <= 0:
            return b""
        indexes = self.manifest.chunk_indexes(offset, size)
        self._read_ahead(offset, indexes[-1])
        self._ends.append(min(offset + size, self.size))
        pieces = []
        end = offset + size
        for i in indexes:
            chunk = self.manifest.chunks[i]
            data = await self._chunk(i)
            pieces.append(data[max(offset, chunk.start) - chunk.start:
                               min(end, chunk.end) - chunk.start])
        return b"".join(pieces)

    def _read_ahead(self, offset: int, last: int) -> None:
        if offset not in self._ends or self._nursery is None:
            return
        for i in range(last + 1, min(last + 1 + READ_AHEAD, len(self.manifest.chunks))):
            if i not in self._kept and i not in self._ahead:
                self._ahead[i] = scope = trio.CancelScope()
                self._nursery.start_soon(self._fetch_ahead, i, scope)

    async def _fetch_ahead(self, i: int, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self._chunk(i)
            except KacheryError as exc:  # the read of that chunk will try again and say
                log.debug("read-ahead of chunk %d of sha1://%s: %s", i, self.manifest.sha1,
                          exc)
        if self._ahead.get(i) is scope:
            del self._ahead[i]

    async def _chunk(self, i: int) -> bytes:
        lock = self._locks.setdefault(i, trio.Lock())
        fresh = False
        async with lock:  # concurrent readers of one chunk fetch it once
            data = self._kept.get(i)
            if data is not None:
                self._kept.move_to_end(i)
            else:
                data = await self._fetch(i)
                self.fetched += 1
                fresh = True
                if not self._closed:
                    self._kept[i] = data
                    while len(self._kept) > KEPT_CHUNKS:
                        self._kept.popitem(last=False)
                    if self._whole_next <= i <= self._whole_next + READ_AHEAD + 1:
                        self._in_order[i] = data  # for the whole check, until it is in
        if i == len(self.manifest.chunks) - 1:
            await self._check_whole()  # the last chunk is served after the whole check
        elif fresh:
            if self._nursery is not None:
                self._nursery.start_soon(self._check_whole)
            else:
                await self._check_whole()
        if self._lie is not None:
            raise self._lie
        return data

    async def _fetch(self, i: int) -> bytes:
        chunk = self.manifest.chunks[i]
        if self._whole_url is not None:
            data = await fetch_range(self._client, self._whole_url, chunk.start, chunk.end)
            if self._on_fetched is not None:
                self._on_fetched(len(data))
        else:
            data = await self._open_chunk(chunk.sha1)
        digest = await trio.to_thread.run_sync(lambda: hashlib.sha1(data).hexdigest())
        if len(data) != chunk.size or digest != chunk.sha1:
            error = IntegrityError(
                f"chunk {i} (bytes {chunk.start:,}-{chunk.end - 1:,}) of"
                f" sha1://{self.manifest.sha1} does not match its SHA-1 in the manifest"
                f" sha1://{self.manifest.hash}")
            if self._on_bad_chunk is not None:
                self._on_bad_chunk(error)
            raise error
        return data

    # -- the whole file ----------------------------------------------------------------

    async def _check_whole(self) -> None:
        """Add the chunks that arrived in order to the running SHA-1 and the temp file;
        at the last one, compare and install or condemn (see the module docstring)."""
        async with self._whole_lock:
            count = len(self.manifest.chunks)
            while self._whole_next < count and not self._closed:
                data = self._in_order.pop(self._whole_next, None)
                if data is None:
                    return  # not here yet (or skipped: read out of order, no whole check)
                offset = self.manifest.chunks[self._whole_next].start
                await trio.to_thread.run_sync(self._add_to_whole, data, offset)
                self._whole_next += 1
            if self._whole_next == count and self._lie is None and not self._closed:
                self._whole_next += 1  # checked once
                await self._finish_whole()
            if self._closed:  # closed meanwhile: the temp file was left to this task
                self._drop_temp()

    def _add_to_whole(self, data: bytes, offset: int) -> None:
        self._whole.update(data)
        if self._store is None:
            return
        try:
            if self._temp is None:
                if offset != 0:
                    return
                self._temp = self._store.new_temp_file()
            os.pwrite(self._temp[1], data, offset)
        except OSError as exc:  # a full disk: serve on, without keeping the file
            log.warning("sha1://%s is read on without being kept in the local store: %s",
                        self.manifest.sha1, exc)
            self._drop_temp()

    async def _finish_whole(self) -> None:
        actual = self._whole.hexdigest()
        if actual != self.manifest.sha1:
            self._drop_temp()
            self._lie = IntegrityError(
                f"the chunks of manifest sha1://{self.manifest.hash} each matched, but"
                f" together they are sha1://{actual}, not sha1://{self.manifest.sha1}: the"
                " manifest is wrong, and what was read is not that file")
            log.error("%s", self._lie)
            if self._on_lie is not None:
                try:
                    self._on_lie(actual)
                except Exception:  # noqa: BLE001 - the readers are told anyway
                    log.exception("reporting the lying manifest sha1://%s failed",
                                  self.manifest.hash)
            return
        if self._temp is None or self._store is None:
            return
        path, fd = self._temp
        self._temp = None
        store = self._store
        try:
            await trio.to_thread.run_sync(
                lambda: store.install_verified(path, self.manifest.sha1, actual_sha1=actual))
        except (OSError, KacheryError) as exc:
            log.warning("sha1://%s was read whole and verified but not kept in the local"
                        " store: %s", self.manifest.sha1, exc)
        finally:
            os.close(fd)
        if self._on_complete is not None:
            self._on_complete()

    def _drop_temp(self) -> None:
        if self._temp is not None:
            path, fd = self._temp
            self._temp = None
            os.close(fd)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def close(self) -> None:
        self._closed = True
        for scope in self._ahead.values():
            scope.cancel()
        self._kept.clear()
        self._in_order.clear()
        if not self._whole_lock.locked():  # else a worker thread may be writing to it
            self._drop_temp()
