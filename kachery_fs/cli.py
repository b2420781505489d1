"""The ``kachery-fs`` command line.

A user mistake (or an unreachable hub, a missing file...) gets a one-line message on
stderr and a non-zero exit status, never a traceback: project exceptions are turned
into messages here and only here.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import trio

from . import __version__
from .config import DEFAULT_HUB_PORT, node_dir
from .errors import InvalidInput, KacheryError, NotFound, leaves
from .protocol import PERMISSIONS
from .requester import DEFAULT_STALL_TIMEOUT_S
from .units import format_size
from .uris import format_uri, parse_uri

log = logging.getLogger("kachery_fs")

DEFAULT_HUB_URL = f"http://127.0.0.1:{DEFAULT_HUB_PORT}"


def _hub_url(args) -> str:
    return args.hub or os.environ.get("KACHERY_FS_HUB") or DEFAULT_HUB_URL


def setup_logging(verbose: int, log_file: str | None = None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose == 1 else logging.WARNING
    handler: logging.Handler = (logging.FileHandler(log_file) if log_file
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "hypercorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _open_node(*, create: bool = False):
    from .node import Node

    return Node(node_dir(), create=create)


# -- node commands ---------------------------------------------------------------------


def cmd_init(args) -> int:
    from . import settings
    from .node import init_node

    directory = node_dir()
    key = init_node(directory)
    if args.cache_size is not None:
        limit = settings.parse_limit(args.cache_size)
        settings.update(directory, cache_size=limit)
        print(f"local store limit: {format_size(limit) if limit else 'none'}"
              f" (in {settings.path(directory)})", file=sys.stderr)
    print(key.node_id)
    return 0


def cmd_node_id(args) -> int:
    from .identity import NodeKey

    d = node_dir()
    try:
        print(NodeKey.load(d).node_id)
    except NotFound:
        raise NotFound(f"no node in {d}: run `kachery-fs init` first") from None
    return 0


async def _join(args) -> int:
    node = _open_node(create=True)
    try:
        hub = node.hub(args.hub_url)
        await _check_is_hub(hub)
        info = await hub.get_channel(args.channel)
        perms = set(info.get("permissions", []))
        # A node not yet authorized is told no bucket; it learns it once it is.
        node.db.add_channel(args.channel, args.hub_url.rstrip("/"),
                            info.get("bucketBaseUrl") or "", perms)
    finally:
        await node.aclose()
    print(f"joined channel {args.channel} on {args.hub_url}")
    if perms:
        print(f"permissions: {', '.join(sorted(perms))}")
    else:
        print("this node has no permissions on it yet; ask the channel owner to run:\n"
              f"  kachery-fs hub channel authorize {args.channel} {node.node_id}"
              " --add requestFiles,provideFiles")
    return 0


async def _check_is_hub(hub) -> None:
    """InvalidInput unless ``hub.url`` answers as a kachery-fs hub. A hub serves its local
    bucket at the same address, so a wrong path would otherwise get a bucket's answer."""
    from .errors import Unavailable

    try:
        about = await hub.info()
    except Unavailable:
        raise  # not reachable: the message says so
    except (KacheryError, ValueError) as exc:
        about = exc
    if not (isinstance(about, dict) and about.get("service") == "kachery-fs hub"):
        why = f" ({about})" if isinstance(about, Exception) else ""
        raise InvalidInput(f"{hub.url} is not a kachery-fs hub{why}: give the address that"
                           " `kachery-fs hub serve` prints, e.g."
                           f" http://HOST:{DEFAULT_HUB_PORT}, with no path")


def _input_files(names: list[str], command: str) -> list[Path]:
    """The paths of ``names``, all checked before any is used."""
    paths = []
    for name in names:
        path = Path(name)
        if path.is_dir():
            raise InvalidInput(f"{name} is a directory: {command} takes files (for the files"
                               f" in it: kachery-fs {command} {name.rstrip('/')}/*)")
        if not path.is_file():
            raise NotFound(f"{name}: no such file" if not path.exists()
                           else f"{name} is not a regular file")
        paths.append(path)
    return paths


def _pick_channel(node, name: str | None) -> str:
    channels = [c.name for c in node.db.channels()]
    if name:
        node.db.channel(name)  # NotFound with advice
        return name
    if len(channels) == 1:
        return channels[0]
    if not channels:
        raise NotFound("this node has joined no channel (see `kachery-fs join HUB_URL CHANNEL`)")
    raise InvalidInput(f"this node has joined several channels ({', '.join(channels)}):"
                       " choose one with --channel")


async def _put(args) -> int:
    from tqdm import tqdm

    from . import resumable
    from .errors import Conflict, CorruptLocalFile, PermissionDenied

    paths = _input_files(args.files, "put")
    node = _open_node()
    try:
        channel_name = _pick_channel(node, args.channel)
        ch = node.db.channel(channel_name)
        hub = node.hub(ch.hub_url)

        async def upload(path: Path, sha1: str, size: int) -> None:
            signed = await hub.initiate_upload(channel_name, sha1, size)
            if signed is None:
                return  # the bucket already has it (the hub checked)
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"uploading {path.name}",
                      disable=args.quiet or None, file=sys.stderr) as bar:
                def progress(committed, bar=bar):
                    bar.update(committed - bar.n)
                    node.db.update_upload(channel_name, sha1, committed=committed)
                try:
                    session = await resumable.start_session(node.client, signed)
                    node.db.update_upload(channel_name, sha1, session_uri=session,
                                          committed=0, state="uploading")
                    await resumable.upload(node.client, session, node.store.path(sha1), size,
                                           on_progress=progress, sha1=sha1)
                except Conflict:
                    # The object appeared meanwhile (a mount or another node uploading the
                    # same content): already uploaded, as far as we are concerned.
                    pass
            await hub.finalize_upload(channel_name, sha1, size)

        for path in paths:
            name = str(path)
            size = path.stat().st_size
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                      disable=args.quiet or None, file=sys.stderr) as bar:
                sha1, size = await trio.to_thread.run_sync(
                    lambda path=path, bar=bar: node.store.add_file(path, progress=bar.update))
            node.db.enqueue_upload(channel_name, sha1, size)
            try:
                await upload(path, sha1, size)
            except (PermissionDenied, InvalidInput, CorruptLocalFile) as exc:
                # Refused: retrying would not help (the mount's uploader would say the same).
                node.db.update_upload(channel_name, sha1, state="failed", error=str(exc))
                raise
            except KacheryError as exc:
                # Transient (hub or bucket unreachable...): the upload stays queued.
                node.db.update_upload(channel_name, sha1, error=str(exc))
                raise KacheryError(
                    f"{name}: {exc}; the upload of {format_uri(sha1, path.name)} stays queued:"
                    " the next `kachery-fs mount` or `kachery-fs serve` will finish it") from None
            node.db.update_upload(channel_name, sha1, state="done", session_uri=None, error=None)
            print(format_uri(sha1, path.name))
    finally:
        await node.aclose()
    return 0


