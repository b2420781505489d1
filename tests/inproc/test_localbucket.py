"""The local bucket: GCS XML-API reads, real V4 signature checks, resumable uploads.

Most tests run the ASGI app in process (httpx.ASGITransport); one set runs it behind
a real hypercorn server on 127.0.0.1 and also checks that accepted sockets have
TCP_NODELAY.
"""

from __future__ import annotations

import os
import re
import socket
import time
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import trio

from kachery_fs import resumable
from kachery_fs._serve import serve_asgi
from kachery_fs.errors import InvalidInput, NotFound
from kachery_fs.hub.signing import UrlSigner
from kachery_fs.localbucket import CHUNK_GRANULARITY, LocalBucket, create_app

URL = "http://bucket.test"
BUCKET = "kachery"
KIB256 = CHUNK_GRANULARITY


class Clock:
    """The bucket's clock: real time plus an offset a test can move."""

    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.signer = UrlSigner.for_local_bucket(root, URL)
        self.clock = Clock()
        self.open_bucket()

    def open_bucket(self) -> None:
        """(Re)create the LocalBucket and its app on the same directory: a restart."""
        self.local = LocalBucket(self.root / "bucket", self.signer.public_keys(),
                                 clock=self.clock)
        self.app = create_app(self.local)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url=URL)

    async def put(self, key: str, data: bytes) -> httpx.Response:
        signed = self.signer.put(BUCKET, key, size=len(data))
        return await self.client.request(signed.method, signed.url, headers=signed.headers,
                                         content=data)

    async def start(self, key: str, size: int) -> str:
        signed = self.signer.resumable_upload(BUCKET, key, size=size)
        response = await self.client.request(signed.method, signed.url, headers=signed.headers)
        assert response.status_code == 201, response.text
        return response.headers["location"]

    async def chunk(self, session: str, data: bytes, first: int, total: int | str):
        last = first + len(data) - 1
        return await self.client.put(session, content=data,
                                     headers={"content-range": f"bytes {first}-{last}/{total}"})

    async def status(self, session: str, total: int | str) -> httpx.Response:
        return await self.client.put(session, headers={"content-range": f"bytes */{total}"})


@pytest.fixture
async def env(tmp_path):
    env = Env(tmp_path)
    try:
        yield env
    finally:
        await env.client.aclose()


def error_code(response: httpx.Response) -> str:
    match = re.search(r"<Code>(\w+)</Code>", response.text)
    return match[1] if match else ""


