"""The Python API (``kachery_fs.load_file`` and the rest) and the fsspec file system,
against a hub and local bucket in a subprocess on 127.0.0.1: node A stores, node B (its
own store, nothing in common with A's) loads, through the same read path as the mount."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest

import kachery_fs
from kachery_fs.api import Client
from kachery_fs.errors import InvalidInput, NotFound
from kachery_fs.manifest import CHUNK_SIZE
from kachery_fs.uris import parse_uri

from ..util import REPO, kfs, make_cluster, wait_for

CH = "api.data"


@pytest.fixture
def cluster(tmp_path):
    c = make_cluster(tmp_path, channel=CH)
    try:
        yield c
    finally:
        c.hub.stop()


@pytest.fixture
def clients(cluster):
    a, b = Client(cluster.a), Client(cluster.b, request_timeout=5)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_store_on_one_node_and_load_on_another(cluster, clients, tmp_path):
    a, b = clients
    src = tmp_path / "results.csv"
    data = os.urandom(300_000)
    src.write_bytes(data)
    uri = a.store_file(src)
    parsed = parse_uri(uri)
    assert uri.startswith("sha1://") and parsed.label == "results.csv"
    path = b.load_file(uri)
    assert Path(path).read_bytes() == data
    assert path.startswith(str(cluster.b))  # in B's own store
    assert b.load_bytes(uri, 1000, 2000) == data[1000:2000]
    assert b.load_bytes(uri, 299_990) == data[299_990:]
    assert b.load_bytes(uri, 5, 5) == b""
    assert b.size(uri) == len(data)
    # kachery 2's forms name the same content.
    h = parsed.sha1
    for form in (f"kachery::sha1:{h}:results.csv", f"kachery:scratch:sha1:{h}",
                 f"kachery:default:sha1:{h.upper()}:a%20b.csv"):
        assert b.load_bytes(form, 0, 10) == data[:10], form
    assert kfs(cluster.b, "cat", f"kachery::sha1:{h}:results.csv").stdout == data


def test_json_and_text(clients):
    a, b = clients
    obj = {"rate": 30000, "name": "tetrode é", "channels": [1, 2, 3]}
    uri = a.store_json(obj)
    assert parse_uri(uri).label is None
    assert b.load_json(uri) == obj
    assert a.store_json(dict(reversed(list(obj.items())))) == uri  # keys sorted: one hash
    labelled = a.store_json(obj, label="params.json")
    assert parse_uri(labelled).label == "params.json"
    assert b.load_text(a.store_text("hello\n")) == "hello\n"
    with pytest.raises(InvalidInput, match="not a JSON document"):
        b.load_json(a.store_text("not json"))
    with pytest.raises(InvalidInput, match="as JSON"):
        a.store_json({"x": float("nan")})


def test_mistakes_get_clear_errors(cluster, clients, tmp_path):
    a, b = clients
    with pytest.raises(InvalidInput, match="not a content URI"):
        b.load_bytes("https://example.org/x")
    with pytest.raises(InvalidInput, match="by md5"):
        b.load_bytes(f"kachery::md5:{'0' * 32}:x")
    with pytest.raises(InvalidInput, match="manifest"):
        b.load_bytes(f"sha1://{'1' * 40}?manifest=nothex")
    with pytest.raises(NotFound):
        b.load_bytes(f"sha1://{'1' * 40}")  # in no bucket, no node has it: the request ends
    with pytest.raises(InvalidInput, match="is a directory"):
        a.store_file(tmp_path)
    with pytest.raises(NotFound, match="no such file"):
        a.store_file(tmp_path / "missing")
    with pytest.raises(InvalidInput, match="counted from 0"):
        b.load_bytes(f"sha1://{'1' * 40}", -1)


def test_a_node_with_two_channels_is_asked_which(cluster, tmp_path):
    kfs(cluster.a, "hub", "channel", "create", "api.other", "--hub", cluster.hub.url)
    kfs(cluster.a, "join", cluster.hub.url, "api.other")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with Client(cluster.a) as a:
        with pytest.raises(InvalidInput, match="choose one with channel="):
            a.store_file(src)
        assert a.store_file(src, upload=False).startswith("sha1://")  # stored, not uploaded
    with Client(cluster.a, channel="api.other") as a:
        assert a.load_bytes(a.store_file(src)) == b"x"


def test_the_module_functions_use_KACHERY_FS_DIR(cluster, tmp_path):
    """In a fresh interpreter, as a user's script: no client set up by hand."""
    src = tmp_path / "f.bin"
    src.write_bytes(b"from a script")
    script = (
        "import kachery_fs, sys\n"
        f"uri = kachery_fs.store_file({str(src)!r})\n"
        "print(uri)\n"
        "print(kachery_fs.load_bytes(uri).decode())\n"
        "print(kachery_fs.load_json(kachery_fs.store_json([1, 2])))\n")
    env = {**os.environ, "KACHERY_FS_DIR": str(cluster.a),
           "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    uri, text, listed = result.stdout.splitlines()
    assert uri.startswith("sha1://") and text == "from a script" and listed == "[1, 2]"
    assert result.stderr == ""


def test_a_closed_client_says_so(cluster):
    c = Client(cluster.b)
    c.close()
    with pytest.raises(kachery_fs.api.KacheryError, match="closed"):
        c.load_bytes(f"sha1://{'1' * 40}")


def test_fsspec_opens_a_content_uri_seekable_and_verified(cluster, clients, tmp_path):
    a, b = clients
    data = os.urandom(100_000)
    src = tmp_path / "x.bin"
    src.write_bytes(data)
    uri = a.store_file(src)
    fs = fsspec.filesystem("sha1", client=b)
    with fs.open(uri) as f:
        f.seek(50_000)
        assert f.read(10) == data[50_000:50_010]
        f.seek(-5, os.SEEK_END)
        assert f.read() == data[-5:]
    assert fs.info(uri)["size"] == len(data)
    assert fs.cat_file(uri, 10, 20) == data[10:20]
    with pytest.raises(PermissionError, match="read-only"):
        fs.open(uri, "wb")
    h = parse_uri(uri).sha1
    # fsspec's own entry points: sha1:// by itself, kachery 2's forms with protocol=.
    with fsspec.open(f"sha1://{h}", client=b) as f:
        assert f.read(4) == data[:4]
    with fsspec.open(f"kachery::sha1:{h}:x.bin", protocol="kachery", client=b) as f:
        assert f.read(4) == data[:4]
    with fsspec.open(f"kachery:zone:sha1:{h}", protocol="kachery", client=b) as f:
        assert f.read(4) == data[:4]
    assert not fs.exists(f"sha1://{'2' * 40}")


def _chunks_present(node_dir, sha1: str) -> int:
    """Bytes of ``sha1``'s chunks in node ``node_dir``'s partial file."""
    with sqlite3.connect(node_dir / "store.db") as db:
        rows = db.execute("SELECT bytes FROM partials WHERE sha1 = ?", (sha1,)).fetchall()
    return sum(r[0] for r in rows)


def test_h5py_reads_a_large_hdf5_file_by_chunk_through_fsspec(cluster, clients, tmp_path):
    """h5py opens a 4-chunk HDF5 file through fsspec: its metadata and a slice of one
    dataset cost the chunks they lie in, not the file."""
    h5py = pytest.importorskip("h5py")
    np = pytest.importorskip("numpy")
    a, b = clients
    path = tmp_path / "rec.h5"
    n = 5_000_000  # float64: 40 MB a dataset, two datasets: 4 chunks of 20,000,000 bytes
    with h5py.File(path, "w") as f:
        first = f.create_dataset("first", (n,), dtype="f8")  # headers together, at the start
        second = f.create_dataset("second", (n,), dtype="f8")
        f.attrs["rate"] = 30000
        first[:] = np.arange(n, dtype="f8")
        second[:] = -np.arange(n, dtype="f8")
    size = path.stat().st_size
    assert size > 3 * CHUNK_SIZE
    uri = a.store_file(path)
    assert "?manifest=" in uri
    sha1 = parse_uri(uri).sha1
    with b.open(uri) as raw:
        with h5py.File(raw, "r") as f:
            assert set(f) == {"first", "second"}
            assert f.attrs["rate"] == 30000
            assert f["second"].shape == (n,)
            assert list(f["second"][-3:]) == [-(n - 3), -(n - 2), -(n - 1)]
    chunks = -(-size // CHUNK_SIZE)
    last = size - (chunks - 1) * CHUNK_SIZE
    # The metadata lies in chunk 0, the end of "second" in the last chunk: those two only.
    assert _chunks_present(cluster.b, sha1) == CHUNK_SIZE + last
    assert not (cluster.b / "sha1" / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1).exists()


def test_store_json_writes_compact_sorted_json(clients):
    """What store_json writes: compact, keys sorted (so equal objects get one hash)."""
    a, _ = clients
    uri = a.store_json({"b": 1, "a": [1.5, "x"]})
    assert a.load_bytes(uri) == json.dumps({"a": [1.5, "x"], "b": 1},
                                           separators=(",", ":")).encode()


def test_a_large_file_by_its_bare_hash_is_read_by_chunk_too(cluster, clients, tmp_path):
    """No ?manifest= in the URI (kachery 2's never has one): the hub vouches for the
    manifest its uploader sent, and a range costs its chunk, not the file."""
    a, b = clients
    src = tmp_path / "big.bin"
    data = os.urandom(2 * CHUNK_SIZE + 1000)
    src.write_bytes(data)
    sha1 = parse_uri(a.store_file(src)).sha1
    assert b.size(f"kachery::sha1:{sha1}:big.bin") == len(data)  # fetches nothing
    assert _chunks_present(cluster.b, sha1) == 0
    assert b.load_bytes(f"kachery::sha1:{sha1}:big.bin", 10, 20) == data[10:20]
    # (written to the partial file behind the read)
    wait_for(lambda: _chunks_present(cluster.b, sha1) >= CHUNK_SIZE, timeout=20,
             what="the chunk in B's partial file")
    time.sleep(0.5)
    assert _chunks_present(cluster.b, sha1) == CHUNK_SIZE  # that one only
    assert not (cluster.b / "sha1" / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1).exists()


def test_size_fetches_nothing(clients, cluster, tmp_path):
    a, b = clients
    src = tmp_path / "f"
    src.write_bytes(os.urandom(500_000))
    uri = a.store_file(src)
    assert b.size(uri) == 500_000
    sha1 = parse_uri(uri).sha1
    assert not (cluster.b / "sha1" / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1).exists()


def test_a_client_whose_parts_stopped_starts_them_again(clients):
    import trio

    a, _ = clients
    uri = a.store_text("before")
    parts = a._parts
    trio.from_thread.run_sync(parts.nursery.cancel_scope.cancel, trio_token=a._token)
    for _ in range(100):  # its thread notices
        if a._token is None:
            break
        time.sleep(0.05)
    assert a.load_text(uri) == "before"  # a new thread, new parts
    assert a._parts is not parts


def test_an_interrupt_cancels_the_call_on_the_clients_thread(clients):
    import trio

    a, _ = clients
    ended = threading.Event()

    async def forever(parts):
        try:
            await trio.sleep_forever()
        finally:
            ended.set()

    main = threading.main_thread().ident
    assert threading.get_ident() == main  # (where Python delivers SIGINT)
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            a._run(forever)
    finally:
        timer.join()
    assert ended.wait(10)  # not left running there
    assert a.load_text(a.store_text("after")) == "after"


def test_fsspec_makes_one_client_for_each_node_and_channel(cluster):
    one = fsspec.filesystem("sha1", node_dir=str(cluster.b))
    two = fsspec.filesystem("sha1", node_dir=str(cluster.b))
    other = fsspec.filesystem("sha1", node_dir=str(cluster.b), channel=CH)
    assert one.client is two.client and other.client is not one.client
    with pytest.raises(ValueError, match="not a content URI"):
        one.info("nonsense")
    assert not one.exists("nonsense")
    one.client.close()
    other.client.close()
