"""Errors reach the user as one line, never a traceback; `put` copes with a concurrent
upload of the same file and with a hub that goes away; a hub that hangs does not stall
permission checks."""

from __future__ import annotations

import argparse
import hashlib
import time

import httpx
import pytest
import trio

from kachery_fs import channels as channels_module
from kachery_fs import cli, resumable
from kachery_fs.cli import data as cli_data
from kachery_fs.cli import node as cli_node
from kachery_fs.errors import InvalidInput, NotFound
from kachery_fs.node import Node
from kachery_fs.state import NodeDB

from ..util import assert_one_line_error, cli_on_hub_in_process, offline_node, run_cli

URL = "http://hub.test"


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# -- errors raised inside nurseries ----------------------------------------------------------


def test_hub_serve_on_a_busy_port(tmp_path, busy_port):
    assert run_cli(tmp_path / "node", "init").returncode == 0  # no "created node" log line
    result = run_cli(tmp_path / "node", "hub", "serve", "--port", str(busy_port))
    assert_one_line_error(result, f"port {busy_port} is in use; choose another with --port,"
                          " or --port 0 for any free port")


def _main_raising(monkeypatch, exc: BaseException) -> int:
    async def failing(args):
        raise exc
    monkeypatch.setattr(cli_node, "_status", failing)
    return cli.main(["status"])


def test_main_unwraps_groups_of_expected_errors(monkeypatch, capsys):
    group = ExceptionGroup("nursery", [ExceptionGroup("inner", [InvalidInput("bad thing")]),
                                       NotFound("second")])
    assert _main_raising(monkeypatch, group) == 1
    assert capsys.readouterr().err == "kachery-fs: bad thing\n"

    group = BaseExceptionGroup("nursery", [trio.Cancelled._create(),
                                           OSError(98, "Address already in use")])
    assert _main_raising(monkeypatch, group) == 1
    assert capsys.readouterr().err == "kachery-fs: [Errno 98] Address already in use\n"

    group = BaseExceptionGroup("nursery", [KeyboardInterrupt(), trio.Cancelled._create()])
    assert _main_raising(monkeypatch, group) == 130


def test_main_keeps_the_traceback_of_a_bug(monkeypatch):
    group = ExceptionGroup("nursery", [InvalidInput("fine"), ZeroDivisionError("a bug")])
    with pytest.raises(ExceptionGroup):
        _main_raising(monkeypatch, group)


# -- put -------------------------------------------------------------------------------------------


@pytest.fixture
async def hub_node(tmp_path, monkeypatch):
    """A node joined to channel 'chan' of an in-process hub; `put` uses it."""
    node_dir = tmp_path / "node"
    async with cli_on_hub_in_process(node_dir, tmp_path / "hub",
                                     monkeypatch) as (server, open_node):
        node = open_node()
        hub = node.channels.hub(URL)
        await hub.create_channel("chan")
        await hub.authorize_node("chan", node.node_id, ["provideFiles", "requestFiles"])
        info = await hub.get_channel("chan")
        node.db.add_channel("chan", URL, info["bucketBaseUrl"], set(info["permissions"]))
        await node.aclose()
        yield node_dir, server, open_node


def put_args(*files) -> argparse.Namespace:
    return argparse.Namespace(files=[str(f) for f in files], channel=None, quiet=True,
                              bwlimit=None)


def upload_state(node_dir, sha: str):
    db = NodeDB(node_dir / "node.db")
    try:
        return db.upload("chan", sha)
    finally:
        db.close()


async def test_put_when_the_object_appears_before_the_session_starts(hub_node, tmp_path,
                                                                     monkeypatch, capsys):
    node_dir, server, _ = hub_node
    data = b"uploaded by the mount at the same time" * 100
    src = tmp_path / "file.bin"
    src.write_bytes(data)
    real_start = resumable.start_session

    async def racing(client, signed):
        # The mount uploads the same content first; then our session start meets 412.
        other = await real_start(client, signed)
        await resumable.upload(client, other, src, len(data))
        return await real_start(client, signed)

    monkeypatch.setattr(resumable, "start_session", racing)
    assert await cli_data._put(put_args(src)) == 0
    assert capsys.readouterr().out.strip() == f"sha1://{sha1(data)}?label=file.bin"
    assert server.hub.cache.size_of("chan", sha1(data)) == len(data)
    assert upload_state(node_dir, sha1(data)).state == "done"


async def test_put_when_the_object_appears_before_the_final_chunk(hub_node, tmp_path,
                                                                  monkeypatch, capsys):
    node_dir, server, _ = hub_node
    data = b"another racer" * 1000
    src = tmp_path / "other.bin"
    src.write_bytes(data)
    real_start = resumable.start_session

    async def racing(client, signed):
        ours = await real_start(client, signed)
        other = await real_start(client, signed)
        await resumable.upload(client, other, src, len(data))  # done before our last chunk
        return ours

    monkeypatch.setattr(resumable, "start_session", racing)
    assert await cli_data._put(put_args(src)) == 0
    assert sha1(data) in capsys.readouterr().out
    assert server.hub.cache.size_of("chan", sha1(data)) == len(data)
    assert upload_state(node_dir, sha1(data)).state == "done"


