"""``up``, ``mount`` and ``umount``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..config import DEFAULT_HUB_PORT, node_dir
from ..errors import Conflict, InvalidInput, KacheryError
from ..protocol import PERMISSIONS
from ..requester import DEFAULT_STALL_TIMEOUT_S
from . import _common
from ._common import (
    CACHE_SIZE_HELP,
    METRICS_HELP,
    _add_cache_size,
    _apply_cache_size,
    _cache_size,
    _metrics_address,
    _port,
    _rate,
    _sub,
    add_metrics,
    setup_logging,
)

log = logging.getLogger("kachery_fs")


def _check_mount_target(mountpoint: Path, nonempty: bool) -> None:
    """What a mount needs of its mount point, beyond ``check_mountpoint``."""
    if not nonempty and mountpoint.is_dir() and not os.path.ismount(mountpoint):
        with os.scandir(mountpoint) as entries:
            if next(entries, None) is not None:
                raise InvalidInput(f"mount point {mountpoint} is not empty: its files would be"
                                   " hidden while mounted; choose an empty directory, or"
                                   " pass --nonempty")


def _check_joined(node) -> None:
    if not node.db.channels():
        raise InvalidInput("this node has joined no channel; run kachery-fs join HUB_URL"
                           " CHANNEL first")


def _check_unmounted(mountpoint: Path) -> None:
    """KacheryError if a kachery-fs mount is still at ``mountpoint`` after its end."""
    entries = _mount_entries(mountpoint)
    if not any(_is_kachery_mount(e) for e in entries):
        return
    if not _is_kachery_mount(entries[-1]):
        raise KacheryError(f"{mountpoint} is still mounted: a {entries[-1][0]} file system"
                           " mounted over it was unmounted instead; unmount what is left"
                           f" with `kachery-fs umount --lazy {mountpoint}`")
    raise KacheryError(f"could not unmount {mountpoint}; unmount it with `kachery-fs umount"
                       f" --lazy {mountpoint}`")


async def _mount_foreground(args) -> int:
    from ..fs.mount import run_mount

    mountpoint = Path(os.path.realpath(args.mountpoint))
    _check_mount_target(mountpoint, args.nonempty)
    node = _common.open_node()
    try:
        _check_joined(node)
        _apply_cache_size(node, args)
        with _common.serving_metrics(args.metrics):
            await run_mount(node, mountpoint, allow_other=args.allow_other,
                            debug=args.debug_fuse, request_timeout=args.request_timeout,
                            bwlimit=args.bwlimit, strict=args.strict,
                            read_only=args.read_only)
    finally:
        await node.aclose()
    _check_unmounted(mountpoint)
    return 0


def cmd_mount(args) -> int:
    from ..fs.mount import check_mountpoint

    if args.foreground:
        setup_logging(max(args.verbose, 1), args.log_file)
        return trio.run(_mount_foreground, args)
    mountpoint = Path(args.mountpoint).resolve()
    check_mountpoint(mountpoint)
    _check_mount_target(mountpoint, args.nonempty)
    node = _common.open_node()  # fail here, in the foreground, if there is no node or channel
    try:
        _check_joined(node)
    finally:
        node.db.close()
    log_file = Path(args.log_file or node_dir() / "mount.log").resolve()
    cmd = foreground_argv(args, mountpoint, log_file)
    # libfuse writes its --debug-fuse output to stderr: into the log file, then.
    with open(os.devnull, "rb") as devnull, \
            open(log_file if args.debug_fuse else os.devnull, "ab") as stderr:
        child = subprocess.Popen(cmd, stdin=devnull, stdout=subprocess.DEVNULL,
                                 stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        entries = _mount_entries(mountpoint)  # not ismount: an automount trigger is a mount
        if entries and _is_kachery_mount(entries[-1]):
            print(f"mounted at {mountpoint} (pid {child.pid}; log: {log_file})")
            return 0
        if child.poll() is not None:
            raise KacheryError(f"the mount process exited with status {child.returncode};"
                               f" see {log_file}")
        time.sleep(0.05)
    child.terminate()
    raise KacheryError(f"{mountpoint} was not mounted within 30 s; see {log_file}")


def _mount_entries(path: Path) -> list[tuple[str, str]]:
    """(file system type, source) of each mount at ``path``, oldest first (the last is the
    one a path lookup sees), from ``/proc/self/mountinfo``: a ``stat`` could hang on a FUSE
    mount, and fails on one whose process has died."""
    def unescape(field: str) -> str:  # mountinfo writes space, tab, newline, \\ as \ooo
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)

    found = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if "-" not in fields:
                    continue
                dash = fields.index("-")
                if len(fields) > dash + 2 and unescape(fields[4]) == str(path):
                    found.append((fields[dash + 1], unescape(fields[dash + 2])))
    except OSError:
        pass
    return found


def _is_kachery_mount(entry: tuple[str, str]) -> bool:
    """Whether a mountinfo entry is ours: fs/mount.py mounts with ``fsname=kachery-fs``
    and ``subtype=kachery-fs``, which the kernel shows as type ``fuse.kachery-fs`` (the
    type of an fstab line); mounts of earlier versions had ``fuse.kachery``."""
    fstype, source = entry
    return (fstype in ("fuse.kachery-fs", "fuse.kachery")
            or (fstype.startswith("fuse") and source == "kachery-fs"))


def cmd_umount(args) -> int:
    from ..errors import NotMounted
    from ..fs.mount import unmount

    mountpoint = Path(os.path.realpath(args.mountpoint))
    entries = _mount_entries(mountpoint)
    if not entries:
        raise NotMounted(f"{mountpoint} is not mounted")
    fstype, source = entries[-1]
    if not _is_kachery_mount(entries[-1]):
        # A mistyped path must not take down another file system (as root, it could).
        raise InvalidInput(f"{mountpoint} is a {fstype} file system ({source}), not a"
                           " kachery-fs mount: left mounted (use umount(8) for it)")
    if os.path.ismount(mountpoint):
        unmount(mountpoint, lazy=args.lazy)
    else:
        # Listed but not reachable: the mount's process has died ("Transport endpoint is
        # not connected"), which ismount, and so unmount(), take for "not mounted".
        _detach_dead_mount(mountpoint)
    return 0


def _detach_dead_mount(mountpoint: Path) -> None:
    """Detach a kachery-fs mount whose process has died: lazily, since nothing serves it."""
    import shutil

    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", "-z", str(mountpoint)] if tool else ["umount", "-l", str(mountpoint)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise KacheryError(f"could not unmount {mountpoint}: {result.stderr.strip()}")


async def _up(args) -> int:
    with _common.serving_metrics(args.metrics) as metrics:  # the hub's and the node's
        return await _up_serving(args, metrics)


async def _up_serving(args, metrics) -> int:
    from ..fs.mount import check_mountpoint, run_mount
    from ..hub.serve import HubServer

    mountpoint = Path(args.mountpoint).resolve()
    mountpoint.mkdir(parents=True, exist_ok=True)
    check_mountpoint(mountpoint)
    _check_mount_target(mountpoint, args.nonempty)
    node = _common.open_node(create=True)
    _apply_cache_size(node, args)
    server = HubServer(node.dir / "hub", owner_id=node.node_id)
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: server.run(
                host="127.0.0.1", port=args.port, task_status=task_status))
            hub = node.channels.hub(url)
            with contextlib.suppress(Conflict):  # made by an earlier `up`
                await hub.create_channel(args.channel)
            await hub.authorize_node(args.channel, node.node_id, list(PERMISSIONS), "up")
            info = await hub.get_channel(args.channel)
            node.db.add_channel(args.channel, url, info["bucketBaseUrl"],
                                set(info["permissions"]), private=info.get("private") is True)

            shown = f"; metrics at {metrics.url}" if metrics else ""

            async def announce(_nursery):
                print(f"""kachery-fs is up: hub and local bucket at {url}, node {node.node_id}
