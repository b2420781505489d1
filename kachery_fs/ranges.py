"""Large ranged GETs straight into a caller's buffer, on worker threads.

A chunk of a large file (20,000,000 bytes) fetched through ``httpx`` on the event loop
costs the loop a Python-level step per 64 KiB piece (parsing, copying, scheduling): about
2 s of the mount's one event-loop thread per GiB, measured, while the same loop must
answer the kernel's reads. :class:`RangeReader` sends the request with the standard
library's ``http.client`` on a worker thread and reads the body with ``readinto`` into the
buffer, in C with the GIL released (about 0.7 s of CPU per GiB, none of it on the loop).
It is the client of one kind of request only: a ``GET`` of bytes ``[start, end)`` of a
bucket object, answered ``206`` with that exact ``Content-Range``; everything else stays
with the ``httpx`` client (:func:`kachery_fs._http.create_client`), whose TLS settings it
shares and whose answers it maps the same way (:func:`kachery_fs._http.error_for_response`).

Each read is judged by progress, on trio's clock: the caller's ``on_data`` is called from
the event loop as bytes arrive (polled every :data:`POLL_S`), so its stall deadline is a
trio deadline like any other. A cancelled read shuts its socket down, which ends the
worker thread's ``recv`` at once; the read returns only once the thread has stopped
writing into the buffer, so the buffer may then be reused. Connections are kept per host
for the next read (at most :data:`MAX_IDLE` each) and closed by :meth:`RangeReader.close`.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable

import httpx
import trio

from . import _http
from .errors import IntegrityError, KacheryError, ProtocolError, Unavailable
from .readurls import Source, source_of
from .retry import retrying

log = logging.getLogger(__name__)

#: How often the event loop looks at a read's progress.
POLL_S = 0.25
#: How much one ``readinto`` asks for: the granularity of progress.
READ_STEP = 1 << 20
#: The longest one network wait of a thread may take (a ``recv``); reads are judged by
#: progress on trio's clock, this only bounds a thread that nobody cancels.
SOCKET_TIMEOUT_S = 120.0
#: The longest a connect may take (a cancel is seen only after it).
CONNECT_TIMEOUT_S = 15.0
#: Idle connections kept per host.
MAX_IDLE = 8

_Key = tuple[str, str, int]


class RangeReader:
    """Ranged GETs into buffers on worker threads (see the module docstring)."""

    def __init__(self) -> None:
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None

    def close(self) -> None:
        """Close the idle connections; reads after this still work, on new ones."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    async def read_into(self, where: Source | str, start: int, end: int, into: bytearray, *,
                        on_data: Callable[[int], None] | None = None,
                        attempts: int = 4) -> memoryview:
        """Bytes ``[start, end)`` of the object ``where`` written into ``into``, a view of
        them returned; tried again on a transient error or a truncated body, a few times
        (:func:`kachery_fs.retry.retrying`). ``on_data(n)``: ``n`` more bytes arrived."""
        source = source_of(where)
        what = f"GET {source} bytes {start}-{end - 1}"
        if len(into) < end - start:
            raise ValueError(f"{what}: a buffer of {len(into)} bytes is too small")
        return await retrying(
            lambda: source.using(lambda url: self._read_once(url, what, start, end, into,
                                                             on_data)),
            what=what, attempts=attempts, also=(IntegrityError,))

    async def _read_once(self, url: str, what: str, start: int, end: int, into: bytearray,
                         on_data: Callable[[int], None] | None) -> memoryview:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ProtocolError(f"{what}: not an http(s) URL")
        key = (parts.scheme, parts.hostname, parts.port or
               (443 if parts.scheme == "https" else 80))
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        read = _Read(self, key, target, url, what, start, end, into)
        outcome: list = []

        async with trio.open_nursery() as nursery:
            async def run() -> None:
                try:
                    outcome.append(await trio.to_thread.run_sync(read.run))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                    outcome.append(exc)
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)
            reported = 0
            try:
                while True:
                    await trio.sleep(POLL_S)
                    if on_data is not None and read.got > reported:
                        on_data(read.got - reported)
                        reported = read.got
            finally:
                if not outcome:  # cancelled from outside: stop the thread's recv now
                    read.abort()
        result = outcome[0]
        if isinstance(result, BaseException):
            raise result
        if on_data is not None and read.got > reported:
            on_data(read.got - reported)
        return result

    def _connection(self, key: _Key, *,
                    fresh: bool = False) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection to ``key`` (True: reused), or (``fresh``: always) a new one."""
        if not fresh:
            with self._lock:
                idle = self._idle.get(key)
                if idle:
                    return idle.pop(), True
        scheme, host, port = key
        if scheme == "https":
            if self._tls is None:
                self._tls = _http._tls_context()
            return http.client.HTTPSConnection(host, port, timeout=CONNECT_TIMEOUT_S,
                                               context=self._tls), False
        return http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT_S), False

    def _release(self, key: _Key, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE:
                idle.append(conn)
                return
        conn.close()


class _Read:
    """One ranged GET on a worker thread: :meth:`run` there, :meth:`abort` from the loop."""

    def __init__(self, reader: RangeReader, key: _Key, target: str, url: str, what: str,
                 start: int, end: int, into: bytearray):
        self.reader = reader
        self.key = key
        self.target = target
        self.what = what  # names the object by its unsigned address
        self.url = url
        self.start, self.end = start, end
        self.view = memoryview(into)[:end - start]
        self.got = 0  # bytes written into the buffer (read by the loop: progress)
        self.conn: http.client.HTTPConnection | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def run(self) -> memoryview:
        conn, reused = self.reader._connection(self.key)
        try:
            try:
                response = self._send(conn)
            except (ConnectionError, http.client.RemoteDisconnected):
                if not reused or self.aborted:
                    raise
                conn.close()  # a kept connection the server had closed: a new one, at once
                conn, _ = self.reader._connection(self.key, fresh=True)
                response = self._send(conn)
            self._body(response)
        except KacheryError:
            conn.close()
            raise
        except ssl.SSLCertVerificationError as exc:
            conn.close()
            raise _http.untrusted(exc, self.what) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if self.aborted:
                raise Unavailable(f"{self.what}: cancelled") from None
            if isinstance(exc, TimeoutError):
                raise Unavailable(f"{self.what}: nothing arrived for {SOCKET_TIMEOUT_S:.0f}"
                                  " s") from None
            raise Unavailable(f"{self.what}: {exc!r}") from None
        except BaseException:
            conn.close()
            raise
        if response.will_close or self.aborted:
            conn.close()
        else:
            self.reader._release(self.key, conn)
        return self.view

    def _send(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        self.conn = conn
        if conn.sock is None:
            conn.connect()  # here, so that a cancel during the connect is seen after it
            sock = conn.sock
            assert sock is not None  # connected
            sock.settimeout(SOCKET_TIMEOUT_S)
        if self.aborted:
            raise Unavailable(f"{self.what}: cancelled")
        conn.request("GET", self.target, headers={
            "range": f"bytes={self.start}-{self.end - 1}", "user-agent": _http.USER_AGENT})
        return conn.getresponse()

    def _body(self, response: http.client.HTTPResponse) -> None:
        size = self.end - self.start
        if response.status != 206:
            body = response.read(64 << 10)
            response.close()
            if response.status == 200:
                raise ProtocolError(f"{self.what}: server answered 200 to a Range request")
            raise _http.error_for_response(httpx.Response(
                response.status, headers=response.getheaders(), content=body,
                request=httpx.Request("GET", self.url)), self.what)
        content_range = response.getheader("content-range", "")
        if not content_range.startswith(f"bytes {self.start}-{self.end - 1}/"):
            response.close()
            raise ProtocolError(f"{self.what}: wrong Content-Range {content_range!r}")
        length = response.getheader("content-length")
        if length is not None and length.strip() != str(size):
            response.close()
            raise ProtocolError(f"{self.what}: Content-Length {length}, not {size}")
        while self.got < size:
            if self.aborted:
                response.close()
                raise Unavailable(f"{self.what}: cancelled")
            n = response.readinto(self.view[self.got:min(size, self.got + READ_STEP)])
            if not n:
                break
            self.got += n
        if self.got != size:
            response.close()
            raise IntegrityError(f"{self.what}: truncated ({self.got} of {size} bytes)")
        if response.read(1):  # nothing may follow (http.client stops at Content-Length)
            response.close()
            raise IntegrityError(f"{self.what}: server sent more bytes than asked for")
