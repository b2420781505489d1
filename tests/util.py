"""Helpers for tests that run real processes: a hub server, nodes, and FUSE mounts.

Every process is started by us and ended by PID; every mount is lazily unmounted in
a ``finally`` (pyfuse3's test/util.py pattern), so a failing test leaves no stray mount.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

KFS = [sys.executable, "-m", "kachery_fs"]
PERMS_ALL = "requestFiles,provideFiles,requestFeeds,provideFeeds"


def fuse_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    return None


def require_fuse() -> None:
    """Skip loudly where FUSE is missing; fail instead where mounts are required (CI)."""
    reason = fuse_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("KACHERY_FS_REQUIRE_MOUNT") == "1":
        pytest.fail(f"real-mount tests are required here but cannot run: {reason}")
    pytest.skip(f"REAL-MOUNT TESTS SKIPPED: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(node_dir: Path) -> dict:
    env = dict(os.environ)
    env["KACHERY_FS_DIR"] = str(node_dir)
    env.pop("KACHERY_FS_HUB", None)
    return env


def kfs(node_dir: Path, *args: str, check: bool = True, timeout: float = 60,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the kachery-fs CLI as node ``node_dir``."""
    result = subprocess.run([*KFS, *args], env=node_env(node_dir), capture_output=True,
                            timeout=timeout, input=input)
    if check and result.returncode != 0:
        raise AssertionError(f"kachery-fs {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stderr.decode(errors='replace')}")
    return result


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


class HubProcess:
    """``kachery-fs hub serve`` in a subprocess, owned by node ``owner_dir``."""

    def __init__(self, owner_dir: Path, hub_dir: Path, port: int | None = None):
        self.owner_dir = owner_dir
        self.hub_dir = hub_dir
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = hub_dir.parent / f"{hub_dir.name}.log"

    def start(self) -> HubProcess:
        url_file = self.hub_dir.parent / f"{self.hub_dir.name}.url"
        url_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*KFS, "-v", "hub", "serve", "--port", str(self.port), "--dir", str(self.hub_dir),
                 "--url-file", str(url_file)],
                env=node_env(self.owner_dir), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not url_file.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"hub exited ({self.proc.returncode}):\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("hub did not start within 30 s")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def bucket_dir(self) -> Path:
        return self.hub_dir / "local-bucket" / "kachery"


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def lazy_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


@contextmanager
def mounted(node_dir: Path, mountpoint: Path):
    """Mount ``node_dir``'s channels in a subprocess; always unmount and end it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    log = node_dir / "mount-test.log"
    proc = subprocess.Popen([*KFS, "-vv", "mount", "--foreground", "--log-file", str(log),
                             str(mountpoint)],
                            env=node_env(node_dir), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")
                logtext = log.read_text() if log.exists() else ""
                raise AssertionError(f"mount process exited ({proc.returncode}):\n{err}\n{logtext}")
            if time.monotonic() > deadline:
                raise AssertionError("mount did not appear within 30 s")
            time.sleep(0.05)
        yield proc
    finally:
        lazy_unmount(mountpoint)
        stop_process(proc)
        assert not os.path.ismount(mountpoint)


def xattr(path: Path, name: str) -> str:
    return os.getxattr(path, name).decode()
