"""What ``close``, ``fsync`` and a crash leave on the disk (no pyfuse3).

The contract is a local file system's, as POSIX gives it:

- **close commits, without waiting for the disk.** The content goes from its staging
  file to the store's ``pending/<sha1>``, hashed but not fsynced; the name points at it
  and the upload is queued, and node.db's ``unsynced`` log records what the file had
  before, in the same transaction. Every reader, in this process or another, sees the
  new content at once (:meth:`~kachery_fs.store.Store.open` looks in ``pending/`` too).
- **A sync makes it durable**: every :data:`SYNC_INTERVAL_S` seconds while something is
  committed, and at once for ``fsync(2)`` or ``fdatasync(2)`` of a file in the mount (or
  of a directory), which return only after it. One ``syncfs(2)`` of the node
  directory's file system puts the content, the node database and the log on the disk;
  then the pending content moves into ``sha1/`` and the log entries it covers go. Every
  caller that asks while one runs is answered by the next (group commit).
- **A crash** (kill -9, a kernel panic, a power cut) loses at most what the last sync
  did not cover, and never shows wrong bytes: at the next mount, :func:`recover` hashes
  every file still in ``pending/`` again and removes the ones that do not hold their
  hash's bytes; a name whose content is gone goes back to the content the log says it
  had before (or, for a file that had none, away), with a log line naming it; and a
  file that ``create(2)`` made but no close committed goes too, rather than stay as an
  empty stand-in.

``sync(1)`` and ``syncfs(2)`` of the mount do not reach a FUSE file system on Linux (the
kernel forwards them only to virtiofs): the periodic sync stands in for them.
"""

from __future__ import annotations

import errno
import logging
import os

import trio

from ..errors import NotFound
from ..state import NodeDB, Unsynced
from ..store import Store
from .namespace import Namespace

log = logging.getLogger(__name__)

#: How often committed content is made durable, as ext4 commits its journal.
SYNC_INTERVAL_S = 5.0


