"""gs:// channels against fake-gcs-server: the hub's GCS backend (signed URLs, stat, list,
delete through google-cloud-storage), nodes' uploads and ranged reads; the whole cycle
through real mounts, eviction from the bucket included, is in tests/mount/test_gcs.py. The
emulator is a real Go server on loopback, set with the standard ``STORAGE_EMULATOR_HOST``
in the hub's environment only: nodes learn everything from the hub. The hub signs with a
service-account key made here (signing is local).

The strict local bucket stays where signatures and resumption are tested
(test_localbucket.py, test_resumable.py): fake-gcs-server checks neither.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import httpx
import pytest
from google.oauth2 import service_account

from kachery_fs import resumable
from kachery_fs.bucket import Download, object_url
from kachery_fs.errors import IntegrityError, InvalidInput, NotFound
from kachery_fs.hub.gcs import GoogleCloudStorage
from kachery_fs.hub.serve import HubServer
from kachery_fs.hub.signing import UrlSigner
from kachery_fs.hub_client import HubClient
from kachery_fs.identity import NodeKey
from kachery_fs.protocol import object_key
from kachery_fs.store import Store

from ..gcs import BUCKET, random_file, service_account_key
from ..util import FakeGcsServer, kfs

CH = "gcs.test"
HUB_URL = "http://hub.test"
K = resumable.CHUNK_GRANULARITY
MiB = 1 << 20


def emulated_gcs(fake: FakeGcsServer, tmp_path: Path) -> GoogleCloudStorage:
    return GoogleCloudStorage.from_environment(
        service_account_key(tmp_path / "key.json"), environ={"STORAGE_EMULATOR_HOST": fake.url})


@pytest.fixture
def connects(monkeypatch):
    """Every address this process connects a socket to, from here on."""
    seen: list = []
    connect = socket.socket.connect

    def recording(sock, address):
        seen.append(address)
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording)
    return seen


# -- the hub's backend, in process ---------------------------------------------------------


@pytest.fixture
async def hub(tmp_path, fake_gcs):
    """A hub in process (API over ASGI) with gs:// on the emulator; the owner's client,
    and a plain client for the emulator."""
    owner = NodeKey.generate()
    server = HubServer(tmp_path / "hub", owner_id=owner.node_id,
                       gcs=emulated_gcs(fake_gcs, tmp_path))
    server._set_public_url(HUB_URL)
    to_hub = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app), base_url=HUB_URL)
    web = httpx.AsyncClient(trust_env=False, timeout=30)
    try:
        yield server, HubClient(HUB_URL, owner, to_hub), web
    finally:
        await web.aclose()
        await to_hub.aclose()
        server.close()


async def test_upload_finalize_and_ranged_reads_on_the_emulator(hub, fake_gcs, tmp_path,
                                                                connects):
    server, owner, web = hub
    await owner.create_channel(CH, f"gs://{BUCKET}")
    info = await owner.get_channel(CH)
    assert info["bucketBaseUrl"] == f"{fake_gcs.url}/{BUCKET}"
    await owner.authorize_node(CH, owner.key.node_id, ["provideFiles"])

    data, sha1 = random_file(tmp_path / "f", 5 * K + 5)
    signed = await owner.initiate_upload(CH, sha1, len(data))
    assert signed.url.startswith(f"{fake_gcs.url}/{BUCKET}/{object_key(CH, sha1)}?")
    session = await resumable.start_session(web, signed)
    committed = []
    await resumable.upload(web, session, tmp_path / "f", len(data), chunk_size=K, sha1=sha1,
                           on_progress=committed.append)
    assert committed == [K, 2 * K, 3 * K, 4 * K, 5 * K, len(data)]  # six chunks, none re-sent
    await owner.finalize_upload(CH, sha1, len(data))
    assert fake_gcs.objects(BUCKET) == {object_key(CH, sha1): len(data)}
    assert await owner.initiate_upload(CH, sha1, len(data)) is None  # present: the hub stat'ed it

    # Nodes read by parallel ranged GETs (each answered 206 with its Content-Range), verified.
    store = Store(tmp_path / "node")
    download = Download(web, object_url(info["bucketBaseUrl"], CH, sha1), sha1, len(data),
                        store, chunk_size=K, parallel=4)
    await download.run()
    assert download.error is None and store.path(sha1).read_bytes() == data

    # Everything went to the emulator on loopback: no token fetch, no Google endpoint.
    assert connects and set(connects) == {("127.0.0.1", fake_gcs.port)}


async def test_finalize_checks_size_and_presence(hub, fake_gcs, tmp_path):
    """fake-gcs-server does not enforce the signed size; the hub's check at finalize does."""
    server, owner, web = hub
    await owner.create_channel(CH, f"gs://{BUCKET}")
    await owner.authorize_node(CH, owner.key.node_id, ["provideFiles"])
    data, sha1 = random_file(tmp_path / "f", 1000)
    signed = await owner.initiate_upload(CH, sha1, 999)  # the node lies about the size
    session = await resumable.start_session(web, signed)
    await resumable.upload(web, session, tmp_path / "f", len(data))
    assert fake_gcs.objects(BUCKET) == {object_key(CH, sha1): 1000}
    with pytest.raises(IntegrityError, match="size 1000 instead of 999"):
        await owner.finalize_upload(CH, sha1, 999)
    assert fake_gcs.objects(BUCKET) == {}  # deleted
    with pytest.raises(NotFound, match="not in the bucket"):
        await owner.finalize_upload(CH, sha1, 1000)


