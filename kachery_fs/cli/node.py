"""The node's own commands: ``init``, ``node-id``, ``join``, ``status``, ``store ...``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..config import DEFAULT_HUB_PORT, node_dir
from ..errors import InvalidInput, KacheryError, NotFound
from ..units import format_size
from ..uris import format_uri, parse_uri
from . import _common
from ._common import (
    _cache_size,
    _input_files,
    _sub,
)

log = logging.getLogger("kachery_fs")


def cmd_init(args) -> int:
    from .. import settings
    from ..node import init_node

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
    from ..identity import NodeKey

    d = node_dir()
    try:
        print(NodeKey.load(d).node_id)
    except NotFound:
        raise NotFound(f"no node in {d}: run `kachery-fs init` first") from None
    return 0


async def _join(args) -> int:
    node = _common.open_node(create=True)
    try:
        hub = node.channels.hub(args.hub_url)
        await _check_is_hub(hub)
        info = await hub.get_channel(args.channel)
        perms = set(info.get("permissions", []))
        # A node not yet authorized is told no bucket; it learns it once it is.
        node.db.add_channel(args.channel, args.hub_url.rstrip("/"),
                            info.get("bucketBaseUrl") or "", perms,
                            private=info.get("private") is True)
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
    from ..errors import Unavailable

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


def cmd_store_add(args) -> int:
    from ..state import NodeDB
    from ..store import Store

    paths = _input_files(args.files, "store add")
    d = node_dir()
    d.mkdir(parents=True, exist_ok=True)
    db = NodeDB(d / "node.db")
    store = Store.for_node(d, db)
    try:
        for path in paths:
            sha1, _size, manifest = store.add_file_with_manifest(path)
            print(format_uri(sha1, path.name,
                             manifest=manifest.hash if manifest is not None else None))
    finally:
        store.close()
        db.close()
    return 0


def cmd_store_unpin(args) -> int:
    from ..state import NodeDB
    from ..store import Store

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
    from .. import settings
    from ..sources import check_source

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
    from .. import settings
    from ..sources import standard_locations

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
    from ..sources import Sources

    sources = Sources.load(node_dir())
    if not sources:
        print("no kachery store is read (add one with `kachery-fs store add-source PATH`)")
    for source in sources:
        how = "found automatically" if source.automatic else "configured"
        missing = "" if source.path.is_dir() else ", missing"
        print(f"{source.path}  ({how}{missing})")
    return 0


async def _status(args) -> int:
    from .. import status

    node = _common.open_node()
    try:
        snapshot = status.read(node.dir)
        if snapshot is None:  # no mount running: what the database and the hubs say
            snapshot = status.collect(node)
            for url in sorted({ch.hub_url for ch in node.db.channels()}):
                try:
                    await node.channels.hub(url).info()
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


def add_commands(sub) -> None:
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

    s = _sub(sub, "status", "show hub connections, pending requests and uploads",
             "Show this node's channels and permissions, its connection to each hub, the files"
             " it is waiting for from other nodes, the files it is providing, and its upload"
             " queue. Reads what the running mount reports; without a mount, asks the hubs.")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(run=_status, is_async=True)

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

