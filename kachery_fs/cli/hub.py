"""``hub serve`` and ``hub channel ...``: running and administering a hub."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from .. import _systemd
from ..config import DEFAULT_HUB_PORT, node_dir
from ..errors import InvalidInput, NotFound
from ..protocol import PERMISSIONS
from ..units import format_size
from . import _common
from ._common import (
    DEFAULT_HUB_URL,
    _hub_url,
    _port,
    _sub,
    add_metrics,
)

if TYPE_CHECKING:
    from ..hub_client import ChannelChanges

log = logging.getLogger("kachery_fs")


async def _hub_serve(args) -> int:
    from ..hub.database import is_postgresql
    from ..hub.serve import HubServer

    database = args.database or os.environ.get("KACHERY_FS_HUB_DATABASE") or None
    if database is not None and not is_postgresql(database):
        raise InvalidInput(f"--database takes a postgresql:// URL, not {database!r} (without"
                           " it, the hub keeps its state in SQLite, in its --dir)")
    owner = args.owner
    if owner is None:
        from ..node import init_node

        owner = init_node(node_dir()).node_id
    directory = Path(args.dir) if args.dir else node_dir() / "hub"
    gcs = None
    if args.gcs_credentials:
        from ..hub.gcs import GoogleCloudStorage

        gcs = GoogleCloudStorage.from_environment(key_file=args.gcs_credentials)
    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise InvalidInput("https needs both --tls-cert and --tls-key")
        from .._serve import Tls

        tls = Tls(Path(args.tls_cert), Path(args.tls_key)).check()
    server = HubServer(directory, owner_id=owner, local_bucket=not args.no_local_bucket,
                       gcs=gcs, database=database)
    server.hub.read_url_expiry_s = args.read_url_lifetime
    try:
        with _common.serving_metrics(args.metrics) as metrics:
            async with trio.open_nursery() as nursery:
                url = await nursery.start(lambda task_status: server.run(
                    host=args.host, port=args.port, public_url=args.public_url, tls=tls,
                    task_status=task_status))
                print(f"kachery-fs hub listening on {url} (owner {owner})"
                      + (f"; metrics at {metrics.url}" if metrics else ""), flush=True)
                if args.url_file:
                    Path(args.url_file).write_text(url + "\n")
                _systemd.notify("READY=1")
    finally:
        server.close()
    return 0


def _hub_migrate(args) -> int:
    from ..hub.database import is_postgresql, redact
    from ..hub.migrate import migrate

    if not is_postgresql(args.to):
        raise InvalidInput(f"--to takes a postgresql:// URL, not {args.to!r}")
    copied = migrate(Path(args.source), args.to)
    width = max(len(c.table) for c in copied)
    for c in copied:
        print(f"  {c.table:<{width}}  {c.rows:>10,} rows")
    print(f"moved the state of the hub in {args.source} to {redact(args.to)} (every table's"
          f" rows counted on both sides). Start its hub processes with `kachery-fs hub serve"
          f" --database URL`; {Path(args.source) / 'hub.db'} is left as it was.")
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
    node = _common.open_node(create=True)
    try:
        result = await fn(node.channels.hub(_hub_url(args)))
    finally:
        await node.aclose()
    if result:
        print(result)
    return 0


async def _channel_create(args) -> int:
    from ..settings import parse_limit

    allocation = parse_limit(args.allocation) if args.allocation else None

    async def go(hub):
        r = await hub.create_channel(args.name, args.bucket, allocation=allocation,
                                     private=args.private)
        extra = f", allocation {format_size(allocation)}" if allocation else ""
        extra += ", private: its objects are read through URLs the hub signs" if args.private else ""
        _warn(r)
        # Only the hub's owner may create a channel, and it expects to use it: it gets
        # every permission, as with `up` (`authorize --remove` takes them away).
        await hub.authorize_node(r["channel"], hub.key.node_id, list(PERMISSIONS), "owner")
        return (f"created channel {r['channel']} (bucket {r['bucket']}{extra}); this node, the"
                f" hub's owner, has every permission on it")
    return await _hub_call(args, go)


async def _channel_set(args) -> int:
    from ..settings import parse_limit

    fields: ChannelChanges = {}
    if args.allocation is not None:
        fields["allocation"] = parse_limit(args.allocation)
    if args.low_watermark is not None:
        fields["lowWatermark"] = _percent(args.low_watermark)
    if args.private is not None:
        fields["private"] = args.private
    if not fields:
        raise InvalidInput("nothing to change: give --allocation, --low-watermark, --private"
                           " or --public")

    async def go(hub):
        r = await hub.set_channel(args.name, fields)
        _warn(r)
        allocation = format_size(r["allocation"]) if r["allocation"] else "none (no eviction)"
        return (f"channel {r['channel']}: allocation {allocation},"
                f" low watermark {r['lowWatermark']:.0%},"
                f" {'private' if r.get('private') else 'public'}")
    return await _hub_call(args, go)


def _warn(answer: dict) -> None:
    """Print the hub's warning, if it gave one."""
    if answer.get("warning"):
        print(f"kachery-fs: warning: {answer['warning']}", file=sys.stderr)


