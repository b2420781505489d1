"""The attribute policy of the mount: what mode, size, link count, times and cache timeouts
each kind of node gets (no pyfuse3: the adapter turns :class:`Attrs` into the kernel's).

- ``sha1/<hash>`` never changes: read-only, its attributes cached for a day
  (:data:`IMMUTABLE_TIMEOUT`).
- A subfeed file grows as messages arrive: never cached, so ``tail -f`` sees the size;
  writable (appendable) only by the feed's owner, as is its feed directory.
- A named entry has its own mode and mtime (ctime follows it), and the size of the
  version being written while it is.
- A channel directory is writable; the root, ``sha1/`` and ``feeds/`` are not.
- Times not kept anywhere are the mount's start.
"""

from __future__ import annotations

import stat
from typing import NamedTuple

from ..state import Entry
from .vnodes import ChannelDir, FeedDir, HashFile, NamedEntry, SubfeedFile, VNode

IMMUTABLE_TIMEOUT = 24 * 3600.0  # sha1/<hash> never changes
MUTABLE_TIMEOUT = 1.0
#: The block size the mount reports (``st_blksize``), the unit in which tools read.
BLOCK_SIZE = 1 << 17


class Attrs(NamedTuple):
    """The attributes of one node, as plain values. The entry and attribute timeouts are
    always equal (``timeout``). A named tuple: built on every lookup and ``getattr``, so
    it must be cheap (a frozen dataclass costs four times as much to build)."""

    mode: int
    nlink: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    timeout: float

    @property
    def blocks(self) -> int:
        """``st_blocks``: 512-byte units."""
        return (self.size + 511) // 512


def attributes(vnode: VNode, *, start_ns: int, size: int = 0, entry: Entry | None = None,
               staged_size: int | None = None, owned: bool = False) -> Attrs:
    """The attributes of ``vnode``.

    ``start_ns`` is the mount's start (the times of built-in nodes); ``size`` the size of a
    hash or subfeed file; ``entry`` the row of a :class:`NamedEntry` (required for one) and
    ``staged_size`` the size of the version of it being written, if any; ``owned`` whether
    this node owns the feed of a :class:`FeedDir` or :class:`SubfeedFile`.
    """
    t = start_ns
    match vnode:
        case NamedEntry():
            if entry is None:
                raise TypeError("the attributes of a named entry need its row")
            m = entry.mtime_ns
            if entry.is_dir:
                return Attrs(stat.S_IFDIR | (entry.mode & 0o7777), 2, 0, t, m, m,
                             MUTABLE_TIMEOUT)
            return Attrs(stat.S_IFREG | (entry.mode & 0o7777), 1,
                         staged_size if staged_size is not None else entry.size, t, m, m,
                         MUTABLE_TIMEOUT)
        case HashFile():
            return Attrs(stat.S_IFREG | 0o444, 1, size, t, t, t, IMMUTABLE_TIMEOUT)
        case SubfeedFile():
            # Grows as messages arrive: no attribute caching, so `tail -f` sees the size.
            return Attrs(stat.S_IFREG | (0o644 if owned else 0o444), 1, size, t, t, t, 0)
        case FeedDir():
            return Attrs(stat.S_IFDIR | (0o755 if owned else 0o555), 2, 0, t, t, t,
                         MUTABLE_TIMEOUT)
    writable = isinstance(vnode, ChannelDir)
    return Attrs(stat.S_IFDIR | (0o755 if writable else 0o555), 2, 0, t, t, t,
                 MUTABLE_TIMEOUT)