async def test_a_recorded_object_of_the_right_size_and_wrong_bytes_is_disputed_and_deleted(
        hub, fake_gcs, tmp_path):
    """The hub cannot hash at finalize on GCS, so junk of the right size is recorded; the
    first reader that finds it bad tells the hub, which reads it, and deletes it."""
    server, owner, web = hub
    await owner.create_channel(CH, f"gs://{BUCKET}")
    await owner.authorize_node(CH, owner.key.node_id, ["provideFiles", "requestFiles"])
    data, sha1 = random_file(tmp_path / "real", 3000)
    random_file(tmp_path / "junk", 3000)
    signed = await owner.initiate_upload(CH, sha1, 3000)
    session = await resumable.start_session(web, signed)
    await resumable.upload(web, session, tmp_path / "junk", 3000)
    await owner.finalize_upload(CH, sha1, 3000)
    assert server.hub.cache.size_of(CH, sha1) == 3000  # recorded: the hub cannot tell
    answer = await owner.request_file(CH, sha1, bad=True)
    assert fake_gcs.objects(BUCKET) == {}  # read, found bad, deleted
    assert server.hub.cache.size_of(CH, sha1) is None
    assert answer["state"] != "finished"  # on to the providers
    # a good object disputed is read once, then left alone
    signed = await owner.initiate_upload(CH, sha1, 3000)
    session = await resumable.start_session(web, signed)
    await resumable.upload(web, session, tmp_path / "real", 3000)
    await owner.finalize_upload(CH, sha1, 3000)
    for _ in range(2):
        await owner.request_file(CH, sha1, bad=True)
    assert fake_gcs.objects(BUCKET) == {object_key(CH, sha1): 3000}
    assert (CH, sha1) in server.hub._checked


async def test_both_backends_stat_and_delete(hub, fake_gcs):
    server, owner, web = hub
    await owner.create_channel("on.gcs", f"gs://{BUCKET}")
    await owner.create_channel("on.local")
    keys = {"a/b/one": 3, "a/b/two": 5, "a/bc": 1, "a/c/three": 7, "z": 2}
    for uri, ours in (("gs://" + BUCKET, web), ("local://kachery", owner.client)):
        backend = server.buckets.for_uri(uri)
        for key, size in keys.items():
            signed = backend.put(key, size=size, expires_s=60)
            r = await ours.put(signed.url, content=b"x" * size, headers=signed.headers)
            assert r.status_code == 200, r.text
        for key, size in keys.items():
            assert await backend.stat(key) == size
        assert await backend.stat("a/b") is None and await backend.stat("nothing") is None
        await backend.delete("a/b/one")
        await backend.delete("a/b/one")  # already gone: no error
        assert await backend.stat("a/b/one") is None and await backend.stat("a/c/three") == 7


# -- fake-gcs-server's gaps, and how uploads to it avoid them -------------------------------


class _FailingChunk(httpx.AsyncBaseTransport):
    """The real transport, except that the ``fail_at``-th chunk PUT fails before it is sent."""

    def __init__(self, fail_at: int):
        self.inner = httpx.AsyncHTTPTransport()
        self.fail_at = fail_at
        self.requests: list[str] = []

    async def handle_async_request(self, request):
        self.requests.append(f"{request.method} {request.headers.get('content-range', '')}")
        if request.method == "PUT" and len(self.requests) == self.fail_at:
            raise httpx.ConnectError("connection lost", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self):
        await self.inner.aclose()


async def test_emulator_upload_is_restarted_never_queried_nor_resent(fake_gcs, tmp_path):
    bucket = emulated_gcs(fake_gcs, tmp_path).bucket(BUCKET)
    data, sha1 = random_file(tmp_path / "f", 5 * K + 5)
    key = f"up/{sha1}"
    transport = _FailingChunk(fail_at=4)  # start, two chunks, then the third fails
    async with httpx.AsyncClient(transport=transport) as client:
        session = await resumable.start_session(
            client, bucket.resumable_upload(key, size=len(data), expires_s=60))
        assert resumable.is_emulator(session)
        with pytest.raises(NotFound, match="start a new session"):
            await resumable.upload(client, session, tmp_path / "f", len(data), chunk_size=K)
        # Nothing was committed: a status query would have made the 2 chunks the object.
        assert fake_gcs.objects(BUCKET) == {}
        sent = len(transport.requests)
        with pytest.raises(NotFound, match="start a new session"):
            await resumable.query_offset(client, session, len(data))
        assert len(transport.requests) == sent  # not asked at all
        # The caller's next attempt: a new session from the first byte.
        session = await resumable.start_session(
            client, bucket.resumable_upload(key, size=len(data), expires_s=60))
        await resumable.upload(client, session, tmp_path / "f", len(data), chunk_size=K)
    assert fake_gcs.read(BUCKET, key) == data
    assert transport.requests[:4] == ["POST ", f"PUT bytes 0-{K - 1}/{len(data)}",
                                      f"PUT bytes {K}-{2 * K - 1}/{len(data)}",
                                      f"PUT bytes {2 * K}-{3 * K - 1}/{len(data)}"]
    assert not any("*/" in r for r in transport.requests)