def _lifetime(text: str) -> int:
    """Seconds, 2 to 604800 (7 days: the longest a V4 signature may last); nodes take a
    second off each lifetime, for the signature's date in whole seconds."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not 2 <= value <= 604800:
        raise argparse.ArgumentTypeError(f"a read URL lives 2 to 604800 seconds, not {value}")
    return value


def _percent(text: str) -> float:
    """``"90%"`` or ``"90"`` → 0.9; a fraction (``"0.9"``) is taken as it is."""
    text = text.strip()
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise InvalidInput(f"not a percentage: {text!r} (example: 90%)") from None
    return value / 100 if text.endswith("%") or value > 1 else value


async def _channel_stats(args) -> int:
    from ..hub.cache import DEFAULT_PRICES, monthly_cost

    prices = {**DEFAULT_PRICES, **{k: v for k, v in (
        ("storage_gib_month", args.storage_price), ("egress_gib", args.egress_price),
        ("class_a_per_1000", args.class_a_price), ("class_b_per_1000", args.class_b_price))
        if v is not None}}

    async def go(hub):
        stats = await hub.channel_stats(args.name)
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
    if "manifests" in stats:  # a hub that keeps manifests of large files
        out.append(f"  {'manifests':<13}{stats['manifests']:>10,}  on record (vouched for"
                   " by nodes at upload)")
        for node, v in stats.get("vouchers", {}).items():
            out.append(f"    node {node[:12]}…  {v['vouched']:,} vouched, {v['refused']:,}"
                       f" refused, {v['disputed']:,} disputed by readers")
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
                         + ("  private" if c.get("private") else "")
                         + (f"  allocation {format_size(alloc)}" if alloc else ""))
            for node_id, perms in c["authorizedNodes"].items():
                lines.append(f"  {node_id}  {','.join(perms)}")
        return "\n".join(lines) or "no channels"
    return await _hub_call(args, go)


def add_commands(sub) -> None:
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
    t.add_argument("--read-url-lifetime", type=_lifetime, default=300, metavar="SECONDS",
                   help="how long the read URLs signed for private channels stay valid"
                        " (default 300): the longest a node whose permission is revoked"
                        " can go on reading what it had started")
    t.add_argument("--database", metavar="URL",
                   help="keep the hub's state in PostgreSQL (postgresql://USER@HOST/DB;"
                        " the password from ~/.pgpass or $PGPASSWORD) instead of hub.db in"
                        " --dir: any number of hub processes on one database serve the same"
                        " channels (default $KACHERY_FS_HUB_DATABASE, else SQLite)")
    add_metrics(t)
    t.set_defaults(run=_hub_serve, is_async=True, log_default=1)

    t = _sub(hs, "migrate", "move a hub's state from SQLite to PostgreSQL",
             "Copy the state of the hub in directory --from (its hub.db: channels,"
             " permissions, uploads, requests, feed counts, bucket cache figures) into the"
             " empty PostgreSQL database --to, in one transaction, and check every table's"
             " row count on both sides. Stop the hub first. hub.db is left as it was. Then"
             " run `kachery-fs hub serve --database URL --dir DIR` (the directory still holds"
             " the local bucket and its signing key).")
    t.add_argument("--from", dest="source", required=True, metavar="HUB_DIR",
                   help="the stopped hub's directory (the --dir of its `hub serve`)")
    t.add_argument("--to", required=True, metavar="URL",
                   help="postgresql://USER@HOST[:PORT]/DB, an empty database")
    t.set_defaults(run=_hub_migrate)

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
    c.add_argument("--private", action="store_true",
                   help="its bucket's objects are readable only through short-lived URLs the"
                        " hub signs for members with requestFiles (files) or requestFeeds"
                        " (feeds); on gs:// the bucket must not be public (README)")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_create, is_async=True)
    c = _sub(cs, "set", "change a channel's bucket allocation or privacy",
             "Change how much of the bucket channel NAME may use. When the content stored"
             " passes the allocation, the hub deletes the files least recently downloaded,"
             " requested or uploaded until the low watermark is reached. An evicted file stays"
             " readable: the next read asks a node that holds it to upload it again."
             " `hub channel stats` shows whether the allocation suits the demand."
             " --private makes its bucket's objects readable only through URLs the hub signs"
             " for its members; --public makes them readable by anyone.")
    c.add_argument("name", metavar="NAME", help="channel name")
    c.add_argument("--allocation", metavar="SIZE",
                   help="bytes, with K, M, G, T suffixes (powers of 1024), or 'none' (no eviction)")
    c.add_argument("--low-watermark", metavar="PERCENT",
                   help="eviction stops at this share of the allocation (default 90%%)")
    privacy = c.add_mutually_exclusive_group()
    privacy.add_argument("--private", action="store_true", default=None,
                         help="make the channel private: reads need URLs the hub signs;"
                              " URLs already out stay valid until they expire")
    privacy.add_argument("--public", dest="private", action="store_false",
                         help="make the channel public: anyone who learns the bucket's"
                              " address can read its objects")
    c.add_argument("--hub", help=hub_help)
    c.set_defaults(run=_channel_set, is_async=True)
    c = _sub(cs, "stats", "show a channel's bucket usage, demand and cost",
             "Show what channel NAME keeps in its bucket against its allocation; the uploads,"
             " re-uploads of evicted files, evictions and downloads counted since the counts began"
             " (when the channel was created, or when its hub was upgraded to keep them); the"
             " manifests of large files on record and, for each node that vouched for some,"
             " how many of its vouches were refused or disputed by readers; and"
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
