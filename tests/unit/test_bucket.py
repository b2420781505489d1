"""Downloads from a channel bucket, over httpx.MockTransport: exact errors, and no byte
served before the whole file matched its SHA-1."""

from __future__ import annotations

import hashlib
import logging
import os
import re

import httpx
import pytest
import trio

from kachery_fs.bucket import Download
from kachery_fs.errors import DeadlineExceeded, IntegrityError, NotFound, ProtocolError
from kachery_fs.store import Store

URL = "http://bucket.test/kachery/chan/sha1/xx"
CHUNK = 64


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def ranged(body: bytes, *, delay: float = 0.0):
    """A handler serving ``body`` to Range GETs like a bucket does (206, Content-Range)."""

    async def handler(request: httpx.Request) -> httpx.Response:
        if delay:
            await trio.sleep(delay)
        if request.method == "HEAD":
            return httpx.Response(200, headers={"content-length": str(len(body))})
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers["range"])
        start, last = int(m[1]), int(m[2])
        return httpx.Response(206, content=streamed(body[start:last + 1]), headers={
            "content-range": f"bytes {start}-{last}/{len(body)}"})
    return handler


async def streamed(data: bytes):
    """A streamed body (the download reads raw bytes, as from the network)."""
    yield data


def client_for(handler) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def download(store: Store, client: httpx.AsyncClient, sha: str, size: int, **kw) -> Download:
    kw.setdefault("chunk_size", CHUNK)
    kw.setdefault("parallel", 2)
    return Download(client, URL, sha, size, store, **kw)


def no_tracebacks(caplog) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


# -- errors are the project's own, not "unexpected" groups -------------------------------


async def test_404_on_a_range_get_is_not_found(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(tmp_path)
    data = os.urandom(5 * CHUNK)

    async def handler(request):
        return httpx.Response(404, text="No such object")

    async with client_for(handler) as client:
        d = download(store, client, sha1(data), len(data))
        await d.run()
    assert type(d.error) is NotFound, repr(d.error)
    assert "HTTP 404" in str(d.error)
    no_tracebacks(caplog)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "download of" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert not any((tmp_path / "tmp").iterdir())


async def test_200_to_a_range_request_is_a_protocol_error(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(tmp_path)
    data = os.urandom(3 * CHUNK)

    async def handler(request):
        return httpx.Response(200, content=data)

    async with client_for(handler) as client:
        d = download(store, client, sha1(data), len(data))
        await d.run()
    assert type(d.error) is ProtocolError, repr(d.error)
    assert "200 to a Range request" in str(d.error)
    no_tracebacks(caplog)
    assert not store.has(sha1(data))


async def test_wrong_content_is_an_integrity_error(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    store = Store(tmp_path)
    good = os.urandom(4 * CHUNK + 7)
    bad = bytearray(good)
    bad[-1] ^= 1

    async with client_for(ranged(bytes(bad))) as client:
        d = download(store, client, sha1(good), len(good))
        await d.run()
    assert isinstance(d.error, IntegrityError), repr(d.error)
    no_tracebacks(caplog)
    assert not store.has(sha1(good))
    assert not any((tmp_path / "tmp").iterdir())


async def test_a_404_during_the_download_is_not_found(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(2 * CHUNK)
    answer_404 = ranged(data)

    async def handler(request):
        if request.method == "HEAD":
            return await answer_404(request)
        return httpx.Response(404)

    async with client_for(handler) as client:
        d = download(store, client, sha1(data), len(data))
        await d.run()
    assert isinstance(d.error, NotFound), repr(d.error)
    assert not store.has(sha1(data))


# -- every byte served is verified -----------------------------------------------------------


async def _read_while_downloading(store: Store, client, sha: str, size: int, end: int, **kw):
    """Start a reader of ``[0, end)`` before the download; return (reader outcome, download)."""
    d = download(store, client, sha, size, **kw)
    d.readers += 1
    outcome: dict = {}

    async def reader():
        try:
            await d.wait_readable(end, stall_timeout=5)
        except Exception as exc:
            outcome["error"] = exc
        else:
            outcome["bytes"] = os.pread(d.fd, end, 0)
            outcome["all_landed_then"] = d.hashed == size

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        nursery.start_soon(d.run)
    d.readers -= 1
    d.close_fd()
    return outcome, d


async def test_a_corrupted_object_never_serves_its_first_bytes(tmp_path):
    store = Store(tmp_path)
    good = os.urandom(8 * CHUNK)
    bad = bytearray(good)
    bad[3] ^= 0xFF  # in the very first bytes: `head -c 16` must not see them
    async with client_for(ranged(bytes(bad), delay=0.01)) as client:
        outcome, d = await _read_while_downloading(store, client, sha1(good), len(good), 16)
    assert "bytes" not in outcome, "corrupted bytes were served"
    assert isinstance(outcome["error"], IntegrityError)
    assert isinstance(d.error, IntegrityError)
    with pytest.raises(IntegrityError):
        await d.wait_readable(16, stall_timeout=1)
    assert d.available == 0


async def test_a_good_object_is_served_once_verified(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(8 * CHUNK + 5)
    async with client_for(ranged(data, delay=0.01)) as client:
        outcome, d = await _read_while_downloading(store, client, sha1(data), len(data), 16)
    assert d.error is None
    assert outcome["bytes"] == data[:16]
    assert outcome["all_landed_then"], "bytes were served before the whole file was hashed"
    assert store.has(sha1(data))  # then installed into the store
    assert store.path(sha1(data)).read_bytes() == data


async def test_a_slow_download_making_progress_does_not_time_out_its_reader(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(CHUNK * 2)

    async def handler(request):
        # One range answered a piece at a time, over longer than the stall timeout.
        if request.method == "HEAD":
            return httpx.Response(200, headers={"content-length": str(len(data))})
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers["range"])
        start, last = int(m[1]), int(m[2])

        async def body():
            for i in range(start, last + 1, 16):
                await trio.sleep(0.1)
                yield data[i:min(i + 16, last + 1)]
        return httpx.Response(206, content=body(), headers={
            "content-range": f"bytes {start}-{last}/{len(data)}"})

    async with client_for(handler) as client:
        d = download(store, client, sha1(data), len(data), chunk_size=len(data))
        d.readers += 1
        got = {}

        async def reader():
            await d.wait_readable(len(data), stall_timeout=0.8)
            got["bytes"] = os.pread(d.fd, len(data), 0)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(d.run)
        assert trio.current_time() - start > 0.8  # longer than the stall timeout...
        assert got["bytes"] == data  # ...yet the reader waited, as bytes kept coming
        d.readers -= 1
        d.close_fd()


async def test_a_stalled_download_times_its_reader_out(tmp_path):
    store = Store(tmp_path)
    data = os.urandom(CHUNK)

    async def handler(request):
        await trio.sleep_forever()

    async with client_for(handler) as client:
        d = download(store, client, sha1(data), len(data))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(d.run)
            with pytest.raises(DeadlineExceeded):
                await d.wait_readable(16, stall_timeout=0.3)
            nursery.cancel_scope.cancel()
    assert d.error is not None  # interrupted: readers are not left waiting
    with pytest.raises(type(d.error)):
        await d.wait_readable(16, stall_timeout=0.3)
    assert not any((tmp_path / "tmp").iterdir())


async def test_an_empty_object_downloads(tmp_path):
    store = Store(tmp_path)
    async with client_for(ranged(b"")) as client:
        d = download(store, client, sha1(b""), 0)
        await d.run()
        await d.wait_readable(0, stall_timeout=1)
    assert d.error is None and store.has(sha1(b""))
