"""The local bucket's ASGI app: public and signed reads, signed PUTs, resumable uploads.

:func:`create_app` serves a :class:`~kachery_fs.localbucket.store.LocalBucket` at paths
``/<bucket>/<key>``; the behaviour it keeps is described in :mod:`kachery_fs.localbucket`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from email.utils import formatdate
from urllib.parse import quote

import trio

from .http import (
    CONTENT_TYPE,
    GcsError,
    _check_length,
    _ChunkRange,
    _ClientGone,
    _generation_match,
    _invalid,
    _length_range,
    _lifespan,
    _no_such_key,
    _no_such_upload,
    _parse_content_range,
    _range_header,
    _receive_body,
    _Request,
    _respond,
    _send_error,
    _send_file,
    _start_response,
    select_range,
)
from .sigv4 import verify_signed_request
from .store import (
    _UPLOAD_ID,
    LocalBucket,
    ObjectInfo,
    UploadSession,
    _fsync_dir,
    _open_for_append,
    _SessionTurn,
    _sync_and_close,
)

log = logging.getLogger(__name__)

#: Non-final chunks of a resumable upload must be multiples of this (as in GCS).
CHUNK_GRANULARITY = 256 * 1024


def create_app(bucket: LocalBucket):
    """The ASGI app serving ``bucket`` at paths ``/<bucket>/<key>``."""
    return _BucketApp(bucket)


class _BucketApp:
    """A raw ASGI app: GET/HEAD public reads, signed PUT, resumable POST + session PUTs.

    Handlers raise :class:`GcsError` only before they start a response; it is turned
    into GCS's XML error answer here, and nowhere else.
    """

    def __init__(self, bucket: LocalBucket):
        self.bucket = bucket

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = _Request.from_scope(scope, receive)
        try:
            await self._dispatch(request, send)
        except GcsError as error:
            if error.status >= 500 or error.status in (403, 409):
                log.info("%s %s: %s", request.method, request.path, error)
            await _send_error(send, error, head=request.method == "HEAD")
        except _ClientGone:
            log.debug("%s %s: client went away", request.method, request.path)

    async def _dispatch(self, request: _Request, send) -> None:
        method = request.method
        if method in ("GET", "HEAD"):
            await self._get_object(request, send)
        elif method == "PUT" and (upload_id := request.query_value("upload_id")) is not None:
            await self._put_session(request, send, upload_id)
        elif method == "PUT":
            await self._put_object(request, send)
        elif method == "POST":
            await self._start_session(request, send)
        else:
            raise GcsError(405, "MethodNotAllowed",
                           f"{method} is not supported by the local bucket.")

    def _verify(self, request: _Request) -> None:
        verify_signed_request(request, self.bucket.public_keys, self.bucket.clock())

    # -- reads --------------------------------------------------------------------------------


    async def _get_object(self, request: _Request, send) -> None:
        bucket, key = request.object_name()
        if request.query_value("X-Goog-Signature") is not None:
            self._verify(request)  # a signed read: of this object, with this method, in time
        elif self.bucket.is_private(bucket, key):
            raise GcsError(403, "AccessDenied", "Anonymous caller does not have"
                           " storage.objects.get access to the Google Cloud Storage object.")
        try:
            fd, info = await trio.to_thread.run_sync(self.bucket.open_object, bucket, key)
        except FileNotFoundError:
            raise _no_such_key(bucket, key) from None
        try:
            selected = select_range(request.header("range"), info.size)
            headers = _object_headers(info)
            if selected is None:
                status, first, length = 200, 0, info.size
            else:
                status, first, length = 206, selected[0], selected[1] - selected[0] + 1
                headers.append(("content-range",
                                f"bytes {selected[0]}-{selected[1]}/{info.size}"))
            headers.append(("content-length", str(length)))
            await _start_response(send, status, headers)
            if request.method == "HEAD" or length == 0:
                await send({"type": "http.response.body", "body": b""})
            else:
                await _send_file(fd, first, length, request.receive, send)
        finally:
            os.close(fd)

    # -- single signed PUT ----------------------------------------------------------------------


    async def _put_object(self, request: _Request, send) -> None:
        bucket, key = request.object_name()
        self._verify(request)
        generation_match = _generation_match(request)
        length_range = _length_range(request)
        declared = request.content_length()
        if declared is not None:
            _check_length(declared, length_range)
        self.bucket.check_precondition(bucket, key, generation_match)
        tmp = self.bucket.temp_path()
        try:
            f = await trio.to_thread.run_sync(open, tmp, "xb")
            try:
                limits = [n for n in (declared, length_range and length_range[1])
                          if n is not None]
                size = await _receive_body(request.receive, f.write,
                                           limit=min(limits, default=None))
                await trio.to_thread.run_sync(_sync_and_close, f)
            finally:
                f.close()
            if declared is not None and size != declared:
                raise _invalid(f"the body has {size} bytes, Content-Length said {declared}")
            _check_length(size, length_range)
            info = self.bucket.install(tmp, bucket, key, generation_match=generation_match)
            await trio.to_thread.run_sync(_fsync_dir, self.bucket.path(bucket, key).parent)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("stored %s/%s (%d bytes)", bucket, key, info.size)
        await _respond(send, 200, _upload_result_headers(info))

    # -- resumable uploads ----------------------------------------------------------------------


    async def _start_session(self, request: _Request, send) -> None:
        bucket, key = request.object_name()
        self._verify(request)
        if (request.header("x-goog-resumable") or "").strip().lower() != "start":
            raise _invalid("POST to an object starts a resumable upload and needs "
                           "x-goog-resumable: start")
        generation_match = _generation_match(request)
        length_range = _length_range(request)
        self.bucket.check_precondition(bucket, key, generation_match)
        session = await trio.to_thread.run_sync(
            lambda: self.bucket.create_session(bucket, key, generation_match=generation_match,
                                               length_range=length_range))
        location = (f"{request.scheme}://{request.host}{quote(request.path, safe='/~')}"
                    f"?upload_id={session.upload_id}")
        log.debug("upload session %s… started for %s/%s", session.upload_id[:8], bucket, key)
        await _respond(send, 201, [("location", location),
                                   ("x-guploader-uploadid", session.upload_id)])

    async def _put_session(self, request: _Request, send, upload_id: str) -> None:
        bucket, key = request.object_name()
        session = self.bucket.session(upload_id) if _UPLOAD_ID.fullmatch(upload_id) else None
        if session is None or (session.bucket, session.key) != (bucket, key):
            raise _no_such_upload()
        with self.bucket.session_turn(upload_id) as turn:
            await self._take_turn(request, send, upload_id, turn)
        if turn.scope.cancelled_caught:
            # Cancelled by a newer request: nothing was answered yet, and nothing of this
            # request's chunk was committed (both come after a checkpoint that raised).
            log.info("PUT %s: superseded by a newer request on upload session %s…",
                     request.path, upload_id[:8])
            raise GcsError(503, "ServiceUnavailable", "A newer request on this upload "
                           "session replaced this one; ask the session where to resume.")

    async def _take_turn(self, request: _Request, send, upload_id: str,
                         turn: _SessionTurn) -> None:
        async with self.bucket.session_lock(upload_id):
            # Re-read: while we waited, another request may have moved or ended the session.
            session = self.bucket.session(upload_id)
            if session is None:
                turn.settle()
                raise _no_such_upload()
            chunk = None if session.done else _parse_content_range(request)
            if chunk is None or chunk.is_query:
                turn.settle()
            if session.done:
                await self._answer_completed(session, send)
                return
            assert chunk is not None  # parsed unless the session is done
            total = _check_chunk(session, chunk)
            if not chunk.is_query:
                session = await self._receive_chunk(request, session, chunk, total, turn)
            if total is not None and session.committed == total and chunk.total is not None:
                # GCS finalizes once a request declares the total and all of it is here,
                # status queries ("bytes */N") included: that is how an empty object, or
                # one whose size was unknown until its last chunk was sent, is finished.
                # "bytes */*" only ever asks.
                await self._finalize(session, send)
            else:
                await _respond(send, 308, _range_header(session.committed))

    async def _receive_chunk(self, request: _Request, session: UploadSession,
                             chunk: _ChunkRange, total: int | None,
                             turn: _SessionTurn) -> UploadSession:
        """Append the new part of ``chunk`` to the session's data, fsync, and persist.

        Until the whole body is here a newer request may cancel this one (``turn``): then
        nothing is persisted, and the bytes written past ``committed`` are cut off by the
        next chunk.
        """
        assert chunk.first is not None and chunk.last is not None  # not a status query
        skip = session.committed - chunk.first
        f = await trio.to_thread.run_sync(_open_for_append,
                                          self.bucket.part_path(session.upload_id),
                                          session.committed)
        hashes = self.bucket._session_hashes
        offset, hasher = hashes.get(session.upload_id, (0, hashlib.sha1()))
        # Hash the new bytes into a copy, adopted only once the chunk is committed.
        running = hasher.copy() if offset == session.committed else None

        def write(data: bytes) -> None:
            f.write(data)
            if running is not None:
                running.update(data)

        try:
            received = await _receive_body(request.receive, write, limit=chunk.length,
                                           skip=skip)
            # The body is all here: from now on we only fsync, persist and answer.
            turn.settle()
            if received != chunk.length:
                raise _invalid(f"the chunk has {received} bytes, Content-Range said "
                               f"{chunk.length}")
            await trio.to_thread.run_sync(_sync_and_close, f)
        finally:
            # A chunk cut short leaves bytes past `committed`: the next chunk truncates them.
            f.close()
        updated = replace(session, committed=max(session.committed, chunk.last + 1),
                          total=total)
        await trio.to_thread.run_sync(self.bucket.save_session, updated)
        if running is not None:
            hashes[session.upload_id] = (updated.committed, running)
        else:
            hashes.pop(session.upload_id, None)
        return updated

    async def _finalize(self, session: UploadSession, send) -> None:
        """Make the session's data the object (checks again: size, precondition)."""
        _check_length(session.committed, session.length_range)
        part = self.bucket.part_path(session.upload_id)
        try:
            info = self.bucket.install(part, session.bucket, session.key,
                                       generation_match=session.generation_match)
        except GcsError:
            await trio.to_thread.run_sync(self.bucket.drop_session, session.upload_id)
            raise
        await trio.to_thread.run_sync(
            _fsync_dir, self.bucket.path(session.bucket, session.key).parent)
        await trio.to_thread.run_sync(self.bucket.save_session, replace(session, done=True))
        offset, hasher = self.bucket._session_hashes.pop(session.upload_id, (None, None))
        if offset == session.committed == info.size:
            assert hasher is not None  # an offset comes with its hasher
            st = os.stat(self.bucket.path(session.bucket, session.key))
            self.bucket._known_sha1[(session.bucket, session.key)] = (
                st.st_size, st.st_mtime_ns, hasher.hexdigest())
        log.info("stored %s/%s (%d bytes, resumable)", session.bucket, session.key, info.size)
        await _respond(send, 200, _upload_result_headers(info))

    async def _answer_completed(self, session: UploadSession, send) -> None:
        """A request on a finished session gets the object's metadata, as from GCS."""
        info = self.bucket.object_info(session.bucket, session.key)
        if info is None:
            raise _no_such_key(session.bucket, session.key)
        await _respond(send, 200, _upload_result_headers(info))