def cmd_store_add(args) -> int:
    from .state import NodeDB
    from .store import Store

    paths = _input_files(args.files, "store add")
    d = node_dir()
    d.mkdir(parents=True, exist_ok=True)
    db = NodeDB(d / "node.db")
    store = Store.for_node(d, db)
    try:
        for path in paths:
            sha1, _size = store.add_file(path)
            print(format_uri(sha1, path.name))
    finally:
        store.close()
        db.close()
    return 0


def cmd_store_unpin(args) -> int:
    from .state import NodeDB
    from .store import Store

    hashes = [parse_uri(text).sha1 for text in args.uris]  # all checked before any change
    d = node_dir()
    db = NodeDB(d / "node.db")
    store = Store.for_node(d, db)
    try:
        for sha1 in hashes:
            if store.cache.unpin(sha1):
                print(f"sha1://{sha1} may now be evicted when the store is over its limit")
            elif store.has(sha1):
                print(f"sha1://{sha1} was not pinned by put or store add")
            else:
                raise NotFound(f"sha1://{sha1} is not in the local store")
    finally:
        store.close()
        db.close()
    return 0


def cmd_store_add_source(args) -> int:
    from . import settings
    from .sources import check_source

    d = node_dir()
    path = check_source(Path(args.path), d)
    configured = settings.load(d).sources
    if str(path) not in configured:
        d.mkdir(parents=True, exist_ok=True)
        settings.update(d, sources=[*configured, str(path)])
    print(f"content missing from this node's store is looked for in {path}"
          " (verified before use; nothing there is ever written)")
    return 0


def cmd_store_remove_source(args) -> int:
    from . import settings
    from .sources import standard_locations

    d = node_dir()
    path = Path(args.path).expanduser().resolve()
    configured = settings.load(d).sources
    if str(path) in configured:
        settings.update(d, sources=[s for s in configured if s != str(path)])
        print(f"{path} is no longer read")
    elif path in standard_locations():
        raise InvalidInput(f"{path} is a standard kachery location, read when it exists: put"
                           f" `auto-sources = false` in {settings.path(d)} to read only the"
                           " configured sources")
    else:
        raise NotFound(f"{path} is not a source (see `kachery-fs store sources`)")
    return 0


def cmd_store_sources(args) -> int:
    from .sources import Sources

    sources = Sources.load(node_dir())
    if not sources:
        print("no kachery store is read (add one with `kachery-fs store add-source PATH`)")
    for source in sources:
        how = "found automatically" if source.automatic else "configured"
        missing = "" if source.path.is_dir() else ", missing"
        print(f"{source.path}  ({how}{missing})")
    return 0


async def _cat(args) -> int:
    from .bucket import fetch_to_store
    from .requester import request_file
    from .sources import Sources

    uri = parse_uri(args.uri)
    node = _open_node(create=True)
    try:
        _apply_cache_size(node, args)
        sources = Sources.load(node.dir)
        if not node.store.has(uri.sha1) and await trio.to_thread.run_sync(
                sources.copy_into, node.store, uri.sha1) is None:
            channels = [node.db.channel(args.channel)] if args.channel else node.db.channels()
            if not channels:
                raise NotFound(f"sha1://{uri.sha1} is neither in the local store nor in a"
                               " kachery store on this machine, and this node has joined no"
                               " channel to look in")
            errors = []
            for ch in channels:
                try:
                    try:
                        await fetch_to_store(node.client, ch.bucket_base_url, ch.name, uri.sha1,
                                             node.store)
                    except NotFound:
                        # In no bucket: ask the channel's other nodes through the hub.
                        await request_file(node, ch.name, uri.sha1,
                                           stall_timeout=args.request_timeout)
                        await fetch_to_store(node.client, ch.bucket_base_url, ch.name, uri.sha1,
                                             node.store)
                    node.downloads.add(ch.name, uri.sha1, node.store.size(uri.sha1) or 0)
                    await node.downloads.final_flush()
                    break
                except KacheryError as exc:
                    errors.append(f"{ch.name}: {exc}")
            else:
                raise NotFound(f"could not get sha1://{uri.sha1}: {'; '.join(errors)}")
        fd = node.store.open(uri.sha1)
        try:
            out = sys.stdout.buffer
            while chunk := os.read(fd, 1 << 20):
                out.write(chunk)
            out.flush()
        finally:
            os.close(fd)
    finally:
        await node.aclose()
    return 0


async def _serve(args) -> int:
    from .provider import Provider
    from .resumable import RateLimit
    from .uploader import Uploader

    node = _open_node()
    try:
        _apply_cache_size(node, args)
        if not node.db.channels():
            raise InvalidInput("this node has joined no channel: `kachery-fs join HUB_URL"
                               " CHANNEL` first")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.store.cache.run)
            uploader = await Uploader.create(
                node, nursery=nursery, rate_limit=RateLimit(args.bwlimit) if args.bwlimit else None)
            provider = Provider(node, uploader)
            nursery.start_soon(provider.run)
            print(f"kachery-fs serving files of node {node.node_id} on request"
                  f" (channels: {', '.join(c.name for c in node.db.channels())}); Ctrl-C stops",
                  file=sys.stderr, flush=True)
    finally:
        await node.aclose()
    return 0


