"""The attribute policy of the mount: what mode, size, link count, times and cache timeouts
each kind of node gets (no pyfuse3: the adapter turns :class:`Attrs` into the kernel's).

- ``sha1/<hash>`` never changes: read-only, its attributes cached for a day
  (:data:`IMMUTABLE_TIMEOUT`).
- A subfeed file grows as messages arrive: never cached, so ``tail -f`` sees the size;
  writable (appendable) only by the feed's owner, as is its feed directory.
- One of the user's inodes has its own type, mode, owner, link count, times and (a
  symbolic link, a special file) target or device; a file the size of the version being
  written while it is.
- A directory's link count is 2 and one per directory in it.
- A channel directory is writable, and its mtime and ctime change with its names; the
  root, ``sha1/`` and ``feeds/`` are not.
- The built-in nodes belong to the mount's owner; times not kept anywhere are the
  mount's start.
"""

from __future__ import annotations

import stat
from typing import NamedTuple

from ..state import Inode
from .vnodes import ChannelDir, FeedDir, HashFile, SubfeedFile, UserInode, VNode

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
    uid: int | None = None  # None: the mount's owner
    gid: int | None = None
    rdev: int = 0

    @property
    def blocks(self) -> int:
        """``st_blocks``: 512-byte units."""
        return (self.size + 511) // 512


def attributes(vnode: VNode, *, start_ns: int, size: int = 0, inode: Inode | None = None,
               staged_size: int | None = None, owned: bool = False, nlink: int = 2,
               times: tuple[int, int] | None = None) -> Attrs:
    """The attributes of ``vnode``.

    ``start_ns`` is the mount's start (the times of built-in nodes); ``size`` the size of a
    hash or subfeed file; ``inode`` the row of a :class:`UserInode` (required for one) and
    ``staged_size`` the size of the version of it being written, if any; ``owned`` whether
    this node owns the feed of a :class:`FeedDir` or :class:`SubfeedFile`; ``nlink`` and
    ``times`` (mtime, ctime) those of a :class:`ChannelDir`.
    """
    t = start_ns
    match vnode:
        case UserInode():
            if inode is None:
                raise TypeError("the attributes of one of the user's inodes need its row")
            size = inode.size
            if inode.is_file and staged_size is not None:
                size = staged_size
            elif inode.is_dir:
                size = 0
            return Attrs(inode.mode, inode.nlink, size, inode.atime_ns, inode.mtime_ns,
                         inode.ctime_ns, MUTABLE_TIMEOUT, inode.uid, inode.gid, inode.rdev)
        case HashFile():
            return Attrs(stat.S_IFREG | 0o444, 1, size, t, t, t, IMMUTABLE_TIMEOUT)
        case SubfeedFile():
            # Grows as messages arrive: no attribute caching, so `tail -f` sees the size.
            return Attrs(stat.S_IFREG | (0o644 if owned else 0o444), 1, size, t, t, t, 0)
        case FeedDir():
            return Attrs(stat.S_IFDIR | (0o755 if owned else 0o555), 2, 0, t, t, t,
                         MUTABLE_TIMEOUT)
        case ChannelDir():
            m, c = times if times is not None else (t, t)
            return Attrs(stat.S_IFDIR | 0o755, nlink, 0, t, m or t, c or t, MUTABLE_TIMEOUT)
    return Attrs(stat.S_IFDIR | 0o555, nlink, 0, t, t, t, MUTABLE_TIMEOUT)
