"""Partial files: the verified chunks of a large file, kept in the local store while the
rest of the file is not there.

A large file read by chunk (:mod:`kachery_fs.chunks`) writes each chunk it fetched and
verified into ``partial/<sha1>`` under the store's root, at the chunk's offset; the rest of
the file is a hole (one partial file per manifest: a lying manifest's chunks never mix
with another's). Which chunks are there is recorded in the store's index (``store.db``,
table ``partials``), so it survives a restart, and their bytes
count in the store's usage: an eviction pass deletes partial files, least recently used
first, like fetched objects. When the last chunk is there and the whole file's SHA-1
matches, the partial file becomes an ordinary object of the store.

Contracts:

* A chunk is recorded as present only after its bytes are written; a chunk recorded but
  lost (a crash before the page cache reached the disk) is caught because a reader in a
  new process hashes each chunk it takes from a partial file before serving it
  (:class:`~kachery_fs.chunks.ChunkedContent` does).
* An open :class:`PartialFile` holds a shared ``flock`` on its file: an eviction pass skips
  it, as it skips an object being read.
* Several processes may fill one partial file at once (a mount and ``cat``): they write the
  same bytes, verified against the same manifest, at the same offsets.
* Not thread-safe per object: the caller serializes calls on one :class:`PartialFile`
  (the writes of different chunks may run on worker threads at once).
"""

from __future__ import annotations

import fcntl
import logging
import os

from .errors import IntegrityError
from .manifest import Manifest
from .store import Store

log = logging.getLogger(__name__)


class PartialFile:
    """The partial file of one large file (see the module docstring)."""

    def __init__(self, store: Store, manifest: Manifest, fd: int, present: set[int]):
        self.store = store
        self.manifest = manifest
        self.sha1 = manifest.sha1
        self.path = store.layout.partial_path(manifest.sha1, manifest.hash)
        self.fd = fd
        #: The chunks recorded as present (not yet verified by this process).
        self.present = present

    @classmethod
    def open(cls, store: Store, manifest: Manifest) -> PartialFile:
        """The partial file of ``manifest``'s file, made (empty, all hole) if absent."""
        path = store.layout.partial_path(manifest.sha1, manifest.hash)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)  # an eviction holds it only while deleting
                # An eviction may have deleted the file between the open and the lock.
                st, held = os.stat(path), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            present = store.cache.partial_chunks(manifest.sha1, manifest.hash)
            if os.fstat(fd).st_size != manifest.size:
                os.ftruncate(fd, manifest.size)
        except BaseException:
            os.close(fd)
            raise
        return cls(store, manifest, fd, present)

    def complete(self) -> bool:
        return len(self.present) == len(self.manifest.chunks)

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def read_chunk_into(self, i: int, buf: bytearray) -> memoryview:
        """Chunk ``i`` as the file holds it, read into ``buf``: a view of it."""
        chunk = self.manifest.chunks[i]
        view = memoryview(buf)[:chunk.size]
        got = 0
        while got < chunk.size:
            n = os.preadv(self.fd, [view[got:]], chunk.start + got)
            if n == 0:
                break  # cut short: a chunk of the wrong size, which fails its hash
            got += n
        return view[:got]

    def add_chunk(self, i: int, data: bytes | memoryview) -> None:
        """Write verified chunk ``i`` and record it (a worker thread may call this)."""
        chunk = self.manifest.chunks[i]
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], chunk.start + written)
        # False when another process made the file an object meanwhile, or found it lying
        # (it removed the row): then nothing is recorded, and the bytes went where they
        # are the same or unused.
        if self.store.cache.partial_add(self.sha1, self.manifest.hash, i, len(data)):
            self.present.add(i)

    def drop_chunk(self, i: int) -> None:
        """Chunk ``i`` was recorded but its bytes do not match: no longer present."""
        self.present.discard(i)
        self.store.cache.partial_drop_chunk(self.sha1, self.manifest.hash, i,
                                            self.manifest.chunks[i].size)

    def install(self) -> None:
        """Make the complete file, whose whole SHA-1 the caller checked, an ordinary object
        of the store (this descriptor then reads the object).

        The row goes first: a crash before the rename leaves a partial file on no record,
        which the next sweep removes, never bytes counted twice."""
        os.fsync(self.fd)
        st, held = os.stat(self.path), os.fstat(self.fd)
        if (st.st_dev, st.st_ino) != (held.st_dev, held.st_ino):
            raise IntegrityError(f"the partial file of sha1://{self.sha1} was replaced while"
                                 " it was read: not installed")
        self.store.cache.partial_forget(self.sha1, self.manifest.hash)
        self.store.install_renamed(self.path, self.sha1)

    def discard(self) -> None:
        """Delete the partial file and its row (its chunks make another file)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.store.cache.partial_forget(self.sha1, self.manifest.hash)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
