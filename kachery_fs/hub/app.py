"""The hub's HTTP face: ``/api/...`` for the JSON API, everything else for the local bucket.

Error mapping for the API lives here and only here: project exceptions become HTTP
statuses with a JSON body ``{"error": {"code": ..., "message": ...}}`` that the node's
HTTP seam (``kachery_fs._http``) turns back into the same exceptions.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import aclosing

import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    KacheryError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from .service import AuthError, Hub

log = logging.getLogger(__name__)

#: The largest request body the API reads (a request is JSON of a few KiB).
MAX_BODY = 1 << 20
#: The longest the API waits for a request's body (hypercorn times out only idle
#: connections and incomplete headers, not a body that trickles in).
BODY_TIMEOUT_S = 30.0

_STATUS = [
    (AuthError, 401, "unauthenticated"),
    (PermissionDenied, 403, "permission_denied"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (IntegrityError, 422, "integrity"),
    (InvalidInput, 400, "invalid_input"),
    (Unavailable, 503, "unavailable"),
]


def _error_response(exc: KacheryError) -> JSONResponse:
    for cls, status, code in _STATUS:
        if isinstance(exc, cls):
            retry_after = getattr(exc, "retry_after", None)
            return JSONResponse({"error": {"code": code, "message": str(exc)}}, status_code=status,
                                headers={"Retry-After": f"{retry_after:.0f}"}
                                if retry_after is not None else None)
    return JSONResponse({"error": {"code": "error", "message": str(exc)}}, status_code=500)


#: A JSON escape of a UTF-16 surrogate: parsed, a lone one is not text, and fails wherever
#: it is stored or encoded. Only bodies holding one are checked further.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _is_unicode(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def _read_body(request: Request) -> bytes | None:
    """The request's body, or None once it is known to pass :data:`MAX_BODY`: from its
    ``Content-Length`` before any of it is read, else as the running total passes it."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        return None
    parts, total = [], 0
    async with aclosing(request.stream()) as stream:  # closed too when we stop early
        async for chunk in stream:
            total += len(chunk)
            if total > MAX_BODY:
                return None
            parts.append(chunk)
    return b"".join(parts)


def create_api(hub: Hub) -> Starlette:
    async def node_request(request: Request) -> JSONResponse:
        with trio.move_on_after(BODY_TIMEOUT_S) as reading:
            raw = await _read_body(request)
        if reading.cancelled_caught:  # it trickles in: let go of the connection and task
            return JSONResponse({"error": {"code": "timeout", "message":
                                 f"request body not received within {BODY_TIMEOUT_S:g} s"}},
                                status_code=408, headers={"connection": "close"})
        if raw is None:
            return JSONResponse({"error": {"code": "too_large", "message":
                                 f"request body over {MAX_BODY} bytes"}}, status_code=413)
        try:
            envelope = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            return _error_response(InvalidInput("request body is not JSON"))
        if _SURROGATE_ESCAPE.search(raw) and not _is_unicode(envelope):
            return _error_response(InvalidInput("request body holds a lone surrogate (\\ud800"
                                                "-\\udfff), which is not text"))
        # A long-poll (a provider listening, a requester waiting) must end when its client
        # goes away, so that the hub knows at once that a provider has disconnected.
        response = None
        async with trio.open_nursery() as nursery:
            async def watch_disconnect():
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            try:
                response = JSONResponse(await hub.handle(envelope, size=len(raw)))
            except KacheryError as exc:
                response = _error_response(exc)
            nursery.cancel_scope.cancel()
        return response if response is not None else Response(status_code=499)

    async def info(request: Request) -> JSONResponse:
        return JSONResponse({"service": "kachery-fs hub", "version": __version__,
                             "ownerId": hub.owner_id})

    return Starlette(routes=[
        Route("/api/node", node_request, methods=["POST"]),
        Route("/api/info", info, methods=["GET"]),
    ])


def compose(api, bucket_app=None):
    """One ASGI app: ``/api/`` to the hub API, the rest to the local bucket (if any)."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await api(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == "/api" or path.startswith("/api/") or bucket_app is None:
            await api(scope, receive, send)
        else:
            await bucket_app(scope, receive, send)

    return app
