"""The local bucket's HTTP layer: GCS's error answers and names, and a raw ASGI request.

Written by hand over ASGI (no web framework): requests are parsed as GCS's XML API reads
them (percent-decoded path and query, repeated headers kept in order), errors are answered
as GCS answers them (:class:`GcsError`, an XML body), and bodies stream both ways in
bounded pieces (:data:`READ_CHUNK` out, :data:`WRITE_BATCH` in) with a stall timeout.
It opens no file: the app hands it open descriptors and write callables.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote
from xml.sax.saxutils import escape

import trio

from ..errors import InvalidInput

#: How much of a file one read (and one ASGI body message) carries when serving it.
READ_CHUNK = 1 << 20

#: How much received body we gather before handing it to a worker thread to write.
WRITE_BATCH = 4 << 20

#: A request body that delivers nothing for this long is given up (``408``): its sender is
#: gone or stuck. Twice the uploader's own stall timeout, so that a slow but live sender
#: gives up first, on its side, and resumes.
BODY_STALL_TIMEOUT_S = 120.0

CONTENT_TYPE = "application/octet-stream"

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")
_BYTE_RANGE = re.compile(r"(\d{0,20})-(\d{0,20})")  # longer numbers: malformed


class GcsError(Exception):
    """A refusal, answered the way GCS's XML API answers it (status, code, message)."""

    def __init__(self, status: int, code: str, message: str, *, details: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def _no_such_key(bucket: str, key: str) -> GcsError:
    return GcsError(404, "NoSuchKey", "The specified key does not exist.",
                    details=f"No such object: {bucket}/{key}")


def _no_such_upload() -> GcsError:
    return GcsError(404, "NoSuchUpload", "The requested upload was not found or has expired.")


def _invalid(message: str) -> GcsError:
    return GcsError(400, "InvalidArgument", message)


def _precondition_failed() -> GcsError:
    return GcsError(412, "PreconditionFailed",
                    "At least one of the pre-conditions you specified did not hold.")


# -- names ----------------------------------------------------------------------------------


def check_bucket_name(bucket: str) -> str:
    """``bucket`` if it is a valid bucket name (GCS's rules; never ``api``), else InvalidInput."""
    if not isinstance(bucket, str) or not _BUCKET_NAME.fullmatch(bucket) or bucket == "api":
        raise InvalidInput(f"invalid bucket name {bucket!r}")
    return bucket


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(key: str) -> str:
    """``key`` if it can name an object file, else InvalidInput.

    Refused: empty keys, absolute paths, empty, ``.`` or ``..`` segments, control
    characters, and keys over GCS's 1024-byte limit.
    """
    if not isinstance(key, str) or not key or len(key.encode("utf-8", "replace")) > 1024:
        raise InvalidInput(f"invalid object key {key!r}")
    if _CONTROL.search(key):
        raise InvalidInput(f"invalid object key {key!r}: control character")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise InvalidInput(f"invalid object key {key!r}: empty, '.' or '..' path segment")
    return key


# -- requests and responses -----------------------------------------------------------------


@dataclass
class _Request:
    """The parts of an ASGI HTTP request that we look at."""

    method: str
    path: str  # percent-decoded, as "/<bucket>/<key>"
    query: list[tuple[str, str]]
    headers: dict[str, list[str]]  # lowercase name -> values in order
    scheme: str
    receive: Callable

    @classmethod
    def from_scope(cls, scope: dict, receive: Callable) -> _Request:
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        return cls(method=scope["method"].upper(), path=scope["path"],
                   query=_parse_query(scope.get("query_string", b"")), headers=headers,
                   scheme=scope.get("scheme", "http"), receive=receive)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return None if values is None else ",".join(values)

    def query_value(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    @property
    def host(self) -> str:
        return self.header("host") or "localhost"

    def object_name(self) -> tuple[str, str]:
        """``(bucket, key)`` named by the path; ``400`` if they are not valid names."""
        bucket, _, key = self.path.lstrip("/").partition("/")
        try:
            return check_bucket_name(bucket), check_key(key)
        except InvalidInput as exc:
            raise _invalid(str(exc)) from None

    def content_length(self) -> int | None:
        value = self.header("content-length")
        if value is None:
            return None
        if not value.isdigit():
            raise _invalid("Content-Length must be a number")
        return int(value)


def _parse_query(raw: bytes) -> list[tuple[str, str]]:
    """Query parameters, percent-decoded (``+`` stays ``+``, as in V4 canonicalization)."""
    pairs = []
    for part in raw.decode("latin-1").split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


class _ClientGone(Exception):
    """The client disconnected before we could answer."""


async def _respond(send: Callable, status: int, headers: list[tuple[str, str]],
                   body: bytes = b"") -> None:
    """A whole response; ``Content-Length`` is added unless ``headers`` has one."""
    if not any(name == "content-length" for name, _ in headers):
        headers = [*headers, ("content-length", str(len(body)))]
    await _start_response(send, status, headers)
    await send({"type": "http.response.body", "body": body})


async def _start_response(send: Callable, status: int, headers: list[tuple[str, str]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]})


async def _send_error(send: Callable, error: GcsError, *, head: bool) -> None:
    xml = f"<Code>{escape(error.code)}</Code><Message>{escape(error.message)}</Message>"
    if error.details:
        xml += f"<Details>{escape(error.details)}</Details>"
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error>{xml}</Error>".encode()
    headers = [("content-type", "application/xml; charset=UTF-8"), *error.headers,
               ("content-length", str(len(body)))]
    await _respond(send, error.status, headers, b"" if head else body)


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- ranges ---------------------------------------------------------------------------------


def select_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` that a ``Range`` header selects.

    ``None`` means "serve the whole object with 200": no header, a malformed one, or
    several ranges (GCS serves single ranges only; RFC 9110 lets a server ignore
    ``Range``). Raises ``416 InvalidRange`` (with ``Content-Range: bytes */size``) when
    the range starts at or past the end, for ``bytes=-0``, and for any range of an empty
    object, as GCS does.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _BYTE_RANGE.fullmatch(spec.strip())
    if match is None or not (match[1] or match[2]):
        return None
    if match[1]:
        first = int(match[1])
        last = int(match[2]) if match[2] else size - 1
        if last < first and match[2]:
            return None  # syntactically invalid (RFC 9110 14.1.1): ignore the header
        if first >= size:
            raise _unsatisfiable(size)
        return first, min(last, size - 1)
    suffix = int(match[2])
    if suffix == 0 or size == 0:
        raise _unsatisfiable(size)
    return max(0, size - suffix), size - 1


def _unsatisfiable(size: int) -> GcsError:
    return GcsError(416, "InvalidRange", "The requested range cannot be satisfied.",
                    headers=(("content-range", f"bytes */{size}"),))


# -- uploads --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkRange:
    """A resumable-upload ``Content-Range``: bytes ``first..last`` of ``total``.

    ``first``/``last`` are ``None`` for a status query (``bytes */N``); ``total`` is
    ``None`` when the client does not know it yet (``/*``).
    """

    first: int | None
    last: int | None
    total: int | None

    @property
    def is_query(self) -> bool:
        return self.first is None

    @property
    def length(self) -> int:
        if self.first is None:
            return 0
        assert self.last is not None  # first and last are both set, or neither
        return self.last - self.first + 1


def _parse_content_range(request: _Request) -> _ChunkRange:
    """The chunk a session ``PUT`` carries. Without ``Content-Range`` the body is the
    whole object (as GCS treats it)."""
    value = request.header("content-range")
    if value is None:
        length = request.content_length()
        if length is None:
            raise GcsError(411, "MissingContentLength", "A session PUT needs Content-Range "
                           "or Content-Length.")
        return _ChunkRange(None, None, 0) if length == 0 else _ChunkRange(0, length - 1, length)
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise _invalid(f"malformed Content-Range {value!r}")
    total = None if match[3] == "*" else int(match[3])
    if match[1] is None:
        return _ChunkRange(None, None, total)
    first, last = int(match[1]), int(match[2])
    if last < first:
        raise _invalid(f"malformed Content-Range {value!r}")
    return _ChunkRange(first, last, total)


def _generation_match(request: _Request) -> int | None:
    value = request.header("x-goog-if-generation-match")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise _invalid("x-goog-if-generation-match must be a number")
    return int(value)


def _length_range(request: _Request) -> tuple[int, int] | None:
    value = request.header("x-goog-content-length-range")
    if value is None:
        return None
    low, _, high = value.partition(",")
    if not (low.strip().isdigit() and high.strip().isdigit()) or int(low) > int(high):
        raise _invalid("x-goog-content-length-range must be MIN,MAX")
    return int(low), int(high)


def _check_length(size: int, length_range: tuple[int, int] | None) -> None:
    """``400 EntityTooSmall/EntityTooLarge`` unless ``size`` is within ``length_range``."""
    if length_range is None:
        return
    low, high = length_range
    if size > high:
        raise GcsError(400, "EntityTooLarge", f"The upload is {size} bytes or more; the "
                       f"signed length range allows at most {high}.")
    if size < low:
        raise GcsError(400, "EntityTooSmall", f"The upload is {size} bytes; the signed length "
                       f"range requires at least {low}.")



def _range_header(committed: int) -> list[tuple[str, str]]:
    return [("range", f"bytes=0-{committed - 1}")] if committed else []


async def _receive_body(receive: Callable, write: Callable[[bytes], object], *,
                        limit: int | None, skip: int = 0) -> int:
    """Feed the request body, minus its first ``skip`` bytes, to the blocking ``write``
    (in a worker thread, in batches of :data:`WRITE_BATCH`); return the body's length.

    Raises ``400 EntityTooLarge`` as soon as the body exceeds ``limit``, ``408
    RequestTimeout`` when nothing arrives for :data:`BODY_STALL_TIMEOUT_S`, and
    :class:`_ClientGone` if the client disconnects.
    """
    received = 0
    batch = bytearray()
    while True:
        message = None
        with trio.move_on_after(BODY_STALL_TIMEOUT_S):
            message = await receive()
        if message is None:
            raise GcsError(408, "RequestTimeout", f"No part of the request body arrived "
                           f"for {BODY_STALL_TIMEOUT_S:g} s.")
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        data = message.get("body", b"")
        received += len(data)
        if limit is not None and received > limit:
            raise GcsError(400, "EntityTooLarge", f"The request body is longer than the "
                           f"{limit} bytes announced or allowed.")
        if skip:
            dropped = min(skip, len(data))
            data, skip = data[dropped:], skip - dropped
        batch += data
        more = message.get("more_body", False)
        if batch and (len(batch) >= WRITE_BATCH or not more):
            chunk, batch = bytes(batch), bytearray()
            await trio.to_thread.run_sync(write, chunk)
        if not more:
            return received



async def _send_file(fd: int, first: int, length: int, receive: Callable, send: Callable) -> None:
    """Send ``length`` bytes of ``fd`` from ``first`` as body messages of up to 1 MiB.

    Each read runs in a worker thread (a cold disk must not stall the event loop); a
    client that disconnects stops the loop instead of letting it read to the end.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        offset, end = first, first + length
        while offset < end:
            size = min(READ_CHUNK, end - offset)
            data = await trio.to_thread.run_sync(os.pread, fd, size, offset)
            if len(data) != size:
                # Objects are replaced, never rewritten in place, so this is a bug or a
                # hand-edited bucket; dropping the connection tells the client it is short.
                raise OSError(f"object shrank while being served ({offset + len(data)} bytes)")
            offset += size
            await send({"type": "http.response.body", "body": data, "more_body": offset < end})
        nursery.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Callable, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
