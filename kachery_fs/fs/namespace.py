"""What the mount looks like as a file system, defined here and only here (no pyfuse3).

::

    /                         one directory per joined channel
    /<channel>/sha1/<hash>    any content by hash (read-only; the listing is empty)
    /<channel>/feeds/<feed-id>/<subfeed>
                              signed append-only logs, one JSON message per line
    /<channel>/<name>...      what the user made: files, directories, symbolic links,
                              special files (rows of ``inodes``, named by ``names``)

The user's part is modelled as a file system models it: inodes (type, mode, owner, link
count, content, times) apart from names, with the rules of POSIX for making, linking,
renaming and removing them here (:meth:`Namespace.make`, :meth:`~Namespace.link`,
:meth:`~Namespace.unlink`, :meth:`~Namespace.rmdir`, :meth:`~Namespace.rename`,
:meth:`~Namespace.set_attributes`). An inode lives while it has a name or the kernel
still knows it (an open file whose names all went): the kernel's lookups are counted
(:meth:`~Namespace.remember`, :meth:`~Namespace.forget`), and an inode with no name is
removed when the kernel forgets it.

``sha1/`` lists nothing, as CernVM-FS and autofs do for what they resolve on demand: every
hash resolves on lookup, but ``du``, ``find`` and ``rsync -a`` of a channel directory
count each file once, under its own name, not again under its hash.

Inodes: 1 is the root; the user's inodes have ``INODE_BASE + row id`` (stable across
remounts); every other node gets a number from a counter the first time it is seen,
kept for the life of the mount, so an inode never changes meaning while mounted.
"""

from __future__ import annotations

import stat
import time

from ..errors import (
    Conflict,
    CrossDevice,
    InvalidInput,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PermissionDenied,
    ReadOnly,
)
from ..feeds import subfeed_hash
from ..identity import is_node_id
from ..state import INODE_BASE, Inode, NodeDB, check_name_length
from ..uris import is_sha1
from .vnodes import (
    MANIFEST_MARK,
    ChannelDir,
    FeedDir,
    FeedsDir,
    HashFile,
    Root,
    Sha1Dir,
    SubfeedFile,
    UserInode,
    VNode,
)

ROOT_INODE = 1
RESERVED_NAMES = frozenset({"sha1", "feeds"})
#: atime is kept as Linux's ``relatime`` keeps it: a read sets it when it is older than
#: the last change, or than this.
ATIME_AGE_NS = 24 * 3600 * 10**9


