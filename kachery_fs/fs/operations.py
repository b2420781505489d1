"""The pyfuse3 adapter: translate kernel requests into namespace, resolver and store calls.

Every handler body runs inside ``fuse_errors`` so that only ``FUSEError`` leaves it.
Writes are staged in the store's temp directory, hashed as they arrive, and committed
into the store when the file is closed (on ``flush``, which ``close(2)`` waits for),
then queued for upload: the state machine is :mod:`.staging`'s; the attributes each
kind of node gets are :mod:`.attrs`'s.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import pyfuse3
import trio

from .. import metrics, status
from ..channels import Channels
from ..errors import (
    Conflict,
    InvalidInput,
    IsADirectory,
    NotFound,
    PermissionDenied,
    ReadOnly,
)
from ..feeds import FeedFiles
from ..resolver import Content, LocalContent, Resolver, SharedChunks
from ..state import INODE_BASE, Inode, NodeDB
from ..store import Store
from ..uploader import Uploader
from ..uris import format_uri
from . import vnodes
from .attrs import BLOCK_SIZE, attributes
from .durability import Durability, recover
from .errno_map import fuse_errors
from .namespace import ROOT_INODE, Namespace
from .staging import Staging, Writer
from .vnodes import ChannelDir, FeedDir, HashFile, SubfeedFile, UserInode, VNode

log = logging.getLogger(__name__)

RENAME_NOREPLACE = getattr(pyfuse3, "RENAME_NOREPLACE", 1)
RENAME_EXCHANGE = getattr(pyfuse3, "RENAME_EXCHANGE", 2)

XATTR_URI = b"user.kachery.uri"
XATTR_STATUS = b"user.kachery.status"
#: How long ``getxattr user.kachery.uri`` of a large file just written waits for its
#: manifest (a file of tens of GB) before it answers EAGAIN.
MANIFEST_WAIT_S = 60.0


@dataclass
class Handle:
    vnode: VNode
    content: Content | None = None
    writer: Writer | None = None
    writes: bool = False
    #: For a subfeed file opened for appending: bytes written but not yet a whole line.
    pending: bytearray | None = None


@dataclass
class DirHandle:
    entries: list = field(default_factory=list)
    #: For one of the user's directories: (channel, its id) and the generation of its
    #: names when it was listed (see ``Namespace.generation``); None for a built-in one.
    names_of: tuple[str, int] | None = None
    generation: int = 0


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, db: NodeDB, store: Store, channels: Channels, resolver: Resolver,
                 uploader: Uploader, *, nursery: trio.Nursery, feeds: FeedFiles | None = None,
                 snapshot: Callable[[], dict] | None = None, read_only: bool = False):
        """``snapshot()`` is the node's activity (:func:`kachery_fs.status.collect`), shown
        as a channel directory's ``user.kachery.status``; without it there is none.
        ``read_only``: every change is refused with ``EROFS`` (the kernel refuses them
        first, the mount being ``ro``: this is the second line)."""
        super().__init__()
        self.read_only = read_only
        self.db = db
        self.store = store
        self.channels = channels
        self.resolver = resolver
        self.uploader = uploader
        self.nursery = nursery
        self.feeds = feeds
        self.snapshot = snapshot
        self.ns = Namespace(db)
        # The kernel holds no inode yet: those a mount that ended left open and unnamed go.
        if dropped := self.ns.drop_unlinked():
            log.info("removed %d files that were unlinked while open when the last mount"
                     " ended", dropped)
        # What the last mount committed but may not have synced (see fs.durability).
        recover(store, db, self.ns)
        self.durability = Durability(store, db)
        db.on_commit = self.durability.committed  # names too reach the disk within 5 s
        nursery.start_soon(self.durability.run)
        self.staging = Staging(store, db, uploader, durability=self.durability,
                               on_lost=self._entry_lost)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        self._start_ns = time.time_ns()

    def _writable(self, operation: str) -> None:
        """Raise ReadOnly (``EROFS``, logged by :func:`fuse_errors` as every refusal is)
        for a change on a read-only mount."""
        if self.read_only:
            raise ReadOnly(f"refused a {operation}: this mount is read-only (--read-only);"
                           " mount without it to write")

    # -- attributes -------------------------------------------------------------------

    def _attrs(self, vnode: VNode, *, size: int = 0) -> pyfuse3.EntryAttributes:
        row, staged_size, owned, nlink, times = None, None, False, 2, None
        match vnode:
            case UserInode(inode_id=inode_id):
                row = self.db.inode(inode_id)
                staged_size = self.staging.staged_size(inode_id)
            case FeedDir(feed=feed) | SubfeedFile(feed=feed):
                owned = self.feeds is not None and self.feeds.owned(feed)
            case ChannelDir(channel=channel):
                nlink = self.ns.directory_links(vnode)
                times = self.db.channel_times(channel)
            case vnodes.Root():
                nlink = 2 + len(self.ns.channel_names())
            case vnodes.FeedsDir():
                nlink = 1  # not counted: "unknown" to find(1), which then looks
        p = attributes(vnode, start_ns=self._start_ns, size=size, inode=row,
                       staged_size=staged_size, owned=owned, nlink=nlink, times=times)
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.ns.inode(vnode)
        a.st_mode, a.st_nlink, a.st_size, a.st_blocks = p.mode, p.nlink, p.size, p.blocks
        a.st_uid = self.uid if p.uid is None else p.uid
        a.st_gid = self.gid if p.gid is None else p.gid
        a.st_rdev = p.rdev
        a.st_blksize = BLOCK_SIZE
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = p.atime_ns, p.mtime_ns, p.ctime_ns
        a.entry_timeout = a.attr_timeout = p.timeout
        return a

    async def _attrs_async(self, vnode: VNode) -> pyfuse3.EntryAttributes:
        size = 0
        match vnode:
            case HashFile(channel=channel, sha1=sha1, manifest=manifest):
                size = await self.resolver.size(channel, sha1, manifest=manifest)
            case SubfeedFile(channel=channel, feed=feed, subfeed=subfeed):
                size = await self._feeds().size(channel, feed, subfeed)
        return self._attrs(vnode, size=size)

    def _entry(self, attrs: pyfuse3.EntryAttributes) -> pyfuse3.EntryAttributes:
        """``attrs`` as the answer to a request that gives the kernel an inode (lookup,
        create, mkdir, mknod, symlink, link): it holds the inode until it forgets it."""
        self.ns.remember(attrs.st_ino)
        return attrs

    def _entry_of(self, row: Inode) -> pyfuse3.EntryAttributes:
        """:meth:`_entry` of one of the user's inodes, just made or linked."""
        return self._entry(self._attrs(UserInode(row.channel, row.id)))

    def _feeds(self) -> FeedFiles:
        if self.feeds is None:
            raise NotFound("feeds are not served by this mount")
        return self.feeds

    # -- lookups -------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        with fuse_errors("lookup"):
            parent = self.ns.vnode(parent_inode)
            text = os.fsdecode(name)
            if text == "..":
                return self._entry(await self._attrs_async(self.ns.parent_of(parent)))
            return self._entry(await self._attrs_async(self.ns.lookup(parent, text)))

    async def getattr(self, inode, ctx):
        with fuse_errors("getattr"):
            return await self._attrs_async(self.ns.vnode(inode))

    async def forget(self, inode_list):
        for inode, count in inode_list:
            try:
                if self.ns.forget(inode, count):
                    log.debug("inode %d had no name left and is forgotten: removed", inode)
            except Exception:  # forget has no answer: a failure here is only logged
                log.exception("forget(%d)", inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        with fuse_errors("setattr"):
            self._writable("setattr")
            self.durability.committed()
            vnode = self.ns.vnode(inode)
            if not isinstance(vnode, UserInode):
                if isinstance(vnode, SubfeedFile) and not (
                        fields.update_size or fields.update_mode or fields.update_uid
                        or fields.update_gid):
                    # The kernel's own times after an append: subfeed files keep none.
                    return await self._attrs_async(vnode)
                raise ReadOnly(f"{vnode} cannot be changed")
            row = self.db.inode(vnode.inode_id)
            if fields.update_size:
                if row.is_dir:
                    raise IsADirectory("a directory has no size to set")
                await self.staging.truncate(row.id, attr.st_size)
            if fields.update_mtime:
                self.staging.set_mtime(row.id, attr.st_mtime_ns)
            self.ns.set_attributes(
                vnode,
                mode=attr.st_mode if fields.update_mode else None,
                uid=attr.st_uid if fields.update_uid else None,
                gid=attr.st_gid if fields.update_gid else None,
                atime_ns=attr.st_atime_ns if fields.update_atime else None,
                mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
                ctime_ns=attr.st_ctime_ns if fields.update_ctime else None)
            return self._attrs(vnode)

    async def readlink(self, inode, ctx):
        with fuse_errors("readlink"):
            vnode = self.ns.vnode(inode)
            target = (self.db.inode(vnode.inode_id).target
                      if isinstance(vnode, UserInode) else None)
            if target is None:
                raise InvalidInput("not a symbolic link")
            return target

    # -- directories ---------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        with fuse_errors("opendir"):
            vnode = self.ns.vnode(inode)  # not a directory: the namespace says NotADirectory
            names: Iterable[str] = ()
            match vnode:
                case vnodes.FeedsDir():
                    names = self._feeds().feed_ids()
                case FeedDir(feed=feed):
                    names = self._feeds().subfeed_names(feed)
            handle = DirHandle()
            if isinstance(vnode, ChannelDir | UserInode):
                handle.names_of = self.ns.directory(vnode)
                handle.generation = self.ns.generation(*handle.names_of)
            for name, child in self.ns.children(vnode, names):
                size = 0
                if isinstance(child, SubfeedFile):
                    size = len(self._feeds().content(child.feed, child.subfeed))
                handle.entries.append((name, self._attrs(child, size=size)))
            return self._new_handle(handle)

    async def readdir(self, fh, start_id, token):
        with fuse_errors("readdir"):
            handle = self._handles[fh]
            assert isinstance(handle, DirHandle)  # opened by opendir
            where = handle.names_of
            stale = where is not None and self.ns.generation(*where) != handle.generation
            for index in range(start_id, len(handle.entries)):
                name, attrs = handle.entries[index]
                if stale and attrs.st_ino >= INODE_BASE:
                    # Names changed since the listing: an entry must not give the kernel
                    # an inode its name no longer has (one replaced by rename may be gone).
                    assert where is not None
                    row = self.db.lookup(where[0], where[1], name)
                    if row is None:
                        continue  # removed meanwhile
                    attrs = self._attrs(UserInode(row.channel, row.id))
                # pyfuse3 answers READDIRPLUS: each entry given is a lookup.
                if not pyfuse3.readdir_reply(token, os.fsencode(name), attrs, index + 1):
                    break
                self.ns.remember(attrs.st_ino)

    async def releasedir(self, fh):
        self._handles.pop(fh, None)

    async def mkdir(self, parent_inode, name, mode, ctx):
        with fuse_errors("mkdir"):
            self._writable("mkdir")
            row = self.ns.make(self.ns.vnode(parent_inode), os.fsdecode(name),
                               mode=stat.S_IFDIR | (mode & ~ctx.umask & 0o7777),
                               uid=ctx.uid, gid=ctx.gid)
            return self._entry_of(row)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        with fuse_errors("mknod"):
            self._writable("mknod")
            kind = stat.S_IFMT(mode) or stat.S_IFREG
            if kind == stat.S_IFDIR:
                raise InvalidInput("mknod makes no directories (mkdir does)")
            parent = self.ns.vnode(parent_inode)
            if kind == stat.S_IFREG:
                channel, _ = self.ns.directory(parent)
                await self._require_provide(channel)
            row = self.ns.make(parent, os.fsdecode(name),
                               mode=kind | (mode & ~ctx.umask & 0o7777), uid=ctx.uid,
                               gid=ctx.gid, rdev=rdev if kind in (stat.S_IFCHR, stat.S_IFBLK)
                               else 0)
            return self._entry_of(row)

    async def symlink(self, parent_inode, name, target, ctx):
        with fuse_errors("symlink"):
            self._writable("symlink")
            row = self.ns.make(self.ns.vnode(parent_inode), os.fsdecode(name),
                               mode=stat.S_IFLNK | 0o777, uid=ctx.uid, gid=ctx.gid,
                               target=bytes(target))
            return self._entry_of(row)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        with fuse_errors("link"):
            self._writable("link")
            row = self.ns.link(self.ns.vnode(inode), self.ns.vnode(new_parent_inode),
                               os.fsdecode(new_name))
            return self._entry_of(row)

    async def rmdir(self, parent_inode, name, ctx):
        with fuse_errors("rmdir"):
            self._writable("rmdir")
            self.ns.rmdir(self.ns.vnode(parent_inode), os.fsdecode(name))

    async def unlink(self, parent_inode, name, ctx):
        with fuse_errors("unlink"):
            self._writable("unlink")
            self.ns.unlink(self.ns.vnode(parent_inode), os.fsdecode(name))

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        with fuse_errors("rename"):
            self._writable("rename")
            if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):  # RENAME_WHITEOUT: overlayfs's
                raise InvalidInput(f"rename flags {flags:#x} are not supported")
            old_parent, new_parent = self.ns.vnode(parent_inode_old), self.ns.vnode(parent_inode_new)
            text_old, text_new = os.fsdecode(name_old), os.fsdecode(name_new)
            await self._before_replacing(old_parent, text_old, new_parent, text_new)
            self.ns.rename(old_parent, text_old, new_parent, text_new,
                           noreplace=bool(flags & RENAME_NOREPLACE),
                           exchange=bool(flags & RENAME_EXCHANGE))

    async def _before_replacing(self, old_parent: VNode, old: str, new_parent: VNode,
                                new: str) -> None:
        """Before a rename puts a file just written over an existing name (an editor's or
        rsync's "write a temporary file, rename it over"), its content goes to the disk,
        as ext4 does (auto_da_alloc): a power cut then leaves the old file or the new one,
        never neither (the new one would be taken back, and the old one is gone)."""
        try:
            source = self.ns.lookup(old_parent, old)
            self.ns.lookup(new_parent, new)
        except NotFound:
            return  # no name is replaced
        if not isinstance(source, UserInode):
            return
        row = self.db.inode(source.inode_id)
        if row.is_file and row.sha1 is not None and row.size:
            await trio.to_thread.run_sync(self.store.sync_pending, row.sha1)

    # -- files -----------------------------------------------------------------------------

    def _new_handle(self, handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    async def _require_provide(self, channel: str) -> None:
        perms = await self.channels.permissions(channel)
        if "provideFiles" not in perms and not self.channels.hub_recently_failed(channel):
            try:  # it may have just been granted: ask the hub before refusing
                perms = (await self.channels.refresh(channel)).permissions
            except Exception as exc:
                log.debug("permission refresh failed: %s", exc)
        if "provideFiles" not in perms:
            log.warning(
                "refused to create a file in channel %s: node %s lacks the provideFiles"
                " permission; the channel owner can grant it with `kachery-fs hub channel"
                " authorize %s %s --add provideFiles`",
                channel, self.channels.node_id, channel, self.channels.node_id)
            raise PermissionDenied(f"no provideFiles permission on {channel}")

    async def create(self, parent_inode, name, mode, flags, ctx):
        with fuse_errors("create"):
            self._writable("create")
            parent = self.ns.vnode(parent_inode)
            text = os.fsdecode(name)
            if isinstance(parent, FeedDir):  # a new subfeed, by appending to it
                vnode = self.ns.lookup(parent, text)
                assert isinstance(vnode, SubfeedFile)  # a feed directory holds only those
                return await self._open_subfeed(vnode, flags), self._entry(self._attrs(vnode))
            channel, parent_id = self.ns.directory(parent)
            await self._require_provide(channel)
            try:
                row = self.ns.make(parent, text, mode=stat.S_IFREG | (mode & ~ctx.umask & 0o7777),
                                   uid=ctx.uid, gid=ctx.gid, committed=False)
                truncate = True
            except Conflict:  # created meanwhile, by another process
                existing = self.db.lookup(channel, parent_id, text)
                if flags & os.O_EXCL or existing is None:
                    raise
                if not existing.is_file:
                    raise IsADirectory(f"{text!r} is not a file") from None
                row, truncate = existing, bool(flags & os.O_TRUNC)
            vnode = UserInode(row.channel, row.id)
            fh = await self._open_write(vnode, truncate=truncate)
            return pyfuse3.FileInfo(fh=fh), self._entry(self._attrs(vnode))

    async def open(self, inode, flags, ctx):
        with fuse_errors("open"):
            vnode = self.ns.vnode(inode)
            accmode = flags & os.O_ACCMODE
            if accmode != os.O_RDONLY or flags & os.O_TRUNC:
                self._writable("open to write")
            if isinstance(vnode, HashFile):
                if accmode != os.O_RDONLY:
                    raise ReadOnly("content under sha1/ is read-only")
                content = await self.resolver.open(vnode.channel, vnode.sha1,
                                                   manifest=vnode.manifest)
                return pyfuse3.FileInfo(fh=self._new_handle(Handle(vnode, content=content)),
                                        keep_cache=True)
            if isinstance(vnode, SubfeedFile):
                return await self._open_subfeed(vnode, flags)
            if not isinstance(vnode, UserInode):
                raise IsADirectory("a directory cannot be opened as a file")
            entry = self.db.inode(vnode.inode_id)
            if entry.is_dir:
                raise IsADirectory("a directory cannot be opened as a file")
            if not entry.is_file:  # the kernel opens special files itself
                raise InvalidInput("not a regular file")
            if accmode != os.O_WRONLY:
                # At the open: a read the kernel answers from its cache never reaches us.
                self.ns.accessed(vnode)
            if accmode != os.O_RDONLY:
                await self._require_provide(entry.channel)
                fh = await self._open_write(vnode, truncate=bool(flags & os.O_TRUNC))
                return pyfuse3.FileInfo(fh=fh)
            writer = self.staging.open_read(entry.id)
            if writer is not None:  # being written: read what is written so far
                return pyfuse3.FileInfo(fh=self._new_handle(Handle(vnode, writer=writer)))
            if entry.sha1 is None or entry.size == 0:  # nothing to read, nor to fetch
                content = LocalContent(os.open(os.devnull, os.O_RDONLY), 0)
            else:
                content = await self.resolver.open(entry.channel, entry.sha1)
            return pyfuse3.FileInfo(fh=self._new_handle(Handle(vnode, content=content)),
                                    keep_cache=True)

    async def _open_subfeed(self, vnode: SubfeedFile, flags: int) -> pyfuse3.FileInfo:
        """Subfeed files are read through (``direct_io``: never stale), and appendable only,
        by the feed's owner."""
        feeds = self._feeds()
        handle = Handle(vnode)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            if not feeds.owned(vnode.feed):
                raise PermissionDenied(f"feed {vnode.feed[:12]}… is owned by another node:"
                                       " only its owner can append")
            if flags & os.O_TRUNC:
                raise PermissionDenied("a subfeed is append-only: use >>, not >")
            await self._require_feed_provide(vnode.channel)
            feeds.created(vnode.feed, vnode.subfeed)
            handle.pending = bytearray()
        return pyfuse3.FileInfo(fh=self._new_handle(handle), direct_io=True)

    async def _require_feed_provide(self, channel: str) -> None:
        if "provideFeeds" not in await self.channels.permissions(channel):
            log.warning("refused an append to a feed in channel %s: node %s lacks the"
                        " provideFeeds permission", channel, self.channels.node_id)
            raise PermissionDenied(f"no provideFeeds permission on {channel}")

    async def _open_write(self, vnode: UserInode, *, truncate: bool) -> int:
        writer = await self.staging.open_write(vnode.inode_id, truncate=truncate)
        return self._new_handle(Handle(vnode, writer=writer, writes=True))

    async def read(self, fh, off, size):
        with fuse_errors("read"):
            handle = self._handles[fh]
            assert isinstance(handle, Handle)  # the kernel reads files only
            vnode = handle.vnode
            if isinstance(vnode, SubfeedFile):
                data = self._feeds().content(vnode.feed, vnode.subfeed)
                return data[off:off + size]
            if handle.writer is not None:
                return await self.staging.read(handle.writer, off, size)
            assert handle.content is not None  # a file open to read has content or a writer
            started = time.monotonic()
            try:
                data = await handle.content.read(off, size)
                metrics.READ_SECONDS.observe(time.monotonic() - started)
                metrics.SERVED_BYTES.labels("mount").inc(len(data))
                return data
            except Exception:
                # A whole download that failed may have had a bad copy's size: look the
                # name up again. A chunk that failed fails alone (the size came from a
                # trusted manifest, and the other chunks stay readable), unless the
                # manifest lied: then the pages served from it are another file's bytes,
                # and every name of that content is looked up and read again.
                content = handle.content
                if isinstance(content, SharedChunks):
                    if content.chunked.lied:
                        self._invalidate(self.ns.inode(vnode))
                        if isinstance(vnode, HashFile):
                            for name in (HashFile(vnode.channel, vnode.sha1),
                                         HashFile(vnode.channel, vnode.sha1,
                                                  content.chunked.manifest.hash)):
                                self._invalidate(self.ns.inode(name))
                                self._renew(name)
                elif isinstance(vnode, HashFile):
                    self._invalidate(self.ns.inode(vnode))
                    self._renew(vnode)
                raise

    async def feed_grew(self, channel: str, feed_id: str, name: str, old_size: int,
                        data: bytes) -> None:
        """A subfeed file grew (messages arrived): hand the kernel the new bytes. With the
        writeback cache the kernel keeps file sizes itself and ignores ours; a store
        notification is what extends the size it shows, so ``tail -f`` sees the growth."""
        inode = self.ns.inode(SubfeedFile(channel, feed_id, name))
        try:
            await trio.to_thread.run_sync(pyfuse3.notify_store, inode, old_size, data)
        except OSError as exc:  # the kernel does not know the inode (never looked up)
            log.debug("notify_store(%d): %s", inode, exc)

    def _invalidate(self, inode: int) -> None:
        """Drop the kernel's cached pages of a file whose content failed (never raises)."""

        async def invalidate():
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except Exception as exc:
                log.debug("invalidate_inode(%d): %s", inode, exc)

        self.nursery.start_soon(invalidate)

    def _entry_lost(self, inode_id: int) -> None:
        """A version of a named entry was dropped (see ``Staging.lose``): with the writeback
        cache the kernel holds the new pages and size; drop them, so that reads show the
        content the name still has."""
        self._invalidate(self.ns.inode_number(inode_id))

    def _renew(self, vnode: HashFile) -> None:
        """Make the kernel look ``sha1/<hash>`` up again, into a new inode (see
        ``Namespace.renumber``): its content failed, and the size it was told may be a bad
        copy's (never raises)."""
        parent = self.ns.inode(self.ns.parent_of(vnode))
        self.ns.renumber(vnode)

        async def invalidate():
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent,
                                              os.fsencode(vnode.name))
            except Exception as exc:
                log.debug("invalidate_entry(%d, %s): %s", parent, vnode.name, exc)

        self.nursery.start_soon(invalidate)

    async def write(self, fh, off, buf):
        with fuse_errors("write"):
            self._writable("write")
            handle = self._handles[fh]
            assert isinstance(handle, Handle)  # the kernel writes files only
            if handle.pending is not None:  # appending to a subfeed: whole lines only
                data = bytes(handle.pending) + bytes(buf)
                cut = data.rfind(b"\n") + 1
                v = handle.vnode
                assert isinstance(v, SubfeedFile)  # only those are pending
                await self._feeds().append_lines(v.channel, v.feed, v.subfeed, data[:cut])
                handle.pending = bytearray(data[cut:])
                return len(buf)
            if not handle.writes:
                raise pyfuse3.FUSEError(errno.EBADF)
            assert handle.writer is not None  # a file open to write has its writer
            return await self.staging.write(handle.writer, off, buf)

    async def flush(self, fh):
        with fuse_errors("flush"):
            handle = self._handles.get(fh)
            assert handle is None or isinstance(handle, Handle)  # flushed: files only
            if handle is not None and handle.pending:  # a last line without its newline
                data, handle.pending = bytes(handle.pending), bytearray()
                v = handle.vnode
                assert isinstance(v, SubfeedFile)  # only those are pending
                await self._feeds().append_lines(v.channel, v.feed, v.subfeed, data)
                return
            if handle is None or not handle.writes:
                return
            # close(2) waits for this: a `cp` that has returned has its file in the store.
            assert handle.writer is not None  # a file open to write has its writer
            await self.staging.flush(handle.writer)

    async def fsync(self, fh, datasync):
        with fuse_errors("fsync"):
            handle = self._handles.get(fh)
            assert handle is None or isinstance(handle, Handle)  # fsynced: files only
            if handle is not None and handle.writes:
                assert handle.writer is not None  # a file open to write has its writer
                await self.staging.fsync(handle.writer)
            else:  # sync(1) FILE opens it read-only: what is committed reaches the disk
                await self.durability.sync()

    async def fsyncdir(self, fh, datasync):
        with fuse_errors("fsyncdir"):
            # Names are in the node database, which a sync puts on the disk with the rest.
            await self.durability.sync()

    async def release(self, fh):
        with fuse_errors("release"):
            handle = self._handles.pop(fh, None)
            if handle is None:
                return
            assert isinstance(handle, Handle)  # directories have releasedir
            if handle.content is not None:
                handle.content.close()
            writer = handle.writer
            if writer is None:
                return
            if not handle.writes:
                self.staging.close_read(writer)
                return
            await self.staging.close_write(writer)

    # -- extended attributes ----------------------------------------------------------------

    async def listxattr(self, inode, ctx):
        with fuse_errors("listxattr"):
            vnode = self.ns.vnode(inode)
            if isinstance(vnode, HashFile) or (isinstance(vnode, UserInode)
                                               and self.db.inode(vnode.inode_id).is_file):
                return [XATTR_URI, XATTR_STATUS]
            if isinstance(vnode, ChannelDir) and self.snapshot is not None:
                return [XATTR_STATUS]
            return []

    async def getxattr(self, inode, name, ctx):
        # We keep no security labels and no POSIX ACLs: ENOTSUP for names outside user.*,
        # as a file system without them answers, not ENODATA. `ls -l` asks for
        # security.selinux and system.posix_acl_access of every name, and the kernel never
        # caches extended attributes: after ENOTSUP, ls stops asking for the rest of its
        # run (10,000 names: 2 requests instead of 20,000).
        if not name.startswith(b"user."):
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        with fuse_errors("getxattr"):
            vnode = self.ns.vnode(inode)
            match vnode:
                case ChannelDir(channel=channel):
                    if name == XATTR_STATUS and self.snapshot is not None:
                        return status.render(self.snapshot(), channel=channel).encode()
                case HashFile(sha1=sha1, manifest=manifest):
                    if name == XATTR_URI:
                        return self._uri(sha1, manifest=manifest)
                    if name == XATTR_STATUS:
                        return b"local" if self.store.has(sha1) else b"remote"
                case UserInode(inode_id=inode_id):
                    entry = self.db.inode(inode_id)
                    if entry.is_file and name in (XATTR_URI, XATTR_STATUS):
                        if self.staging.is_writing(entry.id) or entry.sha1 is None:
                            return b"" if name == XATTR_URI else b"writing"
                        if name == XATTR_URI:  # labelled with a name it has (it may have none)
                            place = self.db.name_of(entry.id)
                            # A large file's manifest is made after its commit: wait for it,
                            # within a deadline (it goes on being made).
                            with trio.move_on_after(MANIFEST_WAIT_S):
                                known = await self.uploader.manifest_of(entry.sha1,
                                                                        entry.size)
                                return self._uri(entry.sha1, place[1] if place else None,
                                                 manifest=known[0] if known else None)
                            log.info("getxattr user.kachery.uri of sha1://%s: its manifest is"
                                     " still being made; EAGAIN (ask again)", entry.sha1)
                            raise pyfuse3.FUSEError(errno.EAGAIN)
                        return self.uploader.status(entry.channel, entry.sha1).encode()
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    def _uri(self, sha1: str, label: str | None = None, *,
             manifest: str | None = None) -> bytes:
        """``user.kachery.uri``: kachery's form with ``?manifest=`` for a file with one (the
        one named, else one on record)."""
        if manifest is None:
            known = self.store.cache.known_manifest(sha1)
            manifest = known[0] if known is not None else None
        return os.fsencode(format_uri(sha1, label, manifest=manifest))

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def statfs(self, ctx):
        with fuse_errors("statfs"):
            st = os.statvfs(self.store.root)  # the node directory
            data = pyfuse3.StatvfsData()
            for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                         "f_ffree", "f_favail", "f_namemax"):
                setattr(data, attr, getattr(st, attr))
            return data


__all__ = ["Operations", "ROOT_INODE"]
