"""Processes and mounts, for the tests (through tests/util.py) and for scripts/bench: the
kachery-fs CLI run as a node, a hub server and FUSE mounts in subprocesses.

Every process is started here and ended by its PID; a mount is unmounted by its mount
point only. No pytest in this module (the bench imports it), only the standard library.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

#: The checkout this module sits in: its kachery_fs is the one the processes run.
REPO = Path(__file__).resolve().parent.parent
KFS = [sys.executable, "-m", "kachery_fs"]
PERMS_ALL = "requestFiles,provideFiles,requestFeeds,provideFeeds"


class ProcessFailed(AssertionError):
    """A process started here failed, or did not get ready in time (an AssertionError, so
    that a test fails on it)."""


def fuse_unavailable_reason() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(node_dir: Path) -> dict:
    """The environment of a process run as node ``node_dir``: this checkout's kachery_fs
    first on the path, whatever an install in the interpreter points at, and no hub from
    the caller's environment."""
    env = dict(os.environ)
    env["KACHERY_FS_DIR"] = str(node_dir)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("KACHERY_FS_HUB", None)
    env.pop("KACHERY_FS_BENCH_REEXEC", None)  # the bench's own, not its children's
    return env


def kfs(node_dir: Path, *args: str, check: bool = True, timeout: float = 60,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run the kachery-fs CLI as node ``node_dir`` (stdin: ``input``, else nothing)."""
    result = subprocess.run([*KFS, *args], env=node_env(node_dir), capture_output=True,
                            timeout=timeout, input=input,
                            stdin=subprocess.DEVNULL if input is None else None)
    if check and result.returncode != 0:
        raise ProcessFailed(f"kachery-fs {' '.join(args)} failed ({result.returncode}):\n"
                            f"{result.stderr.decode(errors='replace')}")
    return result


def run_cli(node_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the CLI as node ``node_dir``, with text output, whatever its exit status."""
    return subprocess.run([*KFS, *args], env=node_env(node_dir), capture_output=True,
                          text=True, timeout=timeout)


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, wait, then SIGKILL: only the process we started, by its PID."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


def poll(predicate, *, timeout: float, interval: float = 0.02):
    """``predicate()`` until it is true or ``timeout`` seconds have passed: its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def wait_for(predicate, *, timeout: float, what: str, interval: float = 0.05):
    """``predicate()``'s first true value; ProcessFailed after ``timeout`` seconds."""
    value = poll(predicate, timeout=timeout, interval=interval)
    if not value:
        raise ProcessFailed(f"timed out after {timeout} s waiting for {what}")
    return value


class HubProcess:
    """``kachery-fs hub serve`` in a subprocess, owned by node ``owner_dir``; its log is
    ``HUB_DIR.log`` beside ``hub_dir``. With ``port=0`` the hub picks a free port, and
    ``url`` is the one it writes to its URL file."""

    def __init__(self, owner_dir: Path, hub_dir: Path, port: int | None = None, *,
                 args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 new_session: bool = False):
        self.owner_dir = owner_dir
        self.hub_dir = hub_dir
        self.port = free_port() if port is None else port
        self.args = tuple(args)  # more `hub serve` flags
        self.env = dict(env or {})  # more environment variables
        self.new_session = new_session  # out of the caller's session (no terminal signals)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = hub_dir.parent / f"{hub_dir.name}.log"

    def start(self) -> HubProcess:
        url_file = self.hub_dir.parent / f"{self.hub_dir.name}.url"
        url_file.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*KFS, "-v", "hub", "serve", "--port", str(self.port), "--dir", str(self.hub_dir),
                 "--url-file", str(url_file), *self.args],
                env={**node_env(self.owner_dir), **self.env}, stdout=log, stderr=log,
                stdin=subprocess.DEVNULL, start_new_session=self.new_session)

        def listening() -> str:
            if self.proc.poll() is not None:
                raise ProcessFailed(f"hub exited ({self.proc.returncode}):\n"
                                    f"{self.log.read_text()}")
            return url_file.exists() and url_file.read_text().strip()

        url = wait_for(listening, timeout=30, what="the hub to start")
        if self.port == 0:
            self.url = url
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def bucket_dir(self) -> Path:
        return self.hub_dir / "local-bucket" / "kachery"


def in_mount_table(path: Path) -> bool:
    """Whether something is mounted on ``path``, as the kernel's table says: also a FUSE
    mount whose process died, which ``os.path.ismount`` misses (its stat fails with
    ENOTCONN, which ismount takes for "not a mount point")."""
    target = os.path.abspath(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if line.strip())


def lazy_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint) or in_mount_table(mountpoint):
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def unmount(mountpoint: Path) -> list[str]:
    """``fusermount3 -u``, then ``-uz`` if that failed: only a mount we made. Never raises;
    returns notes on what went wrong."""
    notes = []
    try:
        if os.path.ismount(mountpoint):
            r = subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True,
                               timeout=30)
            if r.returncode != 0 and os.path.ismount(mountpoint):
                notes.append(f"fusermount3 -u {mountpoint}: "
                             f"{r.stderr.decode(errors='replace').strip()}; trying -uz")
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)],
                               capture_output=True, timeout=30)
    except Exception as exc:  # cleanup goes on whatever happens
        notes.append(f"unmounting {mountpoint}: {exc!r}")
    return notes


def start_mount(node_dir: Path, mountpoint: Path, *, log: Path, verbosity: str = "-vv",
                timeout: float = 30, new_session: bool = False,
                what: str = "mount", options: tuple[str, ...] = ()) -> subprocess.Popen:
    """``kachery-fs mount --foreground`` (with ``options``) of node ``node_dir`` in a
    subprocess, logging to ``log``, once ``mountpoint`` is mounted. If it is not, the
    process is ended (and unmounted) and ProcessFailed says why; else the caller unmounts
    and ends it."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([*KFS, verbosity, "mount", "--foreground", "--log-file", str(log),
                             *options, str(mountpoint)],
                            env=node_env(node_dir), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=new_session)
    try:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace")
                logtext = log.read_text() if log.exists() else ""
                raise ProcessFailed(f"{what} exited ({proc.returncode}):\n{err}\n{logtext}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"{what} did not appear within {timeout:.0f} s")
            time.sleep(0.02)
    except BaseException:
        lazy_unmount(mountpoint)
        stop_process(proc)
        proc.stderr.close()
        raise
    return proc
