"""The client side of a GCS resumable upload (XML API), as nodes use it.

1. :func:`start_session` sends the hub-signed ``POST`` (``x-goog-resumable: start``)
   and gets a session URI; the URI itself is the credential from then on.
2. :func:`upload` ``PUT``s the file in chunks with ``Content-Range: bytes a-b/N``; each
   non-final chunk is answered ``308`` with ``Range: bytes=0-<committed-1>``, the final
   one ``200``/``201``.
3. :func:`query_offset` (``PUT`` with an empty body and ``Content-Range: bytes */N``)
   asks how much is committed, so an upload resumes after a fault or a restart.

Works the same against Google Cloud Storage and the hub's local bucket; knows nothing
of the hub. Errors are the project's (``kachery_fs.errors``), mapped in
``kachery_fs._http``.

Uploads to a GCS emulator (fake-gcs-server), which the hub marks with
:data:`EMULATOR_MARK`, go differently, and only they: that emulator commits a partial
upload as the whole object when asked for the session's status (step 3), and appends a
re-sent chunk a second time. So a marked session is never queried and no chunk of it is
ever sent twice: after any failure the session is dropped (``NotFound``, "start a new
session"), and the caller's next attempt starts a new one from the first byte.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import trio

from ._http import check_response, error_for_exception, error_for_response
from .errors import (
    Conflict,
    CorruptLocalFile,
    DeadlineExceeded,
    IntegrityError,
    InvalidInput,
    NotFound,
    ProtocolError,
    Unavailable,
)
from .protocol import SignedRequest
from .retry import Backoff, as_error, is_transient, pause

log = logging.getLogger(__name__)

#: Non-final chunks must be multiples of this (GCS's rule).
CHUNK_GRANULARITY = 256 * 1024

#: 16 MiB, as rclone uses for GCS: fewer round trips (and fsyncs on the local bucket) than 8.
DEFAULT_CHUNK_SIZE = 16 * 1024 * 1024

#: How much of a chunk is handed to httpx at a time (and counts as progress).
_SEND_SLICE = 256 * 1024

#: Session statuses that mean "this session is gone: start a new one".
_SESSION_GONE = (404, 410)

#: The URL fragment by which the hub marks an upload start as meant for a GCS emulator,
#: and which is kept on the session URI it yields (so that a session saved and resumed
#: later is still known for one). A fragment is never sent to the server.
EMULATOR_MARK = "kachery-fs-emulator"


def mark_emulator(url: str) -> str:
    """``url`` marked as a GCS emulator's (see the module's docstring)."""
    return f"{url.partition('#')[0]}#{EMULATOR_MARK}"


def is_emulator(url: str) -> bool:
    return url.partition("#")[2] == EMULATOR_MARK


async def start_session(client: httpx.AsyncClient, signed: SignedRequest) -> str:
    """Start a resumable upload with the signed request; return the session URI.

    Raises Conflict if the object already exists (``412``: callers treat it as
    "already uploaded"), PermissionDenied if the signature is refused, Unavailable on
    transient failures (the caller retries: a new session is as good as the old one).
    """
    what = "starting a resumable upload"
    try:
        response = await client.request(signed.method, signed.url, headers=signed.headers)
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None
    if response.status_code == 412:
        raise Conflict(f"{what}: the object already exists")
    check_response(response, what, ok=(200, 201))
    location = response.headers.get("location")
    if not location:
        raise ProtocolError(f"{what}: HTTP {response.status_code} without a Location")
    return mark_emulator(location) if is_emulator(signed.url) else location


async def query_offset(client: httpx.AsyncClient, session_uri: str, size: int) -> int | None:
    """How many bytes of the ``size``-byte upload the session has committed.

    ``None`` means the upload is complete (the object exists). Raises NotFound if the
    session is gone (expired or unknown: start a new one), Unavailable on transient
    failures, ProtocolError on an answer the protocol does not allow.

    An emulator's session is not asked (the question would commit it): NotFound.
    """
    what = "querying an upload session"
    if is_emulator(session_uri):
        raise NotFound(f"{what}: a GCS emulator's session cannot be asked how far it got"
                       " without ending it; start a new session")
    try:
        response = await client.put(session_uri, headers={"content-range": f"bytes */{size}"})
    except httpx.HTTPError as exc:
        raise error_for_exception(exc, what) from None
    if response.status_code in (200, 201):
        return None
    if response.status_code == 308:
        return _committed(response, what, size)
    raise _error(response, what)


async def upload(client: httpx.AsyncClient, session_uri: str, path: Path | int, size: int, *,
                 offset: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 on_progress: Callable[[int], None] | None = None,
                 stall_timeout: float = 60, sha1: str | None = None,
                 rate_limit: RateLimit | None = None, base: int = 0) -> None:
    """Send bytes ``offset..size`` of ``path`` to the session, in ``chunk_size`` chunks
    (``path`` may be a descriptor, which the caller keeps open until this returns).
    With ``base``, the object is the ``size`` bytes of ``path`` from ``base`` on (a chunk
    of a large file, uploaded as an object of its own).

    ``offset`` is what the session had committed (from :func:`query_offset` or a
    persisted ``on_progress`` value). ``on_progress(committed)`` is called after every
    acknowledged chunk, so the caller can persist it. Transient failures (Unavailable,
    transport errors) are retried with backoff, re-asking the session where to go on;
    the upload gives up with DeadlineExceeded only after ``stall_timeout`` seconds
    without progress (bytes sent or committed).

    With ``sha1``, the bytes are hashed as they are read and the final chunk is sent only
    if the whole file matches: a file that fails its own SHA-1 check is never committed
    (IntegrityError).

    Raises NotFound if the session is gone, Conflict if the object appeared meanwhile
    (the final chunk met ``x-goog-if-generation-match: 0``), IntegrityError if the file
    changed size, ProtocolError on an answer the protocol does not allow, and the
    mapped errors of other refusals (InvalidInput, PermissionDenied).
    """
    if chunk_size <= 0 or chunk_size % CHUNK_GRANULARITY:
        raise InvalidInput(f"chunk size must be a positive multiple of {CHUNK_GRANULARITY}")
    if not 0 <= offset <= size:
        raise InvalidInput(f"offset {offset} is outside the {size}-byte upload")
    await _Upload(client, session_uri, path, size, committed=offset, chunk_size=chunk_size,
                  on_progress=on_progress, stall_timeout=stall_timeout,
                  verifier=_Verifier(path, sha1, base) if sha1 else None, rate_limit=rate_limit,
                  base=base).run()


class _Upload:
    """One run of :func:`upload`: what the session has committed, and how long since it moved."""

    def __init__(self, client: httpx.AsyncClient, session_uri: str, path: Path | int,
                 size: int, *,
                 committed: int, chunk_size: int, on_progress: Callable[[int], None] | None,
                 stall_timeout: float, verifier: _Verifier | None = None,
                 rate_limit: RateLimit | None = None, base: int = 0):
        self.verifier = verifier
        self.base = base
        self.rate_limit = rate_limit
        self.client = client
        self.session_uri = session_uri
        self.path = path
        self.size = size
        self.committed = committed
        self.chunk_size = chunk_size
        self.on_progress = on_progress
        self.watch = _StallWatch(stall_timeout)
        self.backoff = Backoff()
        self.complete = False

    async def run(self) -> None:
        while not self.complete:
            try:
                with self.watch.scope():
                    await self._send_chunks()
            except (Unavailable, httpx.HTTPError) as exc:
                if is_emulator(self.session_uri):
                    raise NotFound(f"{_transient(exc)}; a GCS emulator's session is not"
                                   " resumed: start a new session") from None
                await self._recover(_transient(exc))

    async def _send_chunks(self) -> None:
        """Send chunks from the committed offset until the session reports completion."""
        while not self.complete:
            end = min(self.committed + self.chunk_size, self.size)
            if self.verifier is None:
                data = await trio.to_thread.run_sync(_read_range, self.path,
                                                     self.base + self.committed,
                                                     end - self.committed)
            else:
                data = await trio.to_thread.run_sync(self.verifier.read, self.committed,
                                                     end - self.committed, self.size)
            self._advance(await _put_chunk(self.client, self.session_uri, data,
                                           self.committed, self.size, self.watch,
                                           self.rate_limit))

    async def _recover(self, error: Unavailable) -> None:
        """After a transient ``error``: back off, then ask the session where to resume.

        Raises DeadlineExceeded once nothing has moved for the stall timeout.
        """
        while True:
            with trio.move_on_after(max(0.0, self.watch.remaining())):
                await pause(self.backoff, error, at_deadline="wait")
            if self.watch.remaining() <= 0:
                raise DeadlineExceeded(f"upload made no progress for {self.watch.timeout:g} s;"
                                       f" last error: {error}") from None
            try:
                with self.watch.scope():
                    self._advance(await query_offset(self.client, self.session_uri, self.size))
                return
            except (Unavailable, httpx.HTTPError) as exc:
                error = _transient(exc)

    def _advance(self, committed: int | None) -> None:
        """Adopt the session's committed count (``None``: complete) and report it."""
        if committed is None:
            self.complete, committed = True, self.size
        elif committed < self.committed:
            log.warning("upload session went back from %d to %d committed bytes",
                        self.committed, committed)
        if committed > self.committed:
            self.watch.progressed()
            self.backoff.reset()
        self.committed = committed
        if self.on_progress is not None:
            self.on_progress(committed)


