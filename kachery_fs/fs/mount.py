"""The mount entry point: owns the nursery, the signals and the unmount (STYLE rule 6).

The node's parts are built by the composition root (:func:`kachery_fs.parts.running`);
this module adds only what is FUSE's. Shutdown order: a signal (or an external
``fusermount3 -u``) ends ``pyfuse3.main``; then the background tasks are cancelled; then
the FUSE session is closed and unmounted; then the downloads made are reported, and the
caller closes the node's HTTP client and databases. Pending uploads stay queued in
the node database and resume at the next mount.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pyfuse3
import trio

from .. import _systemd, status
from ..errors import InvalidInput, NotMounted
from ..node import Node
from ..parts import Parts, running
from ..requester import DEFAULT_STALL_TIMEOUT_S
from .operations import Operations

log = logging.getLogger(__name__)


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.is_dir():
        raise InvalidInput(f"mount point {mountpoint} is not a directory (create it first)")
    if os.path.ismount(mountpoint) and not is_automount_point(mountpoint):
        raise InvalidInput(f"{mountpoint} is already a mount point")
    if not os.path.exists("/dev/fuse"):
        raise InvalidInput("/dev/fuse is missing: install fuse3 and load the fuse module")


def is_automount_point(mountpoint: Path) -> bool:
    """Whether the newest mount at ``mountpoint`` (a resolved path) is an autofs trigger,
    such as systemd's for an fstab line with ``x-systemd.automount``: the mount it waits
    for goes over it. Read from ``/proc/self/mountinfo``, as a stat could wait for it."""
    target = re.sub(r"[ \t\n\\]", lambda m: f"\\{ord(m.group()):03o}", str(mountpoint))
    fstype = None  # (mountinfo writes a space, tab, newline or backslash as \ooo)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4] == target and "-" in fields:
                    fstype = fields[fields.index("-") + 1]  # the last listed is the newest
    except OSError:
        return False
    return fstype == "autofs"


@contextmanager
def one_mount_per_node(node_dir: Path, mountpoint: Path):
    """Hold the node directory's ``mount.lock`` (an exclusive ``flock``) for the block:
    two mounts of one node would each think they alone hold its inodes (a file unlinked
    while open in one is removed at the start of the other) and serve one database."""
    fd = os.open(node_dir / "mount.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            raise InvalidInput(
                f"node {node_dir} is mounted already ({holder or 'by another process'}):"
                " one mount per node; unmount that one first (kachery-fs umount), or use"
                " another node directory (KACHERY_FS_DIR)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"at {mountpoint}, process {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # and so the lock


async def run_mount(node: Node, mountpoint: Path, *, allow_other: bool = False,
                    debug: bool = False, request_timeout: float = DEFAULT_STALL_TIMEOUT_S,
                    bwlimit: float | None = None, strict: bool = False,
                    read_only: bool = False,
                    also: Callable[[trio.Nursery], Awaitable[None]] | None = None,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Mount ``node``'s channels at ``mountpoint`` and serve until unmounted or signalled.

    ``read_only``: a ``ro`` mount that changes nothing a user or another node sees: no
    writes (``EROFS``), no uploads (the queue waits for a mount that may write), no
    answers to other nodes' file requests (they would be uploads), no feed appends or
    publications. What a crash left is still put right at start (names committed but not
    synced, files unlinked while open), as at any mount."""
    mountpoint = Path(os.path.realpath(mountpoint))  # not later: a stat of it would hang
    check_mountpoint(mountpoint)
    with one_mount_per_node(node.dir, mountpoint):
        await _serve(node, mountpoint, allow_other=allow_other, debug=debug,
                     request_timeout=request_timeout, bwlimit=bwlimit, strict=strict,
                     read_only=read_only, also=also, task_status=task_status)


