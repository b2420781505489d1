"""Kachery stores already on this machine, read (never written) as sources of content.

Every kachery generation keeps content in the same ``ab/cd/ef/<hash>`` fan-out, some
with pointers to files kept elsewhere (reference/kachery.md §1.5). For a hash ``h``,
with ``p = h[0:2]/h[2:4]/h[4:6]/h``, a source directory is searched for:

==========================================  ================================================
``sha1/<p>``                                the content itself (every generation)
``sha1/<p>.link``                           JSON ``{"path": ..., "stat": {...}}``: the content
                                            is the file at ``path`` (hub-era daemon and client)
``sha1/<p>.hints.json``                     JSON ``{"files": [{"stat": {"path": ...}}]}``
                                            (kachery v1)
``sha1-trash/<p>``                          evicted by the hub-era daemon, not yet purged
``linked_files/sha1/<p>``                   JSON ``{"path", "size", "mtime", "sha1"}``
                                            (kachery-cloud)
``mutables/@linked_files/@sha1/<h>``        the same, where kachery-cloud 0.1-0.2 kept it
==========================================  ================================================

The standard locations are used without configuration when they exist: the hub daemon's
and v1's ``$KACHERY_STORAGE_DIR`` (default ``~/kachery-storage``), kachery-cloud's
``$KACHERY_CLOUD_DIR`` (``~/.kachery-cloud``) and kachery 2's ``$KACHERY_DIR``
(``~/.kachery``; its ``hash0/`` holds only stray temporary copies, and is not read).

None of these generations checks content when it reads it. A hit here is copied into
our store, hashed while it is copied, and installed as fetched content only if it
matches; it is then served from our copy. We copy rather than verify once and serve the
source file in place, because a source file can change after it was checked: linked
files are a user's working files, and kachery-cloud's own ``store_file(...,
cache_locally=True)`` renames a copy over its source. A mount reads a file over
minutes; only a copy we own is still the verified content when the last byte is read.
The copy is ordinary cache: evicted under the store's limit, copied again on the next
read. A file that does not match is logged and never used, and remembered by (path,
size, mtime, inode) so that it is not hashed again until it changes.

Nothing here writes to a source: files are opened read-only and nothing else is done
to them.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import settings
from .cache import FETCHED
from .errors import IntegrityError, InvalidInput
from .store import Store

log = logging.getLogger(__name__)

#: (environment variable, default directory) of each kachery generation's store.
STANDARD_LOCATIONS = (
    ("KACHERY_STORAGE_DIR", "~/kachery-storage"),  # kachery v1, hub-era daemon
    ("KACHERY_CLOUD_DIR", "~/.kachery-cloud"),     # kachery-cloud
    ("KACHERY_DIR", "~/.kachery"),                 # kachery 2
)
#: The largest link file read (they are a few hundred bytes).
MAX_LINK_BYTES = 64 << 10


@dataclass(frozen=True)
class Source:
    path: Path
    #: Found at a standard location rather than configured.
    automatic: bool = False

    def candidates(self, sha1: str):
        """Paths that may hold ``sha1``: stored copies, then the targets of links."""
        fan = Path(sha1[0:2], sha1[2:4], sha1[4:6], sha1)
        stored = self.path / "sha1" / fan
        yield stored
        yield self.path / "sha1-trash" / fan
        yield from _link_target(stored.with_name(sha1 + ".link"))
        yield from _hint_targets(stored.with_name(sha1 + ".hints.json"))
        yield from _link_target(self.path / "linked_files" / "sha1" / fan)
        yield from _link_target(self.path / "mutables" / "@linked_files" / "@sha1" / sha1)


class Sources:
    """The sources of one node, in order: configured ones, then the standard locations."""

    def __init__(self, sources: list[Source]):
        self.sources = sources
        # Files that failed verification: path -> (size, mtime_ns, inode) when it failed.
        self._bad: dict[Path, tuple[int, int, int]] = {}

    @classmethod
    def load(cls, node_dir: Path) -> Sources:
        conf = settings.load(node_dir)
        own = Path(node_dir).resolve()
        found: list[Source] = []
        seen = {own}
        for text in conf.sources:
            path = Path(text)
            if path not in seen:
                seen.add(path)
                found.append(Source(path))
        if conf.auto_sources:
            for path in standard_locations():
                if path not in seen and path.is_dir():
                    seen.add(path)
                    found.append(Source(path, automatic=True))
        return cls(found)

    def __bool__(self) -> bool:
        return bool(self.sources)

    def __iter__(self):
        return iter(self.sources)

    def find(self, sha1: str) -> list[Path]:
        """Regular files that claim to hold ``sha1`` and did not fail a check as they are.

        Cheap (a few ``stat`` calls and small JSON reads per source): fit for a lookup.
        """
        found = []
        for source in self.sources:
            for path in source.candidates(sha1):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and self._bad.get(path) != _identity(st):
                    found.append(path)
        return found

    def copy_into(self, store: Store, sha1: str, paths: list[Path] | None = None) -> int | None:
        """Copy ``sha1`` from the first source file that hashes right into ``store``, as
        fetched content; its size, or None when no source has it. Blocks (hashing)."""
        for path in self.find(sha1) if paths is None else paths:
            try:
                before = os.stat(path)
                _, size = store.add_file(path, origin=FETCHED, expected=sha1)
            except IntegrityError:
                self._bad[path] = _identity(before)
                log.error("%s does not hold the content of sha1://%s (it hashes to something"
                          " else): not used. It is corrupt or was changed since kachery"
                          " stored it; remove it, or fix the kachery store it belongs to",
                          path, sha1)
                continue
            except OSError as exc:
                log.warning("could not read %s for sha1://%s: %s", path, sha1, exc)
                continue
            log.info("sha1://%s copied from %s, verified", sha1, path)
            return size
        return None


def standard_locations() -> list[Path]:
    """Where each kachery generation keeps its store on this machine (may not exist)."""
    return [Path(os.environ.get(var) or default).expanduser().resolve()
            for var, default in STANDARD_LOCATIONS]


def check_source(path: Path, node_dir: Path) -> Path:
    """The absolute path of a directory fit to be a source; InvalidInput otherwise."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise InvalidInput(f"{path} is not a directory")
    if path == Path(node_dir).resolve():
        raise InvalidInput(f"{path} is this node's own store, not another kachery store")
    layouts = ("sha1", "linked_files", "mutables/@linked_files")
    if not any((path / sub).is_dir() for sub in layouts):
        raise InvalidInput(f"{path} does not look like a kachery store (it has no sha1/,"
                           " linked_files/ or mutables/@linked_files/ directory)")
    return path


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino


def _read_json(path: Path):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_LINK_BYTES))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.debug("ignoring unreadable kachery link file %s: %s", path, exc)
        return None


def _absolute(value) -> list[Path]:
    return [Path(value)] if isinstance(value, str) and os.path.isabs(value) else []


def _link_target(path: Path) -> list[Path]:
    record = _read_json(path)
    return _absolute(record.get("path")) if isinstance(record, dict) else []


def _hint_targets(path: Path) -> list[Path]:
    record = _read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("files"), list):
        return []
    return [p for f in record["files"] if isinstance(f, dict) and isinstance(f.get("stat"), dict)
            for p in _absolute(f["stat"].get("path"))]
