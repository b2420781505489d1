"""The local content-addressed store of one node.

Layout under the node directory (``$KACHERY_FS_DIR``)::

    sha1/ab/cd/ef/<sha1>     content, read-only (0444), named by the SHA-1 of its bytes
    pending/<sha1>           content the mount committed that may not be on the disk yet
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

The mount commits without waiting for the disk (:mod:`kachery_fs.fs.durability`): its
staging files, hashed but not fsynced, go to ``pending/<sha1>`` instead, where every
read of the store finds them too, and move into ``sha1/`` only once a ``syncfs(2)`` has
put them on the disk (:meth:`Store.install_pending`). So a power cut can never leave
wrong bytes under ``sha1/``: what it may damage is in ``pending/``, which the next mount
hashes again (:meth:`Store.recover_pending`).

A file over 20,000,000 bytes committed from a staging file that asks for it (``put``,
``store add``) also gets its kachery manifest, computed while it is written, stored as
content of its own and recorded in the index before the file is in place
(:class:`StagingFile`). The mount's files get theirs after the commit, so that ``close``
waits for one SHA-1 pass only (:meth:`Store.make_manifest`).

All methods here block (file I/O, hashing); async callers run the big ones in
``trio.to_thread.run_sync``. Several processes may use one store at once: renames are
atomic and content-addressed, so two writers of the same hash cannot conflict.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

from . import manifest as kachery_manifest
from . import settings
from .cache import ADDED, FETCHED, MANIFEST_HERE, WRITTEN, StoreCache
from .errors import IntegrityError, InvalidInput, NotFound, as_no_space
from .layout import Layout
from .manifest import Manifest
from .uris import is_sha1

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20
#: Threads hashing the chunks of files being written (for their manifests), beside the
#: thread that hashes each file whole: hashlib lets go of the GIL while it hashes a large
#: buffer, as os.pread does while it reads, so the two run on two cores.
CHUNK_HASHERS = 2
#: A file written in order is hashed whole on a pool thread, a step behind the writes, each
#: time they have gone this far past what is hashed: the thread that serves the writes
#: (the mount's event loop) only writes them, and the commit hashes at most one step.
HASH_STEP = 4 << 20
#: How many writes past the bytes written in order a staging file keeps track of before it
#: gives up on hashing as it goes (and hashes the file again at its commit).
MAX_AHEAD = 4096


class StagingFile:
    """A file being written, hashed as it goes, committed into the store on close.

    Sequential writes (the common case: ``cp``, ``>``) are hashed as they go, on a pool
    thread that reads them back from the file (the page cache has them) every
    :data:`HASH_STEP` bytes, not by the writer: a write costs the caller its ``pwrite``
    only. A write anywhere else marks the hash stale, and :meth:`commit` re-reads the
    file once. Not thread-safe: the mount serialises access per open file.

    With ``manifest``, a file over :data:`~kachery_fs.manifest.CHUNK_SIZE` bytes also gets
    its kachery manifest. While the writes are sequential, each chunk they have written
    past the end of is hashed on a pool thread (:data:`CHUNK_HASHERS`), which reads it
    back from the file (the page cache has it; no chunk is held in memory); the commit
    starts the last chunk's there too, before its fsync, and waits for them all. A write
    anywhere else (or a truncate) makes every chunk hash taken so far stale, whether or
    not its job has finished, and the commit computes the manifest by re-reading the
    file, as it does the SHA-1: no manifest ever holds a chunk hashed before a rewrite of
    it. The commit stores the manifest as content of its own (``added``: never evicted)
    and records it as trusted (``here``) before it puts the file in place (see
    :meth:`commit`).
    """

    def __init__(self, store: Store, path: Path, fd: int, *, manifest: bool = False):
        self._store = store
        self.path = path
        self.fd = fd
        self._whole = _InOrder()  # the SHA-1 of bytes [0, _whole.done), on the pool
        self._whole_jobs: list[concurrent.futures.Future[None]] = []
        self._hashed = 0  # bytes [0, _hashed) were written in order (given to _whole)
        #: Writes past ``_hashed``, not yet joined to it: their start → their end.
        self._ahead: dict[int, int] = {}
        self._sequential = True
        self.size = 0
        self._chunk_size = kachery_manifest.CHUNK_SIZE  # read once: one size per file
        #: With ``manifest``: the hashes of chunks 0, 1, … being taken on the pool (each
        #: job reads through a descriptor of its own, which it closes). Stale once the
        #: writes are not sequential; the commit waits for them all the same.
        self._chunk_jobs: list[concurrent.futures.Future[str]] | None = (
            [] if manifest else None)
        #: The manifest the commit made and stored (None: small file, or not asked for).
        self.manifest: Manifest | None = None

    @classmethod
    def from_existing(cls, store: Store, sha1: str | None, *, truncate: bool,
                      manifest: bool = False) -> StagingFile:
        """A new staging file, holding a copy of stored content ``sha1`` unless
        ``truncate`` (``manifest``: see the class)."""
        staging = store.new_staging(manifest=manifest)
        if sha1 is not None and not truncate:
            try:
                with os.fdopen(store.open(sha1), "rb") as src:
                    while chunk := src.read(COPY_CHUNK):
                        staging.write(staging.size, chunk)
            except BaseException:
                staging.discard()
                raise
        return staging

    def write(self, offset: int, data: bytes) -> int:
        n = os.pwrite(self.fd, data, offset)
        if self._sequential and offset == self._hashed:
            self._hashed += n
            while self._hashed in self._ahead:  # writes that came before their turn
                self._hashed = self._ahead.pop(self._hashed)
            if (job := self._whole.written(self.fd, self._hashed)) is not None:
                # Kept until done, or failed (the commit raises its error).
                self._whole_jobs = [j for j in self._whole_jobs
                                    if not j.done() or j.exception() is not None] + [job]
            if self._chunk_jobs is not None:
                self._hash_passed_chunks()
        elif (self._sequential and offset > self._hashed and n
              and len(self._ahead) < MAX_AHEAD):
            # The kernel writes its cached pages back in no set order: a write past the
            # bytes written in order waits here for those before it.
            self._ahead[offset] = max(self._ahead.get(offset, 0), offset + n)
        else:
            self._sequential = False  # a rewrite: commit() re-reads the file once
        self.size = max(self.size, offset + n)
        return n

    def _hash_passed_chunks(self) -> None:
        """Start hashing, on the pool, each chunk that the sequential writes have written
        past the end of. The chunk that ends where the writes stand is left for the
        commit: it may be the last one (a file of exactly one chunk has no manifest)."""
        jobs, step = self._chunk_jobs, self._chunk_size
        assert jobs is not None
        while (len(jobs) + 1) * step < self._hashed:
            start = len(jobs) * step
            jobs.append(_hash_on_pool(self.fd, start, start + step))

    def _hash_last_chunk(self) -> None:
        """At the commit of a file written in order and over one chunk: start hashing the
        chunk the writes did not pass the end of (the last one) on the pool as well."""
        jobs, step, size = self._chunk_jobs, self._chunk_size, self.size
        if jobs is None or size <= step or not (self._sequential and self._hashed == size):
            return
        while len(jobs) * step < size:
            start = len(jobs) * step
            jobs.append(_hash_on_pool(self.fd, start, min(start + step, size)))

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)
        if not (length == self._hashed == self.size and not self._ahead):
            self._sequential = False
        self.size = length

    def _hashes(self) -> tuple[str, Manifest | None]:
        """The SHA-1 of the file and, if it was asked for and the file is over one chunk,
        its manifest. Waits for every chunk job (none outlives the commit)."""
        jobs = self._chunk_jobs or []
        step, size = self._chunk_size, self.size
        wanted = self._chunk_jobs is not None and size > step
        if self._sequential and self._hashed == size:
            for whole in self._whole_jobs:
                whole.result()  # a read that failed fails the commit
            sha1 = self._whole.finish(self.fd, size)  # the rest, here
            chunks = [job.result() for job in jobs]  # the last one too: see commit()
        else:
            log.debug("%s was not written in order: hashed again (%d bytes)", self.path, size)
            concurrent.futures.wait(jobs)  # stale: their hashes are not used
            fresh = [_hash_on_pool(self.fd, start, min(start + step, size))
                     for start in range(0, size, step)] if wanted else []
            sha1 = _hash_range(self.fd, 0, size)
            chunks = [job.result() for job in fresh]
        if not wanted:
            return sha1, None
        manifest = Manifest.of_chunks(size, sha1, chunks)
        assert manifest is not None  # over one chunk
        return sha1, manifest

    def commit(self, *, origin: str = WRITTEN, expected: str | None = None,
               durable: bool = True) -> str:
        """fsync, hash and move into the store; returns the SHA-1. Closes the staging file.

        ``origin`` is recorded in the store's index (see :mod:`kachery_fs.cache`). With
        ``expected``, content that hashes to anything else is discarded: IntegrityError.
        Not ``durable``: hashed but not fsynced, into ``pending/`` (see the module), for a
        caller that makes it durable later (:meth:`Store.install_pending`).

        A manifest (see the class) is stored as content first, then recorded as the
        file's, and only then is the file put in place: a crash between any two steps
        leaves at most a small manifest nothing names, or a true manifest recorded for
        content the store does not hold; never a record of a manifest that is not stored.
        Any failure (a full disk) fails the commit whole, as before.
        """
        try:
            self._hash_last_chunk()  # on the pool, while the file is synced
            if durable:
                os.fsync(self.fd)
            sha1, manifest = self._hashes()
            if expected is not None:
                _check_hash(expected, sha1)
            if manifest is not None:
                self._store.add_bytes(manifest.to_bytes())
                self._store.cache.note_manifest(sha1, manifest.hash, MANIFEST_HERE)
            # Renamed while the fd (and so the flock) is held: a sweep cannot take it.
            if durable:
                self._store._install(self.path, sha1, origin)
            else:
                self._store._install_pending(self.path, sha1)
            self.manifest = manifest
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
        self.layout.pending_dir.mkdir(exist_ok=True)
        self._sha1_root, self._pending_root = str(self.sha1_dir), str(self.layout.pending_dir)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        #: Whether content in ``pending/`` may be read as it is: only in the mount, once
        #: it has checked what a crash may have left there (recover_pending) and for what
        #: it commits itself. Any other reader hashes it first (see :meth:`open`).
        self.pending_trusted = False
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
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- paths and lookups ----------------------------------------------------------

    def path(self, sha1: str) -> Path:
        """Where content ``sha1`` is once it is on the disk (it may be pending: to read
        it, :meth:`open` it)."""
        return self.layout.path(sha1)

    def _places(self, sha1: str) -> tuple[str, str, str]:
        """Where to look for content ``sha1``, in order: ``sha1/``, ``pending/``, and
        ``sha1/`` again (it may have moved from one to the other meanwhile)."""
        if not is_sha1(sha1):
            raise InvalidInput(f"not a SHA-1 hash: {sha1!r}")
        h = sha1.lower()
        final = f"{self._sha1_root}/{h[0:2]}/{h[2:4]}/{h[4:6]}/{h}"
        return final, f"{self._pending_root}/{h}", final

    def size(self, sha1: str) -> int | None:
        """The size of stored content ``sha1``, or ``None`` if it is not here."""
        for path in self._places(sha1):
            try:
                return os.stat(path).st_size
            except FileNotFoundError:
                pass
        return None

    def has(self, sha1: str) -> bool:
        return self.size(sha1) is not None

    def open(self, sha1: str) -> int:
        """An O_RDONLY file descriptor on stored content; raises NotFound.

        Counts as a read for the cache, and holds a shared ``flock`` until the descriptor
        is closed, so that no eviction deletes the file meanwhile.
        """
        _, pending, _ = places = self._places(sha1)
        for path in places:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                break
            except FileNotFoundError:
                pass
        else:
            raise NotFound(f"sha1://{sha1} is not in the local store")
        if path is pending and not self.pending_trusted:
            self._check_pending(fd, sha1)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # Held exclusively: by its download (which keeps eviction away itself), or
            # by an eviction deleting it this instant (this fd still reads it whole).
            pass
        self.cache.touch(sha1.lower())
        return fd

    def _check_pending(self, fd: int, sha1: str) -> None:
        """Hash content ``sha1`` opened in ``pending/`` as ``fd`` before it is read: a power
        cut may have damaged it, and only the mount's next start checks that. NotFound
        (``fd`` closed) if it does not hold its bytes."""
        try:
            good = _holds_its_hash(fd, sha1)
        except (OSError, IntegrityError):
            good = False
        if not good:
            os.close(fd)
            raise NotFound(f"sha1://{sha1} in the local store's pending/ does not hold its"
                           " bytes (the machine stopped before they reached the disk); the"
                           " next mount removes it")

    def read_small(self, sha1: str, limit: int) -> bytes:
        """The whole of stored content ``sha1`` (a manifest, say) if it has at most
        ``limit`` bytes; NotFound if it is not here, InvalidInput if it is larger. Blocks."""
        fd = self.open(sha1)
        try:
            size = os.fstat(fd).st_size
            if size > limit:
                raise InvalidInput(f"sha1://{sha1} has {size:,} bytes, more than the"
                                   f" {limit:,} expected")
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)

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

    def new_staging(self, *, manifest: bool = False) -> StagingFile:
        """A new, empty staging file (``manifest``: see :class:`StagingFile`)."""
        path, fd = self.new_temp_file()
        return StagingFile(self, path, fd, manifest=manifest)

    def _install(self, temp: Path, sha1: str, origin: str, *, sync_dir: bool = True) -> None:
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
                if sync_dir:
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

    def _install_pending(self, temp: Path, sha1: str) -> bool:
        """Put a complete temp file, hashed as ``sha1`` but perhaps not on the disk yet,
        in ``pending/`` (True), or drop it if the store has that content already."""
        dest = self.layout.pending_path(sha1)
        try:
            final = self.layout.path(sha1)
            if final.exists():
                # Pinned as written (with its grace) before it is named, and still there
                # after: an eviction pass either saw the row or took the file first.
                self.cache.record(sha1, os.stat(temp).st_size, WRITTEN)
            if final.exists() or dest.exists():
                os.unlink(temp)
                return False
            os.chmod(temp, 0o444)
            os.replace(temp, dest)
            return True
        except BaseException:
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise

    def sync_pending(self, sha1: str) -> None:
        """Put pending content ``sha1`` on the disk now (fsync of the file and of
        ``pending/``); nothing to do once it is in ``sha1/``."""
        try:
            fd = os.open(self.layout.pending_path(sha1), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.layout.pending_dir)

    def pending(self) -> list[str]:
        """The hashes of the content in ``pending/``."""
        return [name for name in os.listdir(self.layout.pending_dir) if is_sha1(name)]

    def install_pending(self, hashes: list[str]) -> None:
        """Move pending content that a ``syncfs(2)`` since its commit has put on the disk
        into ``sha1/``, recorded as written. The renames themselves reach the disk at the
        next sync: until then a crash leaves the content in ``pending/``, which is safe."""
        for sha1 in hashes:
            try:
                self._install(self.layout.pending_path(sha1), sha1, WRITTEN, sync_dir=False)
            except FileNotFoundError:
                pass  # moved by an earlier call

    def recover_pending(self) -> tuple[list[str], list[str]]:
        """After a mount that ended without its last sync: hash each file in
        ``pending/`` again, and put those that hold their hash's bytes on the disk and in
        ``sha1/``; remove the others (a power cut lost some of their bytes). Returns
        (kept, removed) hashes."""
        kept, removed = [], []
        for sha1 in self.pending():
            path = self.layout.pending_path(sha1)
            try:
                with open(path, "rb") as f:
                    good = _holds_its_hash(f.fileno(), sha1)
                    if good:
                        os.fsync(f.fileno())
            except FileNotFoundError:
                continue
            except IntegrityError:  # shorter than it was: cannot be
                good = False
            if good:
                self._install(path, sha1, WRITTEN)
                kept.append(sha1)
            else:
                log.warning("content sha1://%s was committed but did not reach the disk"
                            " whole before the machine stopped; removed", sha1)
                os.unlink(path)
                removed.append(sha1)
        if kept or removed:
            _fsync_dir(self.layout.pending_dir)
        return kept, removed

    def syncfs(self) -> None:
        """``syncfs(2)`` of the store's file system: everything written to it so far
        (content, the node's databases beside it) is on the disk when this returns.

        Through one descriptor held from the store's opening: Linux reports to it every
        write-back error since then, which a descriptor opened later would not see."""
        _syncfs(self._root_fd)

    def install_renamed(self, path: Path, sha1: str) -> None:
        """Put a complete, fsynced file whose SHA-1 the caller checked (a partial file,
        :mod:`kachery_fs.partial`) in place as fetched content, by renaming it."""
        self._install(path, sha1.lower(), FETCHED)

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
                 expected: str | None = None) -> tuple[str, int]:
        """Copy a file into the store, hashing as it is read; returns ``(sha1, size)``.

        ``origin`` is recorded in the index: by default the user added it, and it is
        kept. With ``expected``, a file whose content hashes to anything else is not
        stored: IntegrityError.
        """
        sha1, size, _ = self._add_file(src, progress=progress, origin=origin,
                                       expected=expected, manifest=False)
        return sha1, size

    def add_file_with_manifest(self, src: Path, *, progress=None,
                               ) -> tuple[str, int, Manifest | None]:
        """:meth:`add_file`, and for a file over :data:`~kachery_fs.manifest.CHUNK_SIZE`
        bytes its kachery manifest, computed as it is copied (see :class:`StagingFile`)
        and stored as content of its own (both kept whatever the store's limit)."""
        return self._add_file(src, progress=progress, origin=ADDED, expected=None,
                              manifest=True)

    def _add_file(self, src: Path, *, progress, origin: str, expected: str | None,
                  manifest: bool) -> tuple[str, int, Manifest | None]:
        staging = self.new_staging(manifest=manifest)
        try:
            with open(src, "rb") as f:
                while chunk := f.read(COPY_CHUNK):
                    staging.write(staging.size, chunk)
                    if progress is not None:
                        progress(len(chunk))
        except BaseException:
            staging.discard()
            raise
        size = staging.size
        sha1 = staging.commit(origin=origin, expected=expected)
        return sha1, size, staging.manifest

    def make_manifest(self, sha1: str, *,
                      between: Callable[[], None] | None = None) -> Manifest | None:
        """The kachery manifest of stored content ``sha1``, computed from the file here,
        stored as content of its own and recorded in the index as this node's (``here``):
        the mount's large files get theirs after their commit, not while ``close`` waits
        (see :class:`kachery_fs.uploader.Uploader.manifest_of`). None for content of one
        chunk or less; NotFound if it is not here. Hashes on the calling thread, one chunk
        at a time (not on the pool, which hashes the files being written), and calls
        ``between`` before each chunk (it may raise to stop). Blocks."""
        fd = self.open(sha1)
        try:
            size = os.fstat(fd).st_size
            step = kachery_manifest.CHUNK_SIZE
            if size <= step:
                return None
            chunks = []
            for start in range(0, size, step):
                if between is not None:
                    between()
                chunks.append(_hash_range(fd, start, min(start + step, size)))
        finally:
            os.close(fd)
        manifest = Manifest.of_chunks(size, sha1, chunks)
        assert manifest is not None  # over one chunk
        self.add_bytes(manifest.to_bytes())  # stored before it is recorded
        self.cache.note_manifest(sha1, manifest.hash, MANIFEST_HERE)
        return manifest

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
        hasher = hashlib.sha1()
        with os.fdopen(self.open(sha1), "rb") as f:
            while chunk := f.read(COPY_CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() == sha1.lower():
            return True
        log.error("stored object %s is corrupt (hashes to %s); deleting it", sha1,
                  hasher.hexdigest())
        self.delete(sha1)
        return False

    def delete(self, sha1: str) -> None:
        for path in self._places(sha1)[:2]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.cache.forget(sha1.lower())

    def sweep_temp(self) -> int:
        """Remove the temp files nobody holds (their ``flock`` is free), and the partial
        files that are on no record; returns how many.

        A file in use by any process, this one included, is locked and left alone,
        whatever PID its name carries.
        """
        removed = 0
        # Partial files without a row too (a crash between making one and recording it):
        # a partial file being opened holds its lock before its row is made.
        recorded = {f"{sha1}-{manifest}" for sha1, manifest, _ in self.cache.partials()}
        entries = list(os.scandir(self.tmp_dir))
        if self.layout.partial_dir.is_dir():
            entries += [e for e in os.scandir(self.layout.partial_dir)
                        if e.name not in recorded]
        for entry in entries:
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


class _InOrder:
    """The SHA-1 of the bytes a file was written with in order, taken behind the writes by
    at most one pool job at a time, which follows them until it has caught up; the commit
    waits for it, then hashes the rest (:meth:`finish`)."""

    def __init__(self):
        self.hasher = hashlib.sha1()
        self.done = 0  # bytes [0, done) are in hasher
        self._target = 0  # bytes [0, _target) were written in order
        self._running = False
        self._lock = threading.Lock()  # for the fields above; never held while hashing

    def written(self, fd: int, end: int) -> concurrent.futures.Future[None] | None:
        """Bytes [0, end) are written: a job to hash them, when :data:`HASH_STEP` of them
        wait and no job runs (it reads through a duplicate of ``fd`` that it owns, as in
        :func:`_hash_on_pool`)."""
        with self._lock:
            self._target = end
            if self._running or end - self.done < HASH_STEP:
                return None
            self._running = True
        try:
            return _on_pool(self._follow, fd)
        except BaseException:
            with self._lock:
                self._running = False
            raise

    def _follow(self, fd: int) -> None:
        try:
            while True:
                with self._lock:
                    if self.done >= self._target:
                        self._running = False
                        return
                    start, end = self.done, min(self._target, self.done + COPY_CHUNK)
                self._hash(fd, start, end)
        except BaseException:
            with self._lock:
                self._running = False
            raise
        finally:
            os.close(fd)

    def finish(self, fd: int, end: int) -> str:
        """The SHA-1 of bytes [0, end), once no job runs (the caller waited for them)."""
        while self.done < end:
            self._hash(fd, self.done, min(end, self.done + COPY_CHUNK))
        return self.hasher.hexdigest()

    def _hash(self, fd: int, start: int, end: int) -> None:
        block = os.pread(fd, end - start, start)
        if not block:
            raise IntegrityError(f"a file being written ends at byte {start:,}, before the"
                                 f" {end:,} written to it")
        self.hasher.update(block)
        with self._lock:
            self.done = start + len(block)


def _hash_range(fd: int, start: int, end: int) -> str:
    """The SHA-1 of bytes ``[start, end)`` of the file open as ``fd``, read a block at a
    time."""
    hasher = hashlib.sha1()
    offset = start
    while offset < end:
        block = os.pread(fd, min(COPY_CHUNK, end - offset), offset)
        if not block:
            raise IntegrityError(f"a file being written ends at byte {offset:,}, before"
                                 f" the {end:,} written to it")
        hasher.update(block)
        offset += len(block)
    return hasher.hexdigest()


def _holds_its_hash(fd: int, sha1: str) -> bool:
    """Whether the whole file open as ``fd`` hashes to ``sha1``."""
    return _hash_range(fd, 0, os.fstat(fd).st_size) == sha1.lower()


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _hash_on_pool(fd: int, start: int, end: int) -> concurrent.futures.Future[str]:
    """:func:`_hash_range` on a chunk-hashing thread, through a duplicate of ``fd`` that
    the job owns and closes: whatever becomes of ``fd`` meanwhile (a staging file
    discarded, its number reused), the job reads the file it was given."""
    return _on_pool(_hash_range_and_close, fd, start, end)


def _the_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that hash files being written (made at the first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(CHUNK_HASHERS,
                                                          thread_name_prefix="staging-sha1")
        return _pool


def _on_pool(job, fd: int, *args) -> concurrent.futures.Future:
    """``job(own, *args)`` on the pool, where ``own`` is a duplicate of ``fd`` that the job
    owns and closes."""
    own = os.dup(fd)
    try:
        return _the_pool().submit(job, own, *args)
    except BaseException:
        os.close(own)
        raise


def _hash_range_and_close(fd: int, start: int, end: int) -> str:
    try:
        return _hash_range(fd, start, end)
    finally:
        os.close(fd)


def _forget_pool() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()  # a forked child has none of its threads


os.register_at_fork(after_in_child=_forget_pool)


def _check_hash(expected: str, actual: str) -> None:
    if actual != expected.lower():
        raise IntegrityError(f"content for sha1://{expected} hashed to {actual}; not stored")


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(fd: int) -> None:
    """``syncfs(2)``: Python's os module has no such call."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


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
