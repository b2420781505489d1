"""Where a node keeps its state, and the defaults every command shares."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_HUB_PORT = 7420


def node_dir() -> Path:
    """The node directory: ``$KACHERY_FS_DIR``, else ``~/.kachery-fs``."""
    value = os.environ.get("KACHERY_FS_DIR")
    if value:
        return Path(value).expanduser().resolve()
    return Path.home() / ".kachery-fs"


def private_directory(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing; make it 0700 if group or others may enter
    it, with a log line. A node's or a hub's directory holds every stored file and name:
    the mount's own permissions are worth nothing if other local users can read them
    there."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o700)
        log.warning("made %s private (mode %04o, now 0700): other local users could read"
                    " the files in it", path, mode)
    return path


def private_files(*paths: Path) -> None:
    """Make the existing files among ``paths`` readable by their owner only (0600): the
    databases of a directory (and their -wal and -shm files), which SQLite creates with
    the process's umask."""
    for path in paths:
        for p in (Path(path), Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                mode = stat.S_IMODE(p.stat().st_mode)
                if mode & 0o077:
                    os.chmod(p, mode & 0o600)
            except FileNotFoundError:
                pass
