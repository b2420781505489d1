"""The Uploader (the write path's queue, W3 to W8) against a real hub and local bucket on
127.0.0.1, with the node's parts built by the composition root (``parts.start``).

The bucket's side is checked on its own terms: a plain HTTP HEAD of the public object, the
object's file in the local bucket, and the requests that reached it
(``tests.util.log_requests``).
"""

from __future__ import annotations

import os
from functools import partial

import pytest
import trio

from kachery_fs import parts, resumable
from kachery_fs.errors import KacheryError
from kachery_fs.node import Node

from ..util import bucket_head, local_bucket_file, log_requests, offline_node, until
from . import test_faults
from .test_faults import CH, make_node

hub = test_faults.hub  # the fixture: a hub and its local bucket on 127.0.0.1
#: A bound on any one wait here (loopback, files of at most 1 MiB).
WAIT_S = 30
K = resumable.CHUNK_GRANULARITY


def state_of(node: Node, sha1: str) -> str | None:
    up = node.db.upload(CH, sha1)
    return None if up is None else up.state


async def test_an_enqueued_file_ends_up_in_the_bucket(hub, nursery):
    node = await make_node(hub, "node")
    uploader = (await parts.start(node, nursery)).uploader
    data = os.urandom(300_000)
    sha1 = node.store.add_bytes(data)
    assert (await bucket_head(node, CH, sha1)).status_code == 404
    uploader.enqueue(CH, sha1, len(data))
    assert state_of(node, sha1) in ("pending", "uploading")
    await until(lambda: state_of(node, sha1) == "done", within=WAIT_S, what="the upload")
    head = await bucket_head(node, CH, sha1)
    assert head.status_code == 200 and int(head.headers["content-length"]) == len(data)
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data
    assert hub.server.hub.cache.size_of(CH, sha1) == len(data)  # finalized: on record
    assert uploader.status(CH, sha1) == "in bucket"


async def test_content_already_in_the_bucket_is_done_without_sending_it(hub, nursery):
    first = await make_node(hub, "first")
    data = os.urandom(100_000)
    sha1 = first.store.add_bytes(data)
    with trio.fail_after(WAIT_S):
        await (await parts.start(first, nursery)).uploader.upload_now(CH, sha1, len(data))

    second = await make_node(hub, "second")
    uploader = (await parts.start(second, nursery)).uploader
    assert second.store.add_bytes(data) == sha1
    requests = log_requests(hub)
    uploader.enqueue(CH, sha1, len(data))
    await until(lambda: state_of(second, sha1) == "done", within=WAIT_S, what="the upload")
    assert requests.of("PUT") == [] and requests.of("POST", "upload") == []  # no session


async def test_a_saved_session_resumes_from_the_committed_offset_after_a_restart(
        hub, monkeypatch):
    size = 4 * K + 1000  # five chunks of 256 KiB, the last one short
    monkeypatch.setattr(resumable, "upload", partial(resumable.upload, chunk_size=K))
    node = await make_node(hub, "node")
    data = os.urandom(size)
    sha1 = node.store.add_bytes(data)

    def committed() -> int:
        up = node.db.upload(CH, sha1)
        return 0 if up is None else up.committed

    # First run, slowed to 512 KiB/s: stopped (as by a kill) once a chunk is committed.
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as first:
            uploader = (await parts.start(node, first, bwlimit=2 * K)).uploader
            uploader.enqueue(CH, sha1, size)
            await until(lambda: committed() >= K, within=WAIT_S, what="a first chunk")
            first.cancel_scope.cancel()
    saved = node.db.upload(CH, sha1)
    assert saved.state == "uploading" and saved.session_uri
    assert K <= saved.committed < size
    assert (await bucket_head(node, CH, sha1)).status_code == 404

    # Second run: the same session goes on from the bucket's offset.
    requests = log_requests(hub)
    with trio.fail_after(WAIT_S):
        async with trio.open_nursery() as second:
            await parts.start(node, second)
            await until(lambda: state_of(node, sha1) == "done", within=WAIT_S,
                        what="the resumed upload")
            second.cancel_scope.cancel()
    puts = requests.of("PUT")
    session_target = saved.session_uri.removeprefix(hub.url)
    assert puts and all(target == session_target for target, _ in puts), puts
    assert requests.of("POST", "upload") == []  # no new session was started
    sent = sum(int(headers.get("content-length", 0)) for _, headers in puts)
    assert 0 < sent <= size - K  # what the first run had committed was not sent again
    first_range = next(h["content-range"] for _, h in puts if not h["content-range"]
                       .startswith("bytes */"))
    assert int(first_range.split()[1].split("-")[0]) >= K
    assert local_bucket_file(hub.server, CH, sha1).read_bytes() == data


async def test_a_refused_upload_is_marked_failed_with_the_reason(hub, nursery):
    node = await make_node(hub, "reader-only")
    await hub.owner.authorize_node(CH, node.node_id, ["requestFiles"])  # no provideFiles
    uploader = (await parts.start(node, nursery)).uploader
    data = os.urandom(10_000)
    sha1 = node.store.add_bytes(data)
    uploader.enqueue(CH, sha1, len(data))
    await until(lambda: state_of(node, sha1) == "failed", within=WAIT_S,
                what="the upload to be refused")
    up = node.db.upload(CH, sha1)
    assert "provideFiles" in up.error, up.error
    assert uploader.status(CH, sha1) == f"failed: {up.error}"
    assert (await bucket_head(node, CH, sha1)).status_code == 404
    assert node.store.has(sha1)  # a refusal keeps the local copy
    # Not retried in this run: it stays failed (the next start retries failed uploads).
    await trio.sleep(0.3)
    assert state_of(node, sha1) == "failed"


async def test_upload_now_once_on_an_unreachable_hub_leaves_it_queued_with_its_error(
        tmp_path, nursery):
    node = Node(offline_node(tmp_path / "node"))
    try:
        uploader = (await parts.start(node, nursery, upload_workers=0)).uploader
        data = os.urandom(10_000)
        sha1 = node.store.add_bytes(data)
        hub_url = node.db.channel(CH).hub_url
        with trio.fail_after(WAIT_S), pytest.raises(KacheryError) as caught:
            await uploader.upload_now(CH, sha1, len(data), retry=False)
        up = node.db.upload(CH, sha1)
        assert up.state == "pending" and up.error and hub_url in up.error, up
        assert str(caught.value) == up.error
        assert up.attempts == 1
        assert f"retrying: {up.error}" in uploader.status(CH, sha1)
        assert [p.sha1 for p in node.db.pending_uploads()] == [sha1]  # the next run's
    finally:
        await node.aclose()