# -- answers and checks ---------------------------------------------------------------------


def _object_headers(info: ObjectInfo) -> list[tuple[str, str]]:
    return [
        ("content-type", CONTENT_TYPE),
        ("accept-ranges", "bytes"),
        ("etag", info.etag),
        ("last-modified", formatdate(info.mtime, usegmt=True)),
        ("x-goog-generation", str(info.generation)),
        ("x-goog-metageneration", "1"),
        ("x-goog-stored-content-length", str(info.size)),
        ("x-goog-stored-content-encoding", "identity"),
    ]


def _upload_result_headers(info: ObjectInfo) -> list[tuple[str, str]]:
    return [("etag", info.etag), ("x-goog-generation", str(info.generation)),
            ("x-goog-stored-content-length", str(info.size))]



def _check_chunk(session: UploadSession, chunk: _ChunkRange) -> int | None:
    """Validate ``chunk`` against ``session``; return the upload's total size if known.

    A chunk may start before the committed offset (a re-sent chunk: we keep only its new
    part) but not after it (a gap). Non-final chunks are multiples of 256 KiB.
    """
    total = chunk.total if chunk.total is not None else session.total
    if session.total is not None and chunk.total is not None and chunk.total != session.total:
        raise _invalid(f"the upload was declared as {session.total} bytes, now {chunk.total}")
    if total is not None:
        if total < session.committed:
            raise _invalid(f"total size {total} is less than the {session.committed} bytes "
                           "already committed")
        _check_length(total, session.length_range)
    if chunk.is_query:
        return total
    assert chunk.first is not None and chunk.last is not None  # not a status query
    if chunk.first > session.committed:
        raise _invalid(f"the chunk starts at byte {chunk.first}, but only "
                       f"{session.committed} bytes are committed (no gaps)")
    if total is not None and chunk.last >= total:
        raise _invalid(f"the chunk ends at byte {chunk.last}, past the total {total}")
    if session.length_range is not None and chunk.last + 1 > session.length_range[1]:
        _check_length(chunk.last + 1, session.length_range)  # raises EntityTooLarge
    final = total is not None and chunk.last + 1 == total
    if not final and chunk.length % CHUNK_GRANULARITY:
        raise _invalid(f"a non-final chunk must be a multiple of {CHUNK_GRANULARITY} bytes, "
                       f"not {chunk.length}")
    return total
