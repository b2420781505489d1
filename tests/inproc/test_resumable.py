"""The resumable-upload client against the local bucket's app (in process)."""

from __future__ import annotations

import os
from collections.abc import Callable

import httpx
import pytest
import trio

from kachery_fs import resumable
from kachery_fs.errors import Conflict, DeadlineExceeded, NotFound, ProtocolError
from kachery_fs.hub.signing import UrlSigner
from kachery_fs.localbucket import CHUNK_GRANULARITY, LocalBucket, create_app
from kachery_fs.protocol import SignedRequest

URL = "http://bucket.test"
BUCKET = "kachery"
KIB256 = CHUNK_GRANULARITY


class Crash(Exception):
    pass


class FaultyTransport(httpx.AsyncBaseTransport):
    """Passes requests to ``inner``, except where ``fault(request)`` names a failure:

    ``"connect"`` fails before the server sees anything, ``"lost"`` lets the server
    handle the request and then loses the answer, ``"503"`` answers 503 instead.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport,
                 fault: Callable[[httpx.Request], str | None] = lambda request: None):
        self.inner = inner
        self.fault = fault
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = self.fault(request)
        if fault == "connect":
            raise httpx.ConnectError("injected: connection refused", request=request)
        if fault == "503":
            return httpx.Response(503, request=request, text="injected")
        response = await self.inner.handle_async_request(request)
        if fault == "lost":
            await response.aread()
            raise httpx.ReadError("injected: connection reset", request=request)
        return response


class Env:
    def __init__(self, root):
        self.signer = UrlSigner.for_local_bucket(root, URL)
        self.local = LocalBucket(root / "bucket", self.signer.public_keys())
        self.transport = FaultyTransport(httpx.ASGITransport(app=create_app(self.local)))
        self.client = httpx.AsyncClient(transport=self.transport)
        self.file = root / "upload"

    def write(self, size: int) -> bytes:
        data = os.urandom(size)
        self.file.write_bytes(data)
        return data

    def signed(self, key: str, size: int) -> SignedRequest:
        return self.signer.resumable_upload(BUCKET, key, size=size)

    def stored(self, key: str) -> bytes:
        return self.local.path(BUCKET, key).read_bytes()

    def chunk_puts(self) -> list[str]:
        """The Content-Range of every chunk PUT sent so far."""
        return [r.headers["content-range"] for r in self.transport.requests
                if r.method == "PUT" and not r.headers["content-range"].startswith("bytes */")]


@pytest.fixture
async def env(tmp_path):
    env = Env(tmp_path)
    try:
        yield env
    finally:
        await env.client.aclose()


async def test_full_upload_reports_progress(env):
    data = env.write(3 * KIB256 + 123)
    session = await resumable.start_session(env.client, env.signed("chan/obj", len(data)))
    assert await resumable.query_offset(env.client, session, len(data)) == 0
    progress = []
    await resumable.upload(env.client, session, env.file, len(data), chunk_size=KIB256,
                           on_progress=progress.append)
    assert progress == [KIB256, 2 * KIB256, 3 * KIB256, len(data)]
    assert env.stored("chan/obj") == data
    assert await resumable.query_offset(env.client, session, len(data)) is None


async def test_resume_from_a_persisted_offset(env):
    data = env.write(4 * KIB256 + 1)
    session = await resumable.start_session(env.client, env.signed("obj", len(data)))
    persisted = []

    def crash_after_two_chunks(committed: int) -> None:
        persisted.append(committed)
        if len(persisted) == 2:
            raise Crash  # the process dies with the offset persisted

    with pytest.raises(Crash):
        await resumable.upload(env.client, session, env.file, len(data), chunk_size=KIB256,
                               on_progress=crash_after_two_chunks)
    assert env.local.stat(BUCKET, "obj") is None
    offset = await resumable.query_offset(env.client, session, len(data))
    assert offset == persisted[-1] == 2 * KIB256
    sent_before = len(env.chunk_puts())
    await resumable.upload(env.client, session, env.file, len(data), offset=offset,
                           chunk_size=KIB256)
    assert env.chunk_puts()[sent_before] == f"bytes {2 * KIB256}-{3 * KIB256 - 1}/{len(data)}"
    assert env.stored("obj") == data


@pytest.mark.parametrize("fault", ["connect", "lost", "503"])
async def test_a_transient_failure_is_retried(env, fault):
    data = env.write(3 * KIB256)
    session = await resumable.start_session(env.client, env.signed("obj", len(data)))
    second_chunk = f"bytes {KIB256}-{2 * KIB256 - 1}/{len(data)}"
    injected = []

    def once(request: httpx.Request) -> str | None:
        if request.headers.get("content-range") == second_chunk and not injected:
            injected.append(request)
            return fault
        return None

    env.transport.fault = once
    progress = []
    await resumable.upload(env.client, session, env.file, len(data), chunk_size=KIB256,
                           on_progress=progress.append)
    assert injected and env.stored("obj") == data
    assert progress[-1] == len(data) and progress == sorted(progress)
    statuses = [r.headers["content-range"] for r in env.transport.requests
                if r.headers.get("content-range", "").startswith("bytes */")]
    assert statuses == [f"bytes */{len(data)}"]  # one re-query after the failure
    if fault == "lost":  # the server had the chunk: it is not sent again
        assert env.chunk_puts().count(second_chunk) == 1
    else:
        assert env.chunk_puts().count(second_chunk) == 2


async def test_no_progress_for_the_stall_timeout_gives_up(env):
    data = env.write(2 * KIB256)
    session = await resumable.start_session(env.client, env.signed("obj", len(data)))
    env.transport.fault = lambda request: "connect"
    with trio.fail_after(10):
        with pytest.raises(DeadlineExceeded, match="no progress"):
            await resumable.upload(env.client, session, env.file, len(data),
                                   chunk_size=KIB256, stall_timeout=1.0)


async def test_an_existing_object_is_conflict(env):
    data = env.write(10)
    signed = env.signed("obj", len(data))
    session = await resumable.start_session(env.client, signed)
    await resumable.upload(env.client, session, env.file, len(data))
    with pytest.raises(Conflict):
        await resumable.start_session(env.client, signed)
    # Two sessions racing for one object: the second to finish gets Conflict.
    first = await resumable.start_session(env.client, env.signed("raced", len(data)))
    second = await resumable.start_session(env.client, env.signed("raced", len(data)))
    await resumable.upload(env.client, first, env.file, len(data))
    with pytest.raises(Conflict):
        await resumable.upload(env.client, second, env.file, len(data))


async def test_a_gone_session_is_not_found(env):
    data = env.write(KIB256 + 1)
    gone = f"{URL}/{BUCKET}/obj?upload_id={'a' * 64}"
    with pytest.raises(NotFound):
        await resumable.query_offset(env.client, gone, len(data))
    with pytest.raises(NotFound):
        await resumable.upload(env.client, gone, env.file, len(data), chunk_size=KIB256)
    session = await resumable.start_session(env.client, env.signed("obj", len(data)))
    env.local.drop_session(session.rsplit("=", 1)[1])  # e.g. expired
    with pytest.raises(NotFound):
        await resumable.upload(env.client, session, env.file, len(data), chunk_size=KIB256)


async def test_an_empty_file_and_an_already_complete_upload(env):
    env.write(0)
    session = await resumable.start_session(env.client, env.signed("empty", 0))
    await resumable.upload(env.client, session, env.file, 0)
    assert env.stored("empty") == b""
    await resumable.upload(env.client, session, env.file, 0)  # done is done


async def test_answers_outside_the_protocol_are_protocol_errors(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(os.urandom(2 * KIB256))

    def server(answer: httpx.Response) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(lambda request: answer))

    cases = [
        httpx.Response(200),  # complete before the last chunk
        httpx.Response(308, headers={"range": "bytes=5-10"}),  # not from 0
        httpx.Response(308, headers={"range": f"bytes=0-{3 * KIB256}"}),  # more than sent
        httpx.Response(302),
    ]
    for answer in cases:
        async with server(answer) as client:
            with pytest.raises(ProtocolError):
                await resumable.upload(client, "http://x/b/o?upload_id=1", path, 2 * KIB256,
                                       chunk_size=KIB256)
    async with server(httpx.Response(201)) as client:
        with pytest.raises(ProtocolError, match="Location"):
            await resumable.start_session(client, SignedRequest("POST", "http://x/b/o"))


async def test_a_file_that_fails_its_own_sha1_is_never_committed(env):
    import hashlib

    from kachery_fs.errors import CorruptLocalFile

    data = env.write(3 * KIB256 + 7)
    claimed = hashlib.sha1(data[:-1] + b"!").hexdigest()  # what the store says it holds
    session = await resumable.start_session(env.client, env.signed("bad", len(data)))
    with pytest.raises(CorruptLocalFile, match="does not match its SHA-1"):
        await resumable.upload(env.client, session, env.file, len(data), chunk_size=KIB256,
                               sha1=claimed)
    assert await resumable.query_offset(env.client, session, len(data)) == 3 * KIB256
    assert not env.local.path(BUCKET, "bad").exists()  # the final chunk never went out
    # The right hash goes through, also when resumed mid-file (the prefix is re-hashed).
    await resumable.upload(env.client, session, env.file, len(data), chunk_size=KIB256,
                           offset=3 * KIB256, sha1=hashlib.sha1(data).hexdigest())
    assert env.stored("bad") == data
