"""The pyfuse3 adapter: translate kernel requests into namespace, resolver and store calls.

Every handler body runs inside ``fuse_errors`` so that only ``FUSEError`` leaves it.
Writes are staged in the store's temp directory, hashed as they arrive, and committed
into the store when the file is closed (on ``flush``, which ``close(2)`` waits for),
then queued for upload.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from .. import status
from ..errors import Conflict, NotFound, PermissionDenied, ReadOnly
from ..feeds import FeedFiles
from ..node import Node
from ..resolver import Content, LocalContent, Resolver
from ..store import StagingFile
from ..uploader import Uploader
from ..uris import format_uri
from .errno_map import fuse_errors
from .namespace import ROOT_INODE, Namespace, VNode

log = logging.getLogger(__name__)

IMMUTABLE_TIMEOUT = 24 * 3600.0  # sha1/<hash> never changes
MUTABLE_TIMEOUT = 1.0
XATTR_URI = b"user.kachery.uri"
XATTR_STATUS = b"user.kachery.status"


@dataclass
class Writer:
    """The staging file shared by every open handle of one named entry being written.

    ``lock`` serialises making the staging file and committing it: the kernel sends
    writes (and reads) of one file concurrently, and without it two of them could each
    make a staging file, or one could copy the old content while a commit is in flight.
    """

    entry_id: int
    staging: StagingFile | None = None
    handles: int = 0  # open handles that may write
    readers: int = 0  # read-only handles opened while it was being written
    dirty: bool = False
    unqueued: bool = False  # committed, but the upload is queued only at the last close
    #: Why the version being written could not be saved (a full disk at a write or at
    #: the commit); it was dropped, and every later write, flush, fsync and close of the
    #: open handles fails with this (see _commit_writer).
    lost: BaseException | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)

    def check_lost(self) -> None:
        if self.lost is not None:
            raise self.lost.with_traceback(None)


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


class Operations(pyfuse3.Operations):
    enable_writeback_cache = True

    def __init__(self, node: Node, resolver: Resolver, uploader: Uploader, *,
                 nursery: trio.Nursery, provider=None, feeds: FeedFiles | None = None):
        super().__init__()
        self.provider = provider
        self.feeds = feeds
        self.node = node
        self.resolver = resolver
        self.uploader = uploader
        self.nursery = nursery
        self.ns = Namespace(node.db)
        self.uid = os.getuid()
        self.gid = os.getgid()
        self._handles: dict[int, Handle | DirHandle] = {}
        self._next_fh = 1
        self._writers: dict[int, Writer] = {}
        self._start_ns = time.time_ns()

    # -- attributes -------------------------------------------------------------------

    def _attrs(self, vnode: VNode, *, size: int = 0) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.ns.inode(vnode)
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 1 << 17
        a.st_atime_ns = a.st_ctime_ns = a.st_mtime_ns = self._start_ns
        if vnode.kind == "entry":
            entry = self.node.db.entry(vnode.entry_id)
            writer = self._writers.get(entry.id)
            if entry.is_dir:
                a.st_mode = stat.S_IFDIR | (entry.mode & 0o7777)
                a.st_nlink = 2
            else:
                a.st_mode = stat.S_IFREG | (entry.mode & 0o7777)
                a.st_nlink = 1
                a.st_size = writer.staging.size if writer and writer.staging else entry.size
            a.st_mtime_ns = a.st_ctime_ns = entry.mtime_ns
            a.entry_timeout = a.attr_timeout = MUTABLE_TIMEOUT
        elif vnode.kind == "hash":
            a.st_mode = stat.S_IFREG | 0o444
            a.st_nlink = 1
            a.st_size = size
            a.entry_timeout = a.attr_timeout = IMMUTABLE_TIMEOUT
        elif vnode.kind == "subfeed":
            # Grows as messages arrive: no attribute caching, so `tail -f` sees the size.
            owned = self.feeds is not None and self.feeds.owned(vnode.feed)
            a.st_mode = stat.S_IFREG | (0o644 if owned else 0o444)
            a.st_nlink = 1
            a.st_size = size
            a.entry_timeout = a.attr_timeout = 0
        elif vnode.kind == "feed":
            owned = self.feeds is not None and self.feeds.owned(vnode.feed)
            a.st_mode = stat.S_IFDIR | (0o755 if owned else 0o555)
            a.st_nlink = 2
            a.entry_timeout = a.attr_timeout = MUTABLE_TIMEOUT
        else:
            writable = vnode.kind == "channel"
            a.st_mode = stat.S_IFDIR | (0o755 if writable else 0o555)
            a.st_nlink = 2
            a.entry_timeout = a.attr_timeout = MUTABLE_TIMEOUT
        a.st_blocks = (a.st_size + 511) // 512
        return a

    async def _attrs_async(self, vnode: VNode) -> pyfuse3.EntryAttributes:
        size = 0
        if vnode.kind == "hash":
            size = await self.resolver.size(vnode.channel, vnode.sha1)
        elif vnode.kind == "subfeed":
            size = await self._feeds().size(vnode.channel, vnode.feed, vnode.subfeed)
        return self._attrs(vnode, size=size)

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
                return await self._attrs_async(self.ns.parent_of(parent))
            return await self._attrs_async(self.ns.lookup(parent, text))

    async def getattr(self, inode, ctx):
        with fuse_errors("getattr"):
            return await self._attrs_async(self.ns.vnode(inode))

    async def forget(self, inode_list):
        pass  # inodes are cheap and stable for the life of the mount

    async def setattr(self, inode, attr, fields, fh, ctx):
        with fuse_errors("setattr"):
            vnode = self.ns.vnode(inode)
            if vnode.kind != "entry":
                if fields.update_size or fields.update_mode:
                    raise ReadOnly("read-only")
                return await self._attrs_async(vnode)
            entry = self.node.db.entry(vnode.entry_id)
            if fields.update_size:
                if entry.is_dir:
                    raise pyfuse3.FUSEError(errno.EISDIR)
                writer = self._writers.get(entry.id)
                if writer is not None and writer.handles > 0:
                    staging = await self._staging(writer, truncate=attr.st_size == 0)
                    staging.truncate(attr.st_size)
                    writer.dirty = True
                else:
                    # truncate(2) on a file nobody writes: a new version of it, committed
                    # and queued now.
                    writer = self._writer(entry.id)
                    writer.lost = None  # whoever lost a version has closed it
                    try:
                        staging = await self._staging(writer, truncate=attr.st_size == 0)
                        staging.truncate(attr.st_size)
                        writer.dirty = True
                        await self._commit_writer(writer)
                        self._queue_upload(writer)
                    finally:
                        self._forget_writer(writer)
            if fields.update_mode:
                self.node.db.set_mode(entry.id, attr.st_mode)
            if fields.update_mtime:
                self.node.db.set_mtime(entry.id, attr.st_mtime_ns)
            return self._attrs(vnode)

    # -- directories ---------------------------------------------------------------------

    async def opendir(self, inode, ctx):
        with fuse_errors("opendir"):
            vnode = self.ns.vnode(inode)
            if not vnode.is_dir and not (vnode.kind == "entry"
                                         and self.node.db.entry(vnode.entry_id).is_dir):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            local, names = (), ()
            if vnode.kind == "sha1dir":
                local = await trio.to_thread.run_sync(lambda: list(self.node.store.iter_hashes()))
            elif vnode.kind == "feedsdir":
                names = self._feeds().feed_ids()
            elif vnode.kind == "feed":
                names = self._feeds().subfeed_names(vnode.feed)
            entries = []
            for name, child in self.ns.children(vnode, local, names):
                size = 0
                if child.kind == "hash":
                    size = self.resolver.local_size(child.sha1) or 0
                elif child.kind == "subfeed":
                    size = len(self.feeds.content(child.feed, child.subfeed))
                entries.append((os.fsencode(name), self._attrs(child, size=size)))
            return self._new_handle(DirHandle(entries))

    async def readdir(self, fh, start_id, token):
        with fuse_errors("readdir"):
            handle = self._handles[fh]
            for index in range(start_id, len(handle.entries)):
                name, attrs = handle.entries[index]
                if not pyfuse3.readdir_reply(token, name, attrs, index + 1):
                    break

    async def releasedir(self, fh):
        self._handles.pop(fh, None)

    async def mkdir(self, parent_inode, name, mode, ctx):
        with fuse_errors("mkdir"):
            parent = self._writable_dir(parent_inode)
            entry = self._create_entry(parent, os.fsdecode(name), is_dir=True,
                                       mode=mode & ~ctx.umask)
            return self._attrs(VNode("entry", entry.channel, entry_id=entry.id))

    async def rmdir(self, parent_inode, name, ctx):
        with fuse_errors("rmdir"):
            child = self.ns.lookup(self.ns.vnode(parent_inode), os.fsdecode(name))
            if child.kind != "entry":
                raise PermissionDenied("cannot remove a built-in directory")
            entry = self.node.db.entry(child.entry_id)
            if not entry.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            try:
                self.node.db.delete_entry(entry.id)
            except Conflict:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY) from None

    async def unlink(self, parent_inode, name, ctx):
        with fuse_errors("unlink"):
            child = self.ns.lookup(self.ns.vnode(parent_inode), os.fsdecode(name))
            if child.kind != "entry":
                raise ReadOnly("content under sha1/ cannot be removed through the mount")
            entry = self.node.db.entry(child.entry_id)
            if entry.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            self.node.db.delete_entry(entry.id)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        with fuse_errors("rename"):
            old_parent = self.ns.vnode(parent_inode_old)
            child = self.ns.lookup(old_parent, os.fsdecode(name_old))
            if child.kind != "entry":
                raise PermissionDenied("built-in entries cannot be renamed")
            new_parent = self._writable_dir(parent_inode_new)
            if new_parent.channel != child.channel:
                raise pyfuse3.FUSEError(errno.EXDEV)
            new_name = os.fsdecode(name_new)
            if new_parent.kind == "channel" and new_name in ("sha1", "feeds"):
                raise pyfuse3.FUSEError(errno.EEXIST)
            if flags & getattr(pyfuse3, "RENAME_EXCHANGE", 2):
                raise pyfuse3.FUSEError(errno.EINVAL)
            existing = self.node.db.lookup(new_parent.channel, self.ns.entry_parent(new_parent),
                                           new_name)
            if existing is not None and flags & getattr(pyfuse3, "RENAME_NOREPLACE", 1):
                raise pyfuse3.FUSEError(errno.EEXIST)
            if existing is not None and existing.is_dir != self.node.db.entry(child.entry_id).is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR if existing.is_dir else errno.ENOTDIR)
            if self._is_ancestor(child, new_parent):
                raise pyfuse3.FUSEError(errno.EINVAL)
            try:
                self.node.db.rename_entry(child.entry_id, self.ns.entry_parent(new_parent), new_name)
            except Conflict:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY) from None

    def _is_ancestor(self, maybe_ancestor: VNode, vnode: VNode) -> bool:
        while vnode.kind == "entry":
            if vnode.entry_id == maybe_ancestor.entry_id:
                return True
            vnode = self.ns.parent_of(vnode)
        return False

    def _writable_dir(self, inode: int) -> VNode:
        vnode = self.ns.vnode(inode)
        if vnode.kind == "channel":
            return vnode
        if vnode.kind == "entry" and self.node.db.entry(vnode.entry_id).is_dir:
            return vnode
        if vnode.kind == "entry":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if vnode.kind == "root":
            raise PermissionDenied("channels appear here when joined (`kachery-fs join`)")
        raise ReadOnly(f"{vnode.kind} is read-only")

    def _create_entry(self, parent: VNode, name: str, *, is_dir: bool, mode: int):
        if parent.kind == "channel" and name in ("sha1", "feeds"):
            raise Conflict(f"{name!r} is reserved")
        return self.node.db.create_entry(parent.channel, self.ns.entry_parent(parent), name,
                                         is_dir=is_dir, mode=mode & 0o7777)

    # -- files -----------------------------------------------------------------------------

    def _new_handle(self, handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        return fh

    async def _require_provide(self, channel: str) -> None:
        perms = await self.node.permissions(channel)
        if "provideFiles" not in perms and not self.node.hub_recently_failed(channel):
            try:  # it may have just been granted: ask the hub before refusing
                perms = (await self.node.refresh_channel(channel)).permissions
            except Exception as exc:
                log.debug("permission refresh failed: %s", exc)
        if "provideFiles" not in perms:
            log.warning(
                "refused to create a file in channel %s: node %s lacks the provideFiles"
                " permission; the channel owner can grant it with `kachery-fs hub channel"
                " authorize %s %s --add provideFiles`",
                channel, self.node.node_id, channel, self.node.node_id)
            raise PermissionDenied(f"no provideFiles permission on {channel}")

    async def create(self, parent_inode, name, mode, flags, ctx):
        with fuse_errors("create"):
            feed_dir = self.ns.vnode(parent_inode)
            if feed_dir.kind == "feed":  # a new subfeed, by appending to it
                vnode = self.ns.lookup(feed_dir, os.fsdecode(name))
                return await self._open_subfeed(vnode, flags), self._attrs(vnode)
            parent = self._writable_dir(parent_inode)
            await self._require_provide(parent.channel)
            text = os.fsdecode(name)
            existing = self.node.db.lookup(parent.channel, self.ns.entry_parent(parent), text)
            if existing is not None:  # created meanwhile by another process
                if flags & os.O_EXCL:
                    raise pyfuse3.FUSEError(errno.EEXIST)
                entry = existing
                truncate = bool(flags & os.O_TRUNC)
            else:
                entry = self._create_entry(parent, text, is_dir=False, mode=mode & ~ctx.umask)
                truncate = True
            vnode = VNode("entry", entry.channel, entry_id=entry.id)
            fh = await self._open_write(vnode, truncate=truncate)
            return pyfuse3.FileInfo(fh=fh), self._attrs(vnode)

    async def open(self, inode, flags, ctx):
        with fuse_errors("open"):
            vnode = self.ns.vnode(inode)
            accmode = flags & os.O_ACCMODE
            if vnode.kind == "hash":
                if accmode != os.O_RDONLY:
                    raise ReadOnly("content under sha1/ is read-only")
                content = await self.resolver.open(vnode.channel, vnode.sha1)
                return pyfuse3.FileInfo(fh=self._new_handle(Handle(vnode, content=content)),
                                        keep_cache=True)
            if vnode.kind == "subfeed":
                return await self._open_subfeed(vnode, flags)
            if vnode.kind != "entry":
                raise pyfuse3.FUSEError(errno.EISDIR)
            entry = self.node.db.entry(vnode.entry_id)
            if entry.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            if accmode != os.O_RDONLY:
                await self._require_provide(entry.channel)
                fh = await self._open_write(vnode, truncate=bool(flags & os.O_TRUNC))
                return pyfuse3.FileInfo(fh=fh)
            if entry.id in self._writers:  # being written: read what is written so far
                writer = self._writers[entry.id]
                writer.readers += 1
                return pyfuse3.FileInfo(fh=self._new_handle(Handle(vnode, writer=writer)))
            if entry.sha1 is None:
                content: Content = LocalContent(os.open(os.devnull, os.O_RDONLY), 0)
            else:
                content = await self.resolver.open(entry.channel, entry.sha1)
            return pyfuse3.FileInfo(fh=self._new_handle(Handle(vnode, content=content)),
                                    keep_cache=True)

    async def _open_subfeed(self, vnode: VNode, flags: int) -> pyfuse3.FileInfo:
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
        if "provideFeeds" not in await self.node.permissions(channel):
            log.warning("refused an append to a feed in channel %s: node %s lacks the"
                        " provideFeeds permission", channel, self.node.node_id)
            raise PermissionDenied(f"no provideFeeds permission on {channel}")

    def _writer(self, entry_id: int) -> Writer:
        writer = self._writers.get(entry_id)
        if writer is None:
            writer = self._writers[entry_id] = Writer(entry_id)
        return writer

    def _forget_writer(self, writer: Writer) -> None:
        if writer.handles == 0 and writer.readers == 0:
            if writer.staging is not None:  # not dirty: nothing to keep
                writer.staging.discard()
                writer.staging = None
            if self._writers.get(writer.entry_id) is writer:
                del self._writers[writer.entry_id]

    async def _open_write(self, vnode: VNode, *, truncate: bool) -> int:
        writer = self._writer(vnode.entry_id)
        if writer.handles == 0:
            writer.lost = None  # whoever lost a version has closed it (and was told)
        writer.handles += 1
        try:
            if truncate:
                await self._staging(writer, truncate=True)
                writer.dirty = True
        except BaseException:
            writer.handles -= 1
            self._forget_writer(writer)
            raise
        return self._new_handle(Handle(vnode, writer=writer, writes=True))

    async def _staging(self, writer: Writer, *, truncate: bool = False) -> StagingFile:
        """The writer's staging file: made from the committed content when there is none
        (empty when ``truncate``). Waits for a commit in flight."""
        writer.check_lost()  # never write on top of the old content instead of the lost one
        if writer.staging is not None and not (truncate and writer.staging.size):
            return writer.staging
        async with writer.lock:
            if truncate and writer.staging is not None and writer.staging.size:
                writer.staging.discard()  # O_TRUNC: a fresh file, not a copy cut to zero
                writer.staging = None
            if writer.staging is None:
                entry = self.node.db.entry(writer.entry_id)
                copy_from = None if truncate else entry.sha1
                if copy_from is not None and not self.node.store.has(copy_from):
                    raise NotFound(f"content of {entry.name!r} is no longer in the local store")
                writer.staging = await trio.to_thread.run_sync(
                    lambda: StagingFile.from_existing(self.node.store, copy_from,
                                                      truncate=copy_from is None))
            return writer.staging

    async def read(self, fh, off, size):
        with fuse_errors("read"):
            handle = self._handles[fh]
            if handle.vnode.kind == "subfeed":
                data = self._feeds().content(handle.vnode.feed, handle.vnode.subfeed)
                return data[off:off + size]
            if handle.writer is not None:
                writer = handle.writer
                async with writer.lock:  # not during a commit: the staging file moves
                    if writer.staging is not None:
                        return writer.staging.read(off, size)
                    entry = self.node.db.entry(writer.entry_id)
                if entry.sha1 is None:
                    return b""
                fd = self.node.store.open(entry.sha1)
                try:
                    return os.pread(fd, size, off)
                finally:
                    os.close(fd)
            try:
                return await handle.content.read(off, size)
            except Exception:
                if handle.vnode.kind == "hash":
                    self._invalidate(handle.vnode)
                    self._renew(handle.vnode)
                raise

    async def feed_grew(self, channel: str, feed_id: str, name: str, old_size: int,
                        data: bytes) -> None:
        """A subfeed file grew (messages arrived): hand the kernel the new bytes. With the
        writeback cache the kernel keeps file sizes itself and ignores ours; a store
        notification is what extends the size it shows, so ``tail -f`` sees the growth."""
        inode = self.ns.inode(VNode("subfeed", channel, feed=feed_id, subfeed=name))
        try:
            await trio.to_thread.run_sync(pyfuse3.notify_store, inode, old_size, data)
        except OSError as exc:  # the kernel does not know the inode (never looked up)
            log.debug("notify_store(%d): %s", inode, exc)

    def _invalidate(self, vnode: VNode) -> None:
        """Drop the kernel's cached pages of a file whose content failed (never raises)."""
        inode = self.ns.inode(vnode)

        async def invalidate():
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, False)
            except Exception as exc:
                log.debug("invalidate_inode(%d): %s", inode, exc)

        self.nursery.start_soon(invalidate)

    def _renew(self, vnode: VNode) -> None:
        """Make the kernel look ``sha1/<hash>`` up again, into a new inode (see
        ``Namespace.renumber``): its content failed, and the size it was told may be a bad
        copy's (never raises)."""
        parent = self.ns.inode(self.ns.parent_of(vnode))
        self.ns.renumber(vnode)

        async def invalidate():
            try:
                await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent,
                                              os.fsencode(vnode.sha1))
            except Exception as exc:
                log.debug("invalidate_entry(%d, %s): %s", parent, vnode.sha1, exc)

        self.nursery.start_soon(invalidate)

    async def write(self, fh, off, buf):
        with fuse_errors("write"):
            handle = self._handles[fh]
            if handle.pending is not None:  # appending to a subfeed: whole lines only
                data = bytes(handle.pending) + bytes(buf)
                cut = data.rfind(b"\n") + 1
                v = handle.vnode
                await self._feeds().append_lines(v.channel, v.feed, v.subfeed, data[:cut])
                handle.pending = bytearray(data[cut:])
                return len(buf)
            if not handle.writes:
                raise pyfuse3.FUSEError(errno.EBADF)
            writer = handle.writer
            staging = await self._staging(writer)
            writer.dirty = True
            try:
                return staging.write(off, buf)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    # This version of the file cannot be saved whole: the name keeps the
                    # previous one, and the writer hears of it at every step.
                    self._lose(writer, exc)
                raise

    async def flush(self, fh):
        with fuse_errors("flush"):
            handle = self._handles.get(fh)
            if handle is not None and handle.pending:  # a last line without its newline
                data, handle.pending = bytes(handle.pending), bytearray()
                v = handle.vnode
                await self._feeds().append_lines(v.channel, v.feed, v.subfeed, data)
                return
            if handle is None or not handle.writes:
                return
            writer = handle.writer
            writer.check_lost()
            # close(2) waits for this: commit now if this is the only open write handle,
            # so a `cp` that has returned has its file in the store. The upload is queued
            # at the last close (release), so a file written by several short-lived
            # processes sharing one descriptor is uploaded once, not once per process.
            if writer.handles == 1 and writer.dirty:
                await self._commit_writer(writer)

    async def fsync(self, fh, datasync):
        with fuse_errors("fsync"):
            handle = self._handles.get(fh)
            if handle is not None and handle.writes:
                handle.writer.check_lost()
                if handle.writer.dirty:
                    await self._commit_writer(handle.writer)

    async def release(self, fh):
        with fuse_errors("release"):
            handle = self._handles.pop(fh, None)
            if handle is None:
                return
            if handle.content is not None:
                handle.content.close()
            writer = handle.writer
            if writer is None:
                return
            if not handle.writes:
                writer.readers -= 1
                self._forget_writer(writer)
                return
            writer.handles -= 1
            try:
                if writer.handles == 0:
                    if writer.dirty:
                        await self._commit_writer(writer)
                    self._queue_upload(writer)
            finally:
                self._forget_writer(writer)

    async def _commit_writer(self, writer: Writer) -> None:
        """Commit the staging file into the store and point the entry at it.

        If that fails (a full disk: ``NoSpace``/``ENOSPC``, whether the store or the node
        database found it full), the name keeps its previous content and what was written
        is dropped. The failure stays with the writer (``lost``): every later write,
        flush, fsync and close of its open handles fails the same way, so a program that
        missed the first error (one that ignores fsync's) still learns at close that its
        file was not saved, and nothing is ever written on top of the old content in
        place of the lost one.
        """
        async with writer.lock:
            writer.check_lost()
            staging, writer.staging = writer.staging, None
            if staging is None or not writer.dirty:
                return
            writer.dirty = False
            size = staging.size
            try:
                sha1 = await trio.to_thread.run_sync(staging.commit)  # discards it if it fails
                try:
                    entry = self.node.db.entry(writer.entry_id)
                except NotFound:
                    log.info("file was removed before it was closed; sha1://%s stays in the"
                             " store", sha1)
                    return
                self.node.db.set_content(writer.entry_id, sha1, size)
            except Exception as exc:
                self._lose(writer, exc)
                raise
            writer.unqueued = True
            log.info("%s/%s committed as sha1://%s (%d bytes)", entry.channel, entry.name, sha1,
                     size)

    def _lose(self, writer: Writer, error: BaseException) -> None:
        """Drop what ``writer`` was writing: ``error`` made it impossible to save whole
        (see :meth:`_commit_writer`)."""
        writer.lost = error
        writer.dirty = False
        if writer.staging is not None:
            writer.staging.discard()
            writer.staging = None
        # With the writeback cache the kernel holds the new pages and size: drop them, so
        # that reads show the content the name still has.
        self._invalidate(VNode("entry", entry_id=writer.entry_id))

    def _queue_upload(self, writer: Writer) -> None:
        if not writer.unqueued:
            return
        writer.unqueued = False
        try:
            entry = self.node.db.entry(writer.entry_id)
        except NotFound:
            return
        if entry.sha1 is not None:
            self.uploader.enqueue(entry.channel, entry.sha1, entry.size)

    # -- extended attributes ----------------------------------------------------------------

    async def listxattr(self, inode, ctx):
        with fuse_errors("listxattr"):
            vnode = self.ns.vnode(inode)
            if vnode.kind == "hash" or (vnode.kind == "entry"
                                        and not self.node.db.entry(vnode.entry_id).is_dir):
                return [XATTR_URI, XATTR_STATUS]
            if vnode.kind == "channel":
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
            if vnode.kind == "channel" and name == XATTR_STATUS:
                snapshot = status.collect(self.node, provider=self.provider,
                                          resolver=self.resolver)
                return status.render(snapshot, channel=vnode.channel).encode()
            if vnode.kind == "hash":
                if name == XATTR_URI:
                    return format_uri(vnode.sha1).encode()
                if name == XATTR_STATUS:
                    local = self.node.store.has(vnode.sha1)
                    return b"local" if local else b"remote"
            elif vnode.kind == "entry":
                entry = self.node.db.entry(vnode.entry_id)
                if not entry.is_dir and name in (XATTR_URI, XATTR_STATUS):
                    writer = self._writers.get(entry.id)
                    if (writer is not None and writer.handles) or entry.sha1 is None:
                        return b"" if name == XATTR_URI else b"writing"
                    if name == XATTR_URI:
                        return format_uri(entry.sha1, entry.name).encode()
                    return self.uploader.status(entry.channel, entry.sha1).encode()
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def statfs(self, ctx):
        with fuse_errors("statfs"):
            st = os.statvfs(self.node.dir)
            data = pyfuse3.StatvfsData()
            for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                         "f_ffree", "f_favail", "f_namemax"):
                setattr(data, attr, getattr(st, attr))
            return data


__all__ = ["Operations", "ROOT_INODE"]