class _Verifier:
    """Hashes a file in order as it is read for upload; checks the digest before the end."""

    def __init__(self, path: Path | int, sha1: str, base: int = 0):
        self.path = path
        self.base = base  # where the object starts in the file
        self.expected = sha1.lower()
        self.hasher = hashlib.sha1()
        self.hashed = 0

    def read(self, offset: int, length: int, size: int) -> bytes:
        """Bytes ``offset..offset+length`` (blocking). Raises IntegrityError before
        handing out the last bytes of a file whose SHA-1 is not the expected one."""
        while self.hashed < offset:  # the session is ahead of us (a resumed upload)
            self.hasher.update(_read_range(self.path, self.base + self.hashed,
                                           min(DEFAULT_CHUNK_SIZE, offset - self.hashed)))
            self.hashed = min(self.hashed + DEFAULT_CHUNK_SIZE, offset)
        data = _read_range(self.path, self.base + offset, length)
        end = offset + length
        if end > self.hashed:
            self.hasher.update(memoryview(data)[self.hashed - offset:])
            self.hashed = end
        if end == size and self.hasher.hexdigest() != self.expected:
            what = (_named(self.path) if not self.base else
                    f"the chunk at bytes {self.base:,}-{self.base + size - 1:,} of"
                    f" {_named(self.path)}")
            raise CorruptLocalFile(f"{what} does not match its SHA-1 {self.expected} (it"
                                   f" hashes to {self.hasher.hexdigest()}); not uploading it")
        return data