async def _serve(node: Node, mountpoint: Path, *, allow_other: bool, debug: bool,
                 request_timeout: float, bwlimit: float | None, strict: bool,
                 read_only: bool,
                 also: Callable[[trio.Nursery], Awaitable[None]] | None,
                 task_status) -> None:
    async with running(node, provide=not read_only, feeds=True, bwlimit=bwlimit,
                       upload_workers=0 if read_only else 2,
                       request_timeout=request_timeout, strict=strict) as parts:
        nursery = parts.nursery
        nursery.start_soon(partial(status.keep_written, node, provider=parts.provider,
                                   resolver=parts.resolver, mountpoint=str(mountpoint)))
        ops = operations(parts, read_only=read_only)
        options = set(pyfuse3.default_options)
        if read_only:
            options.add("ro")
            waiting = sum(n for state, n in node.db.upload_counts().items() if state != "done")
            log.warning("mounting read-only (--read-only): changes get EROFS; no uploads"
                        "%s, no answers to file requests, no feed appends",
                        f" ({waiting} queued wait for a mount that may write)" if waiting
                        else "")
        options.add("fsname=kachery-fs")
        options.add("subtype=kachery-fs")  # type fuse.kachery-fs, as in /etc/fstab
        options.add("default_permissions")
        if allow_other:
            options.add("allow_other")
        if debug:
            options.add("debug")
        pyfuse3.init(ops, str(mountpoint), options)
        try:
            nursery.start_soon(_watch_signals)
            nursery.start_soon(_raise_read_ahead, mountpoint)
            if also is not None:
                await also(nursery)
            log.info("mounted %s at %s (node %s)", ", ".join(
                c.name for c in node.db.channels()) or "no channels", mountpoint, node.node_id)
            task_status.started()
            _systemd.notify("READY=1")  # mounted: a request waits for pyfuse3.main, no more
            await pyfuse3.main()
            log.info("unmounting %s", mountpoint)
            _systemd.notify("STOPPING=1")
            try:  # what was committed is on the disk, in sha1/
                await ops.durability.sync()
            except OSError as exc:
                log.error("could not sync the node directory's file system: %s; the next"
                          " mount checks what was committed last", exc)
            nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)


def operations(parts: Parts, *, read_only: bool = False) -> Operations:
    """The FUSE handlers over a node's running parts (as a mount serves them); those of
    a read-only mount publish none of the feed messages that wait to be."""
    node = parts.node
    ops = Operations(node.db, node.store, node.channels, parts.resolver, parts.uploader,
                     nursery=parts.nursery, feeds=parts.feeds,
                     snapshot=partial(status.collect, node, provider=parts.provider,
                                      resolver=parts.resolver), read_only=read_only)
    if parts.feeds is not None:
        parts.feeds.on_grow = ops.feed_grew
        if not read_only:
            parts.feeds.resume_publishing()
    return ops


#: Kernel read-ahead for the mount. The default, 128 KiB, makes every sequential read a
#: 128 KiB FUSE request and caps a local read near 0.7 GiB/s; with 1 MiB the same read
#: measured 1.6-2.1 GiB/s on a 2-core machine.
READ_AHEAD_KB = 1024


async def _raise_read_ahead(mountpoint: Path, kb: int = READ_AHEAD_KB) -> None:
    """Set the mount's read-ahead (``/sys/class/bdi/<dev>/read_ahead_kb``) where we may.

    The kernel sets it from the FUSE handshake, which happens once we serve, so this runs
    beside the file system and checks that the value stuck. The device is found in
    ``/proc/self/mountinfo``: a ``stat`` of the mount point from this process could wait
    for an answer from this very process. ``mountpoint`` must be a resolved path.
    """
    target = str(mountpoint)
    device = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and fields[4].replace("\\040", " ") == target:
                    device = fields[2]  # the last one listed is the newest mount there
    except OSError:
        return
    if device is None:
        return
    path = Path(f"/sys/class/bdi/{device}/read_ahead_kb")
    for _ in range(50):
        await trio.sleep(0.1)
        try:
            if int(path.read_text()) == kb:
                log.debug("read-ahead of %s is %d KiB", mountpoint, kb)
                return
            path.write_text(str(kb))
        except (OSError, ValueError) as exc:
            log.info("could not raise the read-ahead of %s (%s); sequential reads will be"
                     " slower. As root: echo %d > %s", mountpoint,
                     getattr(exc, "strerror", None) or exc, kb, path)
            return


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s; unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


def unmount(mountpoint: Path, *, lazy: bool = False) -> None:
    """Unmount a kachery-fs mount point (``fusermount3 -u``, or ``umount`` as a fallback)."""
    mountpoint = Path(mountpoint).resolve()
    if not os.path.ismount(mountpoint):
        raise NotMounted(f"{mountpoint} is not mounted")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u"] + (["-z"] if lazy else []) + [str(mountpoint)] if tool else \
        ["umount"] + (["-l"] if lazy else []) + [str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise InvalidInput(f"could not unmount {mountpoint}: {result.stderr.strip()}"
                           " (is a process still using it? try --lazy)")
