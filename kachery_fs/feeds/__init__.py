"""Feeds: signed append-only logs, kachery-compatible (reference: kachery.md §5).

A feed is an Ed25519 key pair; its id is the 64-hex public key (a :class:`NodeKey`'s
``node_id``). A feed holds any number of *subfeeds*, each named by a hash
(:func:`subfeed_hash`), and a subfeed is a chain of signed messages, each a JSON object
or array, numbered from 0 and chained by ``previousSignature``. Only the feed's owner
(the holder of its private key) can append; everybody else verifies every message it
receives and keeps only the valid prefix.

The package, each module importing only those above it:

* :mod:`.uri`: feed ids, subfeed names and hashes, ``feed://`` URIs;
* :mod:`.messages`: the signed message format, signing and verification, and the
  one-JSON-per-line form of a subfeed file;
* :mod:`.db`: :class:`FeedStore`, the node's feeds in SQLite (``feeds.db``);
* :mod:`.sync`: :class:`FeedSync`, publishing to and fetching from a channel's bucket
  through its hub;
* :mod:`.engine`: :class:`FeedFiles`, the feed engine of the mount (subfeeds as growing
  files, kept current by the hub's long-poll, appended to by the owner). It knows no FUSE.
"""

from .db import FeedInfo, FeedStore, SubfeedInfo
from .engine import FeedFiles
from .messages import (
    MAX_MESSAGE_CHARS,
    ChainCheck,
    check_message,
    message_line,
    parse_line,
    sign_message,
    verify_messages,
)
from .sync import FeedSync
from .uri import FeedUri, format_feed_uri, normalize_feed_id, parse_feed_uri, subfeed_hash

__all__ = [
    "MAX_MESSAGE_CHARS",
    "ChainCheck",
    "FeedFiles",
    "FeedInfo",
    "FeedStore",
    "FeedSync",
    "FeedUri",
    "SubfeedInfo",
    "check_message",
    "format_feed_uri",
    "message_line",
    "normalize_feed_id",
    "parse_feed_uri",
    "parse_line",
    "sign_message",
    "subfeed_hash",
    "verify_messages",
]
