"""Feeds: signed append-only logs, kachery-compatible (reference: kachery.md §5).

A feed is an Ed25519 key pair; its id is the 64-hex public key (a :class:`NodeKey`'s
``node_id``). A feed holds any number of *subfeeds*, each named by a hash
(:func:`subfeed_hash`), and a subfeed is a chain of signed messages::

    {"body": {"message": <a JSON object or array>,
              "previousSignature": <signature of message i-1>,   (absent for i = 0)
              "messageNumber": i,
              "timestamp": <milliseconds since the epoch, integer>,
              "metaData": <JSON object>},                         (optional)
     "signature": <NodeKey.sign(body) by the feed's key>}

Only the feed's owner (the holder of its private key) can append. Everybody else checks
every message they receive (:func:`verify_messages`): the shapes and types above, the
signature against the feed id, ``messageNumber`` equal to the message's position, and
``previousSignature`` equal to the signature of the message before it. Checking stops at
the first problem; readers keep the valid prefix and report the problem, so a tampered or
truncated copy never hides the messages before it and never adds anything after it.
A message (and its ``metaData``) must have canonical JSON shorter than
:data:`MAX_MESSAGE_CHARS`, kachery's limit.

A message written here must be a JSON object or array (:func:`check_message`): kachery
daemons refuse any other value (``isSignedSubfeedMessage``), so a scalar would make a
daemon reading the subfeed stop at it. Received messages are not held to this, so that
subfeeds written before the rule stay readable here.

Local storage (:class:`FeedStore`) is one SQLite file (``feeds.db``, mode 0600 since it
holds private keys)::

    feeds(feed_id PK, private_key_pem NULL unless this node owns the feed, label, created_at)
    subfeeds(feed_id, subfeed_hash, name NULL when only the hash is known; PK both)
    messages(feed_id, subfeed_hash, position, signed = canonical JSON of the signed
             message; PK (feed_id, subfeed_hash, position))

A subfeed's rows are always positions ``0 .. count-1`` with no gap: every write appends
to the end of a chain inside one ``BEGIN IMMEDIATE`` transaction, which reads the last
message, so several processes (a mount, the CLI) appending at once still build one valid
chain. Messages are checked before they are stored, not on every read.

In the mount, a subfeed is a file with one line per message: the message value as
compact JSON and ``"\\n"`` (:func:`message_line`); a line written to it is parsed by
:func:`parse_line`. ``feed://<feed-id>/<subfeed>`` URIs name a feed or one of its subfeeds
(:func:`parse_feed_uri`, :func:`format_feed_uri`).

All methods here block (SQLite, signing); async callers run large appends and reads in
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, unquote

from .canonical import canonical_json
from .errors import IntegrityError, InvalidInput, NotFound, PermissionDenied
from .identity import NodeKey, is_node_id, verify_signature
from .uris import is_sha1

log = logging.getLogger(__name__)

#: A message value (and a ``metaData`` object) must have canonical JSON shorter than this
#: many characters (UTF-16 code units, as JavaScript counts them): kachery's limit.
MAX_MESSAGE_CHARS = 10_000

_SIG_RE = re.compile(r"[0-9a-fA-F]{128}")
_BODY_REQUIRED = frozenset({"message", "messageNumber", "timestamp"})
_BODY_ALLOWED = _BODY_REQUIRED | {"previousSignature", "metaData"}
_SIGNED_KEYS = frozenset({"body", "signature"})

SCHEMA = """
CREATE TABLE IF NOT EXISTS feeds (
    feed_id TEXT PRIMARY KEY,
    private_key_pem TEXT,         -- NULL unless this node owns the feed
    label TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS subfeeds (
    feed_id TEXT NOT NULL REFERENCES feeds(feed_id),
    subfeed_hash TEXT NOT NULL,
    name TEXT,                    -- NULL while only the hash is known
    PRIMARY KEY (feed_id, subfeed_hash)
);
CREATE TABLE IF NOT EXISTS messages (
    feed_id TEXT NOT NULL,
    subfeed_hash TEXT NOT NULL,
    position INTEGER NOT NULL,
    signed TEXT NOT NULL,         -- canonical JSON of the signed message
    PRIMARY KEY (feed_id, subfeed_hash, position)
) WITHOUT ROWID;
"""


# -- names and ids ---------------------------------------------------------------------


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


_hash_of_name = subfeed_hash  # for code where a parameter is called subfeed_hash


def normalize_feed_id(value: object) -> str:
    """Return ``value`` as a lower-case 64-hex feed id, or raise InvalidInput."""
    if isinstance(value, str) and is_node_id(value.lower()):
        return value.lower()
    raise InvalidInput(f"not a feed id (64 hexadecimal digits): {value!r}")


def _check_hash(value: object) -> str:
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


# -- messages ----------------------------------------------------------------------------


def _js_length(text: str) -> int:
    """Length in UTF-16 code units, as JavaScript's ``string.length``."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def check_message(value, what: str = "a feed message") -> None:
    """InvalidInput unless ``value`` can be a message a kachery daemon accepts: a JSON
    object or array (a dict, list or tuple), never a number, string, boolean or null."""
    if isinstance(value, (dict, list, tuple)):
        return
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            type(None): "null"}.get(type(value), type(value).__name__)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    example = text
    if len(text) > 40:
        text, example = text[:37] + "...", "..."
    shown = "" if value is None else f" ({text})"
    raise InvalidInput(f"{what} must be a JSON object or array, as kachery requires, not"
                       f" {kind}{shown}: wrap it, e.g. {{\"value\": {example}}}")


