"""File requests end to end without a mount: files in no bucket, asked for through the hub
with ``kachery-fs cat`` and uploaded by provider nodes running ``kachery-fs serve``. Real
processes on loopback; reads through a mount are in tests/mount/test_requests.py."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess

import pytest

from ..clusters import in_store, request_nodes, serving, stored
from ..util import KFS, kfs, node_env, wait_for


def _end(cat: subprocess.Popen) -> None:
    """Kill ``cat`` if it still runs, and close its stderr pipe."""
    if cat.poll() is None:
        cat.kill()
        cat.wait()
    cat.stderr.close()


@pytest.fixture
def nodes(tmp_path):
    yield from request_nodes(tmp_path)


def test_file_only_in_a_kachery_store_of_the_provider_is_provided(nodes):
    """A holds the file only in a kachery store on its machine: it copies it in, verified,
    and provides it."""
    data = os.urandom(2 * 1024 * 1024 + 3)
    h = hashlib.sha1(data).hexdigest()
    legacy = nodes.base / "kachery-cloud"
    path = legacy / "sha1" / h[:2] / h[2:4] / h[4:6] / h
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    kfs(nodes.a, "store", "add-source", str(legacy))
    with serving(nodes.a):
        assert kfs(nodes.b, "cat", h, timeout=60).stdout == data
    assert in_store(nodes.a, h).read_bytes() == data
    assert path.read_bytes() == data  # the source is only read


def test_provider_killed_mid_upload_another_takes_over(nodes):
    size = 12 * 1024 * 1024
    h, data = stored(nodes.a, size, seed=b"shared")
    src = nodes.base / "same"
    src.write_bytes(data)
    kfs(nodes.c, "store", "add", str(src))
    out = nodes.base / "out.bin"
    # A slow link (3 MiB/s) so that the first provider is caught mid-upload.
    with serving(nodes.a, "--bwlimit", "3M") as pa, serving(nodes.c, "--bwlimit", "3M") as pc:
        with open(out, "wb") as f:
            cat = subprocess.Popen([*KFS, "cat", h], env=node_env(nodes.b), stdout=f,
                                   stderr=subprocess.PIPE)
        try:
            logs = {pa: nodes.a / "serve.log", pc: nodes.c / "serve.log"}
            first = wait_for(lambda: next((p for p, log in logs.items()
                                           if f"providing sha1://{h}" in log.read_text()), None),
                             timeout=30, what="a provider to start uploading")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = pc if first is pa else pa
            assert cat.wait(timeout=120) == 0, cat.stderr.read().decode()
        finally:
            _end(cat)
    assert out.read_bytes() == data
    assert f"providing sha1://{h}" in logs[second].read_text()


def test_hub_restarted_during_a_request(nodes):
    h, data = stored(nodes.a, 10 * 1024 * 1024)
    out = nodes.base / "out.bin"
    with serving(nodes.a, "--bwlimit", "3M"):
        with open(out, "wb") as f:
            cat = subprocess.Popen([*KFS, "-v", "cat", h], env=node_env(nodes.b), stdout=f,
                                   stderr=subprocess.PIPE)
        try:
            wait_for(lambda: f"providing sha1://{h}" in (nodes.a / "serve.log").read_text(),
                     timeout=30, what="the upload to start")
            nodes.hub.stop()
            nodes.hub.start()  # same port, same state directory
            assert cat.wait(timeout=120) == 0, cat.stderr.read().decode()
        finally:
            _end(cat)
    assert out.read_bytes() == data
