"""``feed create``, ``feed append`` and ``feed read``."""

from __future__ import annotations

import logging
import sys

import trio

from ..errors import InvalidInput, KacheryError
from . import _common
from ._common import (
    _pick_channel,
    _sub,
)

log = logging.getLogger("kachery_fs")


def _feed_ref(parts: list[str]):
    """(feed id, subfeed name) from ``feed://ID/SUB`` or ``ID SUB``."""
    from ..feeds import parse_feed_uri

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
    from ..feeds import FeedStore

    node = _common.open_node(create=True)
    try:
        with FeedStore.for_node(node.dir) as store:
            feed_id = store.create_feed(args.label)
        print(feed_id)
    finally:
        node.db.close()
    return 0


async def _feed_append(args) -> int:
    from ..errors import PermissionDenied
    from ..feeds import FeedStore, FeedSync, parse_line, subfeed_hash

    *ref, text = args.args
    if not ref:
        raise InvalidInput("usage: kachery-fs feed append FEED SUBFEED JSON")
    feed_id, subfeed = _feed_ref(ref)
    h = subfeed_hash(subfeed)
    value = parse_line(text.encode())
    node = _common.open_node()
    try:
        # Everything that would refuse the publication is checked before the append: an
        # appended message stays (the log is append-only), so a retry after a refusal
        # would append it a second time.
        channel = _pick_channel(node, args.channel)
        as_of = ""
        try:  # a one-shot command: this node's permissions as of now
            perms = (await node.channels.refresh(channel)).permissions
        except PermissionDenied:
            raise
        except KacheryError as exc:
            log.info("could not refresh permissions on %s: %s", channel, exc)
            perms = node.channels.get(channel).permissions
            as_of = f" (as last known: the hub did not answer: {exc})"
        if "provideFeeds" not in perms:
            raise PermissionDenied(
                f"nothing appended: this node lacks the provideFeeds permission on channel"
                f" {channel!r}{as_of}; the channel owner can grant it with `kachery-fs hub"
                f" channel authorize {channel} {node.node_id} --add provideFeeds`")
        with FeedStore.for_node(node.dir) as store:
            signed = await trio.to_thread.run_sync(store.append, feed_id, subfeed, [value])
            number = signed[0]["body"]["messageNumber"]
            try:
                _, count = await FeedSync(node.channels, store, node.client, node.urls).publish(
                    channel, feed_id, h)
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
    from ..errors import Unavailable
    from ..feeds import FeedStore, FeedSync, message_line, subfeed_hash
    from ..retry import foreground, pause

    feed_id, subfeed = _feed_ref(args.ref)
    h = subfeed_hash(subfeed)
    node = _common.open_node()
    out = sys.stdout.buffer
    try:
        with FeedStore.for_node(node.dir) as store:
            sync = FeedSync(node.channels, store, node.client, node.urls)
            channel = None
            if not store.owned(feed_id):
                channel = _pick_channel(node, args.channel)
                try:  # a one-shot command: this node's permissions as of now
                    await node.channels.refresh(channel)
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
            hub = node.channels.hub_of(channel)
            backoff = foreground()
            while True:
                try:
                    answer = await hub.watch_feeds(
                        channel, [{"feedId": feed_id, "subfeedHash": h,
                                   "position": store.count(feed_id, h)}], wait_s=20)
                except Unavailable as exc:
                    await pause(backoff, exc, level=logging.WARNING)
                    continue
                backoff.reset()
                if answer.get("updates") and not store.owned(feed_id):
                    await sync.fetch(channel, feed_id, h)
                for signed in store.messages(feed_id, h, shown):
                    out.write(message_line(signed))
                    shown += 1
                out.flush()
    finally:
        await node.aclose()


def add_commands(sub) -> None:
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

