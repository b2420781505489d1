"""Where a node keeps its state, and the defaults every command shares."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_HUB_PORT = 7420


def node_dir() -> Path:
    """The node directory: ``$KACHERY_FS_DIR``, else ``~/.kachery-fs``."""
    value = os.environ.get("KACHERY_FS_DIR")
    if value:
        return Path(value).expanduser().resolve()
    return Path.home() / ".kachery-fs"
