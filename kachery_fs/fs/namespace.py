"""What the mount looks like as a file system, defined here and only here (no pyfuse3).

::

    /                         one directory per joined channel
    /<channel>/sha1/<hash>    any content by hash (read-only; listing shows what is local)
    /<channel>/feeds/<feed-id>/<subfeed>
                              signed append-only logs, one JSON message per line
    /<channel>/<name>...      files and directories the user made (rows of ``entries``)

Inodes: 1 is the root; named entries have ``INODE_BASE + row id`` (stable across
remounts); every other node gets a number from a counter the first time it is seen,
kept for the life of the mount, so an inode never changes meaning while mounted.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidInput, NotFound
from ..feeds import subfeed_hash
from ..identity import is_node_id
from ..state import INODE_BASE, NodeDB
from ..uris import is_sha1

ROOT_INODE = 1
RESERVED_NAMES = frozenset({"sha1", "feeds"})


@dataclass(frozen=True)
class VNode:
    """One node of the tree. ``kind`` is root, channel, sha1dir, feedsdir, hash, entry,
    feed (``feeds/<feed-id>``) or subfeed (``feeds/<feed-id>/<name>``)."""

    kind: str
    channel: str | None = None
    sha1: str | None = None
    entry_id: int | None = None
    feed: str | None = None
    subfeed: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind in ("root", "channel", "sha1dir", "feedsdir", "feed")


class Namespace:
    def __init__(self, db: NodeDB):
        self.db = db
        self._inodes: dict[VNode, int] = {VNode("root"): ROOT_INODE}
        self._vnodes: dict[int, VNode] = {ROOT_INODE: VNode("root")}
        self._next = ROOT_INODE + 1

    def inode(self, vnode: VNode) -> int:
        if vnode.kind == "entry":
            return INODE_BASE + vnode.entry_id
        ino = self._inodes.get(vnode)
        if ino is None:
            ino = self._next
            self._next += 1
            self._inodes[vnode] = ino
            self._vnodes[ino] = vnode
        return ino

    def renumber(self, vnode: VNode) -> None:
        """Give ``vnode`` a new inode number at its next lookup; the old one still names it
        for whoever holds it. With the writeback cache the kernel keeps the size it first
        heard of an inode, whatever we answer later: a file whose first size was wrong (a
        bad object's, in the bucket) gets its true size only in a new inode."""
        if vnode.kind != "entry":
            self._inodes.pop(vnode, None)

    def vnode(self, inode: int) -> VNode:
        if inode >= INODE_BASE:
            entry = self.db.entry(inode - INODE_BASE)  # NotFound if deleted
            return VNode("entry", entry.channel, entry_id=entry.id)
        try:
            return self._vnodes[inode]
        except KeyError:
            raise NotFound(f"unknown inode {inode}") from None

    def channel_names(self) -> list[str]:
        return [c.name for c in self.db.channels()]

    def lookup(self, parent: VNode, name: str) -> VNode:
        """The child ``name`` of ``parent``. For ``sha1/<hash>`` only the form is checked
        here: whether the content exists anywhere is the resolver's question."""
        if name == ".":
            return parent
        if parent.kind == "root":
            if name in self.channel_names():
                return VNode("channel", name)
        elif parent.kind == "sha1dir":
            if is_sha1(name) and name == name.lower():
                return VNode("hash", parent.channel, sha1=name)
        elif parent.kind == "feedsdir":
            if is_node_id(name):
                return VNode("feed", parent.channel, feed=name)
        elif parent.kind == "feed":
            try:
                subfeed_hash(name)
            except InvalidInput:
                pass
            else:
                return VNode("subfeed", parent.channel, feed=parent.feed, subfeed=name)
        elif parent.kind in ("channel", "entry"):
            if parent.kind == "channel" and name in RESERVED_NAMES:
                return VNode("sha1dir" if name == "sha1" else "feedsdir", parent.channel)
            entry = self.db.lookup(parent.channel, self.entry_parent(parent), name)
            if entry is not None:
                return VNode("entry", entry.channel, entry_id=entry.id)
        raise NotFound(f"{name!r} not found")

    @staticmethod
    def entry_parent(vnode: VNode) -> int:
        """The ``entries.parent`` value for children of a channel dir or entry dir."""
        return 0 if vnode.kind == "channel" else vnode.entry_id

    def parent_of(self, vnode: VNode) -> VNode:
        if vnode.kind in ("root", "channel"):
            return VNode("root")
        if vnode.kind in ("sha1dir", "feedsdir"):
            return VNode("channel", vnode.channel)
        if vnode.kind == "hash":
            return VNode("sha1dir", vnode.channel)
        if vnode.kind == "feed":
            return VNode("feedsdir", vnode.channel)
        if vnode.kind == "subfeed":
            return VNode("feed", vnode.channel, feed=vnode.feed)
        entry = self.db.entry(vnode.entry_id)
        if entry.parent == 0:
            return VNode("channel", entry.channel)
        return VNode("entry", entry.channel, entry_id=entry.parent)

    def children(self, vnode: VNode, local_hashes=(), feed_names=()) -> list[tuple[str, VNode]]:
        """``local_hashes`` lists ``sha1/``; ``feed_names`` lists ``feeds/`` (feed ids) and
        ``feeds/<feed-id>/`` (subfeed names)."""
        if vnode.kind == "root":
            return [(name, VNode("channel", name)) for name in self.channel_names()]
        if vnode.kind == "sha1dir":
            return [(h, VNode("hash", vnode.channel, sha1=h)) for h in sorted(local_hashes)]
        if vnode.kind == "feedsdir":
            return [(f, VNode("feed", vnode.channel, feed=f)) for f in feed_names]
        if vnode.kind == "feed":
            return [(n, VNode("subfeed", vnode.channel, feed=vnode.feed, subfeed=n))
                    for n in feed_names]
        out = []
        if vnode.kind == "channel":
            out += [("sha1", VNode("sha1dir", vnode.channel)),
                    ("feeds", VNode("feedsdir", vnode.channel))]
        for entry in self.db.children(vnode.channel, self.entry_parent(vnode)):
            out.append((entry.name, VNode("entry", entry.channel, entry_id=entry.id)))
        return out
