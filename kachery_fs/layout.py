"""Where a store keeps its objects: kachery's layout, ``sha1/ab/cd/ef/<hash>`` under a root,
with ``tmp/`` beside it for files being written, ``pending/<hash>`` for content the mount
committed that may not be on the disk yet, and ``partial/`` for large files of which only
some chunks are here.

Both the store (:mod:`kachery_fs.store`) and its cache index (:mod:`kachery_fs.cache`)
find objects through this, so neither needs the other to know where a file is.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidInput
from .uris import is_sha1


class Layout:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.sha1_dir = self.root / "sha1"
        self.tmp_dir = self.root / "tmp"
        self.partial_dir = self.root / "partial"
        self.pending_dir = self.root / "pending"

    def path(self, sha1: str) -> Path:
        """The path of object ``sha1`` (which need not exist)."""
        if not is_sha1(sha1):
            raise InvalidInput(f"not a SHA-1 hash: {sha1!r}")
        sha1 = sha1.lower()
        return self.sha1_dir / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1

    def pending_path(self, sha1: str) -> Path:
        """Where content ``sha1`` waits for the disk before it goes to :meth:`path` (see
        :mod:`kachery_fs.fs.durability`)."""
        if not is_sha1(sha1):
            raise InvalidInput(f"not a SHA-1 hash: {sha1!r}")
        return self.pending_dir / sha1.lower()

    def partial_path(self, sha1: str, manifest_sha1: str) -> Path:
        """The path of the partial file of large file ``sha1`` read through manifest
        ``manifest_sha1``: the chunks fetched so far, at their offsets, holes elsewhere
        (see :mod:`kachery_fs.partial`). One per manifest: the chunks of a manifest that
        lies never mix with another's."""
        for h in (sha1, manifest_sha1):
            if not is_sha1(h):
                raise InvalidInput(f"not a SHA-1 hash: {h!r}")
        return self.partial_dir / f"{sha1.lower()}-{manifest_sha1.lower()}"