def _json_value(value, what: str) -> str:
    """Canonical JSON of a value to be signed, checked against the limits (InvalidInput)."""
    try:
        text = canonical_json(value)
    except RecursionError:
        raise InvalidInput(f"{what} is nested too deeply") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} contains an unpaired surrogate (not valid Unicode)") from None
    n = _js_length(text)
    if n >= MAX_MESSAGE_CHARS:
        raise InvalidInput(
            f"{what} is too large: {n} characters of JSON (the limit is under"
            f" {MAX_MESSAGE_CHARS})")
    return text


def sign_message(key: NodeKey, message, *, message_number: int,
                 previous_signature: str | None, timestamp: int | None = None,
                 metaData: dict | None = None) -> dict:
    """Build and sign message ``message_number`` of a subfeed of feed ``key.node_id``.

    ``previous_signature`` is the signature of message ``message_number - 1`` (None for
    message 0). ``timestamp`` is in milliseconds (now by default). The message value is
    copied through its canonical JSON, so later changes to ``message`` do not touch the
    signed copy, and the copy holds what a kachery daemon would have signed: an integer
    beyond 2**53 becomes the double a JavaScript reader makes of it (``2**53 + 1`` is
    ``2**53``; ``10**21`` is ``1e21``). Raises InvalidInput for a message that is not a
    JSON object or array (:func:`check_message`), and for values with no JSON form or over
    the size limit.
    """
    if not isinstance(message_number, int) or isinstance(message_number, bool) \
            or message_number < 0:
        raise InvalidInput(f"bad message number {message_number!r}")
    if (previous_signature is None) != (message_number == 0):
        raise InvalidInput("previousSignature is required exactly for messages after the first")
    if previous_signature is not None and not (
            isinstance(previous_signature, str) and _SIG_RE.fullmatch(previous_signature)):
        raise InvalidInput(f"not a signature: {previous_signature!r}")
    if timestamp is None:
        timestamp = int(time.time() * 1000)
    elif not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
        raise InvalidInput(f"bad timestamp {timestamp!r} (milliseconds, an integer)")
    check_message(message)
    body = {"message": json.loads(_json_value(message, "a feed message"))}
    if previous_signature is not None:
        body["previousSignature"] = previous_signature
    body["messageNumber"] = message_number
    body["timestamp"] = timestamp
    if metaData is not None:
        if not isinstance(metaData, dict):
            raise InvalidInput("metaData must be a JSON object")
        body["metaData"] = json.loads(_json_value(metaData, "metaData"))
    return {"body": body, "signature": key.sign(body)}


