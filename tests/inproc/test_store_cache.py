"""The local store as a managed cache, through the CLI: the limit set by `init` survives a
restart and shows in `status`; `store unpin` makes put content evictable.

The policy itself is tested in tests/unit/test_store_cache.py; kachery stores and eviction
through real mounts in tests/mount/test_store_cache.py.
"""

from __future__ import annotations

import json

from kachery_fs import settings
from kachery_fs.state import NodeDB
from kachery_fs.store import Store

from ..stores import SIZE, content, fetched, present, read, sha1
from ..util import kfs


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
