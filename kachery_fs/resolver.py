"""Where content comes from: the local store, else a kachery store on this machine
(copied into ours, verified: :mod:`kachery_fs.sources`), else the channel bucket, else a
request through the hub that a provider node answers by uploading to the bucket.

``Resolver.size`` answers lookups; ``Resolver.open`` returns a :class:`Content` that
reads verified bytes. However many readers want one missing hash, there is one request
and one download (STYLE rule 9); they keep running after the readers go, so the content
ends up in the store.

A large file with a trusted manifest is read by chunk instead
(:class:`~kachery_fs.chunks.ChunkedContent`: each chunk verified before it is served).
A manifest is trusted when the caller names it (a URI's ``?manifest=``, the mount's
``sha1/<hash>?manifest=<hash>``: for that read only), or when the store has one on record
for the hash (computed on this node, or vouched for by the channel's hub). With
``strict``, nothing is served before the whole file is verified: a manifest is then only
a way to fetch the file (from a bucket that holds only its chunks, say), into the store.
All the readers of one (hash, manifest) share one :class:`ChunkedContent`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import httpx
import trio
from cachetools import TTLCache

from . import manifest as manifest_module
from . import metrics
from .bucket import EMPTY_SHA1, Download, head_size
from .cache import MANIFEST_HERE, vouched_by_hub
from .channels import Channels
from .chunks import BufferPool, ChunkedContent, ChunkSource, StreamedChunks, WholeObject
from .demand import DownloadReports
from .errors import DeadlineExceeded, IntegrityError, KacheryError, NotFound
from .manifest import Manifest
from .partial import PartialFile
from .protocol import object_key
from .ranges import RangeReader
from .readurls import ObjectUrl, ReadUrls
from .requester import DEFAULT_STALL_TIMEOUT_S, FileRequest
from .sources import Sources
from .store import Store

log = logging.getLogger(__name__)

#: How long a lookup may wait for the bucket to say whether it has a hash.
LOOKUP_DEADLINE_S = 15.0
#: How long a hash whose bucket object failed verification is refused before a new try.
BAD_OBJECT_TTL_S = 60.0
#: How long a read may wait without the download making any progress; the download itself
#: fails after as long without progress, so a later read of it does not wait again.
STALL_TIMEOUT_S = 60.0
#: How long a manifest caught lying (its chunks matched, the whole file did not) is refused.
LYING_MANIFEST_TTL_S = 3600.0
#: How many chunks (20,000,000 bytes each) a node's reads by chunk hold in memory at once,
#: being fetched or written to their partial file: one reader's chunk and its read-ahead,
#: and one still being written. The mount's memory is about 100 MiB plus these.
CHUNK_BUFFERS = 4


class Content(Protocol):
    """Readable bytes of one hash. ``read`` may wait for a download. (A protocol: a large
    file read by chunk, :class:`kachery_fs.chunks.ChunkedContent`, is one too.)"""

    size: int

    async def read(self, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class LocalContent(Content):
    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.size = size

    async def read(self, offset: int, size: int) -> bytes:
        # A page-cache read of at most a kernel request (256 KiB - 1 MiB) is fast enough
        # to do on the event loop; offloading it to a thread halves throughput.
        return os.pread(self.fd, size, offset)

    def close(self) -> None:
        os.close(self.fd)


class DownloadContent(Content):
    """A download's bytes. If the object leaves the bucket before it is fetched (the hub
    evicted it), ``reopen`` resolves the hash again, through a request, once."""

    def __init__(self, download: Download,
                 reopen: Callable[[], Awaitable[Content]] | None = None):
        self.download: Download | None = download
        self.size = download.size
        self._opened: float | None = time.monotonic()  # until the first byte: its latency
        self._reopen = reopen
        self._reopening = trio.Lock()  # concurrent reads of one handle reopen once
        self._instead: Content | None = None
        download.readers += 1

    async def read(self, offset: int, size: int) -> bytes:
        if self._instead is not None:
            return await self._instead.read(offset, size)
        end = min(offset + size, self.size)
        if offset >= self.size:
            return b""
        download = self.download
        assert download is not None  # released only once _instead is set
        try:
            await download.wait_readable(end, stall_timeout=STALL_TIMEOUT_S)
        except (NotFound, IntegrityError):  # evicted, or bad bytes the hub is to check
            async with self._reopening:
                if self._instead is None:
                    if self._reopen is None:
                        raise
                    reopen, self._reopen = self._reopen, None
                    instead = await reopen()
                    if instead.size != self.size:  # the bad object had another size
                        instead.close()
                        raise IntegrityError(
                            f"sha1://{download.sha1} has {instead.size} bytes, not the"
                            f" {self.size} its first copy in the bucket claimed; open it"
                            " again") from None
                    self._instead = instead
                    self._release()
            return await self._instead.read(offset, size)
        if self._opened is not None:
            metrics.FIRST_BYTE_SECONDS.observe(time.monotonic() - self._opened)
            self._opened = None
        # No checkpoint since the wait: another read of this handle cannot have replaced
        # the download meanwhile (it would first have to fetch the replacement).
        return os.pread(download.fd, end - offset, offset)

    def _release(self) -> None:
        download, self.download = self.download, None
        assert download is not None  # released once
        download.readers -= 1
        if download.readers == 0 and download.done.is_set():
            download.close_fd()

    def close(self) -> None:
        if self._instead is not None:
            self._instead.close()
        if self.download is not None:
            self._release()


class SharedChunks(Content):
    """One reader's handle on the :class:`ChunkedContent` that all the readers of a
    (hash, manifest) share; the last to close it closes it."""

    def __init__(self, chunked: ChunkedContent, release: Callable[[], None]):
        self.chunked = chunked
        self.size = chunked.size
        self._release: Callable[[], None] | None = release
        self._opened: float | None = time.monotonic()  # until the first byte: its latency

    async def read(self, offset: int, size: int) -> bytes:
        data = await self.chunked.read(offset, size)
        if self._opened is not None and data:
            metrics.FIRST_BYTE_SECONDS.observe(time.monotonic() - self._opened)
            self._opened = None
        return data

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


@dataclass
class _Shared:
    """The one :class:`ChunkedContent` of a (channel, hash, manifest) and how many readers
    hold it; ``streamed``: opened as a request streams the file (a manifest a reader named
    is trusted for that reader's reads only, so only these are shared with other opens)."""

    content: ChunkedContent
    readers: int = 0
    streamed: bool = False


class Resolver:
    def __init__(self, store: Store, channels: Channels, client: httpx.AsyncClient, *,
                 urls: ReadUrls, ranges: RangeReader, sources: Sources,
                 downloads: DownloadReports,
                 nursery: trio.Nursery,
                 request_stall_timeout: float = DEFAULT_STALL_TIMEOUT_S,
                 strict: bool = False):
        """``client`` for every request but the chunks of large files, which ``ranges``
        fetches; ``urls`` says where each object of a channel's bucket is read."""
        self.store = store
        self.urls = urls
        self.strict = strict
        self.channels = channels
        self.client = client
        self.ranges = ranges
        self.downloads = downloads
        self.nursery = nursery
        self.request_stall_timeout = request_stall_timeout
        self._downloads: dict[str, Download] = {}
        self._requests: dict[tuple[str, str], FileRequest] = {}
        self._sizes: TTLCache = TTLCache(maxsize=100_000, ttl=3600)  # immutable: sizes stay true
        # Hashes whose bucket object just failed verification: opens fail at once for a
        # while instead of downloading the same bad bytes again for every reader.
        self._bad: TTLCache = TTLCache(maxsize=10_000, ttl=BAD_OBJECT_TTL_S)
        self._disputed: TTLCache = TTLCache(maxsize=10_000, ttl=BAD_OBJECT_TTL_S)
        self.sources = sources
        self._copies: dict[str, trio.Event] = {}  # sha1 -> done, while copied from a source
        self._manifests: TTLCache = TTLCache(maxsize=1000, ttl=3600)  # manifest sha1 -> parsed
        # (channel, sha1, manifest sha1) -> its one content, while it has readers
        self._chunked: dict[tuple[str, str, str], _Shared] = {}
        self._lies: TTLCache = TTLCache(maxsize=10_000, ttl=LYING_MANIFEST_TTL_S)
        # What every read by chunk fetches into: at most CHUNK_BUFFERS chunks in memory.
        self._buffers = BufferPool(CHUNK_BUFFERS, manifest_module.CHUNK_SIZE)

    def local_size(self, sha1: str) -> int | None:
        return self.store.size(sha1)

    async def size(self, channel: str, sha1: str, *, manifest: str | None = None) -> int:
        """The size of ``sha1``; ``NotFound`` when neither the store nor the bucket has it.
        ``manifest``: the hash of a manifest the caller trusts for this file."""
        local = self.store.size(sha1)
        if local is not None:
            return local
        if sha1 in self._downloads:
            return self._downloads[sha1].size
        trusted = self._trusted_manifest(channel, sha1, manifest)
        if trusted is not None:
            found = await self._manifest_or_none(channel, sha1, trusted,
                                                 given=manifest is not None)
            if found is not None:
                return found.size
        # A file in a kachery store on this machine is copied in, verified, before its
        # size is told: a linked file may have changed since kachery linked it, and with
        # the writeback cache the kernel keeps the first size it hears of a file.
        copied = await self._copy_from_sources(sha1)
        if copied is not None:
            return copied
        key = (channel, sha1)
        if key in self._sizes:
            return self._sizes[key]
        request = self._requests.get(key)
        if request is None:
            try:
                size = await self._head(channel, sha1)
            except NotFound:
                request = self._request(channel, sha1)
            else:
                if size == 0 and sha1 != EMPTY_SHA1:
                    # An empty object cannot hold this content, and a read of it would end
                    # before anything is verified: a bad object, for the hub to check.
                    log.warning("the bucket of %s holds an empty object for sha1://%s;"
                                " asking the hub to check it and the channel's nodes for the"
                                " file", channel, sha1)
                    request = self._request(channel, sha1, bad=True)
                else:
                    self._sizes[key] = size
                    if size > manifest_module.CHUNK_SIZE and not self.strict:
                        await self._ask_hub_for_manifest(channel, sha1)
                    return size
        # In no bucket yet: a provider has been asked; its size is known once it accepts.
        size = await request.wait_size()
        self._sizes[key] = size
        return size

    async def _copy_from_sources(self, sha1: str) -> int | None:
        """Copy ``sha1`` from a kachery store on this machine into ours, verified (one copy
        however many ask); its size, or None when no source has a good copy."""
        copying = self._copies.get(sha1)
        if copying is not None:
            await copying.wait()
            return self.store.size(sha1)
        paths = self.sources.find(sha1)
        if not paths:
            return None
        self._copies[sha1] = copying = trio.Event()
        try:
            return await trio.to_thread.run_sync(self.sources.copy_into, self.store,
                                                 sha1, paths)
        finally:
            del self._copies[sha1]
            copying.set()

    def requests(self) -> list[FileRequest]:
        """The file requests this node is waiting on now."""
        return list(self._requests.values())

    def _request(self, channel: str, sha1: str, *, bad: bool = False) -> FileRequest:
        """The one request for (channel, sha1), started if there is none (single-flight).
        ``bad``: the bucket's object failed verification, and the hub is told so."""
        key = (channel, sha1)
        request = self._requests.get(key)
        if request is None:
            request = FileRequest(self.channels, channel, sha1,
                                  stall_timeout=self.request_stall_timeout, bad=bad)
            self._requests[key] = request

            async def run():
                try:
                    await request.run()
                finally:
                    if self._requests.get(key) is request:
                        del self._requests[key]
                    if request.error is not None:
                        self._sizes.pop(key, None)

            self.nursery.start_soon(run)
        return request

    async def open(self, channel: str, sha1: str, *, manifest: str | None = None) -> Content:
        """Verified bytes of ``sha1`` (see the module docstring); ``manifest``: the hash of
        a manifest the caller trusts for this file."""
        local = self._open_local(sha1)  # whole and verified: nothing to decide
        if local is not None:
            metrics.STORE_LOOKUPS.labels("hit").inc()
            return local
        content = await self._open_fetched(channel, sha1, manifest)
        # A kachery store on this machine counts as a hit: nothing was fetched.
        metrics.STORE_LOOKUPS.labels(
            "hit" if isinstance(content, LocalContent) else "miss").inc()
        return content

    async def _open_fetched(self, channel: str, sha1: str, manifest: str | None) -> Content:
        trusted = self._trusted_manifest(channel, sha1, manifest)
        if trusted is not None and sha1 not in self._downloads:
            found = await self._manifest_or_none(channel, sha1, trusted,
                                                 given=manifest is not None)
            if found is not None:
                return await self._open_chunked(channel, sha1, found)
        bad = self._bad.get((channel, sha1))
        if bad is not None and not self.store.has(sha1):
            # A bad object in the bucket: the hub checks it, deletes it if so and asks the
            # providers. Once that request has ended, the bucket is read again, once.
            request = self._requests.get((channel, sha1))
            if request is None or not request.bad:
                raise IntegrityError(f"{bad} (retried after {BAD_OBJECT_TTL_S:.0f} s)")
            try:
                await request.wait_done()
            except KacheryError as exc:
                raise IntegrityError(f"{bad}; and no good copy came instead: {exc}") from None
            if self._bad.get((channel, sha1)) == bad:
                del self._bad[(channel, sha1)]
            self._sizes.pop((channel, sha1), None)
        local = self._open_local(sha1)
        if local is not None:
            return local
        reading = self._chunked_of(channel, sha1)
        if reading is not None:  # streamed for a request that has ended: read on there
            return await self._open_chunked(channel, sha1, reading)
        download = self._downloads.get(sha1)
        if download is None:
            size = await self.size(channel, sha1)
            # Copied from a kachery store by size(), or installed by another opener.
            local = self._open_local(sha1)
            if local is not None:
                return local
            request = self._requests.get((channel, sha1))
            if request is not None:  # a provider is uploading it to the bucket
                streamed = await self._open_streamed(channel, sha1, request)
                if streamed is not None:
                    return streamed
                await request.wait_done()
            # The await above may have let another opener start the download.
            download = self._downloads.get(sha1)
            if download is None:
                download = Download(self.client, self._url(channel, sha1), sha1, size,
                                    self.store, stall_timeout=STALL_TIMEOUT_S,
                                    on_finish=partial(self._finished, channel))
                self._downloads[sha1] = download
                self.nursery.start_soon(download.run)
        return DownloadContent(download, reopen=partial(self.open, channel, sha1))

    async def open_here(self, sha1: str) -> Content | None:
        """The content of ``sha1`` if this machine has it: in the store, or in a kachery
        store on this machine (copied in, verified); None otherwise."""
        local = self._open_local(sha1)
        if local is None and await self._copy_from_sources(sha1) is not None:
            local = self._open_local(sha1)
        if local is not None:
            metrics.STORE_LOOKUPS.labels("hit").inc()
        return local

    # -- reads by chunk ----------------------------------------------------------------

    async def _ask_hub_for_manifest(self, channel: str, sha1: str) -> None:
        """Record the manifest of large file ``sha1`` that ``channel``'s hub vouches for,
        if it has one (within :data:`LOOKUP_DEADLINE_S`; without an answer, the file is
        read whole)."""
        if self.store.cache.known_manifest(sha1) is not None:
            return
        manifest = None
        with trio.move_on_after(LOOKUP_DEADLINE_S):
            try:
                manifest = await self.channels.hub_of(channel).get_manifest(channel, sha1)
            except KacheryError as exc:
                log.info("sha1://%s: the hub of %s gave no manifest (%s); reading it whole",
                         sha1, channel, exc)
        if manifest is not None and (sha1, manifest) not in self._lies:
            self.store.cache.note_manifest(sha1, manifest, vouched_by_hub(channel))

    def _trusted_manifest(self, channel: str, sha1: str, given: str | None) -> str | None:
        """The manifest to read ``sha1`` through: the one the caller gave, else the one on
        record in the store (computed here, or vouched for by ``channel``'s hub, not
        another's); None for none (or one caught lying)."""
        if given is not None:
            if (sha1, given) in self._lies:
                raise IntegrityError(self._lies[(sha1, given)])
            return given
        known = self.store.cache.known_manifest(sha1)
        if (known is None or known[1] not in (MANIFEST_HERE, vouched_by_hub(channel))
                or (sha1, known[0]) in self._lies):
            return None
        return known[0]

    async def _manifest_or_none(self, channel: str, sha1: str, manifest_sha1: str, *,
                                given: bool) -> Manifest | None:
        """The parsed manifest ``manifest_sha1`` of ``sha1``. One the caller gave must be
        good (errors raised); one on record that cannot be had or is bad is dropped, and
        the file is read whole (None)."""
        manifest = self._manifests.get(manifest_sha1)
        if manifest is not None and manifest.sha1 == sha1:
            return manifest
        try:
            size = await self.size(channel, manifest_sha1)
            if size > manifest_module.MAX_BYTES:  # before a byte of it is fetched
                raise IntegrityError(f"sha1://{manifest_sha1} has {size:,} bytes: not a"
                                     f" manifest (at most {manifest_module.MAX_BYTES:,})")
            manifest = Manifest.parse(await self._read_all(channel, manifest_sha1), sha1=sha1)
        except KacheryError as exc:
            if given:
                raise
            log.warning("sha1://%s: its manifest sha1://%s cannot be used (%s); reading the"
                        " file whole", sha1, manifest_sha1, exc)
            if isinstance(exc, IntegrityError):
                self.store.cache.forget_manifest(sha1, manifest_sha1)
            return None
        self._manifests[manifest_sha1] = manifest
        return manifest

    async def _open_streamed(self, channel: str, sha1: str,
                             request: FileRequest) -> Content | None:
        """``sha1`` read by chunk as the provider of ``request`` streams it, if it does
        (it named a manifest, which must be ``sha1``'s); None otherwise."""
        if request.manifest is None or (sha1, request.manifest) in self._lies:
            return None
        manifest = await self._manifest_or_none(channel, sha1, request.manifest, given=False)
        if manifest is None:
            return None
        return await self._open_chunked(channel, sha1, manifest, request=request)

    async def _open_chunked(self, channel: str, sha1: str, manifest: Manifest, *,
                            request: FileRequest | None = None) -> Content:
        """A reader's handle on the one :class:`ChunkedContent` of (``sha1``, ``manifest``);
        in strict mode, the file read whole into the store first, then opened there.
        ``request``: a file request whose provider streams the file by that manifest."""
        key = (channel, sha1, manifest.hash)
        shared = self._chunked.get(key)
        if shared is None:
            source = (self._streamed(channel, manifest, request) if request is not None else
                      await self._chunk_source(channel, sha1, manifest))
            try:
                kept: PartialFile | None = await trio.to_thread.run_sync(
                    PartialFile.open, self.store, manifest)
            except OSError as exc:
                log.warning("sha1://%s is read by chunk without keeping its chunks in the"
                            " local store: %s", sha1, exc)
                kept = None
            shared = self._chunked.get(key)  # another opener may have made it meanwhile
            if shared is not None and kept is not None:
                kept.close()
            if shared is None:
                content = ChunkedContent(
                    manifest, self.ranges, source=source,
                    open_chunk=partial(self._read_all, channel), partial=kept,
                    nursery=self.nursery, on_lie=partial(self._lied, channel, manifest),
                    on_fetched=partial(self.downloads.add, channel, sha1),
                    on_bad_chunk=partial(self._bad_chunk, manifest), buffers=self._buffers)
                shared = self._chunked[key] = _Shared(content, streamed=request is not None)
        shared.readers += 1
        handle = SharedChunks(shared.content, partial(self._release_chunked, key, shared))
        if not self.strict:
            return handle
        try:
            offset = 0
            while offset < handle.size:  # each chunk verified; the whole, at the last one
                offset += len(await handle.read(offset, manifest.chunks[0].size))
        finally:
            handle.close()
        local = self._open_local(sha1)
        if local is None:
            raise KacheryError(f"sha1://{sha1} was read and verified whole but could not"
                               " be kept in the local store (is the disk full?): strict mode"
                               " serves only files that are there")
        return local

    async def _chunk_source(self, channel: str, sha1: str,
                            manifest: Manifest) -> ChunkSource | None:
        """Where the chunks of ``sha1`` are read from: the whole object, or chunk objects as
        content of their own (None): the bucket holds one or the other. When it holds
        neither (evicted, or never uploaded), the file is requested from the channel's
        nodes: its chunks as a provider streams them, or the whole object once it is
        there."""
        whole = WholeObject(manifest, self._url(channel, sha1))
        try:
            if await self._head(channel, sha1) == manifest.size:
                return whole
        except NotFound:
            pass
        try:
            for chunk in {manifest.chunks[0], manifest.chunks[-1]}:
                await self._head(channel, chunk.sha1)
            return None  # hub-era kachery's layout: chunks and manifest only
        except NotFound:
            pass
        request = self._request(channel, sha1)
        await request.wait_size()
        if request.manifest == manifest.hash:
            return self._streamed(channel, manifest, request)
        await request.wait_done()
        return whole

    def _streamed(self, channel: str, manifest: Manifest,
                  request: FileRequest) -> StreamedChunks:
        return StreamedChunks(manifest, request, partial(self._url, channel),
                              WholeObject(manifest, self._url(channel, manifest.sha1)),
                              request_again=partial(self._request, channel, manifest.sha1))

    def _url(self, channel: str, sha1: str) -> ObjectUrl:
        return self.urls.of(channel, object_key(channel, sha1))

    def _chunked_of(self, channel: str, sha1: str) -> Manifest | None:
        """The manifest of a :class:`ChunkedContent` of ``sha1`` that readers have open as
        a request streamed it (not one a reader named: that is trusted for its reads
        only)."""
        for (c, h, _), shared in self._chunked.items():
            if (c, h) == (channel, sha1) and shared.streamed and not shared.content.lied:
                return shared.content.manifest
        return None

    def _release_chunked(self, key: tuple[str, str, str], shared: _Shared) -> None:
        shared.readers -= 1
        if shared.readers == 0:
            if self._chunked.get(key) is shared:
                del self._chunked[key]
            shared.content.close()

    def _bad_chunk(self, manifest: Manifest, error: IntegrityError) -> None:
        """A chunk of ``manifest`` failed its hash: the manifest or the bucket's object is
        wrong. A manifest on record is dropped, so that the next open reads the file whole
        (verified against its own SHA-1, and the bad-object path takes over from there)."""
        known = self.store.cache.known_manifest(manifest.sha1)
        if known is not None and known[0] == manifest.hash:
            log.warning("%s; reading sha1://%s whole from now on", error, manifest.sha1)
            self.store.cache.forget_manifest(manifest.sha1, manifest.hash)

    def _lied(self, channel: str, manifest: Manifest, actual: str) -> None:
        """The chunks of ``manifest`` matched, but the whole file hashed to ``actual``."""
        self._lies[(manifest.sha1, manifest.hash)] = (
            f"manifest sha1://{manifest.hash} lies about sha1://{manifest.sha1}: its chunks"
            f" make sha1://{actual}")
        self.store.cache.forget_manifest(manifest.sha1, manifest.hash)
        self.nursery.start_soon(self._report_lie, channel, manifest, actual)

    async def _report_lie(self, channel: str, manifest: Manifest, actual: str) -> None:
        """Tell ``channel``'s hub (which drops the manifest if it vouched for it, and says
        who vouched). Never raises: the readers were told already."""
        with trio.move_on_after(LOOKUP_DEADLINE_S):
            try:
                await self.channels.hub_of(channel).report_manifest(
                    channel, manifest.sha1, manifest.hash, actual)
            except KacheryError as exc:
                log.warning("could not tell the hub of %s that manifest sha1://%s lies: %s",
                            channel, manifest.hash, exc)

    async def _head(self, channel: str, sha1: str) -> int:
        """The size of ``sha1``'s object in ``channel``'s bucket (``NotFound`` if absent),
        within :data:`LOOKUP_DEADLINE_S`."""
        url = self._url(channel, sha1)
        with trio.move_on_after(LOOKUP_DEADLINE_S):
            return await head_size(self.client, url)
        raise DeadlineExceeded(f"HEAD {url}: no answer within {LOOKUP_DEADLINE_S:.0f} s")

    async def _read_all(self, channel: str, sha1: str) -> bytes:
        """The verified bytes of ``sha1``, whole (a manifest, a chunk)."""
        content = await self.open(channel, sha1)
        try:
            return await content.read(0, content.size)
        finally:
            content.close()

    def _open_local(self, sha1: str) -> LocalContent | None:
        try:
            fd = self.store.open(sha1)
        except NotFound:
            return None
        return LocalContent(fd, os.fstat(fd).st_size)

    def _finished(self, channel: str, download: Download) -> None:
        if self._downloads.get(download.sha1) is download:
            del self._downloads[download.sha1]
        if isinstance(download.error, IntegrityError):
            key = (channel, download.sha1)
            self._bad[key] = str(download.error)
            if key not in self._disputed:  # once a while: a second bad copy is an error
                self._disputed[key] = True
                log.warning("%s; asking the hub to check it and the channel's nodes for"
                            " the file", download.error)
                self._request(channel, download.sha1, bad=True)
        elif isinstance(download.error, NotFound):
            # Gone from the bucket since its size was learnt (evicted by the hub): the next
            # open looks again, and asks the channel's nodes.
            self._sizes.pop((channel, download.sha1), None)
            log.info("sha1://%s left the bucket of %s while it was being fetched; asking"
                     " the channel's nodes for it", download.sha1, channel)
        elif download.hashed:  # bytes came from the bucket, even if cut short: demand
            self.downloads.add(channel, download.sha1, download.hashed)
