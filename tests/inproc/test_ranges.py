"""Ranged GETs into buffers on worker threads (kachery_fs.ranges), against a real HTTP
server on 127.0.0.1 that misbehaves on demand: the exact errors, retries, a kept
connection the server closed, and a cancelled read that leaves the buffer alone."""

from __future__ import annotations

import http.server
import os
import re
import threading
import time

import pytest
import trio

from kachery_fs import ranges as ranges_module
from kachery_fs.errors import IntegrityError, NotFound, ProtocolError, Unavailable
from kachery_fs.ranges import RangeReader

BODY = os.urandom(3_000_000)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.mode: list[str] = []  # what the next answers do, in turn; then "good"
        self.gets = 0
        self.connections: set[tuple[str, int]] = set()
        self.release = threading.Event()

    def handle_error(self, request, client_address):
        pass  # a client that went away (the cancelled read): not the test's news

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/kachery/chan/sha1/obj"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def log_message(self, *args):
        pass

    def do_GET(self):
        server: Server = self.server  # type: ignore[assignment]
        server.gets += 1
        server.connections.add(self.client_address)
        mode = server.mode.pop(0) if server.mode else "good"
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("range", ""))
        start, last = int(m[1]), int(m[2])
        body = BODY[start:last + 1]
        if mode == "404":
            return self._answer(404, b"<Error><Code>NoSuchKey</Code></Error>")
        if mode == "503":
            return self._answer(503, b"later")
        if mode == "200":
            return self._answer(200, BODY)
        if mode == "hang":
            server.release.wait(30)
            return
        self.send_response(206)
        content_range = f"bytes {start}-{last}/{len(BODY)}"
        if mode == "wrong-range":
            content_range = f"bytes 0-{last - start}/{len(BODY)}"
        self.send_header("content-range", content_range)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if mode == "truncated":
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)
        if mode == "close":  # closed after the answer, without saying so: kept, and stale
            self.close_connection = True

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def reader():
    r = RangeReader()
    yield r
    r.close()


async def test_a_range_lands_in_the_buffer_and_the_connection_is_kept(server, reader):
    buf = bytearray(2_000_000)
    seen = []
    view = await reader.read_into(server.url, 500_000, 2_500_000, buf, on_data=seen.append)
    assert view == BODY[500_000:2_500_000] and view.obj is buf
    assert sum(seen) == 2_000_000
    assert await reader.read_into(server.url, 0, 10, buf) == BODY[:10]
    assert len(server.connections) == 1  # one connection, kept for the second read


async def test_a_kept_connection_the_server_closed_is_replaced_at_once(server, reader):
    buf = bytearray(100)
    server.mode = ["close"]
    assert await reader.read_into(server.url, 0, 100, buf) == BODY[:100]
    await trio.sleep(0.1)  # the server has closed its end by now
    start = trio.current_time()
    assert await reader.read_into(server.url, 100, 200, buf) == BODY[100:200]
    assert trio.current_time() - start < 0.1  # no backoff (0.125 s at least): at once
    assert len(server.connections) == 2


@pytest.mark.parametrize("mode, error, match", [
    ("404", NotFound, "HTTP 404"),
    ("200", ProtocolError, "answered 200 to a Range request"),
    ("wrong-range", ProtocolError, "wrong Content-Range"),
])
async def test_a_wrong_answer_is_its_error_at_once(server, reader, mode, error, match):
    server.mode = [mode] * 10
    with pytest.raises(error, match=match):
        await reader.read_into(server.url, 10, 1000, bytearray(990))
    assert server.gets == 1  # not worth another try


@pytest.mark.parametrize("mode, error, match", [
    ("503", Unavailable, "HTTP 503"),
    ("truncated", IntegrityError, "truncated"),
])
async def test_a_transient_failure_is_tried_again_then_given_up(server, reader, mode, error,
                                                               match, autojump_clock):
    server.mode = [mode]
    buf = bytearray(1_000_000)
    assert await reader.read_into(server.url, 0, 1_000_000, buf) == BODY[:1_000_000]
    assert server.gets == 2
    server.mode = [mode] * 10
    with pytest.raises(error, match=match):
        await reader.read_into(server.url, 0, 1_000_000, buf, attempts=3)
    assert server.gets == 2 + 3


async def test_a_cancelled_read_stops_its_thread_and_leaves_the_buffer(server, reader):
    server.mode = ["hang"]
    buf = bytearray(b"x" * 1000)
    start = time.monotonic()
    with trio.move_on_after(0.5):
        await reader.read_into(server.url, 0, 1000, buf)
    assert time.monotonic() - start < 2  # the thread's recv ended with the cancel
    assert buf == b"x" * 1000
    # Nothing of the hung read is kept: the next read works on a connection of its own.
    assert await reader.read_into(server.url, 0, 1000, buf) == BODY[:1000]


async def test_progress_is_reported_on_trios_clock_as_bytes_arrive(server, reader,
                                                                 monkeypatch):
    monkeypatch.setattr(ranges_module, "READ_STEP", 64 << 10)
    seen = []
    await reader.read_into(server.url, 0, len(BODY), bytearray(len(BODY)), on_data=seen.append)
    assert sum(seen) == len(BODY)


async def test_not_an_http_url_is_refused(reader):
    with pytest.raises(ProtocolError, match="not an http"):
        await reader.read_into("file:///etc/passwd", 0, 10, bytearray(10))
