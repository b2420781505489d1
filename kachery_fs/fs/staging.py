"""Writes to named entries: staged, committed into the store, queued for upload (no pyfuse3).

Every open handle of one named entry that may write shares one :class:`Writer`. Its
states and transitions:

- **open for write** (:meth:`Staging.open_write`): one more write handle; with
  ``O_TRUNC`` an empty staging file at once.
- **write / truncate**: the staging file is made at the first one, as a copy of the
  committed content (empty when truncating to zero), in the store's temp directory, and
  hashed as the bytes arrive; the writer is then *dirty*.
- **commit** (:meth:`Staging.commit`): on ``flush`` of the only write handle (``close(2)``
  waits for it, so a ``cp`` that has returned has its file in the store), on ``fsync``,
  and on the last close: the staging file moves into the store and the entry points at
  it. The upload is queued at the last close only, so a file written by several
  short-lived processes sharing one descriptor is uploaded once. A file over
  20,000,000 bytes gets its kachery manifest after the commit, so that ``close`` waits
  for one SHA-1 pass only (:meth:`Uploader.manifest_of`: beside its upload, or at once
  when ``user.kachery.uri`` asks for it, which then reads
  ``sha1://<hash>/<name>?manifest=<manifest hash>``); the uploader puts it in the
  bucket before the file's finalize, which vouches for it.
- **lose** (:meth:`Staging.lose`): a full disk (``ENOSPC``, ``EDQUOT``, ``EIO`` at a write,
  or ``NoSpace`` at the commit) makes the version being written impossible to save
  whole. It is dropped, the name keeps its previous content, and every later write,
  flush, fsync and close of the open handles fails the same way, until the last of them
  closes.
- A handle opened read-only while the entry is being written reads what is written so
  far (:meth:`Staging.open_read`, :meth:`Staging.read`).

Errors are kachery-fs errors (``NotFound``, ``NoSpace``) or the ``OSError`` of the local
disk, never FUSE's: the adapter maps them.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from ..bucket import EMPTY_SHA1
from ..errors import NotFound
from ..state import NodeDB
from ..store import StagingFile, Store

if TYPE_CHECKING:
    from ..uploader import Uploader
    from .durability import Durability

log = logging.getLogger(__name__)

#: A file this small is copied into its staging file, and committed, on the event loop:
#: hashing its rest and renaming it costs less than handing it to a thread and back
#: (``rsync``, ``tar -x`` and ``git clone`` write mostly such files). Larger ones go to a
#: worker thread.
INLINE_BYTES = 256 << 10

#: The errors of a write that mean the version being written cannot be saved whole.
LOSING_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


@dataclass
class Writer:
    """The staging file shared by every open handle of one named entry being written.

    ``lock`` serialises making the staging file and committing it: the kernel sends
    writes (and reads) of one file concurrently, and without it two of them could each
    make a staging file, or one could copy the old content while a commit is in flight.
    """

    inode_id: int
    staging: StagingFile | None = None
    handles: int = 0  # open handles that may write
    readers: int = 0  # read-only handles opened while it was being written
    dirty: bool = False
    unqueued: bool = False  # committed, but the upload is queued only at the last close
    #: Why the version being written could not be saved (a full disk at a write or at
    #: the commit); it was dropped, and every later write, flush, fsync and close of the
    #: open handles fails with this (see Staging.commit).
    lost: BaseException | None = None
    #: The version being written starts empty (``O_TRUNC`` of a file with no content):
    #: its staging file is made at the first write, if any; a close before commits an
    #: empty file without one.
    empty: bool = False
    #: A modification time set while it is written (``cp -p``'s ``futimens`` before its
    #: close; with the writeback cache the kernel also sends the time of its last write
    #: this way, before the flush): the commit keeps it instead of its own time.
    mtime_ns: int | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)

    def check_lost(self) -> None:
        if self.lost is not None:
            raise self.lost.with_traceback(None)


class Staging:
    """The writers of the named entries being written, and their transitions.

    ``on_lost(inode_id)`` is called when a version of an entry is dropped (see
    :meth:`lose`): with the writeback cache the kernel holds its pages and size, which
    the mount then drops so that reads show the content the name still has.
    """

    def __init__(self, store: Store, db: NodeDB, uploader: Uploader, *,
                 durability: Durability | None = None,
                 on_lost: Callable[[int], None] | None = None):
        self.store = store
        self.db = db
        self.uploader = uploader
        #: With it, a commit does not wait for the disk and fsync does (see
        #: kachery_fs.fs.durability); without, every commit is durable when it returns.
        self.durability = durability
        self.on_lost = on_lost
        self._writers: dict[int, Writer] = {}

    # -- what is being written --------------------------------------------------------------

    def get(self, inode_id: int) -> Writer | None:
        return self._writers.get(inode_id)

    def set_mtime(self, inode_id: int, mtime_ns: int) -> None:
        """A modification time set on ``inode_id``: kept by the commit of a version being
        written (the caller keeps it in the node database: the name shows it at once)."""
        writer = self._writers.get(inode_id)
        if writer is not None:
            writer.mtime_ns = mtime_ns

    def is_writing(self, inode_id: int) -> bool:
        """True while a handle that may write ``inode_id`` is open."""
        writer = self._writers.get(inode_id)
        return writer is not None and writer.handles > 0

    def staged_size(self, inode_id: int) -> int | None:
        """The size of the version of ``inode_id`` being written; None if there is none."""
        writer = self._writers.get(inode_id)
        if writer is None:
            return None
        if writer.staging is not None:
            return writer.staging.size
        return 0 if writer.empty else None

    # -- opening and closing ---------------------------------------------------------------

    async def open_write(self, inode_id: int, *, truncate: bool) -> Writer:
        """One more handle that may write ``inode_id`` (``truncate``: ``O_TRUNC``)."""
        writer = self._writer(inode_id)
        if writer.handles == 0:
            writer.lost = None  # whoever lost a version has closed it (and was told)
        writer.handles += 1
        try:
            if truncate:
                if writer.staging is None and self.db.inode(inode_id).size == 0:
                    writer.empty = True  # nothing to cut: no staging file until a write
                else:
                    await self.staging(writer, truncate=True)
                writer.dirty = True
        except BaseException:
            writer.handles -= 1
            self._forget(writer)
            raise
        return writer

    def open_read(self, inode_id: int) -> Writer | None:
        """The writer of ``inode_id`` if it is being written (a read-only handle opened now
        reads what is written so far: close it with :meth:`close_read`); else None."""
        writer = self._writers.get(inode_id)
        if writer is not None:
            writer.readers += 1
        return writer

    def close_read(self, writer: Writer) -> None:
        writer.readers -= 1
        self._forget(writer)

    async def close_write(self, writer: Writer) -> None:
        """A handle that may write closes: at the last one, commit and queue the upload."""
        writer.handles -= 1
        try:
            if writer.handles == 0:
                if writer.dirty:
                    await self.commit(writer)
                else:  # a file create(2) made and nothing wrote: an empty file now
                    self.db.mark_committed(writer.inode_id)
                    if self.durability is not None:
                        self.durability.committed()
                self.queue_upload(writer)
        finally:
            self._forget(writer)

    def _writer(self, inode_id: int) -> Writer:
        writer = self._writers.get(inode_id)
        if writer is None:
            writer = self._writers[inode_id] = Writer(inode_id)
        return writer

    def _forget(self, writer: Writer) -> None:
        if writer.handles == 0 and writer.readers == 0:
            if writer.staging is not None:  # not dirty: nothing to keep
                writer.staging.discard()
                writer.staging = None
            if self._writers.get(writer.inode_id) is writer:
                del self._writers[writer.inode_id]

    # -- reading and writing -----------------------------------------------------------------

    async def staging(self, writer: Writer, *, truncate: bool = False) -> StagingFile:
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
                entry = self.db.inode(writer.inode_id)
                copy_from = None if truncate or writer.empty else entry.sha1
                if copy_from is not None and not self.store.has(copy_from):
                    raise NotFound(f"content of inode {entry.id} (sha1://{copy_from}) is no longer"
                                   " in the local store")
                def make() -> StagingFile:
                    return StagingFile.from_existing(self.store, copy_from,
                                                     truncate=copy_from is None)

                if copy_from is None or entry.size <= INLINE_BYTES:
                    writer.staging = make()
                else:
                    writer.staging = await trio.to_thread.run_sync(make)
                writer.empty = False
            return writer.staging

    async def write(self, writer: Writer, offset: int, data: bytes) -> int:
        staging = await self.staging(writer)
        writer.dirty = True
        try:
            return staging.write(offset, data)
        except OSError as exc:
            if exc.errno in LOSING_ERRNOS:
                # This version of the file cannot be saved whole: the name keeps the
                # previous one, and the writer hears of it at every step.
                self.lose(writer, exc)
            raise

    async def read(self, writer: Writer, offset: int, size: int) -> bytes:
        """What is written so far: the staging file, or the committed content."""
        async with writer.lock:  # not during a commit: the staging file moves
            if writer.staging is not None:
                return writer.staging.read(offset, size)
            entry = self.db.inode(writer.inode_id)
        if entry.sha1 is None or entry.size == 0:
            return b""
        fd = self.store.open(entry.sha1)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    async def truncate(self, inode_id: int, length: int) -> None:
        """``truncate(2)`` of ``inode_id`` (a file). On a file nobody writes, a new version
        of it, committed and queued now."""
        writer = self._writers.get(inode_id)
        if writer is not None and writer.handles > 0:
            staging = await self.staging(writer, truncate=length == 0)
            staging.truncate(length)
            writer.dirty = True
            return
        writer = self._writer(inode_id)
        writer.lost = None  # whoever lost a version has closed it
        try:
            staging = await self.staging(writer, truncate=length == 0)
            staging.truncate(length)
            writer.dirty = True
            await self.commit(writer)
            self.queue_upload(writer)
        finally:
            self._forget(writer)

    async def flush(self, writer: Writer) -> None:
        """``close(2)`` of a handle that may write waits for this: commit now if it is the
        only one. The upload is queued at the last close (:meth:`close_write`), so a file
        written by several short-lived processes sharing one descriptor is uploaded once,
        not once per process."""
        writer.check_lost()
        if writer.handles == 1 and writer.dirty:
            await self.commit(writer)

    async def fsync(self, writer: Writer) -> None:
        """``fsync(2)``: commit, and return once the commit is on the disk."""
        writer.check_lost()
        if writer.dirty:
            await self.commit(writer)
        if self.durability is not None:
            await self.durability.sync()

    # -- commit and loss ------------------------------------------------------------------

    async def commit(self, writer: Writer) -> None:
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
            if not writer.dirty or (staging is None and not writer.empty):
                return
            writer.dirty = writer.empty = False
            deferred = self.durability is not None
            if staging is not None and staging.size == 0:
                # Empty, whatever was written and cut: the empty content, stored durably
                # once (a pending copy a power cut could lose would leave the name
                # pointing at nothing, since recovery keeps every empty file).
                staging.discard()
                staging = None
            try:
                if staging is None:  # opened with O_TRUNC and never written, or cut to 0
                    sha1, size = EMPTY_SHA1, 0
                    # For its upload (reads of an empty file need none): in sha1/, on
                    # the disk, not a pending copy.
                    if not self.store.path(EMPTY_SHA1).exists():
                        await trio.to_thread.run_sync(self.store.add_bytes, b"")
                else:
                    size = staging.size
                    # The staging file is discarded if this fails.
                    if size <= INLINE_BYTES and deferred:
                        sha1 = staging.commit(durable=False)
                    else:
                        sha1 = await trio.to_thread.run_sync(
                            lambda: staging.commit(durable=not deferred))
                try:
                    entry = self.db.inode(writer.inode_id)
                except NotFound:  # unlinked, and forgotten before this last close ended
                    log.info("inode %d has no name left; sha1://%s stays in the store",
                             writer.inode_id, sha1)
                    return
                self.db.set_content(writer.inode_id, sha1, size, mtime_ns=writer.mtime_ns,
                                    unsynced=deferred and size > 0)
            except Exception as exc:
                # Content it put in pending/ stays: another commit may have found it there
                # and name it; if none does, it is cache like any unnamed content.
                self.lose(writer, exc)
                raise
            if self.durability is not None:
                self.durability.committed()
            writer.unqueued = True
            if log.isEnabledFor(logging.DEBUG):  # the upload's queueing is logged (info)
                place = self.db.name_of(entry.id)
                log.debug("%s/%s committed as sha1://%s (%d bytes)", entry.channel,
                          place[1] if place else f"(inode {entry.id}, unlinked)", sha1, size)

    def lose(self, writer: Writer, error: BaseException) -> None:
        """Drop what ``writer`` was writing: ``error`` made it impossible to save whole
        (see :meth:`commit`)."""
        writer.lost = error
        writer.dirty = writer.empty = False
        if writer.staging is not None:
            writer.staging.discard()
            writer.staging = None
        if self.on_lost is not None:
            self.on_lost(writer.inode_id)

    def queue_upload(self, writer: Writer) -> None:
        if not writer.unqueued:
            return
        writer.unqueued = False
        try:
            entry = self.db.inode(writer.inode_id)
        except NotFound:
            return
        # A file with no name left (a temporary file, unlinked while open) is never
        # uploaded: no one can name it.
        if entry.sha1 is not None and entry.nlink > 0:
            self.uploader.enqueue(entry.channel, entry.sha1, entry.size)