def _transient(exc: Exception) -> Unavailable:
    """``exc`` (an ``Unavailable`` or an ``httpx`` error) as the transient error it is;
    raises it, mapped, if it is not (an untrusted certificate)."""
    err = as_error(exc, "upload")
    if not is_transient(err):
        raise err from None
    assert isinstance(err, Unavailable)  # what is_transient means of a mapped error
    return err


async def _put_chunk(client: httpx.AsyncClient, session_uri: str, data: bytes, first: int,
                     size: int, watch: _StallWatch,
                     rate_limit: RateLimit | None = None) -> int | None:
    """``PUT`` one chunk; return the committed byte count, or ``None`` if the upload is done."""
    last = first + len(data) - 1
    final = last + 1 == size
    content_range = f"bytes {first}-{last}/{size}" if data else f"bytes */{size}"
    what = f"uploading bytes {first}-{last} of {size}" if data else "finishing an upload"
    response = await client.put(session_uri, content=_slices(data, watch, rate_limit), headers={
        "content-range": content_range, "content-length": str(len(data))})
    if response.status_code in (200, 201):
        if not final:
            raise ProtocolError(f"{what}: upload reported complete before its last chunk")
        return None
    if response.status_code == 308:
        committed = _committed(response, what, size)
        if committed < first or committed > last + 1 or (final and committed == size):
            raise ProtocolError(f"{what}: the session reports {committed} bytes committed")
        return committed
    raise _error(response, what)


