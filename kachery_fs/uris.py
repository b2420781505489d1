"""Content URIs: ``sha1://<hash>[/<name>][?label=...]``.

Parsing is lenient in the ways kachery's clients are (reference: kachery.md §1.1): a bare
40-hex hash, upper-case hex, an informational path after the hash, a ``.ext`` glued to the
hash, and query parameters are all accepted. Emitted URIs are always lower-case.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import TypeGuard
from urllib.parse import parse_qs, quote

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

    def __str__(self) -> str:
        return format_uri(self.sha1, self.label)


def parse_uri(text: str) -> ContentUri:
    """Parse ``sha1://...`` (or a bare hash) leniently; raise InvalidInput otherwise."""
    if not isinstance(text, str):
        raise InvalidInput("a content URI must be a string")
    text = text.strip()
    if is_sha1(text):
        return ContentUri(text.lower())
    head, _, query_text = text.partition("?")
    if not head.lower().startswith("sha1://"):
        raise InvalidInput(
            f"not a content URI: {text!r} (expected sha1://<40 hex digits> or a bare hash)")
    parts = head[len("sha1://"):].split("/")
    h = parts[0]
    if "." in h:  # sha1://<h>.ext, as kachery's clients accept
        h = h.split(".", 1)[0]
    if not is_sha1(h):
        raise InvalidInput(f"not a SHA-1 hash in {text!r}: {h!r}")
    path = "/".join(parts[1:]) or None
    query = {k: v[0] for k, v in parse_qs(query_text, keep_blank_values=True).items()}
    label = query.get("label") or (parts[-1] if path else None)
    return ContentUri(h.lower(), label, path, query)


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