class Namespace:
    def __init__(self, db: NodeDB):
        self.db = db
        self._inodes: dict[VNode, int] = {Root(): ROOT_INODE}
        self._vnodes: dict[int, VNode] = {ROOT_INODE: Root()}
        self._next = ROOT_INODE + 1
        #: The kernel's lookup count of each of the user's inodes it holds.
        self._lookups: dict[int, int] = {}
        #: How many times the names of each directory (channel, id) have changed.
        self._generations: dict[tuple[str, int], int] = {}

    @staticmethod
    def inode_number(inode_id: int) -> int:
        """The inode number of row ``inode_id`` of ``inodes`` (whether or not it still
        exists)."""
        return INODE_BASE + inode_id

    def inode(self, vnode: VNode) -> int:
        if isinstance(vnode, UserInode):
            return self.inode_number(vnode.inode_id)
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
        if not isinstance(vnode, UserInode):
            self._inodes.pop(vnode, None)

    def vnode(self, inode: int) -> VNode:
        if inode >= INODE_BASE:
            row = self.db.inode(inode - INODE_BASE)  # NotFound if it is gone
            return UserInode(row.channel, row.id)
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
            case ChannelDir() | UserInode():
                if isinstance(parent, ChannelDir) and name in RESERVED_NAMES:
                    return (Sha1Dir if name == "sha1" else FeedsDir)(parent.channel)
                channel, parent_id = self.directory(parent)
                row = self.db.lookup(channel, parent_id, name)
                if row is not None:
                    return UserInode(row.channel, row.id)
            case _:
                raise NotADirectory(f"{parent} is not a directory")
        raise NotFound(f"{name!r} not found")

    def directory(self, vnode: VNode) -> tuple[str, int]:
        """(channel, ``names.parent`` of its children) of a directory the user may
        change: a channel directory or one of the user's; ``NotADirectory`` for a user's
        file, ``ReadOnly`` for ``sha1/`` and ``feeds/``, ``PermissionDenied`` for the root."""
        match vnode:
            case ChannelDir(channel=channel):
                return channel, 0
            case UserInode(channel=channel, inode_id=inode_id):
                if not self.db.inode(inode_id).is_dir:
                    raise NotADirectory("not a directory")
                return channel, inode_id
            case Root():
                raise PermissionDenied("channels appear here when joined (`kachery-fs join`)")
        raise ReadOnly(f"{vnode} is read-only")

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
            case UserInode(channel=channel, inode_id=inode_id):
                place = self.db.name_of(inode_id)
                if place is None or place[0] == 0:  # no name left: the channel, as good as any
                    return ChannelDir(channel)
                return UserInode(channel, place[0])
        raise TypeError(f"not a node of the tree: {vnode!r}")

    def children(self, vnode: VNode, feed_names=()) -> list[tuple[str, VNode]]:
        """``feed_names`` lists ``feeds/`` (feed ids) and ``feeds/<feed-id>/`` (subfeed
        names). ``sha1/`` lists nothing (see the module docstring)."""
        match vnode:
            case Root():
                return [(name, ChannelDir(name)) for name in self.channel_names()]
            case Sha1Dir():
                return []
            case FeedsDir(channel=channel):
                return [(f, FeedDir(channel, f)) for f in feed_names]
            case FeedDir(channel=channel, feed=feed):
                return [(n, SubfeedFile(channel, feed, n)) for n in feed_names]
            case HashFile() | SubfeedFile():
                raise NotADirectory(f"not a directory: {vnode!r}")
        channel, parent_id = self.directory(vnode)
        out: list[tuple[str, VNode]] = []
        if isinstance(vnode, ChannelDir):
            out += [("sha1", Sha1Dir(channel)), ("feeds", FeedsDir(channel))]
        for name, row in self.db.children(channel, parent_id):
            out.append((name, UserInode(row.channel, row.id)))
        return out

    def directory_links(self, vnode: ChannelDir) -> int:
        """``st_nlink`` of a channel directory: its ``.``, its name, and the ``..`` of each
        directory in it (``sha1/``, ``feeds/`` and the user's)."""
        return 4 + self.db.subdirectories(vnode.channel, 0)

    # -- the kernel's references ------------------------------------------------------------

    def remember(self, inode: int) -> None:
        """The kernel was told of ``inode`` once more (a lookup, create, link or listing
        entry): it holds it until it forgets as many."""
        if inode >= INODE_BASE:
            self._lookups[inode] = self._lookups.get(inode, 0) + 1

    def forget(self, inode: int, count: int) -> bool:
        """The kernel forgot ``count`` of its references to ``inode``. True if that was
        the last, and the inode, having no name, is removed now."""
        if inode < INODE_BASE:
            return False
        left = self._lookups.get(inode, 0) - count
        if left > 0:
            self._lookups[inode] = left
            return False
        self._lookups.pop(inode, None)
        return self._drop_if_unlinked(inode - INODE_BASE)

    def known(self, inode: int) -> bool:
        """Whether the kernel holds ``inode`` (it may still be read, written, stat'ed)."""
        return self._lookups.get(inode, 0) > 0

    def _drop_if_unlinked(self, inode_id: int) -> bool:
        try:
            row = self.db.inode(inode_id)
        except NotFound:
            return False
        if row.nlink > 0 or self.known(INODE_BASE + inode_id):
            return False
        self.db.delete_inode(inode_id)
        return True

    def drop_unlinked(self) -> int:
        """Remove the inodes a mount that ended left without a name (at the start of a
        mount, when the kernel holds none)."""
        return self.db.delete_unlinked()

    def discard(self, inode_id: int) -> None:
        """Remove a file with every name it has (one a crash left without content: see
        :mod:`kachery_fs.fs.durability`), before the mount serves: the kernel holds none."""
        row = self.db.inode(inode_id)
        now = time.time_ns()
        with self.db.transaction():
            for parent_id, name in self.db.names_of(inode_id):
                self._unname(row.channel, parent_id, name, row, now)
                self._changed(row.channel, parent_id, now)
            self.db.update_inode(inode_id, nlink=0)
            self.db.delete_inode(inode_id)

    # -- changes --------------------------------------------------------------------------

    def make(self, parent: VNode, name: str, *, mode: int, uid: int, gid: int, rdev: int = 0,
             target: bytes | None = None, committed: bool = True) -> Inode:
        """A new file, directory, symbolic link or special file (the type is in ``mode``)
        named ``name`` in ``parent``. ``Conflict`` if the name is taken. In a directory
        with the set-group-ID bit, it gets the directory's group (and a directory the
        bit), as on Linux. Not ``committed``: a file ``create(2)`` made, being written
        (see :attr:`~kachery_fs.state.Inode.committed`)."""
        channel, parent_id, above = self._place(parent, name)
        is_dir = stat.S_ISDIR(mode)
        if above is not None and above.mode & stat.S_ISGID:
            gid = above.gid
            if is_dir:
                mode |= stat.S_ISGID
        now = time.time_ns()
        with self.db.transaction():
            inode_id = self.db.new_inode(channel, mode=mode, uid=uid, gid=gid,
                                         nlink=2 if is_dir else 1, rdev=rdev, target=target,
                                         size=len(target) if target is not None else 0,
                                         now_ns=now, committed=committed)
            self.db.add_name(channel, parent_id, name, inode_id)
            if is_dir and parent_id:
                self.db.add_links(parent_id, 1)
            self._changed(channel, parent_id, now)
        return self.db.inode(inode_id)

    def link(self, vnode: VNode, parent: VNode, name: str) -> Inode:
        """One more name for the inode of ``vnode`` (not a directory)."""
        if not isinstance(vnode, UserInode):
            raise NotPermitted("only what was made here can be linked (sha1/ and feeds/ are"
                               " built in)")
        row = self.db.inode(vnode.inode_id)
        if row.is_dir:
            raise NotPermitted("a directory cannot have a second name")
        channel, parent_id, _ = self._place(parent, name)
        if channel != row.channel:
            raise CrossDevice("each channel is a file system of its own")
        now = time.time_ns()
        with self.db.transaction():
            self.db.add_name(channel, parent_id, name, row.id)
            self.db.add_links(row.id, 1, ctime_ns=now)
            self._changed(channel, parent_id, now)
        return self.db.inode(row.id)

    def unlink(self, parent: VNode, name: str) -> Inode:
        """Remove the name ``name`` (not a directory's) from ``parent``; the inode goes
        with its last name unless the kernel still holds it (an open file). Its row as
        it was after the change."""
        row = self._user_child(parent, name, "removed")
        if row.is_dir:
            raise IsADirectory(f"{name!r} is a directory (rmdir removes one)")
        channel, parent_id = self.directory(parent)
        now = time.time_ns()
        with self.db.transaction():
            self._unname(channel, parent_id, name, row, now)
            self._changed(channel, parent_id, now)
        after = self.db.inode(row.id)
        self._drop_if_unlinked(row.id)
        return after

    def rmdir(self, parent: VNode, name: str) -> None:
        row = self._user_child(parent, name, "removed")
        if not row.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        channel, parent_id = self.directory(parent)
        if self.db.has_children(channel, row.id):
            raise NotEmpty(f"{name!r} is not empty")
        now = time.time_ns()
        with self.db.transaction():
            self._unname(channel, parent_id, name, row, now)
            self._changed(channel, parent_id, now)
        self._drop_if_unlinked(row.id)

    def rename(self, old_parent: VNode, old_name: str, new_parent: VNode, new_name: str, *,
               noreplace: bool = False, exchange: bool = False) -> None:
        """``rename(2)``, with ``renameat2``'s ``RENAME_NOREPLACE`` and
        ``RENAME_EXCHANGE``. A name that is replaced loses its inode as :meth:`unlink`
        would (a reader of it keeps reading it)."""
        src = self._user_child(old_parent, old_name, "renamed")
        channel, old_id = self.directory(old_parent)
        new_channel, new_id, _ = self._live(new_parent)
        if new_channel != channel:
            raise CrossDevice("each channel is a file system of its own")
        check_name_length(new_name)
        if isinstance(new_parent, ChannelDir) and new_name in RESERVED_NAMES:
            raise Conflict(f"{new_name!r} is built in")
        dst = self.db.lookup(channel, new_id, new_name)
        if exchange and dst is None:
            raise NotFound(f"{new_name!r} not found")
        if noreplace and dst is not None:
            raise Conflict(f"{new_name!r} already exists")
        if dst is not None and dst.id == src.id:
            return  # two names of one inode: POSIX says nothing happens
        if src.is_dir and self._within(new_id, src.id):
            raise InvalidInput("a directory cannot be moved into itself")
        if exchange:
            assert dst is not None  # checked above
            if dst.is_dir and self._within(old_id, dst.id):
                raise InvalidInput("a directory cannot be moved into itself")
        elif dst is not None:
            if src.is_dir and not dst.is_dir:
                raise NotADirectory(f"{new_name!r} is not a directory")
            if dst.is_dir and not src.is_dir:
                raise IsADirectory(f"{new_name!r} is a directory")
            if dst.is_dir and self.db.has_children(channel, dst.id):
                raise NotEmpty(f"{new_name!r} is not empty")
        now = time.time_ns()
        with self.db.transaction():
            if exchange:
                assert dst is not None
                self.db.point_name(channel, old_id, old_name, dst.id)
                self.db.point_name(channel, new_id, new_name, src.id)
                if old_id != new_id and src.is_dir != dst.is_dir:
                    self._move_dir_link(old_id if src.is_dir else new_id,
                                        new_id if src.is_dir else old_id)
                self.db.update_inode(dst.id, ctime_ns=now)
            else:
                if dst is not None:
                    self._unname(channel, new_id, new_name, dst, now)
                self.db.move_name(channel, old_id, old_name, new_id, new_name)
                if src.is_dir and old_id != new_id:
                    self._move_dir_link(old_id, new_id)
            self.db.update_inode(src.id, ctime_ns=now)
            self._changed(channel, old_id, now)
            if new_id != old_id:
                self._changed(channel, new_id, now)
        if dst is not None and not exchange:
            self._drop_if_unlinked(dst.id)

    def set_attributes(self, vnode: VNode, *, mode: int | None = None, uid: int | None = None,
                       gid: int | None = None, atime_ns: int | None = None,
                       mtime_ns: int | None = None, ctime_ns: int | None = None) -> None:
        """``chmod``, ``chown`` and ``utimensat`` of one of the user's inodes (the kernel
        has checked the caller may: the mount uses ``default_permissions``). A change of
        mode or owner sets the change time, unless one is given. The built-in nodes
        cannot be changed (``ReadOnly``)."""
        if not isinstance(vnode, UserInode):
            raise ReadOnly(f"{vnode} cannot be changed")
        row = self.db.inode(vnode.inode_id)
        given = {"uid": uid, "gid": gid, "atime_ns": atime_ns, "mtime_ns": mtime_ns,
                 "ctime_ns": ctime_ns,
                 "mode": None if mode is None else stat.S_IFMT(row.mode) | (mode & 0o7777)}
        fields = {name: value for name, value in given.items() if value is not None}
        if ctime_ns is None and fields.keys() & {"mode", "uid", "gid"}:
            fields["ctime_ns"] = time.time_ns()
        if fields:
            self.db.update_inode(row.id, **fields)

    def accessed(self, vnode: VNode) -> None:
        """A file of the user's was opened to be read: its access time, as ``relatime``
        keeps it (at the open, not at each read: the kernel answers most reads from its
        cache, and never tells us of them)."""
        if not isinstance(vnode, UserInode):
            return
        row = self.db.inode(vnode.inode_id)
        now = time.time_ns()
        if (row.atime_ns <= row.mtime_ns or row.atime_ns <= row.ctime_ns
                or now - row.atime_ns >= ATIME_AGE_NS):
            try:
                self.db.update_inode(row.id, atime_ns=now)
            except NoSpace:  # a full disk fails no read for the sake of an access time
                pass

    # -- helpers -----------------------------------------------------------------------------

    def _live(self, parent: VNode) -> tuple[str, int, Inode | None]:
        """:meth:`directory` of a directory a name is to be added to, and its row (None
        for a channel directory): ``NotFound`` once it is removed (someone's working
        directory may still be in it)."""
        channel, parent_id = self.directory(parent)
        above = self.db.inode(parent_id) if parent_id else None
        if above is not None and above.nlink == 0:
            raise NotFound("the directory was removed")
        return channel, parent_id, above

    def _place(self, parent: VNode, name: str) -> tuple[str, int, Inode | None]:
        """:meth:`_live` of the directory a new name goes in, once the name passed the
        checks every new name does: not too long, not taken (``Conflict``)."""
        channel, parent_id, above = self._live(parent)
        check_name_length(name)
        if (isinstance(parent, ChannelDir) and name in RESERVED_NAMES or name in (".", "..")
                or self.db.lookup(channel, parent_id, name) is not None):
            raise Conflict(f"{name!r} already exists")
        return channel, parent_id, above

    def _user_child(self, parent: VNode, name: str, verb: str) -> Inode:
        child = self.lookup(parent, name)
        if not isinstance(child, UserInode):
            if isinstance(parent, Sha1Dir):
                raise ReadOnly(f"content under sha1/ cannot be {verb} through the mount")
            raise NotPermitted(f"{name!r} is built in and cannot be {verb}")
        return self.db.inode(child.inode_id)

    def _unname(self, channel: str, parent_id: int, name: str, row: Inode,
                now: int) -> None:
        """Remove the name ``name`` of ``row`` from directory ``parent_id``: a file has
        one link less; a directory (empty) none left, and its parent loses its ``..``."""
        self.db.remove_name(channel, parent_id, name)
        if not row.is_dir:
            self.db.add_links(row.id, -1, ctime_ns=now)
            return
        self.db.update_inode(row.id, nlink=0, ctime_ns=now)
        if parent_id:
            self.db.add_links(parent_id, -1)

    def _move_dir_link(self, from_id: int, to_id: int) -> None:
        """A directory moved from directory ``from_id`` to ``to_id``: its ``..`` too."""
        if from_id:
            self.db.add_links(from_id, -1)
        if to_id:
            self.db.add_links(to_id, 1)

    def generation(self, channel: str, parent_id: int) -> int:
        """A number that changes whenever a name in directory ``parent_id`` (0: the
        channel's) is added, removed or pointed at another inode, by this mount (the
        only writer of names: one mount per node)."""
        return self._generations.get((channel, parent_id), 0)

    def _changed(self, channel: str, parent_id: int, now: int) -> None:
        """A name was added to or removed from a directory: its mtime and ctime."""
        key = (channel, parent_id)
        self._generations[key] = self._generations.get(key, 0) + 1
        if parent_id:
            self.db.update_inode(parent_id, mtime_ns=now, ctime_ns=now)
        else:
            self.db.touch_channel(channel, now)

    def _within(self, dir_id: int, ancestor_id: int) -> bool:
        """Whether directory ``dir_id`` is ``ancestor_id`` or inside it."""
        while dir_id:
            if dir_id == ancestor_id:
                return True
            place = self.db.name_of(dir_id)
            if place is None:
                return False
            dir_id = place[0]
        return False
