"""Content without a mount: ``put``, ``cat`` and ``serve``."""

from __future__ import annotations

import logging
import sys

import trio

from .. import _systemd
from ..errors import InvalidInput, KacheryError, leaves
from ..requester import DEFAULT_STALL_TIMEOUT_S
from ..uris import parse_uri
from . import _common
from ._common import (
    _add_cache_size,
    _apply_cache_size,
    _input_files,
    _pick_channel,
    _rate,
    _sub,
    add_metrics,
)

log = logging.getLogger("kachery_fs")


async def _put(args) -> int:
    from tqdm import tqdm

    from ..api import store_path
    from ..parts import running

    paths = _input_files(args.files, "put")
    node = _common.open_node()
    uploading: tuple[str, str] | None = None  # (sha1, uri) of the upload in progress
    try:
        channel = _pick_channel(node, args.channel)
        async with running(node, upload_workers=0, keep_cache=False,
                           bwlimit=args.bwlimit) as parts:
            for path in paths:
                size = path.stat().st_size
                bars = [tqdm(total=size, unit="B", unit_scale=True, desc=f"hashing {path.name}",
                             disable=args.quiet or None, file=sys.stderr)]

                def stored(sha1: str, uri: str, path=path, size=size, bars=bars) -> None:
                    nonlocal uploading
                    uploading = (sha1, uri)
                    bars[0].close()
                    bars[0] = tqdm(total=size, unit="B", unit_scale=True,
                                   desc=f"uploading {path.name}", disable=args.quiet or None,
                                   file=sys.stderr)

                def hashed(n: int, bars=bars) -> None:
                    bars[0].update(n)

                def sent(committed: int, bars=bars) -> None:
                    bars[0].update(committed - bars[0].n)

                try:
                    uri = await store_path(parts, path, channel=channel,
                                           hashed=hashed,
                                           sent=sent, stored=stored,
                                           again="run this `kachery-fs put` again")
                finally:
                    bars[0].close()
                print(uri)
                uploading = None
    except BaseException as exc:
        if uploading is not None and any(isinstance(e, KeyboardInterrupt) for e in leaves(exc)):
            sha1, uri = uploading
            up = node.db.upload(channel, sha1)
            sent_part = f" ({up.committed * 100 // max(up.size, 1)}% sent)" if up else ""
            print(f"kachery-fs: interrupted; the upload of {uri} stays queued{sent_part}: run"
                  " this `kachery-fs put` again to resume it, or the next `kachery-fs mount`"
                  " or `kachery-fs serve` finishes it", file=sys.stderr)
        raise
    finally:
        await node.aclose()
    return 0


async def _cat(args) -> int:
    from .. import metrics
    from ..api import open_uri
    from ..parts import running

    uri = parse_uri(args.uri)
    uri.manifest  # noqa: B018 (checked before anything is opened)
    node = _common.open_node(create=True)
    try:
        _apply_cache_size(node, args)
        if args.channel:
            node.channels.get(args.channel)  # NotFound with advice
        async with running(node, upload_workers=0, keep_cache=False,
                           request_timeout=args.request_timeout,
                           strict=args.strict) as parts:
            # Read by chunk (?manifest=), each chunk is verified before it is written out,
            # and the whole file's SHA-1 before its last chunk is.
            content = await open_uri(parts, uri, channel=args.channel)
            try:
                out = sys.stdout.buffer
                offset = 0
                while offset < content.size:
                    chunk = await content.read(offset, 1 << 20)
                    if not chunk:
                        raise KacheryError(f"sha1://{uri.sha1} ended at byte {offset} of"
                                           f" {content.size}")
                    out.write(chunk)
                    offset += len(chunk)
                    metrics.SERVED_BYTES.labels("cat").inc(len(chunk))
                out.flush()
            finally:
                content.close()
    finally:
        await node.aclose()
    return 0


async def _serve(args) -> int:
    node = _common.open_node()
    try:
        _apply_cache_size(node, args)
        if not node.channels.all():
            raise InvalidInput("this node has joined no channel: `kachery-fs join HUB_URL"
                               " CHANNEL` first")
        with _common.serving_metrics(args.metrics) as metrics:
            await _serve_until_stopped(node, args, metrics)
    finally:
        await node.aclose()
    return 0


async def _serve_until_stopped(node, args, metrics) -> None:
    from ..parts import running

    async with running(node, provide=True, bwlimit=args.bwlimit):
        print(f"kachery-fs serving files of node {node.node_id} on request"
              f" (channels: {', '.join(c.name for c in node.channels.all())})"
              + (f"; metrics at {metrics.url}" if metrics else "") + "; Ctrl-C stops",
              file=sys.stderr, flush=True)
        _systemd.notify("READY=1")
        await trio.sleep_forever()


def add_commands(sub) -> None:
    s = _sub(sub, "put", "store files and upload them to a channel; print their URIs",
             "Hash each FILE into the local store, upload it to the channel's bucket through the"
             " hub (resumable, with a progress bar) and print its sha1:// URI. If the upload is"
             " interrupted it stays queued: the same put again resumes it where it stopped,"
             " and so does the next mount or serve.")
    s.add_argument("files", nargs="+", metavar="FILE", help="files to upload")
    s.add_argument("--channel", help="channel (needed when the node joined several)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.add_argument("--bwlimit", type=_rate, metavar="RATE",
                   help="limit upload bandwidth, e.g. 500K, 10M (bytes per second)")
    s.set_defaults(run=_put, is_async=True)

    s = _sub(sub, "cat", "write the content of a sha1:// URI to stdout (verified)",
             "Write the content of URI (sha1://<hash>[...] or a bare hash) to stdout: from the"
             " local store, else from a kachery store on this machine (`store sources`), else"
             " from the bucket of a joined channel, else by asking the"
             " channel's other nodes through the hub; verified against its SHA-1 before any"
             " byte is written. With ?manifest=<hash> (kachery's form for files over"
             " 20,000,000 bytes) it is read by chunk: each chunk is verified against its SHA-1"
             " in that manifest before it is written, only the chunks needed are fetched (also"
             " from a bucket that holds only chunks), and the whole SHA-1 is checked before"
             " the last chunk is written. So is a file whose manifest this node knows (it"
             " computed it, or the channel's hub vouches for it); --strict writes nothing"
             " before the whole file is verified.")
    s.add_argument("uri", metavar="URI",
                   help="sha1://<hash>[/<name>], with or without ?label=... or ?manifest=...")
    s.add_argument("--channel", help="look only in this channel")
    s.add_argument("--request-timeout", type=float, default=DEFAULT_STALL_TIMEOUT_S,
                   metavar="SECONDS", help="give up on a file requested from other nodes when"
                   f" it makes no progress for this long (default {DEFAULT_STALL_TIMEOUT_S:g})")
    s.add_argument("--strict", action="store_true",
                   help="write nothing before the whole file is fetched and verified against"
                   " its SHA-1, even a large file with a manifest (which is then only a way"
                   " to fetch it)")
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
    add_metrics(s)
    s.set_defaults(run=_serve, is_async=True, log_default=1)