def _committed(response: httpx.Response, what: str, size: int) -> int:
    """The committed byte count of a ``308``'s ``Range: bytes=0-N`` (no header: 0)."""
    value = response.headers.get("range")
    if value is None:
        return 0
    unit, _, span = value.partition("=")
    first, _, last = span.partition("-")
    if unit.strip() != "bytes" or first != "0" or not last.isdigit() or int(last) >= size:
        raise ProtocolError(f"{what}: unexpected Range {value!r} in a 308")
    return int(last) + 1


def _error(response: httpx.Response, what: str) -> Exception:
    if response.status_code in _SESSION_GONE:
        return NotFound(f"{what}: the upload session is gone (HTTP {response.status_code})")
    if response.status_code == 412:
        return Conflict(f"{what}: the object already exists")
    return error_for_response(response, what)


def _read_range(source: Path | int, offset: int, length: int) -> bytes:
    """Bytes ``offset..offset+length`` of ``source`` (a path, or a descriptor the caller
    keeps open). Blocking. IntegrityError if short."""
    if isinstance(source, int):
        data = os.pread(source, length, offset)
    else:
        with open(source, "rb") as f:
            data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise IntegrityError(f"{_named(source)} is shorter than the {offset + length} bytes"
                             " being uploaded")
    return data


def _named(source: Path | int) -> str:
    return "the file being uploaded" if isinstance(source, int) else str(source)


async def _slices(data: bytes, watch: _StallWatch,
                  rate_limit: RateLimit | None = None) -> AsyncIterator[bytes]:
    """A chunk as a request body, handed out in slices so each one counts as progress."""
    view = memoryview(data)
    for start in range(0, len(view), _SEND_SLICE):
        piece = bytes(view[start:start + _SEND_SLICE])
        if rate_limit is not None:
            await rate_limit.consume(len(piece))
        yield piece
        watch.progressed()


class RateLimit:
    """An upload bandwidth limit in bytes per second, shared by the uploads it is given to
    (``--bwlimit``, as rclone calls it)."""

    def __init__(self, bytes_per_s: float):
        if bytes_per_s <= 0:
            raise InvalidInput("a bandwidth limit must be positive")
        self.rate = float(bytes_per_s)
        self._next = 0.0  # trio time at which the next byte may go

    async def consume(self, nbytes: int) -> None:
        now = trio.current_time()
        start = max(self._next, now)
        self._next = start + nbytes / self.rate
        if start > now:
            await trio.sleep(start - now)


def parse_rate(text: str) -> float:
    """``"2M"`` → 2 MiB/s; accepts a plain number of bytes or K, M, G suffixes (powers of 1024)."""
    units = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise InvalidInput(f"not a bandwidth: {text!r} (examples: 500K, 2M, 1G)") from None
    if value <= 0:
        raise InvalidInput(f"a bandwidth limit must be positive: {text!r}")
    return value


class _StallWatch:
    """Cancels the request in flight once nothing has moved for ``timeout`` seconds."""

    def __init__(self, timeout: float):
        self.timeout = timeout
        self._last = trio.current_time()
        self._scope: trio.CancelScope | None = None

    def progressed(self) -> None:
        self._last = trio.current_time()
        if self._scope is not None:
            self._scope.deadline = self._last + self.timeout

    def remaining(self) -> float:
        return self._last + self.timeout - trio.current_time()

    @contextmanager
    def scope(self) -> Iterator[None]:
        """Run the body under a deadline that follows progress; a stall -> DeadlineExceeded."""
        with trio.CancelScope(deadline=self._last + self.timeout) as scope:
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
        if scope.cancelled_caught:
            raise DeadlineExceeded(f"upload made no progress for {self.timeout:g} s")