def tamper(url: str, **params: str) -> str:
    """``url`` with query parameters replaced or added."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- reads ----------------------------------------------------------------------------------


async def test_get_and_head_serve_the_object_with_gcs_headers(env):
    data = os.urandom(3 * 1024 * 1024 + 17)  # several read chunks and a ragged tail
    assert (await env.put("a/b/obj", data)).status_code == 200
    response = await env.client.get(f"/{BUCKET}/a/b/obj")
    assert response.status_code == 200 and response.content == data
    headers = response.headers
    assert headers["content-length"] == str(len(data))
    assert headers["content-type"] == "application/octet-stream"
    assert headers["accept-ranges"] == "bytes"
    assert headers["x-goog-stored-content-length"] == str(len(data))
    assert headers["x-goog-generation"] == str(env.local.stat(BUCKET, "a/b/obj")[1])
    assert headers["etag"] and headers["last-modified"].endswith("GMT")
    head = await env.client.head(f"/{BUCKET}/a/b/obj")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))


@pytest.mark.parametrize(("header", "first", "last"), [
    ("bytes=0-99", 0, 99),
    ("bytes=10-10", 10, 10),
    ("bytes=990-5000", 990, 999),  # the end is clamped to the object
    ("bytes=900-", 900, 999),
    ("bytes=-100", 900, 999),
    ("bytes=-5000", 0, 999),  # a suffix longer than the object is all of it
    ("Bytes = 1-2", 1, 2),
])
async def test_satisfiable_ranges_are_206_with_content_range(env, header, first, last):
    data = os.urandom(1000)
    await env.put("obj", data)
    response = await env.client.get(f"/{BUCKET}/obj", headers={"range": header})
    assert response.status_code == 206
    assert response.content == data[first:last + 1]
    assert response.headers["content-range"] == f"bytes {first}-{last}/1000"
    assert response.headers["content-length"] == str(last - first + 1)


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=1000-1005", "bytes=5000-", "bytes=-0"])
async def test_unsatisfiable_ranges_are_416(env, header):
    await env.put("obj", os.urandom(1000))
    response = await env.client.get(f"/{BUCKET}/obj", headers={"range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == "bytes */1000"
    assert error_code(response) == "InvalidRange"


async def test_any_range_of_an_empty_object_is_416(env):
    await env.put("empty", b"")
    response = await env.client.get(f"/{BUCKET}/empty", headers={"range": "bytes=0-"})
    assert response.status_code == 416 and response.headers["content-range"] == "bytes */0"
    whole = await env.client.get(f"/{BUCKET}/empty")
    assert whole.status_code == 200 and whole.content == b""


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "bytes=5-2", "items=0-1", "bytes=abc",
                                    "bytes=-", "bytes 0-1", ""])
async def test_malformed_or_multiple_ranges_serve_the_whole_object(env, header):
    data = os.urandom(1000)
    await env.put("obj", data)
    response = await env.client.get(f"/{BUCKET}/obj", headers={"range": header})
    assert response.status_code == 200 and response.content == data
    assert "content-range" not in response.headers


async def test_missing_object_is_404_no_such_key(env):
    response = await env.client.get(f"/{BUCKET}/no/such/object")
    assert response.status_code == 404 and error_code(response) == "NoSuchKey"
    assert "<Error>" in response.text and "<Message>" in response.text
    assert (await env.client.head(f"/{BUCKET}/no/such/object")).status_code == 404
    await env.put("dir/obj", b"x")
    assert (await env.client.get(f"/{BUCKET}/dir")).status_code == 404  # a prefix, not an object


async def test_bad_names_are_refused(env):
    local = env.local
    for key in ["", "/abs", "a//b", "a/../b", "..", "a/./b", "a/", "x\n"]:
        with pytest.raises(InvalidInput):
            local.path(BUCKET, key)
    for bucket in ["api", "A", "x", ".sessions", "a/b"]:
        with pytest.raises(InvalidInput):
            local.path(bucket, "key")
    # httpx would normalize "..", so speak ASGI directly.
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": f"/{BUCKET}/a/../../etc/passwd",
             "query_string": b"", "headers": [(b"host", b"bucket.test")], "scheme": "http"}
    await env.app(scope, receive, send)
    assert sent[0]["status"] == 400


# -- the python API the hub uses ------------------------------------------------------------


async def test_stat_sha1_and_delete(env):
    data = b"hello local bucket"
    assert env.local.stat(BUCKET, "x/y/z") is None
    await env.put("x/y/z", data)
    size, generation = env.local.stat(BUCKET, "x/y/z")
    assert size == len(data) and generation > 0
    import hashlib

    assert env.local.sha1(BUCKET, "x/y/z") == hashlib.sha1(data).hexdigest()
    env.local.delete(BUCKET, "x/y/z")
    assert env.local.stat(BUCKET, "x/y/z") is None
    assert not (env.root / "bucket" / BUCKET / "x").exists()  # empty directories pruned
    env.local.delete(BUCKET, "x/y/z")  # deleting what is gone is fine
    with pytest.raises(NotFound):
        env.local.sha1(BUCKET, "x/y/z")


# -- signed single PUT ----------------------------------------------------------------------


async def test_signed_put_stores_exact_bytes(env):
    data = os.urandom(5 * 1024 * 1024 + 3)  # more than one write batch
    response = await env.put("chan/sha1/ab/cd/ef/obj", data)
    assert response.status_code == 200
    assert response.headers["x-goog-stored-content-length"] == str(len(data))
    assert env.local.path(BUCKET, "chan/sha1/ab/cd/ef/obj").read_bytes() == data
    assert list((env.root / "bucket" / ".tmp").iterdir()) == []


async def test_tampered_requests_are_403_signature_does_not_match(env):
    data = b"0123456789"
    signed = env.signer.put(BUCKET, "chan/obj", size=len(data))

    async def attempt(url=signed.url, headers=signed.headers, method="PUT", client=env.client):
        response = await client.request(method, url, headers=headers, content=data)
        return response.status_code, error_code(response)

    mismatch = (403, "SignatureDoesNotMatch")
    # The path re-pointed at another object.
    assert await attempt(url=signed.url.replace("/chan/obj?", "/chan/other?")) == mismatch
    # A signed header's value changed.
    assert await attempt(headers={**signed.headers,
                                  "x-goog-content-length-range": "0,100"}) == mismatch
    assert await attempt(headers={**signed.headers,
                                  "x-goog-if-generation-match": "1"}) == mismatch
    # A signed header left out.
    without = {k: v for k, v in signed.headers.items() if k != "x-goog-if-generation-match"}
    assert await attempt(headers=without) == mismatch
    # One byte of the signature flipped.
    sig = dict(parse_qsl(urlsplit(signed.url).query))["X-Goog-Signature"]
    flipped = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
    assert await attempt(url=tamper(signed.url, **{"X-Goog-Signature": flipped})) == mismatch
    # The query changed: a longer life, or an extra parameter.
    assert await attempt(url=tamper(signed.url, **{"X-Goog-Expires": "901"})) == mismatch
    assert await attempt(url=tamper(signed.url, generation="5")) == mismatch
    # Another method, another host.
    assert await attempt(method="POST") == mismatch
    other_host = httpx.AsyncClient(transport=httpx.ASGITransport(app=env.app),
                                   base_url="http://elsewhere.test")
    async with other_host:
        moved = signed.url.replace(URL, "http://elsewhere.test")
        assert await attempt(url=moved, client=other_host) == mismatch
    assert env.local.stat(BUCKET, "chan/obj") is None
    assert env.local.stat(BUCKET, "chan/other") is None
    # The untouched request still works.
    assert await attempt() == (200, "")


async def test_expired_or_future_signatures_are_refused(env):
    signed = env.signer.put(BUCKET, "obj", size=1, expires_s=60)
    env.clock.offset = 61
    response = await env.client.put(signed.url, headers=signed.headers, content=b"x")
    assert response.status_code == 400 and error_code(response) == "ExpiredToken"
    env.clock.offset = -3600  # the signer's clock is an hour ahead of ours
    response = await env.client.put(signed.url, headers=signed.headers, content=b"x")
    assert response.status_code == 403
    env.clock.offset = 0
    assert (await env.client.put(signed.url, headers=signed.headers,
                                 content=b"x")).status_code == 200


async def test_unsigned_and_unknown_signer_writes_are_refused(env, tmp_path):
    response = await env.client.put(f"/{BUCKET}/obj", content=b"data")
    assert response.status_code == 403 and error_code(response) == "AccessDenied"
    response = await env.client.post(f"/{BUCKET}/obj", headers={"x-goog-resumable": "start"})
    assert response.status_code == 403 and error_code(response) == "AccessDenied"
    stranger = UrlSigner.for_local_bucket(tmp_path / "stranger", URL)
    signed = stranger.put(BUCKET, "obj", size=4)  # same client_email, another key
    response = await env.client.put(signed.url, headers=signed.headers, content=b"data")
    assert response.status_code == 403
    assert (await env.client.delete(f"/{BUCKET}/obj")).status_code == 405
    assert env.local.stat(BUCKET, "obj") is None


async def test_no_clobber_is_412(env):
    assert (await env.put("obj", b"first")).status_code == 200
    response = await env.put("obj", b"other")
    assert response.status_code == 412 and error_code(response) == "PreconditionFailed"
    signed = env.signer.resumable_upload(BUCKET, "obj", size=5)
    response = await env.client.post(signed.url, headers=signed.headers)
    assert response.status_code == 412
    assert env.local.path(BUCKET, "obj").read_bytes() == b"first"


async def test_no_clobber_is_checked_again_when_a_resumable_upload_commits(env):
    session = await env.start("obj", 5)
    await env.put("obj", b"first")  # someone else finished first
    response = await env.chunk(session, b"later", 0, 5)
    assert response.status_code == 412
    assert env.local.path(BUCKET, "obj").read_bytes() == b"first"
    assert (await env.status(session, 5)).status_code == 404  # that session is over


async def test_size_outside_the_signed_range_is_400(env):
    signed = env.signer.put(BUCKET, "obj", size=10)
    for body, code in [(b"x" * 11, "EntityTooLarge"), (b"x" * 9, "EntityTooSmall")]:
        response = await env.client.put(signed.url, headers=signed.headers, content=body)
        assert response.status_code == 400 and error_code(response) == code
    session = await env.start("big", 10)
    response = await env.chunk(session, b"x" * 11, 0, 11)
    assert response.status_code == 400 and error_code(response) == "EntityTooLarge"
    response = await env.status(session, 9)
    assert response.status_code == 400 and error_code(response) == "EntityTooSmall"
    assert env.local.stat(BUCKET, "obj") is None and env.local.stat(BUCKET, "big") is None


# -- resumable uploads ----------------------------------------------------------------------


async def test_resumable_upload_commits_only_at_the_final_chunk(env):
    data = os.urandom(2 * KIB256 + 1000)
    session = await env.start("chan/obj", len(data))
    assert re.fullmatch(rf"{URL}/{BUCKET}/chan/obj\?upload_id=[0-9a-f]{{64}}", session)

    response = await env.status(session, len(data))
    assert response.status_code == 308 and "range" not in response.headers

    response = await env.chunk(session, data[:KIB256], 0, len(data))
    assert response.status_code == 308
    assert response.headers["range"] == f"bytes=0-{KIB256 - 1}"
    response = await env.chunk(session, data[KIB256:2 * KIB256], KIB256, "*")
    assert response.headers["range"] == f"bytes=0-{2 * KIB256 - 1}"

    for total in (len(data), "*"):  # status queries report and commit nothing
        response = await env.status(session, total)
        assert response.status_code == 308
        assert response.headers["range"] == f"bytes=0-{2 * KIB256 - 1}"
    assert env.local.stat(BUCKET, "chan/obj") is None
    assert (await env.client.get(f"/{BUCKET}/chan/obj")).status_code == 404

    response = await env.chunk(session, data[2 * KIB256:], 2 * KIB256, len(data))
    assert response.status_code == 200
    assert env.local.path(BUCKET, "chan/obj").read_bytes() == data
    assert (await env.client.get(f"/{BUCKET}/chan/obj")).content == data

    # A finished session answers status queries (and repeats) with the object's metadata.
    response = await env.status(session, len(data))
    assert response.status_code == 200
    assert response.headers["x-goog-stored-content-length"] == str(len(data))
    assert (await env.chunk(session, data[2 * KIB256:], 2 * KIB256,
                            len(data))).status_code == 200


async def test_a_resent_chunk_only_adds_its_new_part(env):
    data = os.urandom(3 * KIB256)
    session = await env.start("obj", len(data))
    assert (await env.chunk(session, data[:2 * KIB256], 0, len(data))).status_code == 308
    # The client did not see that answer and sends from an older offset; the part we
    # already hold is not written again, even if it differs.
    resent = b"\0" * KIB256 + data[2 * KIB256:]
    response = await env.chunk(session, resent, KIB256, len(data))
    assert response.status_code == 200
    assert env.local.path(BUCKET, "obj").read_bytes() == data


async def test_a_chunk_wholly_before_the_offset_changes_nothing(env):
    data = os.urandom(3 * KIB256)
    session = await env.start("obj", len(data))
    await env.chunk(session, data[:2 * KIB256], 0, len(data))
    response = await env.chunk(session, b"\1" * KIB256, 0, len(data))
    assert response.status_code == 308 and response.headers["range"] == f"bytes=0-{2 * KIB256 - 1}"
    await env.chunk(session, data[2 * KIB256:], 2 * KIB256, len(data))
    assert env.local.path(BUCKET, "obj").read_bytes() == data


async def test_gaps_bad_chunk_sizes_and_bad_ranges_are_refused(env):
    data = os.urandom(4 * KIB256)
    session = await env.start("obj", len(data))
    await env.chunk(session, data[:KIB256], 0, len(data))
    refused = [
        (data[2 * KIB256:3 * KIB256], 2 * KIB256, len(data)),  # a gap
        (data[KIB256:KIB256 + 1000], KIB256, len(data)),  # not a multiple of 256 KiB
        (data[KIB256:2 * KIB256], KIB256, len(data) + 1),  # another total than before
        (data[KIB256:] + b"x", KIB256, len(data)),  # past the total
    ]
    for body, first, total in refused:
        response = await env.chunk(session, body, first, total)
        assert response.status_code == 400, (first, total, response.text)
    response = await env.client.put(session, content=b"x",
                                    headers={"content-range": "bytes 5-1/10"})
    assert response.status_code == 400
    response = await env.client.put(session, content=b"xy", headers={
        "content-range": f"bytes {KIB256}-{KIB256 + 9}/{len(data)}"})  # body shorter than said
    assert response.status_code == 400
    response = await env.status(session, len(data))
    assert response.headers["range"] == f"bytes=0-{KIB256 - 1}"  # nothing moved
    await env.chunk(session, data[KIB256:], KIB256, len(data))
    assert env.local.path(BUCKET, "obj").read_bytes() == data


async def test_empty_object_and_finishing_by_status_query(env):
    session = await env.start("empty", 0)
    assert (await env.status(session, 0)).status_code == 200
    assert env.local.path(BUCKET, "empty").read_bytes() == b""
    # An upload whose size was unknown until all of it was sent ends with "bytes */N".
    data = os.urandom(KIB256)
    session = await env.start("sized-late", len(data))
    assert (await env.chunk(session, data, 0, "*")).status_code == 308
    assert (await env.status(session, "*")).status_code == 308  # "*/*" only asks
    assert env.local.stat(BUCKET, "sized-late") is None
    assert (await env.status(session, len(data))).status_code == 200
    assert env.local.path(BUCKET, "sized-late").read_bytes() == data


async def test_sessions_survive_a_restart(env):
    data = os.urandom(2 * KIB256 + 5)
    session = await env.start("obj", len(data))
    await env.chunk(session, data[:KIB256], 0, len(data))
    leftovers = env.root / "bucket" / ".tmp" / "stale.tmp"
    leftovers.write_bytes(b"junk")
    stray = env.root / "bucket" / ".sessions" / ("f" * 64 + ".part")
    stray.write_bytes(b"junk")
    part = env.root / "bucket" / ".sessions" / (session.rsplit("=", 1)[1] + ".part")
    # Bytes of a chunk that was being received when we stopped: never acknowledged.
    part.write_bytes(part.read_bytes() + b"unacknowledged")
    await env.client.aclose()

    env.open_bucket()
    assert not leftovers.exists() and not stray.exists()
    response = await env.status(session, len(data))
    assert response.status_code == 308 and response.headers["range"] == f"bytes=0-{KIB256 - 1}"
    assert (await env.chunk(session, data[KIB256:], KIB256, len(data))).status_code == 200
    assert env.local.path(BUCKET, "obj").read_bytes() == data


async def test_unknown_and_expired_sessions_are_404(env):
    assert (await env.status(f"/{BUCKET}/obj?upload_id={'0' * 64}", 1)).status_code == 404
    assert (await env.status(f"/{BUCKET}/obj?upload_id=../../etc", 1)).status_code == 404
    session = await env.start("obj", 10)
    other_object = session.replace("/obj?", "/other?")
    assert (await env.status(other_object, 10)).status_code == 404
    env.clock.offset = 7 * 24 * 3600 + 1
    assert (await env.status(session, 10)).status_code == 404
    with pytest.raises(NotFound):
        await resumable.query_offset(env.client, session, 10)


# -- through a real server ------------------------------------------------------------------


def _server_side_tcp_nodelay(client_address: tuple[str, int]) -> int:
    """TCP_NODELAY of the socket in this process whose peer is ``client_address``."""
    for name in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        with sock:
            if sock.family != socket.AF_INET or sock.type != socket.SOCK_STREAM:
                continue
            try:
                peer = sock.getpeername()
            except OSError:
                continue
            if peer == client_address:
                return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    raise AssertionError(f"no server-side socket connected to {client_address}")


async def test_real_server_upload_read_and_tcp_nodelay(tmp_path):
    local = LocalBucket(tmp_path / "bucket", {})
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_asgi, create_app(local), host="127.0.0.1",
                                           port=0, shutdown_trigger=stop.wait))
        base = f"http://127.0.0.1:{port}"
        signer = UrlSigner.for_local_bucket(tmp_path, base)
        local.public_keys.update(signer.public_keys())
        data = os.urandom(3 * KIB256 + 100)
        path = tmp_path / "file"
        path.write_bytes(data)
        async with httpx.AsyncClient(trust_env=False) as client:
            signed = signer.resumable_upload(BUCKET, "chan/obj", size=len(data))
            session = await resumable.start_session(client, signed)
            assert session.startswith(f"{base}/{BUCKET}/chan/obj?upload_id=")
            await resumable.upload(client, session, path, len(data), chunk_size=KIB256)
            response = await client.get(f"{base}/{BUCKET}/chan/obj",
                                        headers={"range": "bytes=100-"})
            assert response.status_code == 206 and response.content == data[100:]

        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"HEAD /{BUCKET}/chan/obj HTTP/1.1\r\n"
                                  f"Host: 127.0.0.1:{port}\r\n\r\n".encode())
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 200")
            client_address = stream.socket.getsockname()
            assert _server_side_tcp_nodelay(client_address) == 1
        stop.set()  # a graceful stop: the server task ends and so does the nursery


async def test_a_resumable_upload_is_hashed_as_it_arrives(tmp_path, monkeypatch):
    """The hub's check of a finished upload uses the digest computed on the way in (even
    with a re-sent chunk), and reads the object again only if it changed since."""
    import hashlib

    from kachery_fs import localbucket as lb
    from kachery_fs import resumable
    from kachery_fs.hub.signing import UrlSigner

    signer = UrlSigner.for_local_bucket(tmp_path, "http://bucket.test")
    local = LocalBucket(tmp_path / "bucket", signer.public_keys())
    data = os.urandom(3 * lb.CHUNK_GRANULARITY + 11)
    src = tmp_path / "src"
    src.write_bytes(data)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(local))) as client:
        session = await resumable.start_session(
            client, signer.resumable_upload("kachery", "obj", size=len(data)))
        first = data[:2 * lb.CHUNK_GRANULARITY]
        r = await client.put(session, content=first, headers={
            "content-range": f"bytes 0-{len(first) - 1}/{len(data)}"})
        assert r.status_code == 308
        # a chunk that overlaps what is committed (a client that did not see the 308)
        three = 3 * lb.CHUNK_GRANULARITY
        r = await client.put(session, content=data[:three], headers={
            "content-range": f"bytes 0-{three - 1}/{len(data)}"})
        assert r.status_code == 308 and r.headers["range"] == f"bytes=0-{three - 1}"
        r = await client.put(session, content=data[three:], headers={
            "content-range": f"bytes {three}-{len(data) - 1}/{len(data)}"})
        assert r.status_code == 200
    reads = []
    real = hashlib.file_digest
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: reads.append(1) or real(*a))
    assert local.sha1("kachery", "obj") == hashlib.sha1(data).hexdigest()
    assert reads == []  # known from the upload, not read again
    assert local.sha1("kachery", "obj") == hashlib.sha1(data).hexdigest()
    assert reads == [1]  # asked again: read (the known digest is used once)
