"""The test tiers and what every test run checks.

The suite has three tiers, one directory each:

- ``tests/unit``: pure units, no subprocess and no mount;
- ``tests/inproc``: parts driven against a real hub and local bucket (in this process, or
  on loopback), and CLI commands that mount nothing; no FUSE mount;
- ``tests/mount``: whatever mounts FUSE or runs ``kachery-fs mount``/``up`` in a
  subprocess.

Every test under ``tests/mount`` gets the ``mount`` marker from its directory (select or
deselect the tier with ``-m mount``); collection fails if a test elsewhere mounts (its
code or a fixture it uses calls ``mounted()``/``require_fuse()`` or starts ``mount``/``up``)
or carries the ``mount`` marker itself. ``tests/mount/conftest.py`` fails a test whose
mount logged a traceback.

Warnings are errors (pyproject.toml); garbage is collected after every test, so that what
a test leaves unclosed fails that test.

A test that outlives its timeout (pytest-timeout) has the stacks of all its threads
dumped by faulthandler, which works even while the main thread is stuck in a system call
(on a hung FUSE request, say), where pytest-timeout's own handler cannot run.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import inspect
import os
import re
import socket
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
MOUNT_TIER = TESTS / "mount"

#: What a test (or a fixture it uses) that mounts has in its source (``mount``/``up`` with
#: no argument is only a usage error).
_MOUNTS = re.compile(r"""
      \bmounted\(
    | \brequire_fuse\(
    | \b(?:run_cli|kfs)\([^,\n]*,\s*(?:"-v+",\s*)?"(?:mount|up)",
    | (?:\*KFS|"kachery_fs"),\s*(?:"-v+",\s*)?"(?:mount|up)",
""", re.VERBOSE)

_dump_file = None  # where faulthandler writes: the terminal's stderr, not a capture


def pytest_configure(config):
    global _dump_file
    # fd 2 is the real stderr here (pytest's capture is suspended between conftest
    # loading and the first test); a copy stays valid whatever capture does later
    _dump_file = os.fdopen(os.dup(2), "w")
    if not faulthandler.is_enabled():
        faulthandler.enable(file=_dump_file)


def pytest_unconfigure(config):
    global _dump_file
    faulthandler.cancel_dump_traceback_later()
    if _dump_file is not None:
        _dump_file.close()
        _dump_file = None


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    if settings.timeout and _dump_file is not None:
        faulthandler.dump_traceback_later(settings.timeout, exit=False, file=_dump_file)
    # None: pytest-timeout's own timer is set as well


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item):
    faulthandler.cancel_dump_traceback_later()


def _in_mount_tier(item) -> bool:
    return MOUNT_TIER in Path(str(item.path)).resolve().parents


@functools.cache
def _mounts(func) -> bool:
    func = inspect.unwrap(func)
    try:
        if TESTS not in Path(inspect.getsourcefile(func)).resolve().parents:
            return False  # a fixture of pytest or of a plugin
        return _MOUNTS.search(inspect.getsource(func)) is not None
    except (OSError, TypeError):
        return False


def _mounting_code(item) -> list[str]:
    """The names of the test and of the fixtures it uses whose code mounts."""
    found = []
    func = getattr(item, "function", None)
    if func is not None and _mounts(func):
        found.append(item.name)
    info = getattr(item, "_fixtureinfo", None)
    for name, defs in (info.name2fixturedefs.items() if info is not None else ()):
        if any(_mounts(d.func) for d in defs):
            found.append(f"fixture {name!r}")
    return found


def pytest_collection_modifyitems(config, items):
    misplaced = []
    for item in items:
        if _in_mount_tier(item):
            item.add_marker(pytest.mark.mount)
            continue
        if item.get_closest_marker("mount") is not None:
            misplaced.append(f"{item.nodeid}: marked 'mount'")
        elif code := _mounting_code(item):
            misplaced.append(f"{item.nodeid}: mounts ({', '.join(code)})")
    if misplaced:
        raise pytest.UsageError(
            "tests that mount belong in tests/mount (the mount tier):\n  "
            + "\n  ".join(misplaced))


@pytest.fixture(autouse=True)
def _collect_garbage():
    """Collect garbage after each test, so that what a test leaves unclosed (a socket, a
    file, an async generator) warns, and so fails (warnings are errors), in that test's
    teardown, not in whichever test the garbage collector happens to run in."""
    yield
    gc.collect()


def pytest_generate_tests(metafunc):
    # The hub's state: SQLite, unless a test's module names the databases its hub tests
    # run on (HUB_DATABASES = ("sqlite", "postgresql"): the same tests on SQLite and PostgreSQL).
    if "hub_database" in metafunc.fixturenames:
        metafunc.parametrize("hub_database", getattr(metafunc.module, "HUB_DATABASES",
                                                     ("sqlite",)), indirect=True)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL cluster on 127.0.0.1 (tests/postgres.py), for the session."""
    from .postgres import PostgresCluster

    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def hub_database(request):
    """Where a test's hub keeps its state: None (SQLite, in the hub's directory), or the
    URL of a new, empty PostgreSQL database."""
    if request.param == "sqlite":
        return None
    assert request.param == "postgresql", request.param
    return request.getfixturevalue("postgres_cluster").database()


@pytest.fixture
def busy_port():
    """A loopback port that is taken (bound and listening) for the test's duration."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.fixture
def fake_gcs(tmp_path):
    """fake-gcs-server on loopback with the bucket ``tests.gcs.BUCKET`` (skips loudly where
    the emulator is not installed)."""
    from .gcs import BUCKET
    from .util import FakeGcsServer

    server = FakeGcsServer.require(tmp_path / "fake-gcs-server.log")
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def notify_socket():
    """A bound AF_UNIX datagram socket, as systemd's ``$NOTIFY_SOCKET``, and its path."""
    directory = Path(tempfile.mkdtemp(prefix="kfs-notify-"))  # a short path (107 bytes)
    path = directory / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(path))
        yield sock, path
    finally:
        sock.close()
        path.unlink(missing_ok=True)
        directory.rmdir()