async def test_an_interrupted_put_resumes_where_it_stopped(hub_node, tmp_path, monkeypatch,
                                                          capsys):
    """Ctrl-C during `put` leaves the upload queued with its session; `put` again sends
    only what the bucket lacks, through the same uploader as the mount."""
    node_dir, server, _ = hub_node
    data = bytes(range(256)) * 4096 * 2  # 2 MiB: eight 256 KiB chunks
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    real_upload = resumable.upload
    offsets = []

    async def interrupted(client, session, path, size, *, offset=0, on_progress=None, **kw):
        offsets.append(offset)

        def progress(committed):
            on_progress(committed)
            raise KeyboardInterrupt  # the user's Ctrl-C, after the first chunk
        kw["chunk_size"] = resumable.CHUNK_GRANULARITY
        await real_upload(client, session, path, size, offset=offset, on_progress=progress,
                          **kw)

    monkeypatch.setattr(resumable, "upload", interrupted)
    with pytest.raises((KeyboardInterrupt, BaseExceptionGroup)):
        await cli_data._put(put_args(src))
    err = capsys.readouterr().err
    assert "interrupted; the upload of sha1://" in err and "stays queued (12% sent)" in err
    assert "run this `kachery-fs put` again to resume it" in err
    up = upload_state(node_dir, sha1(data))
    assert up.state == "uploading" and up.session_uri and up.committed == 256 * 1024

    async def resumed(client, session, path, size, *, offset=0, **kw):
        offsets.append(offset)
        await real_upload(client, session, path, size, offset=offset, **kw)

    monkeypatch.setattr(resumable, "upload", resumed)
    assert await cli_data._put(put_args(src)) == 0
    assert capsys.readouterr().out.strip() == f"sha1://{sha1(data)}?label=big.bin"
    assert offsets == [0, 256 * 1024]  # the second put sent only the rest
    assert server.hub.cache.size_of("chan", sha1(data)) == len(data)
    assert upload_state(node_dir, sha1(data)).state == "done"


async def test_put_honours_bwlimit(hub_node, tmp_path, monkeypatch):
    node_dir, server, _ = hub_node
    src = tmp_path / "limited.bin"
    src.write_bytes(b"slowly" * 100)
    real_upload = resumable.upload
    limits = []

    async def upload(*args, rate_limit=None, **kw):
        limits.append(rate_limit.rate if rate_limit else None)
        await real_upload(*args, rate_limit=rate_limit, **kw)

    monkeypatch.setattr(resumable, "upload", upload)
    args = put_args(src)
    args.bwlimit = 500 * 1024.0
    assert await cli_data._put(args) == 0
    assert limits == [500 * 1024.0]


def test_put_with_the_hub_gone_leaves_the_upload_queued(tmp_path):
    node_dir = offline_node(tmp_path / "node", {"provideFiles"})
    src = tmp_path / "data.bin"
    src.write_bytes(b"queued for later")
    result = run_cli(node_dir, "put", "-q", str(src))
    assert_one_line_error(result, "stays queued", "`kachery-fs mount`", "`kachery-fs serve`")
    up = upload_state(node_dir, sha1(b"queued for later"))
    assert up is not None and up.state in ("pending", "uploading") and up.error


# -- permission refresh against a hub that hangs -----------------------------------------


async def test_permissions_do_not_stall_on_a_hung_hub(tmp_path, monkeypatch):
    calls = []
    answering = False

    async def handler(request):
        calls.append(request)
        if not answering:
            await trio.sleep_forever()
        return httpx.Response(200, json={"channel": "chan", "permissions": ["requestFiles"],
                                         "bucketBaseUrl": f"{URL}/kachery"})

    node = Node(tmp_path / "node", create=True,
                client=httpx.AsyncClient(transport=httpx.MockTransport(handler)))
    try:
        node.db.add_channel("chan", URL, f"{URL}/kachery", {"provideFiles"})
        node.db._db.execute("UPDATE channels SET checked_at = 0")  # the cache is stale
        with trio.fail_after(10):
            start = time.monotonic()
            assert await node.channels.permissions("chan") == {"provideFiles"}
            first = time.monotonic() - start
            assert len(calls) == 1
            start = time.monotonic()
            assert await node.channels.permissions("chan") == {"provideFiles"}
            second = time.monotonic() - start
        assert first < channels_module.REFRESH_TIMEOUT_S + 1.0
        assert second < 0.1 and len(calls) == 1  # no second attempt at the hub

        # Once the hold-off has passed, the hub is asked again, and an answer is taken.
        monkeypatch.setattr(channels_module, "PERMISSIONS_TTL_S", 0.2)
        await trio.sleep(0.3)
        answering = True
        assert await node.channels.permissions("chan") == {"requestFiles"}
        assert len(calls) == 2
    finally:
        await node.aclose()
