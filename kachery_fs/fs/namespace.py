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

from ..errors import InvalidInput, NotFound
from ..feeds import subfeed_hash
from ..identity import is_node_id
from ..state import INODE_BASE, NodeDB, check_name_length
from ..uris import is_sha1
from .vnodes import (
    MANIFEST_MARK,
    ChannelDir,
    FeedDir,
    FeedsDir,
    HashFile,
    NamedEntry,
    Root,
    Sha1Dir,
    SubfeedFile,
    VNode,
)

ROOT_INODE = 1
RESERVED_NAMES = frozenset({"sha1", "feeds"})


class Namespace:
    def __init__(self, db: NodeDB):
        self.db = db
        self._inodes: dict[VNode, int] = {Root(): ROOT_INODE}
        self._vnodes: dict[int, VNode] = {ROOT_INODE: Root()}
        self._next = ROOT_INODE + 1

    @staticmethod
    def entry_inode(entry_id: int) -> int:
        """The inode of named entry ``entry_id`` (whether or not it still exists)."""
        return INODE_BASE + entry_id

    def inode(self, vnode: VNode) -> int:
        if isinstance(vnode, NamedEntry):
            return self.entry_inode(vnode.entry_id)
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
        if not isinstance(vnode, NamedEntry):
            self._inodes.pop(vnode, None)

    def vnode(self, inode: int) -> VNode:
        if inode >= INODE_BASE:
            entry = self.db.entry(inode - INODE_BASE)  # NotFound if deleted
            return NamedEntry(entry.channel, entry.id)
        try:
            return self._vnodes[inode]
        except KeyError:
            raise NotFound(f"unknown inode {inode}") from None

    def channel_names(self) -> list[str]:
        return [c.name for c in self.db.channels()]

    def lookup(self, parent: VNode, name: str) -> VNode:
        """The child ``name`` of ``parent``. For ``sha1/<hash>`` only the form is checked
        here: whether the content exists anywhere is the resolver's question. A name over
        :data:`~kachery_fs.state.NAME_MAX` bytes is ``NameTooLong``, as on any file
        system, wherever it is looked up."""
        check_name_length(name)
        if name == ".":
            return parent
        match parent:
            case Root():
                if name in self.channel_names():
                    return ChannelDir(name)
            case Sha1Dir(channel=channel):
                sha1, mark, manifest = name.partition(MANIFEST_MARK)
                if (is_sha1(sha1) and sha1 == sha1.lower()
                        and (not mark or is_sha1(manifest) and manifest == manifest.lower())):
                    return HashFile(channel, sha1, manifest or None)
            case FeedsDir(channel=channel):
                if is_node_id(name):
                    return FeedDir(channel, name)
            case FeedDir(channel=channel, feed=feed):
                try:
                    subfeed_hash(name)
                except InvalidInput:
                    pass
                else:
                    return SubfeedFile(channel, feed, name)
            case ChannelDir() | NamedEntry():
                if isinstance(parent, ChannelDir) and name in RESERVED_NAMES:
                    return (Sha1Dir if name == "sha1" else FeedsDir)(parent.channel)
                entry = self.db.lookup(parent.channel, self.entry_parent(parent), name)
                if entry is not None:
                    return NamedEntry(entry.channel, entry.id)
        raise NotFound(f"{name!r} not found")

    @staticmethod
    def entry_parent(vnode: ChannelDir | NamedEntry) -> int:
        """The ``entries.parent`` value for children of a channel dir or entry dir."""
        return 0 if isinstance(vnode, ChannelDir) else vnode.entry_id

    def parent_of(self, vnode: VNode) -> VNode:
        match vnode:
            case Root() | ChannelDir():
                return Root()
            case Sha1Dir(channel=channel) | FeedsDir(channel=channel):
                return ChannelDir(channel)
            case HashFile(channel=channel):
                return Sha1Dir(channel)
            case FeedDir(channel=channel):
                return FeedsDir(channel)
            case SubfeedFile(channel=channel, feed=feed):
                return FeedDir(channel, feed)
            case NamedEntry(entry_id=entry_id):
                entry = self.db.entry(entry_id)
                if entry.parent == 0:
                    return ChannelDir(entry.channel)
                return NamedEntry(entry.channel, entry.parent)
        raise TypeError(f"not a node of the tree: {vnode!r}")

    def children(self, vnode: VNode, local_hashes=(), feed_names=()) -> list[tuple[str, VNode]]:
        """``local_hashes`` lists ``sha1/``; ``feed_names`` lists ``feeds/`` (feed ids) and
        ``feeds/<feed-id>/`` (subfeed names)."""
        match vnode:
            case Root():
                return [(name, ChannelDir(name)) for name in self.channel_names()]
            case Sha1Dir(channel=channel):
                return [(h, HashFile(channel, h)) for h in sorted(local_hashes)]
            case FeedsDir(channel=channel):
                return [(f, FeedDir(channel, f)) for f in feed_names]
            case FeedDir(channel=channel, feed=feed):
                return [(n, SubfeedFile(channel, feed, n)) for n in feed_names]
            case HashFile() | SubfeedFile():
                raise TypeError(f"not a directory: {vnode!r}")
        assert isinstance(vnode, ChannelDir | NamedEntry)
        out: list[tuple[str, VNode]] = []
        if isinstance(vnode, ChannelDir):
            out += [("sha1", Sha1Dir(vnode.channel)), ("feeds", FeedsDir(vnode.channel))]
        for entry in self.db.children(vnode.channel, self.entry_parent(vnode)):
            out.append((entry.name, NamedEntry(entry.channel, entry.id)))
        return out
