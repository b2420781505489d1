"""Content without a mount: ``put``, ``cat`` and ``serve``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import trio

from ..errors import InvalidInput, KacheryError, NotFound
from ..requester import DEFAULT_STALL_TIMEOUT_S
from ..uris import format_uri, parse_uri
from . import _common
from ._common import (
    _add_cache_size,
    _apply_cache_size,
    _input_files,
    _pick_channel,
    _rate,
    _sub,
)

log = logging.getLogger("kachery_fs")


async def _put(args) -> int:
    from tqdm import tqdm

    from .. import resumable
    from ..errors import Conflict, CorruptLocalFile, PermissionDenied

    paths = _input_files(args.files, "put")
    node = _common.open_node()
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


async def _cat(args) -> int:
    from ..bucket import fetch_to_store
    from ..requester import request_file
    from ..sources import Sources

    uri = parse_uri(args.uri)
    node = _common.open_node(create=True)
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
    from ..provider import Provider
    from ..resumable import RateLimit
    from ..uploader import Uploader

    node = _common.open_node()
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


def add_commands(sub) -> None:
    s = _sub(sub, "put", "store files and upload them to a channel; print their URIs",
             "Hash each FILE into the local store, upload it to the channel's bucket through the"
             " hub (resumable, with a progress bar) and print its sha1:// URI. If the upload is"
             " interrupted it stays queued and the next mount finishes it.")
    s.add_argument("files", nargs="+", metavar="FILE", help="files to upload")
    s.add_argument("--channel", help="channel (needed when the node joined several)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(run=_put, is_async=True)

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

