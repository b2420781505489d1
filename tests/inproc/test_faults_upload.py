"""Fault injection on resumable uploads to the local bucket: a sender that vanishes in the
middle of a chunk without closing its connection (a frozen machine, a connection a proxy
keeps open) must not lock its session. The next request on the session wins, as in GCS,
and the upload resumes from what was really committed.

The bucket runs behind a real hypercorn server on 127.0.0.1; the vanished sender is a
raw TCP connection that sends a chunk's headers and part of its body, then nothing.
"""

from __future__ import annotations

import os
from functools import partial

import httpx
import pytest
import trio
import trio.testing

from kachery_fs import localbucket, resumable
from kachery_fs._serve import serve_asgi
from kachery_fs.hub.signing import UrlSigner
from kachery_fs.localbucket import CHUNK_GRANULARITY, WRITE_BATCH, LocalBucket, create_app

K = CHUNK_GRANULARITY
BUCKET = "kachery"
#: A request on a session whose sender vanished is answered within this (a bound on the
#: contract "usable again within seconds", not a performance figure).
PROMPTLY_S = 10


class Server:
    def __init__(self, local: LocalBucket, port: int, signer: UrlSigner):
        self.local = local
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.signer = signer


@pytest.fixture
async def server(tmp_path, nursery):
    local = LocalBucket(tmp_path / "bucket", {})
    port = await nursery.start(partial(serve_asgi, create_app(local), host="127.0.0.1", port=0))
    signer = UrlSigner.for_local_bucket(tmp_path, f"http://127.0.0.1:{port}")
    local.public_keys.update(signer.public_keys())
    yield Server(local, port, signer)


async def start(server: Server, client: httpx.AsyncClient, key: str, size: int) -> str:
    return await resumable.start_session(client, server.signer.resumable_upload(
        BUCKET, key, size=size))


async def vanish_mid_chunk(server: Server, session: str, first: int, length: int,
                           total: int, sent: bytes) -> trio.SocketStream:
    """A PUT of chunk ``first..first+length-1`` whose sender sends ``sent`` (less than the
    chunk) and then nothing, keeping the connection open. Returns once the bucket is
    receiving it (holding the session)."""
    url = httpx.URL(session)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = (f"PUT {url.raw_path.decode()} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Content-Range: bytes {first}-{first + length - 1}/{total}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()
    await stream.send_all(head + sent)
    lock = server.local.session_lock(url.params["upload_id"])
    await wait_until(lock.locked)
    return stream


async def wait_until(predicate) -> None:
    """Poll ``predicate`` (state no trio event announces: a lock, a file on disk)."""
    with trio.fail_after(PROMPTLY_S):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_a_status_query_supersedes_a_chunk_whose_sender_vanished(server, tmp_path):
    total = 24 * K + 100
    data = os.urandom(total)
    path = tmp_path / "file"
    path.write_bytes(data)
    async with httpx.AsyncClient(trust_env=False) as client:
        session = await start(server, client, "chan/obj", total)
        r = await client.put(session, content=data[:K],
                             headers={"content-range": f"bytes 0-{K - 1}/{total}"})
        assert r.status_code == 308
        upload_id = httpx.URL(session).params["upload_id"]
        part = server.local.part_path(upload_id)
        # More than one write batch of other bytes reaches the part file, then nothing.
        garbage = b"\xee" * (WRITE_BATCH + 3 * K)
        stalled = await vanish_mid_chunk(server, session, K, 20 * K, total, garbage)
        await wait_until(lambda: part.stat().st_size > K)  # a batch is in the part file
        async with stalled:
            # The restarted uploader asks where to resume: answered at once, with only
            # the chunk that was whole and fsync'd.
            with trio.fail_after(PROMPTLY_S):
                assert await resumable.query_offset(client, session, total) == K
            assert server.local.session(upload_id).committed == K
            # The vanished request was told it lost (if anyone still listens).
            with trio.fail_after(PROMPTLY_S):
                answer = await stalled.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
            with trio.fail_after(PROMPTLY_S):
                await resumable.upload(client, session, path, total, offset=K,
                                       chunk_size=8 * K)
        got = await client.get(f"{server.base}/{BUCKET}/chan/obj")
        assert got.status_code == 200 and got.content == data  # no garbage kept


async def test_a_chunk_supersedes_a_chunk_whose_sender_vanished(server, tmp_path):
    total = 4 * K
    data = os.urandom(total)
    async with httpx.AsyncClient(trust_env=False) as client:
        session = await start(server, client, "chan/obj2", total)
        stalled = await vanish_mid_chunk(server, session, 0, total, total, b"\x00" * 1000)
        async with stalled:
            # A sender that resends from the start without asking first also gets in.
            with trio.fail_after(PROMPTLY_S):
                r = await client.put(session, content=data,
                                     headers={"content-range": f"bytes 0-{total - 1}/{total}"})
            assert r.status_code == 200, r.text
        got = await client.get(f"{server.base}/{BUCKET}/chan/obj2")
        assert got.content == data


@pytest.fixture
def clock():
    # Autojump only after a whole second with nothing to run: the bucket opens the part
    # file in a worker thread, and a jump while it does would end the wrong wait.
    return trio.testing.MockClock(autojump_threshold=1.0)


async def test_a_body_that_stops_arriving_frees_its_session(tmp_path, clock):
    """With nobody else asking, a stalled body is given up after BODY_STALL_TIMEOUT_S."""
    signer = UrlSigner.for_local_bucket(tmp_path, "http://bucket.test")
    local = LocalBucket(tmp_path / "bucket", signer.public_keys())
    total = 2 * K

    async def stalls():
        yield b"\x01" * 1000
        await trio.sleep_forever()

    transport = httpx.ASGITransport(app=create_app(local))
    async with httpx.AsyncClient(transport=transport, base_url="http://bucket.test") as client:
        session = await start_in_process(signer, client, total)
        with trio.fail_after(2 * localbucket.BODY_STALL_TIMEOUT_S):
            r = await client.put(session, content=stalls(),
                                 headers={"content-range": f"bytes 0-{total - 1}/{total}"})
        assert r.status_code == 408
        assert trio.current_time() >= localbucket.BODY_STALL_TIMEOUT_S
        r = await client.put(session, headers={"content-range": f"bytes */{total}"})
        assert r.status_code == 308 and "range" not in r.headers  # nothing committed


async def start_in_process(signer: UrlSigner, client: httpx.AsyncClient, size: int) -> str:
    signed = signer.resumable_upload(BUCKET, "obj", size=size)
    r = await client.request(signed.method, signed.url, headers=signed.headers)
    assert r.status_code == 201
    return r.headers["location"]
