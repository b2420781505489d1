"""Where a store keeps its objects: kachery's layout, ``sha1/ab/cd/ef/<hash>`` under a root,
with ``tmp/`` beside it for files being written.

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

    def path(self, sha1: str) -> Path:
        """The path of object ``sha1`` (which need not exist)."""
        if not is_sha1(sha1):
            raise InvalidInput(f"not a SHA-1 hash: {sha1!r}")
        sha1 = sha1.lower()
        return self.sha1_dir / sha1[0:2] / sha1[2:4] / sha1[4:6] / sha1