channel {args.channel!r} mounted at {mountpoint}{shown}

Try, in another terminal:
  cp SOMEFILE {mountpoint}/{args.channel}/
  getfattr -n user.kachery.uri {mountpoint}/{args.channel}/SOMEFILE
  cat {mountpoint}/{args.channel}/sha1/<hash printed above>
  ls {mountpoint}/{args.channel}/sha1/
Another node can join with:  KACHERY_FS_DIR=/tmp/node2 kachery-fs join {url} {args.channel}
Press Ctrl-C to unmount and stop.""", flush=True)

            await run_mount(node, mountpoint, also=announce)
            nursery.cancel_scope.cancel()
    finally:
        pending = sum(n for state, n in node.db.upload_counts().items() if state != "done")
        server.close()
        await node.aclose()
    note = f"; {pending} unfinished upload(s) resume at the next start" if pending else ""
    try:
        _check_unmounted(mountpoint)
    except KacheryError as exc:
        raise KacheryError(f"{exc}{note}") from None
    print(f"unmounted{note}", flush=True)
    return 0


@dataclass(frozen=True)
class Option:
    """One option of ``mount`` that the background mount passes on to its foreground child.

    ``example`` is a valid value (tests check that every option survives the trip)."""

    flag: str
    help: str
    type: Callable[[str], Any] | None = None  # None: a flag without a value
    default: Any = None
    metavar: str | None = None
    example: str | None = None

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        if self.type is None:
            parser.add_argument(self.flag, action="store_true", help=self.help)
        else:
            parser.add_argument(self.flag, type=self.type, default=self.default,
                                metavar=self.metavar, help=self.help)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    def argv(self, args: argparse.Namespace) -> list[str]:
        """This option as the child's command line gives it, from the parsed ``args``."""
        value = getattr(args, self.dest)
        if self.type is None:
            return [self.flag] if value else []
        if value is None or value == self.default:
            return []
        return [self.flag, str(value)]