def test_fake_gcs_server_gaps_are_still_there(fake_gcs, tmp_path):
    """The gaps that gs:// on an emulator works around (hub.signing, resumable). Should
    this fail after an emulator upgrade, the matching workaround may go."""
    credentials = service_account.Credentials.from_service_account_file(
        service_account_key(tmp_path / "key.json"))
    plain = UrlSigner(credentials, api_access_endpoint=fake_gcs.url)
    web = httpx.Client(trust_env=False)

    def session(key: str, size: int, *, name: bool = True) -> str:
        signed = plain.resumable_upload(BUCKET, key, size=size, expires_s=60)
        # No signature is checked: a wrong one is taken as well.
        url = re.sub(r"X-Goog-Signature=[0-9a-f]+", "X-Goog-Signature=00", signed.url)
        r = web.post(url + (f"&name={key}" if name else ""), headers=signed.headers)
        assert r.status_code in (200, 201), r.text
        return r.headers["location"]

    chunk, n = os.urandom(K), 2 * K
    # A signed start without ?name= makes an object with an empty name.
    assert "name=&" in session("k/noname", n, name=False)
    # A status query commits what was sent so far as the whole object.
    s = session("k/query", n)
    assert web.put(s, content=chunk, headers={"content-range": f"bytes 0-{K - 1}/{n}"}
                   ).status_code == 308
    web.put(s, headers={"content-range": f"bytes */{n}"})
    assert fake_gcs.objects(BUCKET, "k/query") == {"k/query": K}
    # A chunk sent twice is appended twice.
    s = session("k/twice", n)
    for first in (0, 0, K):
        web.put(s, content=chunk, headers={"content-range": f"bytes {first}-{first + K - 1}/{n}"})
    assert fake_gcs.objects(BUCKET, "k/twice") == {"k/twice": 3 * K}
    web.close()


# -- credentials and names -------------------------------------------------------------------


@pytest.fixture
def bare_environment(monkeypatch, tmp_path):
    """No emulator, no GOOGLE_APPLICATION_CREDENTIALS, an empty gcloud configuration."""
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    return tmp_path / "gcloud"


async def test_gs_channels_without_a_signing_key_say_what_to_do(tmp_path, bare_environment,
                                                                monkeypatch, connects):
    owner = NodeKey.generate()
    server = HubServer(tmp_path / "hub", owner_id=owner.node_id)  # no --gcs-credentials
    server._set_public_url(HUB_URL)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                                 base_url=HUB_URL) as client:
        hub = HubClient(HUB_URL, owner, client)
        for bad, why in (("gs://Kfs_Test", "invalid bucket name"), ("gs://ab", "3-63"),
                         ("gs://kfs-test/sub", "give a whole bucket"),
                         ("gs://google-data", "'google'")):
            with pytest.raises(InvalidInput, match=why):
                await hub.create_channel(CH, bad)
        with pytest.raises(InvalidInput, match="this hub has none.*--gcs-credentials KEY.json"):
            await hub.create_channel(CH, f"gs://{BUCKET}")
        # gcloud's Application Default Credentials of a user hold no key to sign with.
        bare_environment.mkdir()
        (bare_environment / "application_default_credentials.json").write_text(json.dumps({
            "type": "authorized_user", "client_id": "x", "client_secret": "y",
            "refresh_token": "z"}))
        with pytest.raises(InvalidInput, match="a user's Application Default Credentials"
                                               ".*--gcs-credentials KEY.json"):
            await hub.create_channel(CH, f"gs://{BUCKET}")
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "gone.json"))
        with pytest.raises(InvalidInput, match="gone.json: no such file"):
            await hub.create_channel(CH, f"gs://{BUCKET}")
        # With a key in GOOGLE_APPLICATION_CREDENTIALS, the channel is created (nothing is
        # asked of Google until an object is).
        service_account_key(tmp_path / "gone.json")
        assert (await hub.create_channel(CH, f"gs://{BUCKET}"))["bucket"] == f"gs://{BUCKET}"
        info = await hub.get_channel(CH)
        assert info["bucketBaseUrl"] == f"https://storage.googleapis.com/{BUCKET}"
    server.close()
    assert connects == []


def test_hub_serve_refuses_a_bad_key_file_at_start(tmp_path):
    node = tmp_path / "node"
    kfs(node, "init")
    missing = tmp_path / "missing.json"
    r = kfs(node, "hub", "serve", "--port", "0", "--gcs-credentials", str(missing),
            check=False, timeout=30)
    err = r.stderr.decode()
    assert r.returncode == 1 and f"{missing}: no such file" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
