"""Feed names: feed ids, subfeed names and hashes, and ``feed://`` URIs (kachery's rules).

A feed's id is the 64-hex public key of its Ed25519 key pair (a :class:`NodeKey`'s
``node_id``); feed ids are compared lower-case (:func:`normalize_feed_id`). A feed holds
any number of *subfeeds*, each named by a hash (:func:`subfeed_hash`): ``~<40 hex>`` is
the hash itself, kept as written; any other name is hashed. ``feed://<feed-id>/<subfeed>``
URIs name a feed or one of its subfeeds (:func:`parse_feed_uri`, :func:`format_feed_uri`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import quote, unquote

from ..errors import InvalidInput
from ..identity import is_node_id
from ..uris import is_sha1


def subfeed_hash(name: str) -> str:
    """The hash that names subfeed ``name`` (kachery's rule).

    A name starting with ``~`` is the hash itself (``~<40 hex>``), kept as written: kachery
    uses the text after ``~`` as the subfeed hash (``kachery_client._feeds._subfeed_hash``)
    and the daemon keys its database and bucket objects by it unchanged, so
    ``~<upper-case hex>`` and ``~<lower-case hex>`` are two subfeeds. Any other string names
    the subfeed whose hash is ``sha1(name)`` (UTF-8, lower-case hex).
    """
    if not isinstance(name, str):
        raise InvalidInput(f"a subfeed name must be a string, not {type(name).__name__}")
    if name.startswith("~"):
        if not is_sha1(name[1:]):
            raise InvalidInput(f"not a subfeed hash (~ and 40 hexadecimal digits): {name!r}")
        return name[1:]
    try:
        return hashlib.sha1(name.encode("utf-8")).hexdigest()
    except UnicodeEncodeError:
        raise InvalidInput(f"subfeed name {name!r} is not valid Unicode") from None


def normalize_feed_id(value: object) -> str:
    """Return ``value`` as a lower-case 64-hex feed id, or raise InvalidInput."""
    if isinstance(value, str) and is_node_id(value.lower()):
        return value.lower()
    raise InvalidInput(f"not a feed id (64 hexadecimal digits): {value!r}")


def check_subfeed_hash(value: object) -> str:
    """``value`` if it is a subfeed hash, case kept (see :func:`subfeed_hash`)."""
    if not is_sha1(value):
        raise InvalidInput(f"not a subfeed hash (40 hexadecimal digits): {value!r}")
    return value


@dataclass(frozen=True)
class FeedUri:
    """A parsed ``feed://<feed-id>[/<subfeed>]``.

    ``subfeed`` is the subfeed name as given (unquoted), possibly ``~<hash>``; None when
    the URI names the whole feed.
    """

    feed_id: str
    subfeed: str | None = None

    @property
    def subfeed_hash(self) -> str | None:
        return None if self.subfeed is None else subfeed_hash(self.subfeed)

    def __str__(self) -> str:
        return format_feed_uri(self.feed_id, self.subfeed)


def parse_feed_uri(text: str) -> FeedUri:
    """Parse ``feed://<feed-id>[/<subfeed>]`` (or a bare feed id); raise InvalidInput.

    The subfeed part is URL-unquoted and may contain ``/`` (kachery's clients join the
    rest of the path); ``~<hash>`` names a subfeed by its hash. A query string is ignored.
    """
    if not isinstance(text, str):
        raise InvalidInput("a feed URI must be a string")
    text = text.strip()
    if is_node_id(text.lower()):
        return FeedUri(text.lower())
    head = text.split("?", 1)[0]
    if not head.lower().startswith("feed://"):
        raise InvalidInput(
            f"not a feed URI: {text!r} (expected feed://<64 hex digits>[/<subfeed>])")
    feed_part, _, rest = head[len("feed://"):].partition("/")
    feed_id = normalize_feed_id(feed_part)
    if not rest:
        return FeedUri(feed_id)
    try:
        subfeed = unquote(rest, errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput(f"bad %-escape in the subfeed of {text!r}") from None
    subfeed_hash(subfeed)  # validates ~<hash>
    return FeedUri(feed_id, subfeed)


def format_feed_uri(feed_id: str, subfeed: str | None = None) -> str:
    """``feed://<feed-id>[/<quoted subfeed name or ~hash>]``."""
    uri = f"feed://{normalize_feed_id(feed_id)}"
    if subfeed is not None:
        subfeed_hash(subfeed)  # validates ~<hash>
        uri += "/" + quote(subfeed, safe="")
    return uri
