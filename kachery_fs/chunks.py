"""A large file read by chunk, through a manifest whose hash the reader trusts.

:class:`ChunkedContent` serves ``[offset, offset + size)`` of a file by fetching only the
chunks that range overlaps, and verifies each chunk against its SHA-1 in the manifest
before it serves a byte of it. A chunk comes from the file's partial file in the local
store (:mod:`kachery_fs.partial`) when an earlier read fetched it, else from where its
:class:`ChunkSource` says: a ranged ``GET`` of the whole object when the bucket holds it
(:class:`WholeObject`, as kachery-fs uploads a file), or the chunk's own object as a
provider streams it for a request (:class:`StreamedChunks`); without a source, as a
content object of its own, through the resolver (the bucket under the chunk's hash, as
hub-era kachery stores large files, or a request to the channel's nodes).

Contracts:

* The manifest must be trusted (see the README's trust model): the resolver decides that.
  Every chunk is hashed, on a worker thread, before it is served: one fetched, and one
  found in the partial file (it may predate a crash) the first time this object reads it.
* Concurrent reads of one chunk fetch it once; a chunk that fails its hash fails the reads
  in that chunk only, and nothing of it is kept.
* A fetched chunk is written to the partial file, so that it is not fetched again, after
  a restart too; reads of it are then served from there (the page cache). At most
  :data:`KEPT_CHUNKS` chunks are also kept in memory.
* A sequential reader (a read that starts where a recent read ended, as the kernel's
  read-ahead and ``cat`` read) gets read-ahead: the next :data:`READ_AHEAD` chunks are
  fetched in the background, in parallel, while it reads. Other reads (an HDF5 library
  reading metadata here and there) fetch only the chunks they touch.
* **The whole file is checked** once all its chunks are here: a running SHA-1 takes the
  chunks in order as they come (from the partial file for those that came out of
  order). It is compared with the file's before the last chunk is served. A match makes
  the partial file an ordinary object of the store (later opens read it locally); a
  mismatch means the manifest lied: every later read fails, the partial file is deleted,
  and ``on_lie`` is told (the resolver forgets the manifest and reports it to the hub).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

import trio

from . import metrics
from .errors import DeadlineExceeded, IntegrityError, KacheryError, NotFound
from .manifest import Manifest
from .partial import PartialFile
from .ranges import RangeReader
from .readurls import Source
from .requester import FileRequest

log = logging.getLogger(__name__)

#: Verified chunks kept in memory per open file (20,000,000 bytes each).
KEPT_CHUNKS = 3
#: How many chunks past the one being read a sequential reader has fetched for it.
READ_AHEAD = 2
#: How long a chunk's transfer may go without a byte arriving (as a whole download's).
STALL_TIMEOUT_S = 60.0
#: How long after a chunk failed to arrive a read of it fails at once, with the same error
#: (the kernel reads a page again after a failed read: it must not wait a second deadline).
FAILED_CHUNK_TTL_S = 10.0


class _Closed(Exception):
    """The content was closed (its last reader went) while a background task of it ran:
    the task ends, quietly."""


class BufferPool:
    """Chunk-sized buffers, reused: a fetch writes a chunk into one as it arrives, and it
    goes back once the chunk is in the partial file. At most ``count`` are out at once
    (fetches wait for one), so a node's chunk transfers hold a bounded amount of memory,
    and no 20 MB allocation is made and freed per chunk (which the allocator keeps)."""

    def __init__(self, count: int, size: int):
        self.size = size
        self._free: list[bytearray] = []
        self._slots = trio.Semaphore(count)

    async def acquire(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes, to :meth:`release` (waits for one)."""
        if size > self.size:  # not a kachery chunk size: a buffer of its own
            return bytearray(size)
        await self._slots.acquire()
        return self._free.pop() if self._free else bytearray(self.size)

    def release(self, buf: bytearray) -> None:
        if len(buf) == self.size:
            self._free.append(buf)
            self._slots.release()

    @asynccontextmanager
    async def buffer(self, size: int) -> AsyncIterator[bytearray]:
        buf = await self.acquire(size)
        try:
            yield buf
        finally:
            self.release(buf)


