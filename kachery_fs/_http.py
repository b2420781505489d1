"""The HTTP seam: one client factory, one wire->domain error mapping.

Clients are built here and injected into the components that use them, so tests can
hand in an ``httpx.MockTransport`` or ``httpx.ASGITransport`` instead. What is worth
retrying, and how, is :mod:`kachery_fs.retry` (which builds on the mapping here).
"""

from __future__ import annotations

import re
import ssl
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx

from .errors import (
    Conflict,
    DeadlineExceeded,
    IntegrityError,
    InvalidInput,
    KacheryError,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Unavailable,
)

USER_AGENT = "kachery-fs/0.1"


# httpcore reads a response 64 KiB at a time, and each read is a trip through h11 and the
# event loop in Python: a download from a local bucket was CPU-bound in the mount process at
# ~130 MiB/s. Larger reads cut that overhead; httpcore has no setting, so its class attribute
# is raised where it exists.
_READ_SIZE = 1 << 20
try:
    from httpcore._async.http11 import AsyncHTTP11Connection as _H11

    if getattr(_H11, "READ_NUM_BYTES", _READ_SIZE) < _READ_SIZE:
        _H11.READ_NUM_BYTES = _READ_SIZE
except ImportError:  # a different httpcore layout: keep its default
    pass


def create_client(*, transport: httpx.AsyncBaseTransport | None = None,
                  timeout: float = 30.0, max_connections: int = 32) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` configured the way every kachery-fs component wants it.

    ``timeout`` bounds each single network wait (connect, one read, one write); whole
    transfers are judged by progress by their callers, not by this number.
    """
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    return httpx.AsyncClient(
        transport=transport,
        verify=_tls_context(),
        timeout=httpx.Timeout(timeout),
        limits=limits,
        headers={"user-agent": USER_AGENT},
        follow_redirects=False,
        trust_env=False,  # never route loopback traffic through a proxy from the environment
    )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import datetime as _dt

        when = parsedate_to_datetime(value)
        return max(0.0, (when - _dt.datetime.now(_dt.UTC)).total_seconds())
    except (TypeError, ValueError):
        return None


_XML_FIELD = re.compile(r"<(Code|Message|Details)>([^<]*)</\1>")

#: The hub's own error codes (``{"error": {"code", "message"}}``) and a bucket's, more precise
#: than the status they travel with.
_CODES: dict[str, type[KacheryError]] = {
    "unauthenticated": PermissionDenied,
    "permission_denied": PermissionDenied,
    "not_found": NotFound,
    "conflict": Conflict,
    "integrity": IntegrityError,
    "invalid_input": InvalidInput,
    # Google Cloud Storage's: a signed URL past its expiry (a 400) is a credential refused.
    "ExpiredToken": PermissionDenied,
}


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    """The server's own error code and explanation, if it gave them, on one line.

    Understands the hub's JSON errors and Google Cloud Storage's XML ``<Error>`` bodies.
    """
    try:
        body = response.json()
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict) and "message" in err:
                return err.get("code"), str(err["message"])
            if isinstance(err, str):
                return None, err
    except (ValueError, UnicodeDecodeError):
        pass
    text = response.text.strip().replace("\n", " ") if response.content else ""
    if text.startswith("<?xml") or text.startswith("<Error>"):
        fields = dict(_XML_FIELD.findall(text))
        if fields:
            return fields.get("Code"), ": ".join(
                v for v in (fields.get("Code"), fields.get("Message"), fields.get("Details")) if v)
    return None, text[:200] or response.reason_phrase


def error_for_response(response: httpx.Response, what: str) -> KacheryError:
    """Translate a non-success HTTP response into the project's exception tree.

    The body must already be read (``await response.aread()`` for streamed responses).
    """
    status = response.status_code
    code, detail = _error_body(response)
    msg = f"{what}: HTTP {status}: {detail}"
    if code in _CODES:
        return _CODES[code](msg)
    if status == 404:
        return NotFound(msg)
    if status in (401, 403):
        return PermissionDenied(msg)
    if status in (409, 412):
        return Conflict(msg)
    if status in (400, 411, 413, 416, 422):
        return InvalidInput(msg)
    if status in (408, 429) or status >= 500:
        return Unavailable(msg, retry_after=_retry_after(response))
    return ProtocolError(msg)


def check_response(response: httpx.Response, what: str, *, ok: tuple[int, ...] = (200,)) -> None:
    """Raise the mapped error unless ``response.status_code`` is one of ``ok``."""
    if response.status_code not in ok:
        raise error_for_response(response, what)


def _tls_context() -> ssl.SSLContext:
    """How https servers are checked: against the system's certificate authorities (where
    ``update-ca-certificates`` puts a private one), or those of the file named by
    ``SSL_CERT_FILE`` or the directory named by ``SSL_CERT_DIR``, as OpenSSL does."""
    return ssl.create_default_context()


_E = TypeVar("_E", bound=BaseException)


def _cause(exc: BaseException | None, kind: type[_E]) -> _E | None:
    """The first exception of ``kind`` in the chain of causes of ``exc`` (httpx wraps
    those of the transport)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def untrusted(cause: ssl.SSLCertVerificationError, what: str) -> PermissionDenied:
    """The error of a server whose TLS certificate is not trusted here, saying what to do."""
    return PermissionDenied(
        f"{what}: the server's TLS certificate is not trusted here"
        f" ({cause.verify_message or cause}); if a private authority signed it, add that"
        " to the system's (update-ca-certificates) or point SSL_CERT_FILE at it")


def error_for_exception(exc: httpx.HTTPError, what: str) -> KacheryError:
    """Translate a transport-level httpx exception (no response) into our tree: all are
    transient (:class:`Unavailable`) but an untrusted TLS certificate."""
    cause = _cause(exc, ssl.SSLCertVerificationError)
    if cause is not None:  # retrying cannot help
        return untrusted(cause, what)
    if isinstance(exc, httpx.TimeoutException):
        return DeadlineExceeded(f"{what}: timed out ({type(exc).__name__})")
    return Unavailable(f"{what}: {type(exc).__name__}: {exc}")