async def _status(args) -> int:
    from . import status

    node = _open_node()
    try:
        snapshot = status.read(node.dir)
        if snapshot is None:  # no mount running: what the database and the hubs say
            snapshot = status.collect(node)
            for url in sorted({ch.hub_url for ch in node.db.channels()}):
                try:
                    await node.hub(url).info()
                    snapshot["hubs"][url] = {"state": "reachable (no mount running)",
                                             "since": None, "error": None}
                except KacheryError as exc:
                    snapshot["hubs"][url] = {"state": "unreachable", "since": None,
                                             "error": str(exc)}
        if args.json:
            print(json.dumps(snapshot, indent=1))
        else:
            sys.stdout.write(status.render(snapshot))
    finally:
        await node.aclose()
    return 0


# -- feeds -------------------------------------------------------------------------------


def _feed_ref(parts: list[str]):
    """(feed id, subfeed name) from ``feed://ID/SUB`` or ``ID SUB``."""
    from .feeds import parse_feed_uri

    if len(parts) == 1:
        uri = parse_feed_uri(parts[0])
        if uri.subfeed is None:
            raise InvalidInput(f"{parts[0]} names no subfeed: use feed://FEED/SUBFEED or"
                               " FEED SUBFEED")
        return uri.feed_id, uri.subfeed
    if len(parts) == 2:
        uri = parse_feed_uri(parts[0])
        if uri.subfeed is not None:
            raise InvalidInput(f"{parts[0]} already names a subfeed")
        return uri.feed_id, parts[1]
    raise InvalidInput("name a subfeed as feed://FEED/SUBFEED or as FEED SUBFEED")


def cmd_feed_create(args) -> int:
    from .feedsync import feed_store

    node = _open_node(create=True)
    try:
        with feed_store(node) as store:
            feed_id = store.create_feed(args.label)
        print(feed_id)
    finally:
        node.db.close()
    return 0


async def _feed_append(args) -> int:
    from .errors import PermissionDenied
    from .feeds import parse_line, subfeed_hash
    from .feedsync import FeedSync, feed_store

    *ref, text = args.args
    if not ref:
        raise InvalidInput("usage: kachery-fs feed append FEED SUBFEED JSON")
    feed_id, subfeed = _feed_ref(ref)
    h = subfeed_hash(subfeed)
    value = parse_line(text.encode())
    node = _open_node()
    try:
        # Everything that would refuse the publication is checked before the append: an
        # appended message stays (the log is append-only), so a retry after a refusal
        # would append it a second time.
        channel = _pick_channel(node, args.channel)
        as_of = ""
        try:  # a one-shot command: this node's permissions as of now
            perms = (await node.refresh_channel(channel)).permissions
        except PermissionDenied:
            raise
        except KacheryError as exc:
            log.info("could not refresh permissions on %s: %s", channel, exc)
            perms = node.channel(channel).permissions
            as_of = f" (as last known: the hub did not answer: {exc})"
        if "provideFeeds" not in perms:
            raise PermissionDenied(
                f"nothing appended: this node lacks the provideFeeds permission on channel"
                f" {channel!r}{as_of}; the channel owner can grant it with `kachery-fs hub"
                f" channel authorize {channel} {node.node_id} --add provideFeeds`")
        with feed_store(node) as store:
            signed = await trio.to_thread.run_sync(store.append, feed_id, subfeed, [value])
            number = signed[0]["body"]["messageNumber"]
            try:
                _, count = await FeedSync(node, store).publish(channel, feed_id, h)
            except KacheryError as exc:
                # The message is appended and signed; only its publication failed. A mount
                # publishes, when it starts, the subfeeds listed in feed_singles, and
                # uploads the single objects from `done` (an earlier failed append's row
                # keeps its own, lower `done`; objects already there cost a 412 each).
                node.db.feed_singles_due(channel, feed_id, h, number, number + 1)
                print(f"appended message {number}")
                print(f"kachery-fs: message {number} is not yet in the bucket of {channel}"
                      f" ({exc}); it stays queued: the next `kachery-fs mount` or `kachery-fs"
                      " feed append` to this subfeed publishes it (do not append it again)",
                      file=sys.stderr)
                return 0
        print(f"appended message {number}; {count} in the bucket of {channel}")
    finally:
        await node.aclose()
    return 0


async def _feed_read(args) -> int:
    from .errors import Unavailable
    from .feeds import message_line, subfeed_hash
    from .feedsync import FeedSync, feed_store

    feed_id, subfeed = _feed_ref(args.ref)
    h = subfeed_hash(subfeed)
    node = _open_node()
    out = sys.stdout.buffer
    try:
        with feed_store(node) as store:
            sync = FeedSync(node, store)
            channel = None
            if not store.owned(feed_id):
                channel = _pick_channel(node, args.channel)
                try:  # a one-shot command: this node's permissions as of now
                    await node.refresh_channel(channel)
                except KacheryError as exc:
                    log.info("could not refresh permissions on %s: %s", channel, exc)
                await sync.fetch(channel, feed_id, h, name=None if subfeed.startswith("~")
                                 else subfeed)
            shown = 0
            for signed in store.messages(feed_id, h):
                out.write(message_line(signed))
                shown += 1
            out.flush()
            if not args.follow:
                return 0
            channel = channel or _pick_channel(node, args.channel)
            hub = node.hub(node.channel(channel).hub_url)
            while True:
                try:
                    answer = await hub.call(
                        "watchFeeds", wait_s=20, channel=channel,
                        subscriptions=[{"feedId": feed_id, "subfeedHash": h,
                                        "position": store.count(feed_id, h)}])
                except Unavailable as exc:
                    log.warning("%s; retrying in 2 s", exc)
                    await trio.sleep(2)
                    continue
                if answer.get("updates") and not store.owned(feed_id):
                    await sync.fetch(channel, feed_id, h)
                for signed in store.messages(feed_id, h, shown):
                    out.write(message_line(signed))
                    shown += 1
                out.flush()
    finally:
        await node.aclose()