class ChunkSource(Protocol):
    """Where the chunks of one file are fetched from by ranged ``GET``."""

    async def locate(self, i: int, *, gone: bool = False) -> tuple[Source, int]:
        """The object that holds chunk ``i`` and where the chunk starts in it,
        once it can be fetched (this may wait). ``gone``: the last answer's object was not
        there: another, or the error that says why not."""
        raise NotImplementedError


class WholeObject(ChunkSource):
    """Chunks as ranges of the file's whole object in the bucket."""

    def __init__(self, manifest: Manifest, url: Source):
        self.manifest = manifest
        self.url = url

    async def locate(self, i: int, *, gone: bool = False) -> tuple[Source, int]:
        if gone:
            raise NotFound(f"{self.url} is no longer in the bucket")
        return self.url, self.manifest.chunks[i].start


class StreamedChunks(ChunkSource):
    """Chunks of a file a provider is streaming for a file request: each one's own object
    (``chunk_url(sha1)``) once the request says it is in the bucket, and the whole object
    once the request has finished without it. Every wait is the request's, under its stall
    deadline. A request that failed is not the end: the next chunk asks again
    (``request_again()``: the file's request, a new one if none runs; the hub answers at
    once if the whole object is in the bucket by then), and raises that one's error."""

    def __init__(self, manifest: Manifest, request: FileRequest,
                 chunk_url: Callable[[str], Source], whole: WholeObject,
                 request_again: Callable[[], FileRequest] | None = None):
        self.manifest = manifest
        self.request = request
        self.chunk_url = chunk_url
        self.whole = whole
        self.request_again = request_again

    async def locate(self, i: int, *, gone: bool = False) -> tuple[Source, int]:
        if self.request.error is not None and self.request_again is not None:
            self.request = self.request_again()
        if not gone and await self.request.wait_chunk(self.manifest.hash, i):
            return self.chunk_url(self.manifest.chunks[i].sha1), 0
        if gone:  # said to be there and not (evicted?): the whole object, at the end
            log.info("chunk %d of sha1://%s is not in the bucket as the provider said; it"
                     " is read from the whole object once it is there", i,
                     self.manifest.sha1)
        await self.request.wait_done()
        return await self.whole.locate(i)


