"""A large file read by chunk, through a manifest whose hash the reader trusts.

:class:`ChunkedContent` serves ``[offset, offset + size)`` of a file by fetching only the
chunks that range overlaps, and verifies each chunk against its SHA-1 in the manifest
before it serves a byte of it. A chunk comes from a ranged ``GET`` of the whole object
when the bucket holds it (as kachery-fs uploads a file), else as a content object of its
own, through the resolver (the bucket under the chunk's hash, as hub-era kachery stores
large files, or a request to the channel's nodes).

The manifest must be trusted: its hash came from the user (``?manifest=`` in a URI).
Verification is then per chunk; whoever reads the whole file can check the whole SHA-1
too (``kachery-fs cat`` does).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import httpx
import trio

from .bucket import fetch_range
from .errors import IntegrityError
from .manifest import Manifest

log = logging.getLogger(__name__)

#: Verified chunks kept in memory per open file (20,000,000 bytes each).
KEPT_CHUNKS = 2


class ChunkedContent:
    """Readable bytes of one large file, chunk by chunk (the resolver's ``Content``)."""

    def __init__(self, manifest: Manifest, client: httpx.AsyncClient, *,
                 whole_url: str | None,
                 open_chunk: Callable[[str], Awaitable[bytes]]):
        """``whole_url``: the whole object in the bucket, or None; ``open_chunk(sha1)``:
        the verified bytes of a chunk as content of its own."""
        self.manifest = manifest
        self.size = manifest.size
        self._client = client
        self._whole_url = whole_url
        self._open_chunk = open_chunk
        self._kept: OrderedDict[int, bytes] = OrderedDict()
        self._locks: dict[int, trio.Lock] = {}
        #: How many chunks were fetched (not served from memory).
        self.fetched = 0

    async def read(self, offset: int, size: int) -> bytes:
        pieces = []
        end = offset + size
        for i in self.manifest.chunk_indexes(offset, size):
            chunk = self.manifest.chunks[i]
            data = await self._chunk(i)
            pieces.append(data[max(offset, chunk.start) - chunk.start:
                               min(end, chunk.end) - chunk.start])
        return b"".join(pieces)

    async def _chunk(self, i: int) -> bytes:
        lock = self._locks.setdefault(i, trio.Lock())
        async with lock:  # concurrent readers of one chunk fetch it once
            data = self._kept.get(i)
            if data is None:
                data = await self._fetch(i)
                self.fetched += 1
                self._kept[i] = data
                while len(self._kept) > KEPT_CHUNKS:
                    self._kept.popitem(last=False)
            else:
                self._kept.move_to_end(i)
            return data

    async def _fetch(self, i: int) -> bytes:
        chunk = self.manifest.chunks[i]
        if self._whole_url is not None:
            data = await fetch_range(self._client, self._whole_url, chunk.start, chunk.end)
        else:
            data = await self._open_chunk(chunk.sha1)
        digest = await trio.to_thread.run_sync(lambda: hashlib.sha1(data).hexdigest())
        if len(data) != chunk.size or digest != chunk.sha1:
            raise IntegrityError(
                f"chunk {i} (bytes {chunk.start:,}-{chunk.end - 1:,}) of"
                f" sha1://{self.manifest.sha1} does not match its SHA-1 in the manifest")
        return data

    def close(self) -> None:
        self._kept.clear()
