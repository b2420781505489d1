"""Kachery manifests: a large file as 20,000,000-byte chunks, each with its own SHA-1
(reference: kachery.md §1.4).

A file of more than :data:`CHUNK_SIZE` bytes has a manifest; a smaller one has none. The
manifest is JSON, compact and in this key order (what kachery's JavaScript and Python
both write, so both hash it the same)::

    {"size":N,"sha1":"<whole file>","chunks":[{"start":0,"end":20000000,"sha1":"<chunk>"},…]}

and is stored as ordinary content under its own SHA-1, the *manifest hash*. A URI names it
as ``sha1://<whole>/<name>?manifest=<manifest hash>``.

Nothing here decides whether a manifest is to be trusted: :meth:`Manifest.parse` checks
that its bytes are a well-formed manifest of the claimed file (contiguous chunks of the
right sizes covering exactly ``size`` bytes), not that its chunk hashes are true. A reader
that serves bytes by chunk must hold a manifest whose hash it trusts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from .errors import IntegrityError, InvalidInput
from .uris import is_sha1

#: kachery's chunk size: decimal, not MiB.
CHUNK_SIZE = 20_000_000
#: A manifest of a file this size has this many chunks; past it, a "manifest" is no
#: kachery manifest (and parsing one must not cost unbounded memory).
MAX_CHUNKS = 10_000_000
#: The largest manifest a reader or the hub fetches (about 160,000 chunks: files of 3 TB);
#: an object named as a manifest that is larger is refused before it is read.
MAX_BYTES = 16 << 20


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    sha1: str

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Manifest:
    size: int
    sha1: str
    chunks: tuple[Chunk, ...]

    def to_bytes(self) -> bytes:
        """The manifest as kachery writes it: compact JSON, keys in kachery's order."""
        doc = {"size": self.size, "sha1": self.sha1,
               "chunks": [{"start": c.start, "end": c.end, "sha1": c.sha1} for c in self.chunks]}
        return json.dumps(doc, separators=(",", ":")).encode()

    @property
    def hash(self) -> str:
        """The manifest hash: the SHA-1 of :meth:`to_bytes`."""
        return hashlib.sha1(self.to_bytes()).hexdigest()

    def chunk_indexes(self, offset: int, length: int) -> range:
        """The indexes of the chunks that bytes ``[offset, offset + length)`` overlap (an
        empty range past the end or for no bytes)."""
        if offset < 0 or length < 0:
            raise InvalidInput("offset and length must not be negative")
        end = min(offset + length, self.size)
        if offset >= end:
            return range(0)
        return range(offset // CHUNK_SIZE, (end - 1) // CHUNK_SIZE + 1)

    @classmethod
    def of_chunks(cls, size: int, sha1: str, chunk_sha1s: Sequence[str]) -> Manifest | None:
        """The manifest of a file of ``size`` bytes that hashes to ``sha1`` and whose
        chunks, in order, hash to ``chunk_sha1s`` (None for a file of at most one chunk:
        it has no manifest)."""
        if size <= CHUNK_SIZE:
            return None
        if len(chunk_sha1s) != -(-size // CHUNK_SIZE):
            raise ValueError(f"a file of {size:,} bytes has {-(-size // CHUNK_SIZE):,}"
                             f" chunks, not {len(chunk_sha1s):,}")
        return cls(size, sha1, tuple(
            Chunk(i * CHUNK_SIZE, min((i + 1) * CHUNK_SIZE, size), chunk_sha1)
            for i, chunk_sha1 in enumerate(chunk_sha1s)))

    @classmethod
    def parse(cls, data: bytes, *, sha1: str | None = None) -> Manifest:
        """The manifest in ``data``; ``IntegrityError`` unless it is a well-formed kachery
        manifest (of the file ``sha1``, when given)."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError("not a kachery manifest: not JSON") from None
        except RecursionError:  # [[[[...]]]]: nested past what the parser follows
            raise IntegrityError("not a kachery manifest: JSON nested too deeply") from None
        if not isinstance(doc, dict):
            raise IntegrityError("not a kachery manifest: not a JSON object")
        size, whole, chunks = doc.get("size"), doc.get("sha1"), doc.get("chunks")
        if not _is_count(size) or not is_sha1(whole) or not isinstance(chunks, list):
            raise IntegrityError("not a kachery manifest: it needs size, sha1 and chunks")
        if sha1 is not None and whole.lower() != sha1.lower():
            raise IntegrityError(f"the manifest is of sha1://{whole.lower()}, not of"
                                 f" sha1://{sha1.lower()}")
        if size <= CHUNK_SIZE:
            raise IntegrityError(f"a kachery manifest is of more than {CHUNK_SIZE:,} bytes,"
                                 f" not {size:,}")
        expected = -(-size // CHUNK_SIZE)
        if expected > MAX_CHUNKS or len(chunks) != expected:
            raise IntegrityError(f"a manifest of {size:,} bytes has {expected:,} chunks, not"
                                 f" {len(chunks):,}")
        parsed = []
        for i, chunk in enumerate(chunks):
            start, end = i * CHUNK_SIZE, min((i + 1) * CHUNK_SIZE, size)
            if not (isinstance(chunk, dict) and chunk.get("start") == start
                    and chunk.get("end") == end and _is_count(chunk.get("start"))
                    and _is_count(chunk.get("end")) and is_sha1(chunk.get("sha1"))):
                raise IntegrityError(f"chunk {i} of the manifest is not bytes {start:,} to"
                                     f" {end:,} with a SHA-1")
            parsed.append(Chunk(start, end, chunk["sha1"].lower()))
        return cls(size, whole.lower(), tuple(parsed))


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ManifestBuilder:
    """Hash a file as it is written (in order): its SHA-1 and, past :data:`CHUNK_SIZE`
    bytes, its manifest."""

    def __init__(self) -> None:
        self._whole = hashlib.sha1()
        self._chunk = hashlib.sha1()
        self._in_chunk = 0
        self._size = 0
        self._chunks: list[Chunk] = []

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        self._whole.update(view)
        self._size += len(view)
        while view:
            take = min(len(view), CHUNK_SIZE - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK_SIZE:
                self._close_chunk()

    def _close_chunk(self) -> None:
        start = len(self._chunks) * CHUNK_SIZE
        self._chunks.append(Chunk(start, start + self._in_chunk, self._chunk.hexdigest()))
        self._chunk = hashlib.sha1()
        self._in_chunk = 0

    def finish(self) -> tuple[str, Manifest | None]:
        """The file's SHA-1, and its manifest (None for a file of at most one chunk)."""
        if self._in_chunk:
            self._close_chunk()
        sha1 = self._whole.hexdigest()
        if self._size <= CHUNK_SIZE:
            return sha1, None
        return sha1, Manifest(self._size, sha1, tuple(self._chunks))


def manifest_of(blocks: Iterable[bytes]) -> tuple[str, Manifest | None]:
    """The SHA-1 and manifest of the bytes ``blocks`` yield, in order."""
    builder = ManifestBuilder()
    for block in blocks:
        builder.update(block)
    return builder.finish()


def manifest_of_file(path: Path, *, block_size: int = 1 << 20) -> tuple[str, Manifest | None]:
    """The SHA-1 and manifest of the file at ``path``."""
    with open(path, "rb") as f:
        return manifest_of(iter(lambda: f.read(block_size), b""))
