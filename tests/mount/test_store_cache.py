"""The local store as a managed cache, through real mounts: content served from kachery
stores on the machine with no bucket and no provider, and a mount that evicts what was read
least recently and reads it again through the bucket.

The policy itself is tested in tests/unit/test_store_cache.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

from kachery_fs.store import Store

from ..stores import content, present, sha1
from ..util import HubProcess, kfs, make_cluster, mounted, require_fuse, wait_for, xattr


def _put_in_store_dir(root: Path, data: bytes, *, suffix: str = "", subdir: str = "sha1"):
    h = sha1(data)
    path = root / subdir / h[:2] / h[2:4] / h[4:6] / (h + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    return h, path


def _snapshot(*roots: Path) -> dict:
    """Every file under ``roots``: bytes, mtime and mode (sources are never written)."""
    snap = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            st = path.lstat()
            snap[str(path)] = (path.read_bytes() if path.is_file() else None, st.st_mtime_ns,
                               st.st_mode)
    return snap


def test_kachery_stores_are_read_through_the_mount_verified(tmp_path, monkeypatch):
    require_fuse()
    node = tmp_path / "node"
    node_id = kfs(node, "init").stdout.decode().strip()
    hub = HubProcess(node, tmp_path / "hub").start()
    try:
        kfs(node, "hub", "channel", "create", "legacy", "--hub", hub.url)
        kfs(node, "hub", "channel", "authorize", "legacy", node_id, "--permissions", "all",
            "--hub", hub.url)
        kfs(node, "join", hub.url, "legacy")
    finally:
        hub.stop()  # no hub, no bucket, no provider from here on

    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    # kachery-cloud: a stored file, a linked file, and a stored file that went bad.
    cloud = tmp_path / "kachery-cloud"
    stored = content("stored in kachery-cloud", 300_000)
    h_stored, path = _put_in_store_dir(cloud, stored)
    path.write_bytes(stored)
    linked = content("linked from kachery-cloud")
    h_linked, path = _put_in_store_dir(cloud, linked, subdir="linked_files/sha1")
    (elsewhere / "linked.bin").write_bytes(linked)
    path.write_text(json.dumps({"path": str(elsewhere / "linked.bin"), "size": len(linked),
                                "mtime": 0, "sha1": h_linked}))
    good = content("the real bytes")
    h_bad, path = _put_in_store_dir(cloud, good)
    path.write_bytes(good[:-1] + b"X")
    later = content("read with kachery-fs cat")
    h_later, path = _put_in_store_dir(cloud, later)
    path.write_bytes(later)
    # The hub-era daemon's store, found at its standard location: a .link file.
    daemon = tmp_path / "kachery-storage"
    pointed = content("pointed to by a daemon .link")
    h_pointed, path = _put_in_store_dir(daemon, pointed, suffix=".link")
    (elsewhere / "pointed.bin").write_bytes(pointed)
    path.write_text(json.dumps({"path": str(elsewhere / "pointed.bin"),
                                "stat": {"size": len(pointed), "mtime": 0}}))
    monkeypatch.setenv("KACHERY_STORAGE_DIR", str(daemon))
    monkeypatch.setenv("KACHERY_CLOUD_DIR", str(tmp_path / "absent-1"))
    monkeypatch.setenv("KACHERY_DIR", str(tmp_path / "absent-2"))

    kfs(node, "store", "add-source", str(cloud))
    listing = kfs(node, "store", "sources").stdout.decode()
    assert f"{cloud}  (configured)" in listing
    assert f"{daemon}  (found automatically)" in listing
    refused = kfs(node, "store", "add-source", str(elsewhere), check=False)
    assert refused.returncode == 1 and b"does not look like a kachery store" in refused.stderr
    before = _snapshot(cloud, daemon, elsewhere)

    mnt = tmp_path / "mnt"
    with mounted(node, mnt):
        sha1_dir = mnt / "legacy" / "sha1"
        for h, data in ((h_stored, stored), (h_linked, linked), (h_pointed, pointed)):
            got = subprocess.run(["cat", str(sha1_dir / h)], capture_output=True, check=True)
            assert got.stdout == data
        bad = subprocess.run(["cat", str(sha1_dir / h_bad)], capture_output=True)
        assert bad.returncode != 0 and bad.stdout == b""
        log = (node / "mount-test.log").read_text()
        assert f"does not hold the content of sha1://{h_bad}" in log
    store = Store(node)
    assert present(store, h_stored, h_linked, h_pointed, h_bad) == {h_stored, h_linked,
                                                                   h_pointed}
    assert store.path(h_stored).read_bytes() == stored
    store.close()

    # The same path without a mount.
    assert kfs(node, "cat", f"sha1://{h_later}").stdout == later
    refused = kfs(node, "cat", h_bad, check=False)
    assert refused.returncode == 1 and refused.stdout == b""
    assert f"does not hold the content of sha1://{h_bad}" in refused.stderr.decode()
    assert _snapshot(cloud, daemon, elsewhere) == before  # nothing written to a source


KiB = 1024
FILE = 256 * KiB


def test_a_mount_evicts_what_was_read_least_recently(tmp_path):
    require_fuse()
    c = make_cluster(tmp_path, channel="cache", b_permissions="requestFiles,provideFiles")
    with ExitStack() as stack:
        stack.callback(c.hub.stop)
        data = {}
        for i in range(1, 5):
            src = tmp_path / f"f{i}.bin"
            src.write_bytes(os.urandom(FILE))
            uri = kfs(c.a, "put", "-q", str(src)).stdout.decode().strip()
            data[uri.split("/")[2].split("?")[0]] = src.read_bytes()
        f1, f2, f3, f4 = data
        # Room for three and a half files: a fourth one takes B over, eviction goes to 90 %.
        kfs(c.b, "init", "--cache-size", f"{7 * FILE // 2}")
        stack.enter_context(mounted(c.b, c.mnt_b))
        store = Store(c.b)
        stack.callback(store.close)
        mine = os.urandom(FILE)
        (c.mnt_b / "cache" / "mine.bin").write_bytes(mine)  # written here: pinned
        w = sha1(mine)
        sha1_dir = c.mnt_b / "cache" / "sha1"

        def read_through_mount(h):
            assert (sha1_dir / h).read_bytes() == data[h]
            wait_for(lambda: store.has(h), timeout=30, what=f"{h} in B's store")

        def held():
            return present(store, w, *data)

        read_through_mount(f1)
        read_through_mount(f2)
        read_through_mount(f3)
        wait_for(lambda: held() == {w, f2, f3}, timeout=30,
                 what=f"f1 evicted (B's store holds {held()})")
        read_through_mount(f2)  # now f3 is the least recently read
        read_through_mount(f4)
        wait_for(lambda: held() == {w, f2, f4}, timeout=30,
                 what=f"f3 evicted (B's store holds {held()})")
        read_through_mount(f1)  # evicted: read again through the bucket
        wait_for(lambda: held() == {w, f4, f1}, timeout=30,
                 what=f"f2 evicted (B's store holds {held()})")

        def status():  # what the mount reports (its pinned bytes are a few seconds old)
            return json.loads(kfs(c.b, "status", "--json").stdout)["store"]

        # The written file is in the index once a sync has put it on the disk, and the
        # report is a few seconds old: wait for one made after the last eviction.
        wait_for(lambda: (lambda s: s["pinnedBytes"] == FILE and s["evictions"] == 3)(
                     status()), timeout=30,
                 what="the mount to report the written file as pinned, and 3 evictions")
        report = status()
        assert report["limit"] == 7 * FILE // 2
        assert report["evictions"] == 3 and report["evictedBytes"] == 3 * FILE
        assert report["bytes"] == 3 * FILE
        assert "local store: 768 KiB in 3 object(s), limit 896 KiB" in \
            kfs(c.b, "status").stdout.decode()


def test_a_bad_kachery_store_file_of_another_size_never_shows_its_size(tmp_path):
    """B's kachery store has a file of the wrong size for a hash (a linked file changed
    since): a lookup checks it before telling a size, refuses it, and the file comes from
    the bucket, whole and verified."""
    require_fuse()
    c = make_cluster(tmp_path, channel="cache.src")
    true = os.urandom(300_000)
    h = sha1(true)
    legacy = tmp_path / "kachery-cloud"
    _, path = _put_in_store_dir(legacy, true)
    path.write_bytes(true[:1000])  # shorter, and not the content
    kfs(c.b, "store", "add-source", str(legacy))
    with ExitStack() as stack:
        stack.callback(c.hub.stop)
        stack.enter_context(mounted(c.a, c.mnt_a))
        (c.mnt_a / c.channel / "f").write_bytes(true)
        wait_for(lambda: xattr(c.mnt_a / c.channel / "f", "user.kachery.status") == "in bucket",
                 timeout=30, what="f in the bucket")
        stack.enter_context(mounted(c.b, c.mnt_b))
        target = c.mnt_b / c.channel / "sha1" / h
        assert target.stat().st_size == len(true)
        assert target.read_bytes() == true
    assert path.read_bytes() == true[:1000]  # the source is never written