class ChainCheck(NamedTuple):
    """The result of :func:`verify_messages`: the valid prefix, and the first problem."""

    valid: list[dict]
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _short(value) -> str:
    """``repr(value)``, cut short: problems quote data that may be hostile and huge."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message_problem(feed_id: str, signed, position: int,
                     previous_signature: str | None, check_link: bool,
                     signature_ok: bool | None = None) -> str | None:
    """What is wrong with one signed message at ``position``, or None."""
    if not isinstance(signed, dict):
        return f"not a JSON object but {type(signed).__name__}"
    if set(signed) != _SIGNED_KEYS:
        return f"expected keys body and signature, got {_short(sorted(map(str, signed)))}"
    body, signature = signed["body"], signed["signature"]
    if not isinstance(signature, str) or not _SIG_RE.fullmatch(signature):
        return "the signature is not 128 hexadecimal digits"
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    keys = set(body)
    if not _BODY_REQUIRED <= keys:
        return f"the body lacks {sorted(_BODY_REQUIRED - keys)}"
    if not keys <= _BODY_ALLOWED:
        return f"the body has unknown keys {_short(sorted(map(str, keys - _BODY_ALLOWED)))}"
    number = body["messageNumber"]
    if not isinstance(number, int) or isinstance(number, bool):
        return f"messageNumber is not an integer: {_short(number)}"
    if number != position:
        return f"messageNumber is {number}, expected {position}"
    timestamp = body["timestamp"]
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp < 0:
        return f"timestamp is not a non-negative integer: {_short(timestamp)}"
    if position == 0:
        if "previousSignature" in body:
            return "the first message has a previousSignature"
    else:
        prev = body.get("previousSignature")
        if prev is None:
            return "previousSignature is missing"
        if not isinstance(prev, str) or not _SIG_RE.fullmatch(prev):
            return "previousSignature is not a signature"
        if check_link and prev != previous_signature:
            return "previousSignature does not match the signature of the message before"
    if "metaData" in body and not isinstance(body["metaData"], dict):
        return "metaData is not a JSON object"
    try:
        _json_value(body["message"], "the message")
        if "metaData" in body:
            _json_value(body["metaData"], "metaData")
    except InvalidInput as exc:
        return str(exc)
    except Exception as exc:  # no canonical form (e.g. too deep)
        return f"the message has no canonical JSON form ({type(exc).__name__})"
    if signature_ok is None:
        signature_ok = verify_signature(body, signature, feed_id)
    if not signature_ok:
        return "bad signature (not signed by the feed's key)"
    return None


#: From this many messages on, signatures are checked on several threads first (Ed25519
#: verification releases the GIL: two threads halve the time of a long subfeed).
PARALLEL_VERIFY_MIN = 256


def _signatures_ok(feed_id: str, signed_messages) -> list[bool | None]:
    """Each message's signature check (None where the shape is wrong: found later)."""
    def check(signed) -> bool | None:
        if not isinstance(signed, dict):
            return None
        body, signature = signed.get("body"), signed.get("signature")
        if not isinstance(body, dict) or not isinstance(signature, str):
            return None
        return verify_signature(body, signature, feed_id)

    workers = min(4, os.cpu_count() or 1)
    if workers < 2 or len(signed_messages) < PARALLEL_VERIFY_MIN:
        return [None] * len(signed_messages)  # checked one by one, in order
    step = -(-len(signed_messages) // workers)
    slices = [signed_messages[i:i + step] for i in range(0, len(signed_messages), step)]
    with ThreadPoolExecutor(workers) as pool:
        return [ok for part in pool.map(lambda msgs: [check(m) for m in msgs], slices)
                for ok in part]


def _verify(feed_id, signed_messages, start, previous_signature) -> tuple[list, str | None]:
    if not is_node_id(feed_id):
        return [], f"not a feed id: {_short(feed_id)}"
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        return [], f"bad start position {_short(start)}"
    if not isinstance(signed_messages, (list, tuple)):
        return [], f"expected a list of messages, got {type(signed_messages).__name__}"
    valid: list[dict] = []
    prev = previous_signature
    check_link = start == 0 or previous_signature is not None
    checked = _signatures_ok(feed_id, signed_messages)
    for i, signed in enumerate(signed_messages):
        position = start + i
        problem = _message_problem(feed_id, signed, position, prev, check_link or i > 0,
                                   checked[i])
        if problem is not None:
            return valid, f"message {position}: {problem}"
        valid.append(signed)
        prev = signed["signature"]
    return valid, None


def verify_messages(feed_id: str, signed_messages, *, start: int = 0,
                    previous_signature: str | None = None) -> ChainCheck:
    """Check signed messages that claim to be positions ``start, start+1, ...`` of a subfeed.

    Checks shapes and types, signatures by ``feed_id``, numbering and the chain, and stops
    at the first problem. The first message must chain to ``previous_signature``; when
    ``start > 0`` and it is None, that one link is only type-checked (the caller links it).
    Never raises on bad data: anything malformed is the returned problem.
    """
    return ChainCheck(*_verify(feed_id, signed_messages, start, previous_signature))


def message_line(signed: dict) -> bytes:
    """One line of a subfeed file: the message value as compact JSON, then ``\\n``."""
    try:
        value = signed["body"]["message"]
    except (TypeError, KeyError):
        raise InvalidInput("not a signed feed message") from None
    return canonical_json(value).encode("utf-8") + b"\n"


def _parse_int(text: str) -> int:
    # Beyond 309 digits an integer is beyond the largest double, which a JS reader would
    # take for Infinity; refused here before int() refuses with its digit limit (4300).
    if len(text.lstrip("-")) > 309:
        raise InvalidInput(f"an integer of {len(text.lstrip('-'))} digits is beyond the range"
                           " of JSON numbers (doubles)")
    return int(text)


def parse_line(line: bytes) -> object:
    """The JSON value of one line written to a subfeed file; InvalidInput unless the line
    is exactly one JSON document (a final ``\\n`` is allowed) that can be a feed message: a
    JSON object or array (:func:`check_message`) within the size limit."""
    if isinstance(line, (bytearray, memoryview)):
        line = bytes(line)
    if not isinstance(line, bytes):
        raise InvalidInput("a line must be bytes")
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    if b"\n" in line:
        raise InvalidInput("more than one line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the line is not UTF-8") from None
    if not text.strip():
        raise InvalidInput("an empty line is not a JSON document")

    def no_constant(name):
        raise InvalidInput(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant, parse_int=_parse_int)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not one JSON document: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise InvalidInput("the JSON document is nested too deeply") from None
    check_message(value)
    _json_value(value, "the message")
    return value


# -- local storage -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedInfo:
    feed_id: str
    label: str | None
    owned: bool
    created_at: float


@dataclass(frozen=True)
class SubfeedInfo:
    subfeed_hash: str
    #: The name, if this node has seen it (appended by name, or told it); else None.
    name: str | None
    count: int


class FeedStore:
    """The node's feeds in SQLite. See the module docstring for layout and concurrency.

    One connection, shared by the threads of a process under a lock; other processes
    open their own ``FeedStore`` on the same file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)  # private keys live here; -wal and -shm copy this mode
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a signed message the owner may already have published must survive a power
        # loss, or the next append would sign a different message at the same position.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> FeedStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taking the database's write lock at once."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _read(self, sql: str, args: tuple = ()) -> list:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- feeds -----------------------------------------------------------------------

    def create_feed(self, label: str | None = None) -> str:
        """Make a new feed owned by this node (its private key is stored); its id."""
        if label is not None and not isinstance(label, str):
            raise InvalidInput("a feed label must be a string")
        key = NodeKey.generate()
        with self._write() as db:
            db.execute("INSERT INTO feeds (feed_id, private_key_pem, label, created_at)"
                       " VALUES (?, ?, ?, ?)", (key.node_id, key.private_pem(), label, time.time()))
        return key.node_id

    def add_feed(self, feed_id: str, label: str | None = None) -> None:
        """Remember a feed owned elsewhere (no-op if known; a given label replaces the old)."""
        feed_id = normalize_feed_id(feed_id)
        if label is not None and not isinstance(label, str):
            raise InvalidInput("a feed label must be a string")
        with self._write() as db:
            self._ensure_feed(db, feed_id)
            if label is not None:
                db.execute("UPDATE feeds SET label = ? WHERE feed_id = ?", (label, feed_id))

    @staticmethod
    def _ensure_feed(db: sqlite3.Connection, feed_id: str) -> None:
        db.execute("INSERT OR IGNORE INTO feeds (feed_id, created_at) VALUES (?, ?)",
                   (feed_id, time.time()))

    def feeds(self) -> list[FeedInfo]:
        rows = self._read("SELECT feed_id, label, private_key_pem IS NOT NULL, created_at"
                          " FROM feeds ORDER BY created_at, feed_id")
        return [FeedInfo(r[0], r[1], bool(r[2]), r[3]) for r in rows]

    def feed(self, feed_id: str) -> FeedInfo:
        feed_id = normalize_feed_id(feed_id)
        rows = self._read("SELECT feed_id, label, private_key_pem IS NOT NULL, created_at"
                          " FROM feeds WHERE feed_id = ?", (feed_id,))
        if not rows:
            raise NotFound(f"feed {feed_id} is not known to this node")
        r = rows[0]
        return FeedInfo(r[0], r[1], bool(r[2]), r[3])

    def owned(self, feed_id: str) -> bool:
        """True if this node holds the private key of ``feed_id`` (False if unknown)."""
        if not isinstance(feed_id, str) or not is_node_id(feed_id.lower()):
            return False
        rows = self._read("SELECT private_key_pem IS NOT NULL FROM feeds WHERE feed_id = ?",
                          (feed_id.lower(),))
        return bool(rows and rows[0][0])

    def key(self, feed_id: str) -> NodeKey:
        """The private key of an owned feed (e.g. to prove ownership to a hub).

        NotFound for an unknown feed; PermissionDenied if another node owns it.
        """
        feed_id = normalize_feed_id(feed_id)
        with self._lock:
            return self._key(self._db, feed_id)

    def _key(self, db: sqlite3.Connection, feed_id: str) -> NodeKey:
        row = db.execute("SELECT private_key_pem FROM feeds WHERE feed_id = ?",
                         (feed_id,)).fetchone()
        if row is None:
            raise NotFound(f"feed {feed_id} is not known to this node")
        if row[0] is None:
            raise PermissionDenied(f"feed {feed_id} is not owned by this node; only its owner"
                                   " can append")
        return NodeKey.from_private_pem(row[0])

    # -- subfeeds --------------------------------------------------------------------

    @staticmethod
    def _ensure_subfeed(db: sqlite3.Connection, feed_id: str, h: str,
                        name: str | None) -> None:
        db.execute("INSERT INTO subfeeds (feed_id, subfeed_hash, name) VALUES (?, ?, ?)"
                   " ON CONFLICT(feed_id, subfeed_hash) DO UPDATE SET"
                   " name = COALESCE(subfeeds.name, excluded.name)", (feed_id, h, name))

    @staticmethod
    def _tail(db: sqlite3.Connection, feed_id: str, h: str) -> tuple[int, str | None]:
        """(count, signature of the last message) of a subfeed, inside a transaction."""
        row = db.execute("SELECT position, signed FROM messages WHERE feed_id = ? AND"
                         " subfeed_hash = ? ORDER BY position DESC LIMIT 1",
                         (feed_id, h)).fetchone()
        if row is None:
            return 0, None
        return row[0] + 1, json.loads(row[1])["signature"]

    def append(self, feed_id: str, subfeed_name: str, messages: Sequence, *,
               metaData: dict | None = None) -> list[dict]:
        """Sign ``messages`` (JSON objects or arrays) onto the end of a subfeed of an owned feed.

        All or nothing, in one transaction that chains from the last stored message, so
        concurrent appenders (threads or processes) interleave whole batches. Returns the
        signed messages. InvalidInput for a message that is not a JSON object or array,
        or with no JSON form or over the size limit; NotFound for an unknown feed;
        PermissionDenied if another node owns it.
        """
        feed_id = normalize_feed_id(feed_id)
        h = subfeed_hash(subfeed_name)
        name = None if subfeed_name.startswith("~") else subfeed_name
        if not isinstance(messages, (list, tuple)):
            raise InvalidInput("messages must be a list of JSON values")
        if metaData is not None and not isinstance(metaData, dict):
            raise InvalidInput("metaData must be a JSON object")
        for i, m in enumerate(messages):  # fail before taking the write lock
            what = "the message" if len(messages) == 1 else f"message {i} of the batch"
            check_message(m, what)
            _json_value(m, what)
        if not messages:
            return []
        signed: list[dict] = []
        with self._write() as db:
            key = self._key(db, feed_id)
            self._ensure_subfeed(db, feed_id, h, name)
            n, prev = self._tail(db, feed_id, h)
            rows = []
            for i, m in enumerate(messages):
                s = sign_message(key, m, message_number=n + i, previous_signature=prev,
                                 metaData=metaData)
                prev = s["signature"]
                signed.append(s)
                rows.append((feed_id, h, n + i, canonical_json(s)))
            db.executemany("INSERT INTO messages (feed_id, subfeed_hash, position, signed)"
                           " VALUES (?, ?, ?, ?)", rows)
        return signed

    def add_signed(self, feed_id: str, subfeed_hash: str, signed_messages, start: int, *,
                   name: str | None = None) -> tuple[int, str | None]:
        """Store messages received from elsewhere, claimed to be positions ``start, ...``.

        They are verified against ``feed_id`` and against the local chain: a run that
        starts beyond the local end, does not chain to the local message before ``start``,
        or differs from a message already stored (a fork) adds nothing; otherwise the
        valid prefix is stored past what is already here. Returns ``(added, problem)``,
        problem None when every message was good. ``name``, if given, is remembered as
        the subfeed's name. InvalidInput only for bad arguments, never for bad messages.
        """
        feed_id = normalize_feed_id(feed_id)
        h = _check_hash(subfeed_hash)
        if name is not None and _hash_of_name(name) != h:
            raise InvalidInput(f"subfeed name {name!r} does not hash to {h}")
        if name is not None and name.startswith("~"):
            name = None
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise InvalidInput(f"bad start position {start!r}")
        # The expensive part (signatures) runs before the write lock is taken.
        valid, problem = _verify(feed_id, signed_messages, start, None)
        # Every part of a valid message has a canonical form in valid UTF-8 (checked).
        texts = [canonical_json(m) for m in valid]
        added = 0
        with self._write() as db:
            n, _ = self._tail(db, feed_id, h)
            refusal = self._continues(db, feed_id, h, n, valid, start)
            if refusal is None:
                if valid or problem is None:  # nothing is learnt from garbage alone
                    self._ensure_feed(db, feed_id)
                    self._ensure_subfeed(db, feed_id, h, name)
                rows = [(feed_id, h, start + i, texts[i])
                        for i in range(max(n - start, 0), len(valid))]
                db.executemany("INSERT INTO messages (feed_id, subfeed_hash, position, signed)"
                               " VALUES (?, ?, ?, ?)", rows)
                added = len(rows)
            else:
                problem = refusal
        if problem:
            log.warning("feed %s subfeed %s: %s (%d messages added)", feed_id, h, problem, added)
        return added, problem

    @staticmethod
    def _continues(db: sqlite3.Connection, feed_id: str, h: str, n: int, valid: list[dict],
                   start: int) -> str | None:
        """Why a verified run at ``start`` cannot extend the ``n`` stored messages, or None."""
        if not valid:
            return None
        if start > n:
            return f"the messages start at {start} but only {n} are stored here (a gap)"
        local = [json.loads(r[0])["signature"] for r in db.execute(
            "SELECT signed FROM messages WHERE feed_id = ? AND subfeed_hash = ? AND"
            " position >= ? AND position < ? ORDER BY position",
            (feed_id, h, max(start - 1, 0), min(start + len(valid), n)))]
        if start > 0:
            if valid[0]["body"]["previousSignature"] != local[0]:
                return (f"message {start}: previousSignature does not match the stored"
                        f" message {start - 1}")
            local = local[1:]
        for i, sig in enumerate(local):
            if valid[i]["signature"] != sig:
                return f"message {start + i}: differs from the stored message (a fork)"
        return None

    def count(self, feed_id: str, subfeed_hash: str) -> int:
        """How many messages of the subfeed are stored here (0 if none or unknown)."""
        rows = self._read("SELECT MAX(position) FROM messages WHERE feed_id = ? AND"
                          " subfeed_hash = ?",
                          (normalize_feed_id(feed_id), _check_hash(subfeed_hash)))
        return 0 if rows[0][0] is None else rows[0][0] + 1

    def messages(self, feed_id: str, subfeed_hash: str, start: int = 0,
                 end: int | None = None) -> list[dict]:
        """Stored signed messages ``start <= position < end`` (to the last if end is None).

        They were verified when stored. IntegrityError if the rows have a gap.
        """
        feed_id = normalize_feed_id(feed_id)
        h = _check_hash(subfeed_hash)
        for v in (start, end):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise InvalidInput(f"bad position {v!r}")
        rows = self._read("SELECT position, signed FROM messages WHERE feed_id = ? AND"
                          " subfeed_hash = ? AND position >= ? AND position < ?"
                          " ORDER BY position",
                          (feed_id, h, start, 2**62 if end is None else end))
        out = []
        for i, (position, text) in enumerate(rows):
            if position != start + i:
                raise IntegrityError(f"feed {feed_id} subfeed {h}: message {start + i} is"
                                     " missing from the local database")
            out.append(json.loads(text))
        return out

    def subfeeds(self, feed_id: str) -> list[SubfeedInfo]:
        """The subfeeds of ``feed_id`` known here, named ones first (by name), then hashes."""
        rows = self._read(
            "SELECT s.subfeed_hash, s.name, (SELECT MAX(m.position) FROM messages m WHERE"
            " m.feed_id = s.feed_id AND m.subfeed_hash = s.subfeed_hash)"
            " FROM subfeeds s WHERE s.feed_id = ? ORDER BY s.name IS NULL, s.name, s.subfeed_hash",
            (normalize_feed_id(feed_id),))
        return [SubfeedInfo(r[0], r[1], 0 if r[2] is None else r[2] + 1) for r in rows]
