"""The Resolver (the read path) against a real hub and local bucket on 127.0.0.1.

Each node's parts are built by the composition root (``parts.start``); the bucket's
objects are the local bucket's files, which a test may overwrite on disk to play a bucket
that serves bad bytes. Requests to the hub and the bucket are counted behind the hub's
fault layer (``tests.util.log_requests``).
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from kachery_fs import parts, resolver, settings
from kachery_fs.errors import IntegrityError, NotFound
from kachery_fs.resolver import DownloadContent, LocalContent

from ..util import local_bucket_file, log_requests, past_startup_grace, until
from . import test_faults
from .test_faults import CH, connected_provider, in_bucket, make_node

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
#: A bound on any one wait here (loopback, files of at most a few hundred KB).
WAIT_S = 30


async def read_all(content) -> bytes:
    try:
        with trio.fail_after(WAIT_S):
            return await content.read(0, content.size)
    finally:
        content.close()


def corrupt(hub, sha1: str) -> bytes:
    """Overwrite the bucket's object of ``sha1`` on disk with as many other bytes (so its
    size still matches: only its hash can tell); its good bytes."""
    path = local_bucket_file(hub.server, CH, sha1)
    good = path.read_bytes()
    bad = bytes(b ^ 0xFF for b in good)
    path.write_bytes(bad)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a new generation
    return good


def kachery_file(store_dir, sha1: str):
    """Where a kachery store keeps ``sha1``: ``sha1/ab/cd/ef/<hash>``."""
    return store_dir / "sha1" / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1


async def test_size_and_open_of_content_in_the_bucket(hub, nursery):
    data = os.urandom(200_000)
    sha1 = await in_bucket(hub, data)
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    assert res.local_size(sha1) is None
    assert await res.size(CH, sha1) == len(data)
    content = await res.open(CH, sha1)
    assert isinstance(content, DownloadContent) and content.size == len(data)
    assert await read_all(content) == data
    # Installed, verified: the next open reads the store.
    await until(lambda: node.store.has(sha1), within=10, what="the download to install")
    again = await res.open(CH, sha1)
    assert isinstance(again, LocalContent)
    assert await read_all(again) == data
    assert res.local_size(sha1) == len(data)


async def test_two_concurrent_opens_of_a_missing_hash_make_one_download(hub, nursery):
    data = os.urandom(300_000)  # one ranged GET (the chunk is 8 MiB)
    sha1 = await in_bucket(hub, data)
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    requests = log_requests(hub)
    contents = []

    async def open_and_keep():
        contents.append(await res.open(CH, sha1))

    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as both:
            both.start_soon(open_and_keep)
            both.start_soon(open_and_keep)
    assert len(contents) == 2
    assert all(isinstance(c, DownloadContent) for c in contents)
    assert contents[0].download is contents[1].download
    for content in contents:
        assert await read_all(content) == data
    gets = requests.of("GET", f"/sha1/{sha1[:2]}/")
    assert len(gets) == 1, gets
    await until(lambda: node.store.has(sha1), within=10, what="the download to install")


async def test_a_corrupted_bucket_object_is_refused_and_reported_to_the_hub(hub, nursery):
    data = os.urandom(100_000)
    sha1 = await in_bucket(hub, data)
    corrupt(hub, sha1)
    assert hub.server.hub.cache.size_of(CH, sha1) == len(data)  # on the hub's record
    past_startup_grace(hub.server)  # no provider is coming: the report's request fails
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    content = await res.open(CH, sha1)
    with pytest.raises(IntegrityError) as caught:
        await read_all(content)
    assert sha1 in str(caught.value) and "no good copy" in str(caught.value)
    assert not node.store.has(sha1)  # bad bytes are never cached
    # The hub read the object, found it bad, deleted it and forgot it.
    assert not local_bucket_file(hub.server, CH, sha1).exists()
    assert hub.server.hub.cache.size_of(CH, sha1) is None
    # For a while, opens are refused at once rather than downloading bad bytes again.
    with pytest.raises(IntegrityError):
        await res.open(CH, sha1)


async def test_after_a_corrupted_object_a_good_copy_from_a_provider_opens(
        hub, nursery, monkeypatch):
    monkeypatch.setattr(resolver, "BAD_OBJECT_TTL_S", 0.5)  # a bad object is refused 0.5 s
    data = os.urandom(100_000)
    sha1 = await in_bucket(hub, data)
    corrupt(hub, sha1)
    past_startup_grace(hub.server)
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    with pytest.raises(IntegrityError):
        await read_all(await res.open(CH, sha1))
    assert not local_bucket_file(hub.server, CH, sha1).exists()

    provider = await connected_provider(hub, nursery)
    provider.store.add_bytes(data)
    await trio.sleep(0.6)  # past the refusal
    assert await read_all(await res.open(CH, sha1)) == data
    # The provider's upload put the good copy in the bucket.
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
    await until(lambda: node.store.has(sha1), within=10, what="the download to install")
    assert node.store.path(sha1).read_bytes() == data


async def test_a_reader_of_a_corrupted_object_gets_the_good_copy_a_provider_sends(
        hub, nursery):
    """With a provider online, the handle that met the bad bytes reads the good ones: the
    hub deletes the bad object, the provider uploads its copy, the download starts over."""
    data = os.urandom(100_000)
    sha1 = await in_bucket(hub, data)
    corrupt(hub, sha1)
    provider = await connected_provider(hub, nursery)
    provider.store.add_bytes(data)
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    requests = log_requests(hub)
    assert await read_all(await res.open(CH, sha1)) == data
    assert len(requests.of("GET", sha1)) == 2  # the bad copy, then the good one
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
    assert provider.db.upload(CH, sha1).state == "done"


async def test_an_empty_object_under_the_hash_of_other_content_is_not_read_as_empty(
        hub, nursery):
    """A read of an empty object would end before any byte is verified: the resolver
    takes it for a bad object, the hub checks and deletes it, a provider sends the file."""
    data = os.urandom(10_000)
    sha1 = await in_bucket(hub, data)
    local_bucket_file(hub.server, CH, sha1).write_bytes(b"")
    provider = await connected_provider(hub, nursery)
    provider.store.add_bytes(data)
    node = await make_node(hub, "reader")
    res = (await parts.start(node, nursery)).resolver
    content = await res.open(CH, sha1)
    assert content.size == len(data)
    assert await read_all(content) == data
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data


async def test_open_here_reads_local_content_and_nothing_else(hub, nursery):
    data = os.urandom(10_000)
    sha1_in_bucket = await in_bucket(hub, os.urandom(1000))
    node = await make_node(hub, "node")
    res = (await parts.start(node, nursery)).resolver
    sha1 = node.store.add_bytes(data)
    content = await res.open_here(sha1)
    assert isinstance(content, LocalContent)
    assert await read_all(content) == data
    requests = log_requests(hub)
    assert await res.open_here(sha1_in_bucket) is None  # in the bucket, not here
    assert await res.open_here(hashlib.sha1(b"nowhere").hexdigest()) is None
    assert requests.seen == []  # and nobody was asked


async def test_content_in_a_kachery_store_on_this_machine_is_copied_in_verified(
        hub, nursery, tmp_path):
    source = tmp_path / "kachery-storage"
    good = os.urandom(20_000)
    bad_claim = os.urandom(20_000)
    good_sha1 = hashlib.sha1(good).hexdigest()
    bad_sha1 = hashlib.sha1(b"what the file claims to be").hexdigest()
    for sha1, data in ((good_sha1, good), (bad_sha1, bad_claim)):
        path = kachery_file(source, sha1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    node = await make_node(hub, "node")
    settings.update(node.dir, sources=[str(source)], auto_sources=False)
    res = (await parts.start(node, nursery)).resolver

    content = await res.open_here(good_sha1)
    assert isinstance(content, LocalContent)  # served from our copy, not the source
    assert await read_all(content) == good
    assert node.store.path(good_sha1).read_bytes() == good
    assert kachery_file(source, good_sha1).read_bytes() == good  # the source is only read

    # A file that does not hash to its name is not used, and nothing is cached.
    assert await res.open_here(bad_sha1) is None
    assert not node.store.has(bad_sha1)
    # Nor does a lookup through a channel take it: the bucket has no such object either.
    past_startup_grace(hub.server)
    with pytest.raises(NotFound):
        await res.size(CH, bad_sha1)
