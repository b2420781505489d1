"""The local store as a managed cache: index, limit, LRU eviction, pins, kachery stores as
sources.

In process with a real store and node database for the policy (what is evicted, in what
order, what survives a restart, how an old store gets indexed), then through real
mounts: content served from kachery stores on the machine with no bucket and no
provider, and a mount that evicts what was read least recently and reads it again
through the bucket.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from kachery_fs import cache, settings
from kachery_fs.state import NodeDB
from kachery_fs.store import Store

from ..util import HubProcess, kfs, make_cluster, mounted, require_fuse, wait_for, xattr

SIZE = 1000


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def content(tag: str, size: int = SIZE) -> bytes:
    return (tag.encode() * size)[:size]


def fetched(store: Store, data: bytes) -> str:
    """Install ``data`` the way a bucket download does (verified temp file, renamed in)."""
    temp, fd = store.new_temp_file()
    try:
        os.write(fd, data)
        store.install_verified(temp, sha1(data), actual_sha1=sha1(data))
    finally:
        os.close(fd)
    return sha1(data)


def written(store: Store, data: bytes) -> str:
    """Commit ``data`` the way the mount commits a file written into it."""
    staging = store.new_staging()
    staging.write(0, data)
    return staging.commit()


def read(store: Store, h: str) -> None:
    os.close(store.open(h))


def present(store: Store, *hashes: str) -> set[str]:
    return {h for h in hashes if store.has(h)}


@pytest.fixture
def node(tmp_path):
    db = NodeDB(tmp_path / "node.db")
    yield tmp_path, db
    db.close()


def test_lru_eviction_keeps_what_is_pinned_and_what_is_open(node, monkeypatch):
    directory, db = node
    # No grace: a written file is kept only because its entry or upload pins it.
    monkeypatch.setattr(cache, "WRITTEN_GRACE_S", 0.0)
    store = Store(directory, limit=10 * SIZE, pinned=db.pinned_sha1s)
    w = written(store, content("written"))
    entry = db.create_entry("ch", 0, "mine.txt", is_dir=False, mode=0o644, sha1=w, size=SIZE)
    orphan = written(store, content("overwritten version"))  # no entry, no upload
    u = fetched(store, content("pending upload"))
    db.enqueue_upload("ch", u, SIZE, again=True)  # provided on request: not done yet
    d = fetched(store, content("done upload"))
    db.enqueue_upload("ch", d, SIZE)
    db.update_upload("ch", d, state="done")
    a = store.add_bytes(content("added"))  # `store add` / `put`
    r = fetched(store, content("open"))
    reader = store.open(r)  # held open, as a reader in the mount would
    f = [fetched(store, content(f"f{i}")) for i in range(1, 5)]
    assert store.cache.usage() == 10 * SIZE  # at the limit, not over: nothing evicted
    read(store, f[0])  # f1 is now the most recently read fetched object

    f.append(fetched(store, content("f5")))  # over: evict down to 90 %
    assert not present(store, orphan, d)  # least recently used first, pinned ones skipped
    assert present(store, w, u, a, r, *f) == {w, u, a, r, *f}
    assert store.cache.usage() == 9 * SIZE

    f.append(fetched(store, content("f6")))
    f.append(fetched(store, content("f7")))
    # r is older but open; f1 was read after f2 and f3 were stored.
    assert not present(store, f[1], f[2])
    assert present(store, w, u, a, r, f[0]) == {w, u, a, r, f[0]}

    os.close(reader)
    f.append(fetched(store, content("f8")))
    f.append(fetched(store, content("f9")))
    assert not present(store, r, f[3])
    assert f[0] in present(store, f[0])

    # Once nothing needs them, written content and finished uploads are cache too.
    db.delete_entry(entry.id)
    db.update_upload("ch", u, state="done")
    f.append(fetched(store, content("f10")))
    f.append(fetched(store, content("f11")))
    assert not present(store, w, u)
    assert a in present(store, a)  # added content is never evicted

    stats = store.cache.stats()
    assert stats["evictions"] == 8 and stats["evictedBytes"] == 8 * SIZE
    assert stats["bytes"] == 9 * SIZE and stats["objects"] == 9
    assert stats["pinnedBytes"] == SIZE  # a
    assert set(store.iter_hashes()) == {a, f[0], *f[4:]}  # the index matches the disk
    store.close()


def test_written_content_is_kept_while_its_entry_is_being_recorded(node):
    directory, db = node
    store = Store(directory, limit=2 * SIZE, pinned=db.pinned_sha1s)
    w = written(store, content("just committed"))  # no entry yet
    for tag in ("x", "y", "z"):
        fetched(store, content(tag))
    assert w in present(store, w)
    store.close()


def test_pinned_content_over_the_limit_warns_and_never_fails_a_write(node, caplog):
    directory, db = node
    store = Store(directory, limit=3 * SIZE, pinned=db.pinned_sha1s)
    x = fetched(store, content("cache"))
    with caplog.at_level(logging.WARNING, logger="kachery_fs.cache"):
        added = [store.add_bytes(content(f"added {i}")) for i in range(4)]
        w = written(store, content("written"))
        db.create_entry("ch", 0, "w", is_dir=False, mode=0o644, sha1=w, size=SIZE)
    assert present(store, *added, w) == {*added, w}  # every write went through
    assert not store.has(x)  # what could go, went
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # said once, not at every insert
    assert "more than its limit" in warnings[0] and "--cache-size" in warnings[0]
    store.close()


def test_a_long_eviction_pass_is_cut_into_short_transactions(node, monkeypatch):
    directory, db = node
    monkeypatch.setattr(cache, "EVICT_BATCH", 3)
    store = Store(directory, pinned=db.pinned_sha1s)
    hashes = [fetched(store, content(f"object {i}")) for i in range(20)]
    store.cache.limit = 10 * SIZE  # lowered: 20 objects, down to 9 in batches of 3
    assert store.cache.evict() == (11, 11 * SIZE)
    assert present(store, *hashes) == set(hashes[11:])
    assert store.cache.usage() == 9 * SIZE
    store.close()


def test_restart_keeps_the_index_and_the_limit(tmp_path):
    directory = tmp_path / "node"
    out = kfs(directory, "init", "--cache-size", "3500")
    assert "3500" in settings.path(directory).read_text()
    assert "local store limit" in out.stderr.decode()
    db = NodeDB(directory / "node.db")
    store = Store.for_node(directory, db)
    assert store.cache.limit == 3500
    f1, f2, f3 = (fetched(store, content(t)) for t in ("one", "two", "three"))
    read(store, f1)  # noted in memory, written out at close
    store.close()

    store = Store.for_node(directory, db)  # as the next process opens it
    assert store.cache.limit == 3500
    assert store.cache.usage() == 3 * SIZE
    f4 = fetched(store, content("four"))
    assert present(store, f1, f2, f3, f4) == {f1, f3, f4}  # f1 was read after f2 was stored
    store.close()
    db.close()

    status = json.loads(kfs(directory, "status", "--json").stdout)["store"]
    assert status["limit"] == 3500 and status["bytes"] == 3 * SIZE
    assert status["evictions"] == 1 and status["evictedBytes"] == SIZE
    # A flag overrides the setting for one run; `init` changes it for good.
    kfs(directory, "init", "--cache-size", "unlimited")
    assert "cache-size" not in settings.path(directory).read_text()
    bad = kfs(directory, "init", "--cache-size", "lots", check=False)
    assert bad.returncode == 2 and b"not a size" in bad.stderr


def test_a_store_without_an_index_is_indexed_once(node):
    directory, db = node
    objects = {}
    for i, tag in enumerate(("put", "named", "old", "older", "uploading")):
        data = content(tag, SIZE + i)
        h = sha1(data)
        path = directory / "sha1" / h[:2] / h[2:4] / h[4:6] / h
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o444)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # the oldest first
        objects[tag] = h
    db.create_entry("ch", 0, "named", is_dir=False, mode=0o644, sha1=objects["named"],
                    size=SIZE + 1)
    db.enqueue_upload("ch", objects["uploading"], SIZE + 4)
    # `put` by the earlier version, uploaded since: it must never become evictable cache.
    db.enqueue_upload("ch", objects["put"], SIZE)
    db.update_upload("ch", objects["put"], state="done")
    assert not (directory / cache.INDEX_FILE).exists()  # as an earlier version left it

    store = Store(directory, pinned=db.pinned_sha1s, uploaded=db.uploaded_sha1s)
    assert store.cache.usage() == 5 * SIZE + 10
    assert store.cache.stats()["objects"] == 5
    store.close()

    store = Store(directory, limit=5 * SIZE, pinned=db.pinned_sha1s)
    assert store.cache.usage() == 5 * SIZE + 10  # read from the index, not walked again
    new = fetched(store, content("new"))
    # Over the limit: the unpinned old objects go, oldest first; the pinned ones stay.
    assert present(store, *objects.values(), new) == {
        objects["named"], objects["uploading"], objects["put"], new}
    store.close()


# -- through real mounts ---------------------------------------------------------------------


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

        wait_for(lambda: status()["pinnedBytes"] == FILE, timeout=30,
                 what="the mount to report the written file as pinned")
        report = status()
        assert report["limit"] == 7 * FILE // 2
        assert report["evictions"] == 3 and report["evictedBytes"] == 3 * FILE
        assert report["bytes"] == 3 * FILE
        assert "local store: 768 KiB in 3 object(s), limit 896 KiB" in \
            kfs(c.b, "status").stdout.decode()


def test_unpin_makes_put_content_evictable(tmp_path):
    directory = tmp_path / "node"
    kfs(directory, "init", "--cache-size", str(3 * SIZE))
    src = tmp_path / "kept.bin"
    src.write_bytes(content("kept"))
    h = sha1(src.read_bytes())
    kfs(directory, "store", "add", str(src))
    db = NodeDB(directory / "node.db")
    store = Store.for_node(directory, db)
    others = [fetched(store, content(f"fetched {i}")) for i in range(3)]
    # Over the limit at the third: the fetched ones went, oldest first; the added one stays.
    assert store.has(h) and present(store, *others) == {others[2]}
    store.close()
    out = kfs(directory, "store", "unpin", f"sha1://{h}?label=kept.bin").stdout.decode()
    assert "may now be evicted" in out
    assert "was not pinned" in kfs(directory, "store", "unpin", h).stdout.decode()
    missing = kfs(directory, "store", "unpin", "0" * 40, check=False)
    assert missing.returncode == 1 and b"not in the local store" in missing.stderr
    store = Store.for_node(directory, db)
    newer = [fetched(store, content(f"newer {i}")) for i in range(2)]
    assert not store.has(h)  # now cache, and the least recently used
    assert present(store, others[2], *newer) == set(newer)
    store.close()
    db.close()


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
