"""The background upload queue: stored files to their channel's bucket, through the hub.

The queue lives in the node database (``uploads`` table), so a crash, a kill or a remount
loses nothing: :meth:`Uploader.create` picks up every pending upload, and an upload
that had a resumable session resumes from the bucket's committed offset.

Life of one upload: ``initiate`` at the hub (answer: already present, or a signed
resumable URL) → session start → chunked PUTs (progress persisted) → ``finalize`` at
the hub, which checks the object. Transient failures are retried with backoff without
limit; a refusal (no permission, bad object) marks the upload failed with the reason,
which ``user.kachery.status`` shows.

A large file whose manifest this node computed from the file itself (``put``, ``store
add``: source ``here`` in the store's index) has that manifest uploaded first, and its
finalize vouches for it, so that the hub can tell readers which manifest to trust
(``hub.manifests``). A manifest the hub vouched for is never vouched for again from
here. A vouch the hub refuses is a warning: the upload is done all the same.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import httpx
import trio

from . import manifest as manifest_module
from . import metrics, resumable
from .cache import MANIFEST_HERE
from .channels import Channels
from .errors import (
    Conflict,
    CorruptLocalFile,
    IntegrityError,
    InvalidInput,
    KacheryError,
    NoSpace,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from .hub_client import HubClient
from .retry import background, pause, retrying
from .state import NodeDB
from .store import Store

log = logging.getLogger(__name__)

#: How long a worker waits before it tries again an upload whose state the node database
#: could not record because the disk is full.
NO_SPACE_PAUSE_S = 60.0
#: The background workers let a burst of closes pass before they upload, so that the
#: uploads do not take the CPU (and the mount's event loop) from the program writing
#: (``rsync``, ``tar -x``): they start once no file was queued for this long...
QUIET_S = 0.5
#: ...or once the burst has gone on this long, whatever goes on.
HOLD_MAX_S = 5.0


class Uploader:
    """Runs uploads in the background of a nursery it is given (STYLE rule 6)."""

    def __init__(self, db: NodeDB, store: Store, channels: Channels, client: httpx.AsyncClient,
                 *, workers: int = 2, rate_limit: resumable.RateLimit | None = None):
        self.db = db
        self.store = store
        self.channels = channels
        self.client = client
        self.rate_limit = rate_limit
        self.workers = workers
        self._wake = trio.Event()
        self._active: set[tuple[str, str]] = set()
        self._progress: dict[tuple[str, str], int] = {}
        self._listeners: dict[tuple[str, str], Callable[[int], None]] = {}
        self.idle = trio.Event()
        self._last_queued = -math.inf  # trio time of the last enqueue
        self._burst_began = -math.inf  # of the first enqueue after a quiet spell
        #: Manifests being computed (:meth:`manifest_of`): sha1 → set when done.
        self._making: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    @classmethod
    async def create(cls, db: NodeDB, store: Store, channels: Channels,
                     client: httpx.AsyncClient, *, nursery: trio.Nursery, workers: int = 2,
                     rate_limit: resumable.RateLimit | None = None) -> Uploader:
        """An uploader with ``workers`` background workers in ``nursery``. With workers, the
        queue is recovered first (committed files not queued, failed uploads retried);
        with none, uploads run only when asked (:meth:`upload_now`)."""
        self = cls(db, store, channels, client, workers=workers, rate_limit=rate_limit)
        # Manifests are made in the background with or without workers: a read-only mount
        # has none, and its user.kachery.uri of a large file waits for one.
        self._nursery = nursery
        if not workers:
            return self
        for _ in range(workers):
            nursery.start_soon(self._worker)
        for channel, sha1, size in db.entries_not_queued():
            log.info("queuing the upload of %s/sha1://%s, committed but not queued", channel,
                     sha1)
            db.enqueue_upload(channel, sha1, size)
        retried = db.requeue_failed()
        if retried:
            log.info("retrying %d upload(s) that failed before", retried)
        pending = db.pending_uploads()
        if pending:
            log.info("resuming %d pending upload(s)", len(pending))
        return self

    def enqueue(self, channel: str, sha1: str, size: int) -> None:
        if self.db.enqueue_upload(channel, sha1, size):
            log.info("queued upload of sha1://%s (%d bytes) to %s", sha1, size, channel)
            self._wake.set()
        now = trio.current_time()
        if now - self._last_queued >= QUIET_S:
            self._burst_began = now
        self._last_queued = now

    async def _quiet(self) -> None:
        """Wait until no file was queued for :data:`QUIET_S`, or the burst of closes has
        gone on for :data:`HOLD_MAX_S`."""
        deadline = self._burst_began + HOLD_MAX_S
        while (now := trio.current_time()) < deadline:
            wait = self._last_queued + QUIET_S - now
            if wait <= 0:
                return
            await trio.sleep(min(wait, deadline - now))

    async def manifest_of(self, sha1: str, size: int) -> tuple[str, str] | None:
        """The manifest of stored content ``sha1`` (``size`` bytes) on record, as
        ``(manifest hash, source)`` (see :meth:`StoreCache.known_manifest`). A file over
        one chunk with none on record gets one computed from the file here, on a thread
        (:meth:`Store.make_manifest`): the mount commits its files without one, so that
        ``close`` waits for one SHA-1 pass only. Callers asking at once share one
        computation. None for a small file, or content no longer here."""
        if size <= manifest_module.CHUNK_SIZE:
            return None  # one chunk or less: kachery gives it no manifest
        known = self.store.cache.known_manifest(sha1)
        if known is not None:
            return known
        making = self._making.get(sha1)
        if making is None:
            self._making[sha1] = making = trio.Event()
            if self._nursery is not None:
                # In the background: a caller that stops waiting (a deadline) does not
                # stop the computation, which the next caller then finds done.
                self._nursery.start_soon(self._make_manifest, sha1, making)
            else:
                await self._make_manifest(sha1, making)
        await making.wait()
        return self.store.cache.known_manifest(sha1)

    async def _make_manifest(self, sha1: str, done: trio.Event) -> None:
        try:
            # An unmount stops it between two chunks (trio.Cancelled from the thread).
            await trio.to_thread.run_sync(partial(self.store.make_manifest, sha1,
                                                  between=trio.from_thread.check_cancelled))
        except (KacheryError, OSError) as exc:
            log.warning("no manifest for sha1://%s: %s (it is read and uploaded whole)",
                        sha1, exc)
        except Exception:  # in the background: it must not take the mount down
            log.exception("no manifest for sha1://%s (it is read and uploaded whole)", sha1)
        finally:
            del self._making[sha1]
            done.set()

    def status(self, channel: str, sha1: str) -> str:
        """A one-line status for ``user.kachery.status``."""
        up = self.db.upload(channel, sha1)
        if up is None:
            return "local"
        if up.state == "done":
            return "in bucket"
        if up.state == "failed":
            return f"failed: {up.error}"
        committed = self._progress.get((channel, sha1), up.committed)
        pct = 100.0 if up.size == 0 else 100.0 * committed / up.size
        text = f"uploading {math.floor(pct * 10) / 10:.1f}%"
        if up.error:
            text += f" (retrying: {up.error})"
        return text

    async def _worker(self) -> None:
        while True:
            job = self._next_job()
            if job is None:
                self._wake = trio.Event() if self._wake.is_set() else self._wake
                with trio.move_on_after(30):
                    await self._wake.wait()
                continue
            key = (job.channel, job.sha1)
            self._active.add(key)
            try:
                await self._quiet()
                if self._nursery is not None and job.size > manifest_module.CHUNK_SIZE:
                    # Made beside the upload (if none is on record), which reads the same
                    # pages; its finalize waits for it (_upload_manifest).
                    self._nursery.start_soon(self.manifest_of, job.sha1, job.size)
                await self._run(job)
            except NoSpace as exc:
                # The node database cannot record the upload's state (the disk is full).
                # The upload stays queued as it was; a worker must not die of it, which
                # would take the mount down with it.
                log.warning("upload of sha1://%s to %s paused for %g s: %s", job.sha1,
                            job.channel, NO_SPACE_PAUSE_S, exc)
                await trio.sleep(NO_SPACE_PAUSE_S)
            except Exception:
                log.exception("upload of %s to %s failed unexpectedly", job.sha1, job.channel)
                try:
                    self.db.update_upload(job.channel, job.sha1, state="failed",
                                          error="internal error (see the log)")
                except NoSpace as exc:
                    log.warning("could not mark the upload failed: %s", exc)
            finally:
                self._active.discard(key)
                self._progress.pop(key, None)

    def _next_job(self):
        # The oldest that no worker has: among the first len(active) + 1 (not a scan of a
        # queue of thousands at every pick).
        for up in self.db.pending_uploads(limit=len(self._active) + 1):
            if (up.channel, up.sha1) not in self._active:
                return up
        return None

    async def _run(self, job, *, retry: bool = True) -> None:
        """Upload ``job`` until it is done or refused; with ``retry=False``, one attempt
        (a transient error stays recorded on the queued upload)."""
        backoff = background()
        while True:
            # A refusal is the log's news in the background; a caller that does not retry
            # (`put`) reports it to its user itself.
            err = await self._try(job, level=logging.ERROR if retry else logging.INFO)
            if err is None or not retry:
                return
            await pause(backoff, err, what=f"upload of sha1://{job.sha1} to {job.channel}",
                        level=logging.WARNING)
            job = self.db.upload(job.channel, job.sha1)

    async def _try(self, job, *, level: int = logging.ERROR) -> KacheryError | None:
        """One attempt at ``job``, its outcome recorded in the queue: None when the upload
        is over (done, or refused: no retry would help, logged at ``level``), else the
        transient error."""
        try:
            await self._attempt(job)
            self.db.update_upload(job.channel, job.sha1, state="done", error=None)
            metrics.UPLOADS_ENDED.labels("done").inc()
            log.info("sha1://%s is in the bucket of %s", job.sha1, job.channel)
            return None
        except CorruptLocalFile as exc:
            self.db.update_upload(job.channel, job.sha1, state="failed", error=str(exc))
            metrics.UPLOADS_ENDED.labels("failed").inc()
            log.log(level, "upload of sha1://%s to %s abandoned: %s; removing the bad copy"
                    " from the local store", job.sha1, job.channel, exc)
            self.store.delete(job.sha1)
            return None
        except (PermissionDenied, InvalidInput) as exc:
            self.db.update_upload(job.channel, job.sha1, state="failed", error=str(exc))
            metrics.UPLOADS_ENDED.labels("failed").inc()
            log.log(level, "upload of sha1://%s to %s refused: %s", job.sha1, job.channel, exc)
            return None
        except NotFound as exc:
            if not self.store.has(job.sha1):
                self.db.update_upload(job.channel, job.sha1, state="failed",
                                      error="the file is no longer in the local store")
                metrics.UPLOADS_ENDED.labels("failed").inc()
                return None
            err: KacheryError = exc
        except IntegrityError as exc:
            # The hub found the object bad and deleted it: start over with a new session.
            self.db.update_upload(job.channel, job.sha1, session_uri=None, committed=0)
            err = exc
        except (Unavailable, Conflict, KacheryError) as exc:
            err = exc
        recorded = self.db.upload(job.channel, job.sha1)
        assert recorded is not None  # queued uploads are never deleted
        attempts = (recorded.attempts or 0) + 1
        self.db.update_upload(job.channel, job.sha1, error=str(err), attempts=attempts)
        return err

    @property
    def in_flight(self) -> int:
        """How many uploads are being sent now."""
        return len(self._active)

    async def upload_now(self, channel: str, sha1: str, size: int, *,
                         on_progress: Callable[[int], None] | None = None,
                         retry: bool = True) -> None:
        """Upload at once (for a file request), ahead of the queue, and return when the
        object is in the bucket. Uses the persistent queue's record, so an interrupted
        upload is resumed later by the background workers like any other.

        Raises the upload's error; transient errors are retried here only until the
        caller gives up (it cancels us), or not at all with ``retry=False``: the upload
        then stays queued with its error, its session saved for the next attempt.
        """
        key = (channel, sha1)
        self.db.enqueue_upload(channel, sha1, size, again=True)
        while key in self._active:  # a worker is on it already: follow its progress
            if on_progress is not None:
                on_progress(self._progress.get(key, 0))
            await trio.sleep(0.2)
        up = self.db.upload(channel, sha1)
        assert up is not None  # enqueued just above
        if up.state == "done":
            return
        self._active.add(key)
        try:
            def progress(committed: int) -> None:
                if on_progress is not None:
                    on_progress(committed)
            self._listeners[key] = progress
            await self._run(up, retry=retry)
        finally:
            self._listeners.pop(key, None)
            self._active.discard(key)
            self._progress.pop(key, None)
            self._wake.set()
        up = self.db.upload(channel, sha1)
        if up is None or up.state != "done":
            raise KacheryError(up.error if up is not None and up.error else "upload failed")

    async def upload_part(self, channel: str, sha1: str, size: int, *, source: str,
                          start: int) -> None:
        """Upload the ``size`` bytes of stored file ``source`` from ``start`` on as object
        ``sha1`` (a chunk of a large file, for a file request that streams: see
        :mod:`kachery_fs.provider`); return when it is in the bucket. The bytes are hashed
        as they are read and the last of them is sent only if they are ``sha1``'s.

        Not queued: a chunk object serves the readers of one request, and if the upload
        is cut short the file's own upload (queued) still brings the file. Transient
        errors are tried again a few times (:func:`kachery_fs.retry.retrying`)."""
        hub = self.channels.hub_of(channel)

        async def attempt() -> None:
            signed = await hub.initiate_upload(channel, sha1, size)
            if signed is None:  # the bucket has it already
                return
            try:
                session = await resumable.start_session(self.client, signed)
                with _opened(self.store, source) as fd:
                    await resumable.upload(self.client, session, fd, size, base=start,
                                           sha1=sha1, rate_limit=self.rate_limit)
            except Conflict:
                pass  # it appeared meanwhile: the hub's finalize checks it
            await hub.finalize_upload(channel, sha1, size)

        await retrying(attempt, what=f"uploading chunk sha1://{sha1} of sha1://{source}")

    async def _attempt(self, job) -> None:
        db, client = self.db, self.client
        hub = self.channels.hub_of(job.channel)
        if not self.store.has(job.sha1):
            raise NotFound(f"sha1://{job.sha1} is not in the local store")
        session, offset = job.session_uri, 0
        if session:
            try:
                committed = await resumable.query_offset(client, session, job.size)
            except NotFound:
                log.info("upload session for %s expired; starting a new one", job.sha1)
                session = None
                db.update_upload(job.channel, job.sha1, session_uri=None, committed=0)
            else:
                if committed is None:
                    await self._finalize(hub, job)
                    return
                offset = committed
        if not session:
            signed = await hub.initiate_upload(job.channel, job.sha1, job.size)
            if signed is None:  # the bucket already has it (the hub checked)
                if await self._manifest_here(job.sha1, job.size) is not None:
                    await self._finalize(hub, job)  # for the vouch: the hub may have none
                return
            try:
                session = await resumable.start_session(client, signed)
            except Conflict:
                await self._finalize(hub, job)
                return
            db.update_upload(job.channel, job.sha1, session_uri=session, committed=0,
                             state="uploading")
            offset = 0

        key = (job.channel, job.sha1)

        sent = [offset]

        def on_progress(committed: int) -> None:
            metrics.UPLOADED_BYTES.inc(max(0, committed - sent[0]))
            sent[0] = committed
            self._progress[key] = committed
            db.update_upload(job.channel, job.sha1, committed=committed)
            listener = self._listeners.get(key)
            if listener is not None:
                listener(committed)

        try:
            with _opened(self.store, job.sha1) as fd:
                await resumable.upload(client, session, fd, job.size, offset=offset,
                                       on_progress=on_progress, sha1=job.sha1,
                                       rate_limit=self.rate_limit)
        except Conflict:
            # The object appeared meanwhile (a mount or another node uploading the same
            # content): the hub's finalize checks it as if it were ours.
            log.info("sha1://%s appeared in the bucket of %s during its upload", job.sha1,
                     job.channel)
        await self._finalize(hub, job)
        db.update_upload(job.channel, job.sha1, session_uri=None)

    async def _manifest_here(self, sha1: str, size: int) -> str | None:
        """The manifest of ``sha1`` that this node computed from the file itself, if any,
        computed now if none is on record (one the hub vouched for is not this node's to
        vouch for again)."""
        known = await self.manifest_of(sha1, size)
        return known[0] if known is not None and known[1] == MANIFEST_HERE else None

    async def _finalize(self, hub: HubClient, job) -> None:
        """The hub's finalize of ``job``. For a large file whose manifest this node computed
        (:meth:`_manifest_here`), the manifest goes up first and the finalize vouches for
        it; a vouch the hub refuses is a warning, the upload is done all the same."""
        manifest = await self._upload_manifest(job)
        said = await hub.finalize_upload(job.channel, job.sha1, job.size, manifest=manifest)
        if manifest is None:
            return
        if said == "vouched":
            log.info("the hub of %s has manifest %s of sha1://%s on record", job.channel,
                     manifest, job.sha1)
        elif said is None:
            log.info("the hub of %s keeps no manifests: readers of sha1://%s read it whole",
                     job.channel, job.sha1)
        else:
            log.warning("the hub of %s did not take this node's manifest %s of sha1://%s:"
                        " %s (readers read the file whole; the upload is done)", job.channel,
                        manifest, job.sha1, said.removeprefix("refused: "))

    async def _upload_manifest(self, job) -> str | None:
        """Put the manifest of ``job``'s file that this node computed in the bucket (through
        :meth:`upload_now`, one attempt) and return its SHA-1 to vouch for; None when there
        is none, it is gone from the store, or its upload was refused. A transient error is
        raised: the job's finalize is tried again with it."""
        manifest = await self._manifest_here(job.sha1, job.size)
        if manifest is None:
            return None
        size = self.store.size(manifest)
        if size is None:
            log.warning("the manifest %s of sha1://%s is no longer in the local store:"
                        " finalizing the file without vouching for it", manifest, job.sha1)
            return None
        try:
            await self.upload_now(job.channel, manifest, size, retry=False)
        except KacheryError as exc:
            up = self.db.upload(job.channel, manifest)
            if up is None or up.state != "failed":
                raise  # transient (it stays queued): the finalize waits for it
            log.warning("the manifest %s of sha1://%s could not be uploaded (%s):"
                        " finalizing the file without vouching for it", manifest, job.sha1,
                        exc)
            return None
        return manifest


@contextmanager
def _opened(store: Store, sha1: str) -> Iterator[int]:
    """A descriptor on stored content ``sha1`` for the block (NotFound if it is gone):
    the content may move from ``pending/`` to ``sha1/`` while it is read, and eviction
    keeps away from it meanwhile (see :meth:`Store.open`)."""
    fd = store.open(sha1)
    try:
        yield fd
    finally:
        os.close(fd)
