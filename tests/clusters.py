"""Nodes on a real hub, all in subprocesses on loopback, for the end-to-end tests of two
tiers (tests/inproc without mounts, tests/mount with them): the feed pair and the
file-request trio. Each is a generator that a test module's fixture yields from; the hub
is stopped when it ends."""

from __future__ import annotations

import hashlib
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .procs import KFS, PERMS_ALL, HubProcess, kfs, node_env, stop_process, wait_for

# -- feeds: A owns a feed, B may request feeds ----------------------------------------------

FEEDS_CH = "feeds.test"


def feed_cluster(base: Path):
    """Yield ``(base, hub, a, b, b_id, feed)``: a hub owned by A, channel FEEDS_CH with A
    (every permission) and B (requestFeeds), and a feed of A's."""
    a, b = base / "node-a", base / "node-b"
    a_id = kfs(a, "init").stdout.decode().strip()
    b_id = kfs(b, "init").stdout.decode().strip()
    hub = HubProcess(a, base / "hub").start()
    try:
        kfs(a, "hub", "channel", "create", FEEDS_CH, "--hub", hub.url)
        kfs(a, "hub", "channel", "authorize", FEEDS_CH, a_id, "--permissions", PERMS_ALL,
            "--hub", hub.url)
        kfs(a, "hub", "channel", "authorize", FEEDS_CH, b_id, "--permissions", "requestFeeds",
            "--hub", hub.url)
        kfs(a, "join", hub.url, FEEDS_CH)
        kfs(b, "join", hub.url, FEEDS_CH)
        feed = kfs(a, "feed", "create", "--label", "test").stdout.decode().strip()
        yield base, hub, a, b, b_id, feed
    finally:
        hub.stop()


# -- file requests: providers A and C, requester B ------------------------------------------

REQUESTS_CH = "req.test"


@dataclass
class Nodes:
    base: Path
    hub: HubProcess
    a: Path  # provider
    c: Path  # second provider
    b: Path  # requester
    ids: dict


def authorize(nodes: Nodes, node: Path, perms: str) -> None:
    kfs(nodes.a, "hub", "channel", "authorize", REQUESTS_CH, nodes.ids[node], "--permissions",
        perms, "--hub", nodes.hub.url)


def request_nodes(base: Path):
    """Yield :class:`Nodes`: a hub owned by A, channel REQUESTS_CH with A and C (every
    permission) and B (requestFiles), all three joined."""
    a, b, c = base / "node-a", base / "node-b", base / "node-c"
    ids = {n: kfs(n, "init").stdout.decode().strip() for n in (a, b, c)}
    hub = HubProcess(a, base / "hub").start()
    try:
        n = Nodes(base, hub, a, c, b, ids)
        kfs(a, "hub", "channel", "create", REQUESTS_CH, "--hub", hub.url)
        authorize(n, a, PERMS_ALL)
        authorize(n, c, PERMS_ALL)
        authorize(n, b, "requestFiles")
        for node in (a, b, c):
            kfs(node, "join", hub.url, REQUESTS_CH)
        yield n
    finally:
        hub.stop()


@contextmanager
def serving(node: Path, *extra: str):
    """``kachery-fs serve`` for ``node`` until the block ends (or it is killed)."""
    log = node / "serve.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([*KFS, "-vv", "serve", *extra], env=node_env(node),
                                stdout=out, stderr=out, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "listening for file requests" in log.read_text()
                 or proc.poll() is not None, timeout=30, what=f"{node.name} to listen")
        assert proc.poll() is None, log.read_text()
        yield proc
    finally:
        stop_process(proc)


def stored(node: Path, size: int, seed: bytes = b"") -> tuple[str, bytes]:
    """A random file added to ``node``'s local store only (in no bucket)."""
    data = seed + os.urandom(size - len(seed))
    src = node.parent / f"src-{os.urandom(4).hex()}"
    src.write_bytes(data)
    kfs(node, "store", "add", str(src))
    src.unlink()
    return hashlib.sha1(data).hexdigest(), data


def in_store(node: Path, sha1: str) -> Path:
    return node / "sha1" / sha1[:2] / sha1[2:4] / sha1[4:6] / sha1


def stored_bytes(node: Path, sha1: str) -> bytes:
    """The bytes of ``sha1`` in node ``node``'s store: in ``sha1/``, or in ``pending/`` if
    a mount committed it and has not yet synced it (kachery_fs.fs.durability)."""
    try:
        return (node / "pending" / sha1).read_bytes()
    except FileNotFoundError:
        return in_store(node, sha1).read_bytes()
