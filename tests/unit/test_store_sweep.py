"""Temp files of the store are swept when nobody holds their flock, whatever PID their
name carries (a container's mount often gets the same PID every run)."""

from __future__ import annotations

import hashlib
import os

import httpx

from kachery_fs.bucket import Download
from kachery_fs.store import Store


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def temps(store: Store) -> set[str]:
    return {p.name for p in store.tmp_dir.iterdir()}


def test_an_unheld_temp_file_named_with_a_live_pid_is_swept(tmp_path):
    store = Store(tmp_path)
    # Left by a crashed run that had the PID this process has now.
    leftover = store.tmp_dir / f"{os.getpid()}-0123456789abcdef.part"
    leftover.write_bytes(b"half a file")
    # And one of this run, created then let go (its fd closed).
    path, fd = store.new_temp_file()
    assert path.name.startswith(f"{os.getpid()}-")
    os.close(fd)
    assert store.sweep_temp() == 2
    assert temps(store) == set()


def test_a_held_staging_file_is_not_swept_and_commits_after(tmp_path):
    store = Store(tmp_path)
    staging = store.new_staging()
    staging.write(0, b"being written")
    assert store.sweep_temp() == 0
    assert staging.path.exists()
    assert staging.commit() == sha1(b"being written")
    assert store.has(sha1(b"being written"))
    assert temps(store) == set()


async def test_a_download_temp_file_is_held(tmp_path):
    store = Store(tmp_path)
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(404))) \
            as client:
        d = Download(client, "http://bucket.test/x", sha1(b"abc"), 3, store)
        assert store.sweep_temp() == 0
        assert d.temp_path.exists()
        d.close_fd()
    assert store.sweep_temp() == 1  # let go without cleanup: swept
    assert not d.temp_path.exists()


def test_sweep_ignores_directories(tmp_path):
    store = Store(tmp_path)
    (store.tmp_dir / "somedir").mkdir()
    assert store.sweep_temp() == 0
    assert temps(store) == {"somedir"}
