"""Feed messages: signing, verification, and the one-JSON-per-line format of the mount.

A subfeed is a chain of signed messages::

    {"body": {"message": <a JSON object or array>,
              "previousSignature": <signature of message i-1>,   (absent for i = 0)
              "messageNumber": i,
              "timestamp": <milliseconds since the epoch, integer>,
              "metaData": <JSON object>},                         (optional)
     "signature": <NodeKey.sign(body) by the feed's key>}

Only the feed's owner (the holder of its private key) can append (:func:`sign_message`).
Everybody else checks every message they receive (:func:`verify_messages`): the shapes and
types above, the signature against the feed id, ``messageNumber`` equal to the message's
position, and ``previousSignature`` equal to the signature of the message before it.
Checking stops at the first problem; readers keep the valid prefix and report the problem,
so a tampered or truncated copy never hides the messages before it and never adds anything
after it. A message (and its ``metaData``) must have canonical JSON shorter than
:data:`MAX_MESSAGE_CHARS`, kachery's limit.

A message written here must be a JSON object or array (:func:`check_message`): kachery
daemons refuse any other value (``isSignedSubfeedMessage``), so a scalar would make a
daemon reading the subfeed stop at it. Received messages are not held to this, so that
subfeeds written before the rule stay readable here.

In the mount, a subfeed is a file with one line per message: the message value as
compact JSON and ``"\\n"`` (:func:`message_line`); a line written to it is parsed by
:func:`parse_line`.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

from ..canonical import canonical_json
from ..errors import InvalidInput
from ..identity import NodeKey, is_node_id, verify_signature

#: A message value (and a ``metaData`` object) must have canonical JSON shorter than this
#: many characters (UTF-16 code units, as JavaScript counts them): kachery's limit.
MAX_MESSAGE_CHARS = 10_000

_SIG_RE = re.compile(r"[0-9a-fA-F]{128}")
_BODY_REQUIRED = frozenset({"message", "messageNumber", "timestamp"})
_BODY_ALLOWED = _BODY_REQUIRED | {"previousSignature", "metaData"}
_SIGNED_KEYS = frozenset({"body", "signature"})


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


def message_json(value, what: str) -> str:
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
    body = {"message": json.loads(message_json(message, "a feed message"))}
    if previous_signature is not None:
        body["previousSignature"] = previous_signature
    body["messageNumber"] = message_number
    body["timestamp"] = timestamp
    if metaData is not None:
        if not isinstance(metaData, dict):
            raise InvalidInput("metaData must be a JSON object")
        body["metaData"] = json.loads(message_json(metaData, "metaData"))
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
        message_json(body["message"], "the message")
        if "metaData" in body:
            message_json(body["metaData"], "metaData")
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
    message_json(value, "the message")
    return value
