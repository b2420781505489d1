"""The local content-addressed store of one node.

Layout under the node directory (``$KACHERY_FS_DIR``)::

    sha1/ab/cd/ef/<sha1>     content, read-only (0444), named by the SHA-1 of its bytes
    tmp/<pid>-<rand>.part    files being written or downloaded; swept at start when no
                             process holds them (see below)

Contract: a file under ``sha1/`` always holds exactly the bytes its name says. Every
way in goes through a temp file in ``tmp/`` (same file system), is hashed while it is
written, fsynced, compared with the expected hash if there is one, and only then
renamed into place with ``os.replace``; on any failure the temp file is removed. A
crash leaves at most a stray temp file, never a partial or wrong object.

Every temp file is held under an exclusive ``flock`` on the descriptor its writer keeps
open for as long as it uses the file (:meth:`Store.new_temp_file`). The kernel drops
the lock when that descriptor is closed, or when its process dies however it dies, so
:meth:`Store.sweep_temp` removes exactly the temp files it can lock: nobody uses them.
The PID in a name is only a hint for a human; it decides nothing (in a container, a
new run often gets the PID the crashed one had).

The store is also a cache with an optional size limit: ``store.db`` beside ``sha1/``
indexes every object with its size, last read and origin (fetched, written, added), and
fetched content is evicted least recently read first (:mod:`kachery_fs.cache`). Every
way in records the object there; :meth:`Store.open` notes the read and holds a shared
``flock`` on the file while it is open, which keeps eviction away from it.

All methods here block (file I/O, hashing); async callers run the big ones in
``trio.to_thread.run_sync``. Several processes may use one store at once: renames are
atomic and content-addressed, so two writers of the same hash cannot conflict.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from . import settings
from .cache import ADDED, FETCHED, MANIFEST_HERE, WRITTEN, StoreCache
from .errors import IntegrityError, NotFound, as_no_space
from .layout import Layout
from .manifest import Manifest, ManifestBuilder
from .uris import is_sha1

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20


class StagingFile:
    """A file being written, hashed as it goes, committed into the store on close.

    Sequential writes (the common case: ``cp``, ``>``) are hashed on the fly. A write
    anywhere else marks the hash stale, and :meth:`commit` re-reads the file once.
    Not thread-safe: the mount serialises access per open file.
    """

    def __init__(self, store: Store, path: Path, fd: int):
        self._store = store
        self.path = path
        self.fd = fd
        self._hasher = hashlib.sha1()
        self._hashed = 0  # bytes [0, _hashed) are in _hasher
        self._sequential = True
        self.size = 0

    @classmethod
    def from_existing(cls, store: Store, sha1: str | None, *, truncate: bool) -> StagingFile:
        """A new staging file, holding a copy of stored content ``sha1`` unless ``truncate``."""
        staging = store.new_staging()
        if sha1 is not None and not truncate:
            try:
                with open(store.path(sha1), "rb") as src:
                    while chunk := src.read(COPY_CHUNK):
                        staging.write(staging.size, chunk)
            except BaseException:
                staging.discard()
                raise
        return staging

    def write(self, offset: int, data: bytes) -> int:
        n = os.pwrite(self.fd, data, offset)
        if self._sequential and offset == self._hashed:
            self._hasher.update(data[:n])
            self._hashed += n
        else:
            self._sequential = False  # commit() re-reads the file once
        self.size = max(self.size, offset + n)
        return n

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)
        if not (length == self._hashed == self.size):
            self._sequential = False
        self.size = length

    def _digest(self) -> str:
        if self._sequential and self._hashed == self.size:
            return self._hasher.hexdigest()
        hasher = hashlib.sha1()
        offset = 0
        while chunk := os.pread(self.fd, COPY_CHUNK, offset):
            hasher.update(chunk)
            offset += len(chunk)
        return hasher.hexdigest()

    def commit(self, *, origin: str = WRITTEN, expected: str | None = None) -> str:
        """fsync, hash and move into the store; returns the SHA-1. Closes the staging file.

        ``origin`` is recorded in the store's index (see :mod:`kachery_fs.cache`). With
        ``expected``, content that hashes to anything else is discarded: IntegrityError.
        """
        try:
            os.fsync(self.fd)
            sha1 = self._digest()
            if expected is not None:
                _check_hash(expected, sha1)
            # Renamed while the fd (and so the flock) is held: a sweep cannot take it.
            self._store._install(self.path, sha1, origin)
        except BaseException as exc:
            self.discard()
            full = as_no_space(exc, "recording a written file in the store's index")
            if full is not None:  # SQLITE_FULL from the index: the disk is full
                raise full from exc
            raise
        os.close(self.fd)
        self.fd = -1
        return sha1

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Store:
    """A content-addressed store rooted at a node directory. See the module docstring.

    ``limit`` (bytes, None for none) and ``pinned`` (the hashes the node's state needs
    kept) make it a cache; without ``pinned`` nothing is ever evicted.
    """

    def __init__(self, root: Path, *, limit: int | None = None,
                 pinned: Callable[[], set[str]] | None = None,
                 uploaded: Callable[[], set[str]] | None = None):
        self.layout = Layout(root)
        self.root, self.sha1_dir, self.tmp_dir = (self.layout.root, self.layout.sha1_dir,
                                                  self.layout.tmp_dir)
        self.sha1_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.cache = StoreCache(self.layout, limit=limit, pinned=pinned, uploaded=uploaded)

    @classmethod
    def for_node(cls, directory: Path, db) -> Store:
        """The store of the node in ``directory``: limited as the node's settings say,
        and keeping what its database ``db`` (a :class:`~kachery_fs.state.NodeDB`) pins."""
        return cls(directory, limit=settings.load(directory).cache_size,
                   pinned=db.pinned_sha1s, uploaded=db.uploaded_sha1s)

    def close(self) -> None:
        """Write out what the cache noted in memory (access times) and close its index."""
        self.cache.close()

    # -- paths and lookups ----------------------------------------------------------

    def path(self, sha1: str) -> Path:
        return self.layout.path(sha1)

    def size(self, sha1: str) -> int | None:
        """The size of stored content ``sha1``, or ``None`` if it is not here."""
        try:
            return os.stat(self.path(sha1)).st_size
        except FileNotFoundError:
            return None

    def has(self, sha1: str) -> bool:
        return self.size(sha1) is not None

    def open(self, sha1: str) -> int:
        """An O_RDONLY file descriptor on stored content; raises NotFound.

        Counts as a read for the cache, and holds a shared ``flock`` until the descriptor
        is closed, so that no eviction deletes the file meanwhile.
        """
        try:
            fd = os.open(self.path(sha1), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"sha1://{sha1} is not in the local store") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # Held exclusively: by its download (which keeps eviction away itself), or
            # by an eviction deleting it this instant (this fd still reads it whole).
            pass
        self.cache.touch(sha1.lower())
        return fd

    def iter_hashes(self):
        """Every hash stored here (walks the fan-out directories)."""
        for _dirpath, _dirnames, filenames in os.walk(self.sha1_dir):
            for name in filenames:
                if is_sha1(name):
                    yield name

    # -- writing ----------------------------------------------------------------------

    def new_temp_path(self) -> Path:
        """A fresh temp file name. The file is not created, so nothing protects it from
        :meth:`sweep_temp`: use :meth:`new_temp_file` for a file that must survive."""
        return self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.part"

    def new_temp_file(self) -> tuple[Path, int]:
        """Create a temp file and hold it: ``(path, fd)``, the fd O_RDWR under an exclusive
        ``flock`` that lasts until it is closed. Keep the fd open while using the file."""
        while True:
            path = self.new_temp_path()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A sweep may have locked and removed the file between open and flock.
                st, held = os.stat(path), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino):
                    return path, fd
            except (BlockingIOError, FileNotFoundError):
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # lost that race: take another name

    def new_staging(self) -> StagingFile:
        path, fd = self.new_temp_file()
        return StagingFile(self, path, fd)

    def _install(self, temp: Path, sha1: str, origin: str) -> None:
        """Rename a complete, fsynced, verified temp file into place (or drop it if present),
        and record it in the index as ``origin``.

        Content the node must keep is recorded before it is put in place, fetched content
        after (see :mod:`kachery_fs.cache` for why this order is safe with eviction).
        """
        dest = self.path(sha1)
        size = os.stat(temp).st_size
        pin_first = origin != FETCHED
        if pin_first:
            self.cache.record(sha1, size, origin)
        try:
            if dest.exists():
                os.unlink(temp)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(temp, 0o444)
                os.replace(temp, dest)
                _fsync_dir(dest.parent)
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            if pin_first and not dest.exists():
                self.cache.forget(sha1)
            raise
        if not pin_first:
            self.cache.record(sha1, size, origin)
        self.cache.inserted(sha1)

    def install_verified(self, temp: Path, expected_sha1: str, *, actual_sha1: str) -> None:
        """Install a downloaded temp file whose hash the caller computed as ``actual_sha1``.

        Raises IntegrityError (and removes the temp file) when it is not ``expected_sha1``.
        """
        try:
            _check_hash(expected_sha1, actual_sha1)
        except IntegrityError:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        self._install(temp, expected_sha1.lower(), FETCHED)

    def add_file(self, src: Path, *, progress=None, origin: str = ADDED,
                 expected: str | None = None,
                 also: Callable[[bytes], None] | None = None) -> tuple[str, int]:
        """Copy a file into the store, hashing as it is read; returns ``(sha1, size)``.

        ``origin`` is recorded in the index: by default the user added it, and it is
        kept. With ``expected``, a file whose content hashes to anything else is not
        stored: IntegrityError. ``also(block)`` sees every block read, in order.
        """
        staging = self.new_staging()
        try:
            with open(src, "rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    staging.write(staging.size, chunk)
                    if also is not None:
                        also(chunk)
                    if progress is not None:
                        progress(len(chunk))
        except BaseException:
            staging.discard()
            raise
        size = staging.size
        return staging.commit(origin=origin, expected=expected), size

    def add_file_with_manifest(self, src: Path, *, progress=None,
                               ) -> tuple[str, int, Manifest | None]:
        """:meth:`add_file`, and for a file over :data:`~kachery_fs.manifest.CHUNK_SIZE`
        bytes its kachery manifest, computed in the same pass and stored as content of its
        own (both kept whatever the store's limit)."""
        builder = ManifestBuilder()
        sha1, size = self.add_file(src, progress=progress, also=builder.update)
        _, manifest = builder.finish()
        if manifest is not None:
            self.add_bytes(manifest.to_bytes())
            self.cache.note_manifest(sha1, manifest.hash, MANIFEST_HERE)
        return sha1, size, manifest

    def add_bytes(self, data: bytes, *, origin: str = ADDED) -> str:
        staging = self.new_staging()
        try:
            staging.write(0, data)
        except BaseException:
            staging.discard()
            raise
        return staging.commit(origin=origin)

    def verify(self, sha1: str) -> bool:
        """Re-hash stored content; a corrupt object is deleted and False returned."""
        path = self.path(sha1)
        hasher = hashlib.sha1()
        with open(path, "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() == sha1.lower():
            return True
        log.error("stored object %s is corrupt (hashes to %s); deleting it", sha1,
                  hasher.hexdigest())
        self.delete(sha1)
        return False

    def delete(self, sha1: str) -> None:
        try:
            os.unlink(self.path(sha1))
        except FileNotFoundError:
            pass
        self.cache.forget(sha1.lower())

    def sweep_temp(self) -> int:
        """Remove the temp files nobody holds (their ``flock`` is free); returns how many.

        A file in use by any process, this one included, is locked and left alone,
        whatever PID its name carries.
        """
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                # Removed while we hold the lock, so its writer cannot be mid-creation.
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        if removed:
            log.info("removed %d temp file(s) that no process holds", removed)
        return removed


def _check_hash(expected: str, actual: str) -> None:
    if actual != expected.lower():
        raise IntegrityError(f"content for sha1://{expected} hashed to {actual}; not stored")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:  # pragma: no cover - exotic file systems
        if exc.errno in (errno.EACCES, errno.EPERM):
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