# -- mount -------------------------------------------------------------------------------


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
    from .fs.mount import run_mount

    mountpoint = Path(os.path.realpath(args.mountpoint))
    _check_mount_target(mountpoint, args.nonempty)
    node = _open_node()
    try:
        _check_joined(node)
        _apply_cache_size(node, args)
        await run_mount(node, mountpoint, allow_other=args.allow_other,
                        debug=args.debug_fuse, request_timeout=args.request_timeout,
                        bwlimit=args.bwlimit)
    finally:
        await node.aclose()
    _check_unmounted(mountpoint)
    return 0


def cmd_mount(args) -> int:
    from .fs.mount import check_mountpoint

    if args.foreground:
        setup_logging(max(args.verbose, 1), args.log_file)
        return trio.run(_mount_foreground, args)
    mountpoint = Path(args.mountpoint).resolve()
    check_mountpoint(mountpoint)
    _check_mount_target(mountpoint, args.nonempty)
    node = _open_node()  # fail here, in the foreground, if there is no node or channel
    try:
        _check_joined(node)
    finally:
        node.db.close()
    log_file = Path(args.log_file or node_dir() / "mount.log").resolve()
    cmd = [sys.executable, "-m", "kachery_fs", "-" + "v" * max(args.verbose, 1), "mount",
           "--foreground", "--log-file", str(log_file), str(mountpoint)]
    if args.allow_other:
        cmd.append("--allow-other")
    if args.nonempty:
        cmd.append("--nonempty")
    cmd += ["--request-timeout", str(args.request_timeout)]
    if args.bwlimit:
        cmd += ["--bwlimit", str(args.bwlimit)]
    if args.cache_size:
        cmd += ["--cache-size", args.cache_size]
    with open(os.devnull, "rb") as devnull:
        child = subprocess.Popen(cmd, stdin=devnull, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.ismount(mountpoint):
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
    and ``subtype=kachery``, which the kernel shows as type ``fuse.kachery``."""
    fstype, source = entry
    return fstype == "fuse.kachery" or (fstype.startswith("fuse") and source == "kachery-fs")


def cmd_umount(args) -> int:
    from .errors import NotMounted
    from .fs.mount import unmount

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


# -- hub ----------------------------------------------------------------------------------


async def _hub_serve(args) -> int:
    from .hub.serve import HubServer

    owner = args.owner
    if owner is None:
        from .node import init_node

        owner = init_node(node_dir()).node_id
    directory = Path(args.dir) if args.dir else node_dir() / "hub"
    gcs = None
    if args.gcs_credentials:
        from .hub.gcs import GoogleCloudStorage

        gcs = GoogleCloudStorage.from_environment(key_file=args.gcs_credentials)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise InvalidInput("https needs both --tls-cert and --tls-key")
        from ._serve import Tls

        tls = Tls(Path(args.tls_cert), Path(args.tls_key)).check()
    server = HubServer(directory, owner_id=owner, local_bucket=not args.no_local_bucket,
                       gcs=gcs)
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: server.run(
                host=args.host, port=args.port, public_url=args.public_url, tls=tls,
                task_status=task_status))
            print(f"kachery-fs hub listening on {url} (owner {owner})", flush=True)
            if args.url_file:
                Path(args.url_file).write_text(url + "\n")
    finally:
        server.close()
    return 0


def _permissions(text: str) -> list[str]:
    if text in ("all", "*"):
        return list(PERMISSIONS)
    if text in ("none", ""):
        return []
    perms = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(perms) - set(PERMISSIONS)
    if unknown:
        raise InvalidInput(f"unknown permission(s) {', '.join(sorted(unknown))};"
                           f" choose from {', '.join(PERMISSIONS)}, or all / none")
    return perms


async def _hub_call(args, fn) -> int:
    node = _open_node(create=True)
    try:
        result = await fn(node.hub(_hub_url(args)))
    finally:
        await node.aclose()
    if result:
        print(result)
    return 0


async def _channel_create(args) -> int:
    from .settings import parse_limit

    allocation = parse_limit(args.allocation) if args.allocation else None

    async def go(hub):
        r = await hub.create_channel(args.name, args.bucket, allocation=allocation)
        extra = f", allocation {format_size(allocation)}" if allocation else ""
        # Only the hub's owner may create a channel, and it expects to use it: it gets
        # every permission, as with `up` (`authorize --remove` takes them away).
        await hub.authorize_node(r["channel"], hub.key.node_id, list(PERMISSIONS), "owner")
        return (f"created channel {r['channel']} (bucket {r['bucket']}{extra}); this node, the"
                f" hub's owner, has every permission on it")
    return await _hub_call(args, go)


async def _channel_set(args) -> int:
    from .settings import parse_limit

    fields = {}
    if args.allocation is not None:
        fields["allocation"] = parse_limit(args.allocation)
    if args.low_watermark is not None:
        fields["lowWatermark"] = _percent(args.low_watermark)
    if not fields:
        raise InvalidInput("nothing to change: give --allocation and/or --low-watermark")

    async def go(hub):
        r = await hub.call("setChannel", channel=args.name, **fields)
        allocation = format_size(r["allocation"]) if r["allocation"] else "none (no eviction)"
        return (f"channel {r['channel']}: allocation {allocation},"
                f" low watermark {r['lowWatermark']:.0%}")
    return await _hub_call(args, go)


def _percent(text: str) -> float:
    """``"90%"`` or ``"90"`` → 0.9; a fraction (``"0.9"``) is taken as it is."""
    text = text.strip()
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise InvalidInput(f"not a percentage: {text!r} (example: 90%)") from None
    return value / 100 if text.endswith("%") or value > 1 else value


async def _channel_stats(args) -> int:
    from .hub.cache import DEFAULT_PRICES, monthly_cost

    prices = {**DEFAULT_PRICES, **{k: v for k, v in (
        ("storage_gib_month", args.storage_price), ("egress_gib", args.egress_price),
        ("class_a_per_1000", args.class_a_price), ("class_b_per_1000", args.class_b_price))
        if v is not None}}

    async def go(hub):
        stats = await hub.call("channelStats", channel=args.name)
        cost = monthly_cost(stats, prices)
        if args.json:
            return json.dumps({**stats, "prices": prices, "monthlyCost": cost}, indent=2)
        return render_channel_stats(stats, cost, prices)
    return await _hub_call(args, go)


def render_channel_stats(stats: dict, cost: dict, prices: dict) -> str:
    def line(label, counter):
        c = stats[counter]
        return f"  {label:<13}{c['count']:>10,}  {format_size(c['bytes']):>10}"

    allocation = stats["allocation"]
    used = stats["storedBytes"]
    if allocation:
        alloc_text = (f"{format_size(allocation)}, {used / allocation:.0%} used,"
                      f" evicts down to {stats['lowWatermark']:.0%} of it")
    else:
        alloc_text = "none (nothing is evicted; set one with `hub channel set --allocation`)"
    days = (stats["now"] - stats["since"]) / 86400
    out = [
        f"channel {stats['channel']}  ({stats['bucket']})",
        f"  allocation   {alloc_text}",
        f"  stored       {stats['storedObjects']:>10,}  {format_size(used):>10}"
        + (f"   ({stats['inFlight']} upload(s) in flight)" if stats["inFlight"] else ""),
        f"  since {time.strftime('%Y-%m-%d %H:%M', time.localtime(stats['since']))}"
        f" ({days:.1f} days):   count        bytes",
        line("uploads", "uploads"),
        line("re-uploads", "reuploads"),
        line("evictions", "evictions"),
        line("downloads", "downloads"),
        f"  {'requests':<13}{stats['requests']['count']:>10,}",
    ]
    reuploads, uploads = stats["reuploads"]["count"], stats["uploads"]["count"]
    if uploads and reuploads / uploads > 0.1:
        out.append(f"  note: {reuploads / uploads:.0%} of uploads were of files evicted before:"
                   " a larger allocation would save those transfers")
    out += [
        "estimated monthly cost on Google Cloud Storage (USD; egress and operations at the"
        " rate seen so far):",
        f"  storage  ${cost['storage']:9.2f}   ({format_size(used)} at"
        f" ${prices['storage_gib_month']}/GiB-month)",
        f"  egress   ${cost['egress']:9.2f}   (at ${prices['egress_gib']}/GiB)",
        f"  class A  ${cost['class_a']:9.2f}   class B  ${cost['class_b']:.2f}",
        f"  total    ${cost['total']:9.2f}",
    ]
    return "\n".join(out)


async def _channel_authorize(args) -> int:
    if args.permissions is not None and (args.add or args.remove):
        raise InvalidInput("--permissions sets the whole list: give it alone, or change the"
                           " current list with --add and --remove")
    if args.permissions is None and not (args.add or args.remove):
        raise InvalidInput("give --add PERMS, --remove PERMS or --permissions LIST")
    add = _permissions(args.add) if args.add else []
    remove = _permissions(args.remove) if args.remove else []

    async def go(hub):
        if args.permissions is not None:
            perms = _permissions(args.permissions)
        else:
            # --add and --remove change the node's current list, as the hub reports it.
            current = next((c for c in await hub.list_channels()
                            if c["channel"] == args.name), None)
            if current is None:
                raise NotFound(f"the hub has no channel {args.name!r}"
                               " (see `kachery-fs hub channel list`)")
            held = set(current["authorizedNodes"].get(args.node_id.lower(), []))
            perms = [p for p in PERMISSIONS if (p in held or p in add) and p not in remove]
        r = await hub.authorize_node(args.name, args.node_id, perms, args.label)
        return (f"channel {r['channel']}: node {r['nodeId']} has "
                f"{', '.join(r['permissions']) or 'no permissions'}")
    return await _hub_call(args, go)


async def _channel_list(args) -> int:
    async def go(hub):
        lines = []
        for c in await hub.list_channels():
            alloc = c.get("allocation")
            lines.append(f"{c['channel']}  {c['bucket']}"
                         + (f"  allocation {format_size(alloc)}" if alloc else ""))
            for node_id, perms in c["authorizedNodes"].items():
                lines.append(f"  {node_id}  {','.join(perms)}")
        return "\n".join(lines) or "no channels"
    return await _hub_call(args, go)


# -- up ----------------------------------------------------------------------------------------


async def _up(args) -> int:
    from .fs.mount import check_mountpoint, run_mount
    from .hub.serve import HubServer
    from .node import Node

    mountpoint = Path(args.mountpoint).resolve()
    mountpoint.mkdir(parents=True, exist_ok=True)
    check_mountpoint(mountpoint)
    _check_mount_target(mountpoint, args.nonempty)
    node = Node(node_dir(), create=True)
    _apply_cache_size(node, args)
    server = HubServer(node.dir / "hub", owner_id=node.node_id)
    try:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(lambda task_status: server.run(
                host="127.0.0.1", port=args.port, task_status=task_status))
            hub = node.hub(url)
            try:
                await hub.create_channel(args.channel)
            except KacheryError as exc:
                if "already exists" not in str(exc):
                    raise
            await hub.authorize_node(args.channel, node.node_id, list(PERMISSIONS), "up")
            info = await hub.get_channel(args.channel)
            node.db.add_channel(args.channel, url, info["bucketBaseUrl"],
                                set(info["permissions"]))

            async def announce(_nursery):
                print(f"""kachery-fs is up: hub and local bucket at {url}, node {node.node_id}
channel {args.channel!r} mounted at {mountpoint}

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


# -- parser ------------------------------------------------------------------------------------


EPILOG = """\
getting started (one machine, everything embedded):
  kachery-fs up ./kachery             hub, local bucket, node and channel 'default', mounted
  cp data.bin ./kachery/default/      hashed as written, committed on close, uploaded
  getfattr -n user.kachery.uri ./kachery/default/data.bin
  cat ./kachery/default/sha1/<hash>   any content by hash, verified

a second node:
  KACHERY_FS_DIR=~/.kachery-fs-2 kachery-fs init            prints its node id
  kachery-fs hub channel authorize default NODE_ID --add requestFiles,provideFiles
  KACHERY_FS_DIR=~/.kachery-fs-2 kachery-fs join http://127.0.0.1:7420 default
  KACHERY_FS_DIR=~/.kachery-fs-2 kachery-fs mount ~/kachery2

environment:
  KACHERY_FS_DIR   this node's directory: identity, store, state (default ~/.kachery-fs)
  KACHERY_FS_HUB   default hub URL for `hub channel ...` (default http://127.0.0.1:7420)
"""


def _sub(parent, name: str, help: str, description: str | None = None, **kw):
    description = description or help[:1].upper() + help[1:] + "."
    parser = parent.add_parser(name, help=help, description=textwrap.fill(description, 88),
                               formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    # -v also after the command. Its own dest: a subcommand's default would otherwise
    # replace the count given before the command.
    parser.add_argument("-v", "--verbose", action="count", dest="verbose_after",
                        default=argparse.SUPPRESS, help="more log output (-vv for debug)")
    return parser


def _cache_size(text: str) -> str:
    from .settings import parse_limit

    try:
        parse_limit(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _apply_cache_size(node, args) -> None:
    """``--cache-size``, if given, overrides the node's setting for this run."""
    from .settings import parse_limit

    if args.cache_size is not None:
        node.store.cache.limit = parse_limit(args.cache_size)


def _add_cache_size(parser, what: str = "for this run") -> None:
    parser.add_argument("--cache-size", type=_cache_size, metavar="SIZE",
                        help=f"limit the local store to SIZE {what} (e.g. 10G, 500MiB: powers"
                        " of 1024; 'unlimited' for none): past it, the content read least"
                        " recently is evicted, never files written here, unfinished uploads"
                        " or content added with put or store add (default: the node's"
                        " setting, `kachery-fs init --cache-size`, else unlimited)")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range: choose one from 0 to"
                                         " 65535 (0 picks a free one)")
    return port


def _rate(text: str) -> float:
    from .resumable import parse_rate

    try:
        return parse_rate(text)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kachery-fs",
        description="Mount kachery channels as a drive: content-addressed files shared through"
                    " a cloud bucket, brokered by a hub. The node's state lives in"
                    " $KACHERY_FS_DIR (default ~/.kachery-fs).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"kachery-fs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log output (-vv for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    s.set_defaults(run=_up, is_async=True)

    s = _sub(sub, "init", "create this node's identity and store; print its node id",
             "Create $KACHERY_FS_DIR with a new Ed25519 identity (private.pem, mode 0600, in"
             " kachery's PEM format) unless one exists, and print the node id (the 64-hex public"
             " key) that a channel owner authorizes. With --cache-size, also set the node's"
             " default limit of its local store (in $KACHERY_FS_DIR/config.toml), for a new"
             " node or an existing one.")
    s.add_argument("--cache-size", type=_cache_size, metavar="SIZE",
                   help="the most the local store may hold, e.g. 10G or 500MiB (powers of"
                   " 1024), or 'unlimited' (the default); past it, the content read least"
                   " recently is evicted")
    s.set_defaults(run=cmd_init)
    s = _sub(sub, "node-id", "print this node's id")
    s.set_defaults(run=cmd_node_id)

    s = _sub(sub, "join", "add a channel membership to this node",
             "Remember CHANNEL on the hub at HUB_URL, with the bucket and permissions the hub"
             " reports for this node. Joining before being authorized is allowed: the mount"
             " picks up permissions as soon as the owner grants them.")
    s.add_argument("hub_url", metavar="HUB_URL", help="the hub, e.g. http://127.0.0.1:7420")
    s.add_argument("channel", metavar="CHANNEL", help="channel name")
    s.set_defaults(run=_join, is_async=True)

    s = _sub(sub, "mount", "mount this node's channels",
             "Mount every joined channel as a directory under MOUNTPOINT: <channel>/sha1/<hash>"
             " reads any content by hash (verified), files written under <channel>/ are stored"
             " and uploaded. Runs in the background unless -f; stop it with `kachery-fs umount`.")
    s.add_argument("mountpoint", help="an existing empty directory")
    s.add_argument("--nonempty", action="store_true",
                   help="mount even on a directory that is not empty (hiding its files)")
    s.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr (for services and tests)")
    s.add_argument("--log-file", help="log here (default in the background:"
                   " $KACHERY_FS_DIR/mount.log)")
    s.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (needs user_allow_other in /etc/fuse.conf)")
    s.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    s.add_argument("--request-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                   metavar="SECONDS", help="give up on a file requested from other nodes when"
                   f" it makes no progress for this long (default {DEFAULT_STALL_TIMEOUT_S:g})")
    s.add_argument("--bwlimit", type=_rate, metavar="RATE",
                   help="limit upload bandwidth, e.g. 500K, 10M (bytes per second)")
    _add_cache_size(s)
    s.set_defaults(run=cmd_mount)

    s = _sub(sub, "umount", "unmount a kachery-fs mount point",
             "Unmount MOUNTPOINT (fusermount3 -u) if it is a kachery-fs mount; any other file"
             " system there is refused and left mounted. Files already closed are safe in the"
             " local store; their uploads resume at the next mount.")
    s.add_argument("mountpoint", help="the mount point")
    s.add_argument("-z", "--lazy", action="store_true", help="detach now, clean up when unused")
    s.set_defaults(run=cmd_umount)

    s = _sub(sub, "put", "store files and upload them to a channel; print their URIs",
             "Hash each FILE into the local store, upload it to the channel's bucket through the"
             " hub (resumable, with a progress bar) and print its sha1:// URI. If the upload is"
             " interrupted it stays queued and the next mount finishes it.")
    s.add_argument("files", nargs="+", metavar="FILE", help="files to upload")
    s.add_argument("--channel", help="channel (needed when the node joined several)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(run=_put, is_async=True)

    s = _sub(sub, "store", "the local store")
    ss = s.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    t = _sub(ss, "add", "add files to the local store only; print their URIs",
             "Hash each FILE into the local store and print its sha1:// URI. Content added"
             " this way (or with put) is kept whatever the store's limit: this node holds it"
             " to provide it.")
    t.add_argument("files", nargs="+", metavar="FILE", help="files to add")
    t.set_defaults(run=cmd_store_add)
    t = _sub(ss, "unpin", "let content added with put or store add be evicted",
             "Content added with put or store add is kept whatever the store's limit. After"
             " unpin it is ordinary cache: evicted, least recently read first, when the store"
             " is over its limit, unless a name in the mount or an unfinished upload still"
             " needs it. Other nodes can then get it from this node only while it is here.")
    t.add_argument("uris", nargs="+", metavar="URI", help="sha1:// URIs or hashes")
    t.set_defaults(run=cmd_store_unpin)
    t = _sub(ss, "add-source", "read content from another kachery store on this machine",
             "Look for content missing from this node's store in the kachery store at PATH"
             " (~/kachery-storage, ~/.kachery-cloud, ~/.kachery or a copy of one), before the"
             " bucket. Content found there is verified against its SHA-1 and copied into this"
             " node's store as cached content; PATH is never written to. The standard"
             " locations are read without this when they exist.")
    t.add_argument("path", metavar="PATH", help="a kachery store directory")
    t.set_defaults(run=cmd_store_add_source)
    t = _sub(ss, "remove-source", "stop reading a kachery store added with add-source")
    t.add_argument("path", metavar="PATH", help="the directory, as listed by `store sources`")
    t.set_defaults(run=cmd_store_remove_source)
    t = _sub(ss, "sources", "list the kachery stores this node reads content from")
    t.set_defaults(run=cmd_store_sources)

    s = _sub(sub, "cat", "write the content of a sha1:// URI to stdout (verified)",
             "Write the content of URI (sha1://<hash>[...] or a bare hash) to stdout: from the"
             " local store, else from a kachery store on this machine (`store sources`), else"
             " from the bucket of a joined channel, else by asking the"
             " channel's other nodes through the hub; verified against its SHA-1 before any"
             " byte is written.")
    s.add_argument("uri", metavar="URI", help="sha1://<hash>, with or without ?label=...")
    s.add_argument("--channel", help="look only in this channel")
    s.add_argument("--request-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                   metavar="SECONDS", help="give up on a file requested from other nodes when"
                   f" it makes no progress for this long (default {DEFAULT_STALL_TIMEOUT_S:g})")
    _add_cache_size(s, "when adding the content to it")
    s.set_defaults(run=_cat, is_async=True)

    s = _sub(sub, "serve", "provide this node's files to its channels, without a mount",
             "Answer file requests: hold a connection to the hub of every joined channel and,"
             " when another node asks for a file this node holds, upload it to the channel's"
             " bucket. A mount does the same; this is for machines that only provide. Also"
             " finishes this node's pending uploads. Runs until Ctrl-C.")
    s.add_argument("--bwlimit", type=_rate, metavar="RATE",
                   help="limit upload bandwidth, e.g. 500K, 10M (bytes per second)")
    _add_cache_size(s)
    s.set_defaults(run=_serve, is_async=True, log_default=1)

    s = _sub(sub, "status", "show hub connections, pending requests and uploads",
             "Show this node's channels and permissions, its connection to each hub, the files"
             " it is waiting for from other nodes, the files it is providing, and its upload"
             " queue. Reads what the running mount reports; without a mount, asks the hubs.")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_status, is_async=True)

    s = _sub(sub, "feed", "create, append to and read feeds (signed append-only logs)",
             "Feeds are kachery's signed, hash-chained, append-only logs: a feed is an Ed25519"
             " key (its id is the 64-hex public key), with named subfeeds of JSON messages."
             " Name a subfeed as feed://FEED/SUBFEED or as FEED SUBFEED.")
    fs = s.add_subparsers(dest="feed_command", metavar="SUBCOMMAND", required=True)
    t = _sub(fs, "create", "create a feed owned by this node; print its id")
    t.add_argument("--label", help="a note about the feed")
    t.set_defaults(run=cmd_feed_create)
    t = _sub(fs, "append", "append one JSON message to a subfeed of a feed this node owns",
             "Sign JSON as the next message of the subfeed, store it, and publish the"
             " subfeed's new messages to the channel's bucket (the hub tells watching nodes).")
    t.add_argument("args", nargs="+", metavar="FEED [SUBFEED] JSON",
                   help="feed://FEED/SUBFEED JSON, or FEED SUBFEED JSON")
    t.add_argument("--channel", help="channel to publish to (needed when several are joined)")
    t.set_defaults(run=_feed_append, is_async=True)
    t = _sub(fs, "read", "print a subfeed's messages, one JSON document per line",
             "Print the subfeed's messages (fetched from the channel's bucket and verified"
             " when this node does not own the feed), one per line; with --follow, keep"
             " printing new ones as the hub announces them.")
    t.add_argument("ref", nargs="+", metavar="FEED [SUBFEED]",
                   help="feed://FEED/SUBFEED, or FEED SUBFEED")
    t.add_argument("--follow", "-f", action="store_true", help="wait for new messages")
    t.add_argument("--channel", help="channel to read from (needed when several are joined)")
    t.set_defaults(run=_feed_read, is_async=True)

    s = _sub(sub, "hub", "run or administer a hub")
    hs = s.add_subparsers(dest="hub_command", metavar="SUBCOMMAND", required=True)
    t = _sub(hs, "serve", "run a hub (with a local bucket unless --no-local-bucket)",
             "Run a hub: the control plane that authorizes nodes and signs upload URLs (it never"
             " carries file bytes), and the local bucket, a directory served with Google Cloud"
             " Storage semantics at the same address.")
    t.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    t.add_argument("--port", type=_port, default=DEFAULT_HUB_PORT,
                   help=f"port (default {DEFAULT_HUB_PORT}; 0 picks a free one)")
    t.add_argument("--dir", help="hub state directory (default $KACHERY_FS_DIR/hub)")
    t.add_argument("--owner", help="node id of the hub's owner (default: this node)")
    t.add_argument("--public-url", help="URL nodes use to reach this hub"
                   " (default http://HOST:PORT, or https:// with --tls-cert)")
    t.add_argument("--no-local-bucket", action="store_true", help="serve no local bucket")
    t.add_argument("--gcs-credentials", metavar="KEY_FILE",
                   help="service-account JSON key that signs upload URLs for gs:// channels"
                        " (default: $GOOGLE_APPLICATION_CREDENTIALS); with"
                        " $STORAGE_EMULATOR_HOST set, gs:// buckets are that emulator's")
    t.add_argument("--tls-cert", metavar="PEM_FILE",
                   help="serve https with this certificate (chain); needs --tls-key")
    t.add_argument("--tls-key", metavar="PEM_FILE", help="the certificate's private key")
    t.add_argument("--url-file", help="write the hub's URL to this file once listening")
    t.set_defaults(run=_hub_serve, is_async=True, log_default=1)

    t = _sub(hs, "channel", "channel administration (signed by the hub owner's node)")
    cs = t.add_subparsers(dest="channel_command", metavar="SUBCOMMAND", required=True)
    hub_help = f"hub URL (default $KACHERY_FS_HUB or {DEFAULT_HUB_URL})"
    c = _sub(cs, "create", "create a channel",
             "Create channel NAME on the hub (only its owner may). The owner's node, which runs"
             " this, gets every permission on it, as with `up`; `hub channel authorize NAME"
             " NODE_ID --remove PERMS` takes them away.")
    c.add_argument("name", metavar="NAME", help="channel name: 3-40 characters from A-Z a-z 0-9 _ -, in segments joined by '.'")
    c.add_argument("--bucket", help="bucket URI: local://NAME (a bucket of the hub's local"
                   " bucket) or gs://NAME (Google Cloud Storage); default local://kachery")
    c.add_argument("--allocation", metavar="SIZE",
                   help="the most the channel's content may take in the bucket (e.g. 50G);"
                        " past it, the least recently used files are evicted (default: none)")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_create, is_async=True)
    c = _sub(cs, "set", "change a channel's bucket allocation",
             "Change how much of the bucket channel NAME may use. When the content stored"
             " passes the allocation, the hub deletes the files least recently downloaded,"
             " requested or uploaded until the low watermark is reached. An evicted file stays"
             " readable: the next read asks a node that holds it to upload it again."
             " `hub channel stats` shows whether the allocation suits the demand.")
    c.add_argument("name", metavar="NAME", help="channel name")
    c.add_argument("--allocation", metavar="SIZE",
                   help="bytes, with K, M, G, T suffixes (powers of 1024), or 'none' (no eviction)")
    c.add_argument("--low-watermark", metavar="PERCENT",
                   help="eviction stops at this share of the allocation (default 90%%)")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_set, is_async=True)
    c = _sub(cs, "stats", "show a channel's bucket usage, demand and cost",
             "Show what channel NAME keeps in its bucket against its allocation; the uploads,"
             " re-uploads of evicted files, evictions and downloads counted since the counts began"
             " (when the channel was created, or when its hub was upgraded to keep them); and"
             " an estimate of what a month of it costs on Google Cloud Storage"
             " at list prices (change them with the price flags).")
    c.add_argument("name", metavar="NAME", help="channel name")
    c.add_argument("--json", action="store_true", help="print the figures as JSON")
    c.add_argument("--storage-price", type=float, metavar="USD",
                   help="per GiB-month stored (default 0.020, Standard, us-central1)")
    c.add_argument("--egress-price", type=float, metavar="USD",
                   help="per GiB downloaded (default 0.12, internet egress)")
    c.add_argument("--class-a-price", type=float, metavar="USD",
                   help="per 1,000 upload requests (default 0.005)")
    c.add_argument("--class-b-price", type=float, metavar="USD",
                   help="per 1,000 download requests (default 0.0004)")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_stats, is_async=True)
    c = _sub(cs, "authorize", "set a node's permissions on a channel",
             "Change NODE_ID's permissions on channel NAME: --add and --remove change the ones"
             " it has; --permissions replaces them all. Takes effect at once on the hub and"
             " within seconds on running mounts.")
    c.add_argument("name", metavar="NAME", help="channel name")
    c.add_argument("node_id", metavar="NODE_ID", help="the node's id (`kachery-fs node-id`)")
    c.add_argument("--add", metavar="PERMS",
                   help="grant these (comma-separated, or 'all'), keeping the others")
    c.add_argument("--remove", metavar="PERMS",
                   help="withdraw these (comma-separated, or 'all'), keeping the others")
    c.add_argument("--permissions", metavar="LIST",
                   help=f"replace all: comma-separated from {', '.join(PERMISSIONS)};"
                   " 'all' or 'none'")
    c.add_argument("--label", help="a note about the node")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_authorize, is_async=True)
    c = _sub(cs, "list", "list channels and authorized nodes")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_list, is_async=True)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    if not (args.command == "mount" and args.foreground):
        setup_logging(max(args.verbose, getattr(args, "log_default", 0)))
    try:
        if getattr(args, "is_async", False):
            return trio.run(args.run, args)
        return args.run(args)
    except KacheryError as exc:
        print(f"kachery-fs: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"kachery-fs: {_os_error_message(exc, args)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # An error raised inside a nursery (the hub's listener, the mount...) arrives
        # wrapped in a group: show it like the same error raised directly. Tasks
        # cancelled because of it add only trio.Cancelled leaves. Anything else is a
        # bug, and keeps its traceback.
        found = list(leaves(group))
        expected = (KacheryError, OSError, KeyboardInterrupt)
        if not all(isinstance(e, (*expected, trio.Cancelled)) for e in found):
            raise
        first = next((e for e in found if isinstance(e, expected)), None)
        if first is None:
            raise
        if isinstance(first, KeyboardInterrupt):
            return 130
        message = _os_error_message(first, args) if isinstance(first, OSError) else first
        print(f"kachery-fs: {message}", file=sys.stderr)
        return 1


def _os_error_message(exc: OSError, args) -> str:
    port = getattr(args, "port", None)
    if exc.errno == errno.EADDRINUSE and port is not None:
        return (f"port {port} is in use; choose another with --port, or --port 0 for any"
                " free port")
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