class Durability:
    """The syncs of one mount: periodic, and on demand for ``fsync(2)`` (see the module).

    Run :meth:`run` in a nursery for the periodic ones; call :meth:`committed` after each
    commit that left something to sync, and :meth:`sync` to wait for one.
    """

    def __init__(self, store: Store, db: NodeDB, *, interval: float = SYNC_INTERVAL_S):
        self.store = store
        self.db = db
        self.interval = interval
        self._lock = trio.Lock()  # one sync at a time
        self._started = 0  # syncs started
        self._done = 0  # the last sync that ended, by its number
        self._dirty = False  # something was committed since the last sync began
        self._wake = trio.Event()  # for run(): something was committed
        #: The error of a sync that failed (the disk could not write back what was
        #: committed). From then on nothing in pending/ is taken for durable in this mount
        #: (the next start hashes it all again), and fsync(2) fails.
        self.failed: OSError | None = None

    def committed(self) -> None:
        """Something was committed that only a sync makes durable."""
        self._dirty = True
        self._wake.set()

    async def sync(self) -> None:
        """Return once everything committed before the call is on the disk: after a sync
        that began after it (one that is running may have begun before)."""
        wanted = self._started + 1
        async with self._lock:
            self._check()
            if self._done >= wanted:
                return  # another caller ran one for us
            self._started += 1
            number = self._started
            self._dirty = False
            seq = self.db.unsynced_seq()
            pending = await trio.to_thread.run_sync(self.store.pending)
            try:
                await trio.to_thread.run_sync(self.store.syncfs)
            except OSError as exc:
                self.failed = exc
                self._dirty = True
                log.error("the disk could not write back what was committed (syncfs: %s):"
                          " files committed since the mount started stay in the store's"
                          " pending/ and are checked again at the next start; fsync fails"
                          " until then", exc)
                self._check()
            self._done = number
            # On the disk now: the content may move where readers expect durable content.
            # If that fails (a full disk for a new directory, or for the index), it stays
            # in pending/, which is as safe: the next sync tries again.
            try:
                await trio.to_thread.run_sync(self.store.install_pending, pending)
                self.db.forget_unsynced(seq)
            except Exception as exc:
                log.warning("committed content is on the disk but stays in the store's"
                            " pending/ for now: %s", exc)
                self._dirty = True
                self._wake.set()

    def _check(self) -> None:
        if self.failed is not None:
            raise OSError(self.failed.errno or errno.EIO,
                          f"an earlier sync failed: {self.failed}")

    async def run(self) -> None:
        """Sync :attr:`interval` seconds after the first commit since the last sync."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            await trio.sleep(self.interval)
            if not self._dirty or self.failed is not None:
                continue  # an fsync synced it meanwhile; or nothing is taken for synced
            try:
                await self.sync()
            except OSError:
                pass  # logged once, by sync(); the mount goes on serving
            except Exception:  # never take the mount down for it
                log.exception("sync of the node directory failed")
                self.committed()


def recover(store: Store, db: NodeDB, ns: Namespace) -> None:
    """Bring the node back to a state a sync could have left, after a mount that ended
    without its last one (see the module). Run before the mount serves anything. Blocks:
    it hashes what is in ``pending/``."""
    pending = store.pending()
    if pending:
        log.info("checking %d file(s) committed just before the last mount ended",
                 len(pending))
    _, removed = store.recover_pending()
    changes: dict[int, list[Unsynced]] = {}
    for change in db.unsynced_changes():
        changes.setdefault(change.inode, []).append(change)
    for inode_id, chain in changes.items():
        _roll_back(store, db, ns, inode_id, chain)
    for row in db.uncommitted():
        _remove(db, ns, row.id, "was being created and never closed when the last mount ended")
    for sha1 in removed:  # no upload of what is gone, unless a name still wants it
        if not db.names_content(sha1):
            db.forget_upload(sha1)
    store.syncfs()
    db.forget_unsynced(db.unsynced_seq())
    # Written by this process from now on, in this boot: served without a second hash.
    store.pending_trusted = True


def _roll_back(store: Store, db: NodeDB, ns: Namespace, inode_id: int,
               chain: list[Unsynced]) -> None:
    """Give inode ``inode_id`` the newest content in its log ``chain`` that the store
    holds: its own, else what it had before each change, newest first."""
    try:
        row = db.inode(inode_id)
    except NotFound:  # removed since: nothing names it
        return
    if _holds(store, row.sha1, row.size):
        return
    for change in reversed(chain):
        if not change.prev_committed:
            _remove(db, ns, inode_id, f"lost its first content (sha1://{row.sha1}) before"
                    " it reached the disk")
            return
        if _holds(store, change.prev_sha1, change.prev_size):
            db.update_inode(inode_id, sha1=change.prev_sha1, size=change.prev_size)
            log.warning("%s lost its last content (sha1://%s) before it reached the disk:"
                        " it has its previous content again (sha1://%s, %d bytes)",
                        _where(db, row.channel, inode_id), row.sha1, change.prev_sha1,
                        change.prev_size)
            return
    _remove(db, ns, inode_id, f"lost its content (sha1://{row.sha1}) and every earlier"
            " one")


def _holds(store: Store, sha1: str | None, size: int) -> bool:
    return size == 0 or (sha1 is not None and store.size(sha1) == size)


def _remove(db: NodeDB, ns: Namespace, inode_id: int, why: str) -> None:
    try:
        row = db.inode(inode_id)
    except NotFound:
        return
    log.warning("%s %s: removed", _where(db, row.channel, inode_id), why)
    ns.discard(inode_id)


def _where(db: NodeDB, channel: str, inode_id: int) -> str:
    """A name of inode ``inode_id``, as a path under its channel, for a log line."""
    parts: list[str] = []
    current = inode_id
    while current:
        place = db.name_of(current)
        if place is None:
            return f"{channel}/(inode {inode_id}, unlinked)"
        current, name = place
        parts.append(name)
    return os.path.join(channel, *reversed(parts))