class ChunkedContent:
    """Readable bytes of one large file, chunk by chunk (the resolver's ``Content``)."""

    def __init__(self, manifest: Manifest, ranges: RangeReader, *,
                 source: ChunkSource | None,
                 open_chunk: Callable[[str], Awaitable[bytes]],
                 partial: PartialFile | None = None,
                 nursery: trio.Nursery | None = None,
                 on_lie: Callable[[str], None] | None = None,
                 on_fetched: Callable[[int], None] | None = None,
                 on_bad_chunk: Callable[[IntegrityError], None] | None = None,
                 buffers: BufferPool | None = None):
        """``source``: where chunks are fetched by ranged GET, or None: ``open_chunk(sha1)``,
        the verified bytes of a chunk as content of its own; ``partial``: the file's
        partial file (None: nothing is kept); ``nursery``: runs read-ahead and the whole
        check (inline without it, and no read-ahead); ``on_lie(actual)``: the chunks
        matched but the whole file hashed to ``actual``; ``on_fetched(nbytes)``: bytes
        came from the bucket by ``source`` (demand, for the hub's cache);
        ``on_bad_chunk(error)``: a fetched chunk did not match its hash; ``buffers``: where
        chunks are fetched into (shared by a resolver's reads; one of its own without)."""
        self.manifest = manifest
        self.size = manifest.size
        self._ranges = ranges
        self._source = source
        self._open_chunk = open_chunk
        self._partial = partial
        self._nursery = nursery
        self._on_lie = on_lie
        self._on_fetched = on_fetched
        self._on_bad_chunk = on_bad_chunk
        self._buffers = buffers or BufferPool(
            READ_AHEAD + 2, max(c.size for c in manifest.chunks))
        self._last = len(manifest.chunks) - 1
        self._kept: OrderedDict[int, bytes] = OrderedDict()
        self._verified: set[int] = set()  # in the partial file, hashed by this object
        # Verified chunks in a pool buffer while they are written to the partial file:
        # readers copy their bytes from here meanwhile (without an await between the look
        # and the copy: the buffer goes back to the pool when the write ends, and the event
        # is set).
        self._writing: dict[int, tuple[memoryview, trio.Event]] = {}
        self._locks: dict[int, trio.Lock] = {}
        self._failed: dict[int, tuple[KacheryError, float]] = {}  # chunk -> (error, when)
        self._ends: deque[int] = deque(maxlen=8)  # where recent reads ended
        self._ahead: dict[int, trio.CancelScope] = {}  # read-ahead in flight
        self._whole = hashlib.sha1()
        self._whole_next = 0  # chunks [0, _whole_next) are in _whole
        self._whole_lock = trio.Lock()
        self._in_order: dict[int, bytes] = {}  # a fetched chunk the whole check takes next
        self._served: set[int] = set()  # chunks served to readers (not read-ahead)
        self._whole_failed: Exception | None = None  # a background whole check broke
        self._lie: IntegrityError | None = None
        self._busy = 0  # worker threads using the partial file's descriptor
        self._closed = False
        #: How many chunks were fetched from the bucket or the nodes.
        self.fetched = 0
        #: How many chunks were taken from the partial file (and verified).
        self.from_partial = 0
        #: The whole file was verified and is an object of the store now.
        self.complete = False

    @property
    def lied(self) -> bool:
        """The whole file did not match: what was served is another file's bytes."""
        return self._lie is not None

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
            lo, hi = max(offset, chunk.start), min(end, chunk.end)
            piece = None
            while piece is None:
                piece = self._piece(i, await self._chunk(i), lo - chunk.start, hi - lo)
            pieces.append(piece)
        return b"".join(pieces)

    def _piece(self, i: int, data: bytes | memoryview | None, at: int,
               n: int) -> bytes | None:
        """``n`` bytes at ``at`` in chunk ``i``, which :meth:`_chunk` just verified, copied
        out at once (a buffer being written goes back to the pool when the write ends);
        None when it is no longer here (it left memory meanwhile): fetch it again."""
        if isinstance(data, bytes):
            return data[at:at + n]
        writing = self._writing.get(i)
        if writing is not None:
            return bytes(writing[0][at:at + n])
        if i in self._verified:  # in the partial file: from the page cache
            assert self._partial is not None
            return self._partial.read(self.manifest.chunks[i].start + at, n)
        return None

    def _read_ahead(self, offset: int, last: int) -> None:
        if offset not in self._ends or self._nursery is None:
            return
        for i in range(last + 1, min(last + 1 + READ_AHEAD, self._last + 1)):
            if i not in self._kept and i not in self._verified and i not in self._ahead:
                self._ahead[i] = scope = trio.CancelScope()
                self._nursery.start_soon(self._fetch_ahead, i, scope)

    async def _fetch_ahead(self, i: int, scope: trio.CancelScope) -> None:
        with scope:
            try:
                await self._chunk(i, ahead=True)
            except KacheryError as exc:  # the read of that chunk will try again and say
                log.debug("read-ahead of chunk %d of sha1://%s: %s", i, self.manifest.sha1,
                          exc)
            except _Closed:
                pass
            except Exception:  # noqa: BLE001 - never into the mount's nursery
                log.exception("read-ahead of chunk %d of sha1://%s failed", i,
                              self.manifest.sha1)
        if self._ahead.get(i) is scope:
            del self._ahead[i]

    async def _check_whole_in_background(self) -> None:
        try:
            await self._check_whole()
        except _Closed:
            pass
        except Exception as exc:  # noqa: BLE001 - never into the mount's nursery
            self._whole_failed = exc
            log.exception("checking sha1://%s whole failed", self.manifest.sha1)

    async def _chunk(self, i: int, *, ahead: bool = False) -> bytes | memoryview | None:
        """Chunk ``i``, verified: its bytes, a view of the buffer it is being written from
        (see :meth:`_piece`), or None when they are to be read from the partial file.
        ``ahead``: for read-ahead (a failure is not remembered for readers)."""
        lock = self._locks.setdefault(i, trio.Lock())
        fresh = False
        data: bytes | memoryview | None
        async with lock:  # concurrent readers of one chunk fetch it once
            data = self._kept.get(i)
            if data is not None:
                self._kept.move_to_end(i)
            elif i in self._writing:
                data = self._writing[i][0]
            elif i not in self._verified:
                failed = self._failed.get(i)
                if failed is not None and trio.current_time() - failed[1] < FAILED_CHUNK_TTL_S:
                    raise failed[0]
                try:
                    data = await self._fetch(i)
                except KacheryError as exc:
                    if not ahead:
                        self._failed[i] = (exc, trio.current_time())
                    raise
                self._failed.pop(i, None)
                fresh = True
                if isinstance(data, bytes) and not self._closed:  # not in the partial file
                    if i == self._whole_next:
                        self._in_order[i] = data  # the whole check takes it next
                    self._kept[i] = data
                    while len(self._kept) > KEPT_CHUNKS:
                        self._kept.popitem(last=False)
        if not ahead:
            self._served.add(i)
        if i == self._last and not ahead:
            # The last chunk is served after the whole check, to a reader that read the
            # others (one that jumps to the end reads by chunk only).
            await self._check_whole(final=True)
        elif fresh:
            if self._nursery is not None:
                self._nursery.start_soon(self._check_whole_in_background)
            else:
                await self._check_whole()
        if self._lie is not None:
            raise self._lie
        return data

    async def _fetch(self, i: int) -> bytes | memoryview | None:
        """Chunk ``i``, verified: None when it is in the partial file (read it there), a
        view of its buffer while it is written there in the background, else its bytes
        (nothing could be kept on disk)."""
        partial = self._partial
        if partial is not None and i in partial.present:
            async with self._buffers.buffer(self.manifest.chunks[i].size) as buf:
                view = await self._on_thread(partial.read_chunk_into, i, buf)
                if await self._matches(i, view):
                    self._verified.add(i)
                    self.from_partial += 1
                    return None
            log.warning("chunk %d of sha1://%s in the local store's partial file does not"
                        " match its SHA-1 (lost in a crash?): fetching it again", i,
                        self.manifest.sha1)
            await self._on_thread(partial.drop_chunk, i)
        chunk = self.manifest.chunks[i]
        if self._source is None:
            return await self._keep(i, await self._open_chunk(chunk.sha1))
        url, start = await self._source.locate(i)  # before a buffer is taken: it may wait
        into = await self._buffers.acquire(chunk.size)  # no chunk-sized allocation
        owned = True  # until a write behind takes it
        try:
            try:
                view = await self._fetch_range(url, start, start + chunk.size, into=into)
            except NotFound:  # elsewhere, maybe later: no buffer is held while it waits
                owned = False
                self._buffers.release(into)
                url, start = await self._source.locate(i, gone=True)
                into = await self._buffers.acquire(chunk.size)
                owned = True
                view = await self._fetch_range(url, start, start + chunk.size, into=into)
            if self._on_fetched is not None:
                self._on_fetched(len(view))
            await self._verify(i, view)
            if (self._partial is not None and self._nursery is not None and not self._closed
                    and i not in self._writing):
                # Served from the buffer at once; written to the partial file meanwhile.
                writing = self._writing[i] = (memoryview(view), trio.Event())
                self._busy += 1  # the partial file stays open for the write (see close)
                try:
                    self._nursery.start_soon(self._write_behind, i, into)
                except BaseException:  # the nursery is closing: nothing was handed over
                    del self._writing[i]
                    self._busy -= 1
                    raise
                owned = False
                return writing[0]
            return await self._store(i, view)
        finally:
            if owned:
                self._buffers.release(into)

    async def _write_behind(self, i: int, buf: bytearray) -> None:
        """Write verified chunk ``i`` from ``buf`` to the partial file (also after the last
        reader went: the chunk is kept for the next), then give the buffer back; if it
        cannot be kept there, its bytes are kept in memory instead. The caller counted this
        write in ``_busy``."""
        partial = self._partial
        assert partial is not None
        view, done = self._writing[i]
        data: bytes | None = None  # kept in memory instead
        try:
            await trio.to_thread.run_sync(partial.add_chunk, i, view)
            self._verified.add(i)
        except (OSError, sqlite3.Error) as exc:  # a full disk: serve on from memory
            log.warning("chunk %d of sha1://%s is served without being kept in the local"
                        " store: %s", i, self.manifest.sha1, exc)
            data = bytes(view)
        except Exception:  # noqa: BLE001 - never into the mount's nursery
            log.exception("keeping chunk %d of sha1://%s failed", i, self.manifest.sha1)
        finally:
            if data is not None and not self._closed:
                self._kept[i] = data
                while len(self._kept) > KEPT_CHUNKS:
                    self._kept.popitem(last=False)
            if self._writing.get(i, (view, None))[1] is done:
                del self._writing[i]
            self._buffers.release(buf)
            done.set()
            self._busy -= 1
            if self._closed and self._busy == 0:
                partial.close()
        if (i in self._verified and self._whole_next == i and not self._closed
                and self._nursery is not None):
            self._nursery.start_soon(self._check_whole_in_background)

    async def _keep(self, i: int, data: bytes | memoryview) -> bytes | None:
        """Verify fetched chunk ``i`` and write it to the partial file: None, or its bytes
        when it could not be kept there."""
        await self._verify(i, data)
        return await self._store(i, data)

    async def _verify(self, i: int, data: bytes | memoryview) -> None:
        """Fetched chunk ``i`` matches its SHA-1 in the manifest, else ``IntegrityError``
        (and ``on_bad_chunk`` is told)."""
        if not await self._matches(i, data):
            chunk = self.manifest.chunks[i]
            metrics.REFUSED_BYTES.labels("chunk").inc(len(data))
            error = IntegrityError(
                f"chunk {i} (bytes {chunk.start:,}-{chunk.end - 1:,}) of"
                f" sha1://{self.manifest.sha1} does not match its SHA-1 in the manifest"
                f" sha1://{self.manifest.hash}")
            if self._on_bad_chunk is not None:
                self._on_bad_chunk(error)
            raise error
        metrics.VERIFIED_BYTES.labels("chunk").inc(len(data))
        self.fetched += 1

    async def _store(self, i: int, data: bytes | memoryview) -> bytes | None:
        """Write verified chunk ``i`` to the partial file: None, or its bytes when it could
        not be kept there."""
        partial = self._partial
        if partial is not None and not self._closed:
            try:
                await self._on_thread(partial.add_chunk, i, data)
            except (OSError, sqlite3.Error) as exc:  # a full disk: serve on from memory
                log.warning("chunk %d of sha1://%s is served without being kept in the local"
                            " store: %s", i, self.manifest.sha1, exc)
            else:
                self._verified.add(i)
                return None
        return bytes(data)

    async def _fetch_range(self, url: Source, start: int, end: int, *,
                           into: bytearray) -> bytes | memoryview:
        """Bytes ``[start, end)`` of the object at ``url``, into ``into``;
        ``DeadlineExceeded`` once :data:`STALL_TIMEOUT_S` pass without a byte arriving (a
        bucket that trickles)."""
        with trio.CancelScope(deadline=trio.current_time() + STALL_TIMEOUT_S) as scope:

            def progressed(_n: int) -> None:
                scope.deadline = trio.current_time() + STALL_TIMEOUT_S

            data = await self._ranges.read_into(url, start, end, into, on_data=progressed)
            metrics.FETCHED_BYTES.labels("chunk").inc(len(data))
            return data
        raise DeadlineExceeded(f"GET {url} bytes {start}-{end - 1}: nothing arrived for"
                               f" {STALL_TIMEOUT_S:.0f} s")

    async def _matches(self, i: int, data: bytes | memoryview) -> bool:
        chunk = self.manifest.chunks[i]
        if len(data) != chunk.size:
            return False
        return await trio.to_thread.run_sync(lambda: hashlib.sha1(data).hexdigest()) == \
            chunk.sha1

    async def _on_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker thread, the partial file kept open until it is done
        (:meth:`close` leaves the descriptor to the last such call). ``_Closed`` once the
        descriptor is closed: a background task that outlived the last reader."""
        if self._partial is not None and self._partial.fd < 0:
            raise _Closed()
        self._busy += 1
        try:
            return await trio.to_thread.run_sync(fn, *args)
        finally:
            self._busy -= 1
            if self._closed and self._busy == 0 and self._partial is not None:
                self._partial.close()

    # -- the whole file ----------------------------------------------------------------

    async def _check_whole(self, *, final: bool = False) -> None:
        """Add the chunks that are here, in order, to the running SHA-1; once all are in,
        compare, and install or condemn (see the module docstring).

        ``final``: the last chunk is about to be served. Every chunk a reader was served
        is then added even if it must be fetched again (it left memory, and the partial
        file could not keep it): a reader that read all the others never gets the last
        chunk of a file whose whole SHA-1 does not match. ``IntegrityError`` when that
        cannot be done."""
        async with self._whole_lock:
            while self._whole_next <= self._last and not self._closed:
                i = self._whole_next
                if not await self._add_to_whole(i, final=final):
                    return  # not here (yet): a reader that skipped it reads by chunk only
                self._whole_next += 1
            if self._whole_next == self._last + 1 and not self._closed:
                self._whole_next += 1  # checked once
                await self._finish_whole()
        if final and self._whole_failed is not None and self._lie is None:
            raise IntegrityError(f"sha1://{self.manifest.sha1}: its whole check failed"
                                 f" ({self._whole_failed!r}): the last chunk is not served")

    async def _add_to_whole(self, i: int, *, final: bool) -> bool:
        """Add chunk ``i`` to the running SHA-1, from memory or the partial file (or,
        ``final``, fetched again if a reader was served it); False if it is not here."""
        writing = self._writing.get(i)
        if writing is not None:  # here in a moment: its write ends, then in the partial file
            if not final:
                return False
            await writing[1].wait()
            return await self._add_to_whole(i, final=final)
        data = self._in_order.pop(i, None) or self._kept.get(i)
        if data is not None:
            await trio.to_thread.run_sync(self._whole.update, data)
            return True
        partial = self._partial
        if partial is not None and i in partial.present:
            async with self._buffers.buffer(self.manifest.chunks[i].size) as buf:
                view = await self._on_thread(partial.read_chunk_into, i, buf)
                if i in self._verified or await self._matches(i, view):
                    self._verified.add(i)
                    await trio.to_thread.run_sync(self._whole.update, view)
                    return True
            await self._on_thread(partial.drop_chunk, i)  # written before a crash, maybe
        if not (final and i in self._served):
            return False
        try:
            fetched = await self._fetch(i)
        except KacheryError as exc:
            raise IntegrityError(
                f"sha1://{self.manifest.sha1}: its last chunk is served only once the whole"
                f" file is verified, and chunk {i} could not be had again for that: {exc}"
            ) from None
        if not isinstance(fetched, bytes):  # in the partial file now, or in a moment
            writing = self._writing.get(i)
            if writing is not None:
                await writing[1].wait()
            if await self._add_to_whole(i, final=False):
                return True
            raise IntegrityError(
                f"sha1://{self.manifest.sha1}: its last chunk is served only once the whole"
                f" file is verified, and chunk {i} could not be kept for that")
        await trio.to_thread.run_sync(self._whole.update, fetched)
        return True

    async def _finish_whole(self) -> None:
        actual = self._whole.hexdigest()
        if actual != self.manifest.sha1:
            metrics.REFUSED_BYTES.labels("manifest").inc(self.size)
            self._lie = IntegrityError(
                f"the chunks of manifest sha1://{self.manifest.hash} each matched, but"
                f" together they are sha1://{actual}, not sha1://{self.manifest.sha1}: the"
                " manifest is wrong, and what was read is not that file")
            log.error("%s", self._lie)
            self._kept.clear()
            if self._partial is not None:
                await self._on_thread(self._partial.discard)
            if self._on_lie is not None:
                try:
                    self._on_lie(actual)
                except Exception:  # noqa: BLE001 - the readers are told anyway
                    log.exception("reporting the lying manifest sha1://%s failed",
                                  self.manifest.hash)
            return
        if self._partial is None or not self._partial.complete():
            return  # verified, but a chunk could not be kept: nothing to install
        try:
            await self._on_thread(self._partial.install)
        except (OSError, sqlite3.Error, KacheryError) as exc:
            log.warning("sha1://%s was read whole and verified but not kept in the local"
                        " store: %s", self.manifest.sha1, exc)
        else:
            self.complete = True

    def close(self) -> None:
        self._closed = True
        for scope in self._ahead.values():
            scope.cancel()
        self._kept.clear()
        self._in_order.clear()
        if self._busy == 0 and self._partial is not None:
            self._partial.close()
