"""Content URIs: ``sha1://<hash>[/<name>][?label=...]``, and kachery 2's
``kachery:<zone>:sha1:<hash>[:<label>]``.

Parsing is lenient in the ways kachery's clients are (reference: kachery.md §1.1): a bare
40-hex hash, upper-case hex, an informational path after the hash, a ``.ext`` glued to the
hash, and query parameters are all accepted. kachery 2's form (``kachery::sha1:<hash>:label``
when its zone is the default) is read by hash: the zone names where kachery 2 kept the
file, which says nothing about its bytes. Emitted URIs are always ``sha1://``, lower-case.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import TypeGuard
from urllib.parse import parse_qs, quote, unquote

from .errors import InvalidInput

_SHA1_RE = re.compile(r"[0-9a-fA-F]{40}")


def is_sha1(value: object) -> TypeGuard[str]:
    """True for 40 hexadecimal digits (either case), the way kachery hubs validate hashes."""
    return isinstance(value, str) and _SHA1_RE.fullmatch(value) is not None


def normalize_sha1(value: str) -> str:
    """Return ``value`` as lower-case hex, or raise InvalidInput."""
    if not is_sha1(value):
        raise InvalidInput(f"not a SHA-1 hash (40 hexadecimal digits): {value!r}")
    return value.lower()


def pathify(h: str) -> str:
    """kachery's fan-out: ``ab/cd/ef/abcdef...``."""
    return f"{h[0:2]}/{h[2:4]}/{h[4:6]}/{h}"


def sha1_hex(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


@dataclass(frozen=True)
class ContentUri:
    sha1: str
    label: str | None = None
    #: The informational path after the hash (``sha1://<h>/<path>``), if any.
    path: str | None = None
    query: dict[str, str] = field(default_factory=dict)
    #: kachery 2's zone (``kachery:<zone>:sha1:...``; ``""`` for its default zone).
    zone: str | None = None

    def __str__(self) -> str:
        return format_uri(self.sha1, self.label)

    @property
    def manifest(self) -> str | None:
        """The ``?manifest=`` hash (kachery's form for a large file), lower-case, if any."""
        value = self.query.get("manifest")
        if value is None:
            return None
        if not is_sha1(value):
            raise InvalidInput(f"manifest={value!r} in {self} is not a SHA-1 hash")
        return value.lower()


def parse_uri(text: str) -> ContentUri:
    """Parse ``sha1://...``, ``kachery:<zone>:sha1:...`` or a bare hash leniently; raise
    InvalidInput otherwise."""
    if not isinstance(text, str):
        raise InvalidInput("a content URI must be a string")
    text = text.strip()
    if is_sha1(text):
        return ContentUri(text.lower())
    if text.lower().startswith("kachery:"):
        return _parse_kachery2(text)
    head, _, query_text = text.partition("?")
    if not head.lower().startswith("sha1://"):
        raise InvalidInput(
            f"not a content URI: {text!r} (expected sha1://<40 hex digits>,"
            " kachery:<zone>:sha1:<40 hex digits> or a bare hash)")
    parts = head[len("sha1://"):].split("/")
    h = parts[0]
    if "." in h:  # sha1://<h>.ext, as kachery's clients accept
        h = h.split(".", 1)[0]
    if not is_sha1(h):
        raise InvalidInput(f"not a SHA-1 hash in {text!r}: {h!r}")
    path = "/".join(parts[1:]) or None
    query = {k: v[0] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
    label = query.get("label") or (unquote(parts[-1]) if path else None)
    return ContentUri(h.lower(), label, path, query)


def _parse_kachery2(text: str) -> ContentUri:
    """kachery 2's ``kachery:<zone>:<algorithm>:<hash>[:<URL-quoted label>]`` (its
    ``_form_uri``; the label is quoted, so it holds no ``:``, but one more is kept in it)."""
    parts = text.split(":", 4)
    if len(parts) < 4:
        raise InvalidInput(f"not a kachery URI: {text!r} (expected"
                           " kachery:<zone>:sha1:<40 hex digits>[:<label>])")
    _, zone, algorithm, h = parts[:4]
    if algorithm.lower() != "sha1":
        raise InvalidInput(f"{text!r} names its content by {algorithm or 'nothing'}:"
                           " kachery-fs reads content by SHA-1 only")
    if not is_sha1(h):
        raise InvalidInput(f"not a SHA-1 hash in {text!r}: {h!r}")
    label = unquote(parts[4]) if len(parts) == 5 and parts[4] else None
    return ContentUri(h.lower(), label, zone=zone)


def format_uri(sha1: str, label: str | None = None, *, manifest: str | None = None) -> str:
    """``sha1://<lower-case hash>`` with an optional URL-quoted ``label``; with a
    ``manifest`` hash, kachery's form for a large file: ``sha1://<hash>/<label>?manifest=``
    (kachery.md §1.4)."""
    uri = f"sha1://{normalize_sha1(sha1)}"
    if manifest is not None:
        return (uri + (f"/{quote(os.fsencode(label), safe='')}" if label else "")
                + f"?manifest={normalize_sha1(manifest)}")
    if label:
        uri += "?label=" + quote(os.fsencode(label), safe="")  # a name's bytes, any of them
    return uri