#: The options of ``mount`` besides the mount point, ``--foreground`` and ``--log-file``.
#: The parser is built from this table, and the background mount re-executes itself in
#: the foreground with every one of them, so none can be left behind.
MOUNT_OPTIONS = (
    Option("--nonempty", "mount even on a directory that is not empty (hiding its files)"),
    Option("--allow-other", "let other users see the mount (needs user_allow_other in"
           " /etc/fuse.conf)"),
    Option("--debug-fuse", "libfuse debug output"),
    Option("--read-only", "change nothing: writes, renames and removals get EROFS, no"
           " uploads (queued ones wait for a mount without it), no answers to other nodes'"
           " file requests, no feed appends"),
    Option("--strict", "serve no byte of a file before the whole file is fetched and"
           " verified against its SHA-1: no reads by chunk of large files (a first read of"
           " a cold 2 GB file then waits for all of it)"),
    Option("--request-timeout", "give up on a file requested from other nodes when it makes"
           f" no progress for this long (default {DEFAULT_STALL_TIMEOUT_S:g})", type=float,
           default=DEFAULT_STALL_TIMEOUT_S, metavar="SECONDS", example="12.5"),
    Option("--bwlimit", "limit upload bandwidth, e.g. 500K, 10M (bytes per second)",
           type=_rate, metavar="RATE", example="500K"),
    Option("--cache-size", CACHE_SIZE_HELP.format(what="for this run"), type=_cache_size,
           metavar="SIZE", example="10G"),
    Option("--metrics", METRICS_HELP, type=_metrics_address, metavar="ADDR:PORT",
           example="127.0.0.1:9420"),
)


def foreground_argv(args: argparse.Namespace, mountpoint: Path, log_file: Path) -> list[str]:
    """The command line of the foreground mount that a background ``mount`` starts."""
    argv = [sys.executable, "-m", "kachery_fs", "-" + "v" * max(args.verbose, 1), "mount",
            "--foreground", "--log-file", str(log_file), str(mountpoint)]
    for option in MOUNT_OPTIONS:
        argv += option.argv(args)
    return argv


def add_commands(sub) -> None:
    s = _sub(sub, "up", "run hub, local bucket, node and one channel, mounted (Ctrl-C stops)",
             "The embedded default: a hub with its local bucket on 127.0.0.1, this node (created"
             " if missing) as its owner, one channel this node may request and provide, and the"
             " mount, all in one process until Ctrl-C. Hub state lives in $KACHERY_FS_DIR/hub.")
    s.add_argument("mountpoint", help="directory to mount on (created if missing)")
    s.add_argument("--channel", default="default", help="channel name (default: default)")
    s.add_argument("--port", type=_port, default=DEFAULT_HUB_PORT,
                   help=f"hub port on 127.0.0.1 (default {DEFAULT_HUB_PORT}; 0 picks a free one)")
    s.add_argument("--nonempty", action="store_true",
                   help="mount even on a directory that is not empty (hiding its files)")
    _add_cache_size(s)
    add_metrics(s)
    s.set_defaults(run=_up, is_async=True)

    s = _sub(sub, "mount", "mount this node's channels",
             "Mount every joined channel as a directory under MOUNTPOINT: <channel>/sha1/<hash>"
             " reads any content by hash (verified), files written under <channel>/ are stored"
             " and uploaded. Runs in the background unless -f; stop it with `kachery-fs umount`.")
    s.add_argument("mountpoint", help="an existing empty directory")
    s.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr (for services and tests)")
    s.add_argument("--log-file", help="log here (default in the background:"
                   " $KACHERY_FS_DIR/mount.log)")
    for option in MOUNT_OPTIONS:
        option.add_to(s)
    s.set_defaults(run=cmd_mount)

    s = _sub(sub, "umount", "unmount a kachery-fs mount point",
             "Unmount MOUNTPOINT (fusermount3 -u) if it is a kachery-fs mount; any other file"
             " system there is refused and left mounted. Files already closed are safe in the"
             " local store; their uploads resume at the next mount.")
    s.add_argument("mountpoint", help="the mount point")
    s.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up when unused")
    s.set_defaults(run=cmd_umount)

