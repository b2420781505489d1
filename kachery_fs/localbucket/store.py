"""The local bucket's on-disk store: objects, resumable upload sessions, their locks.

Layout, locking and what survives a restart are described in :mod:`kachery_fs.localbucket`.
Refusals are :class:`~kachery_fs.localbucket.http.GcsError` (a precondition that fails, a
key that collides with a prefix), so the HTTP side answers them as GCS would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import trio

from ..errors import NotFound
from .http import GcsError, _precondition_failed, check_bucket_name, check_key

log = logging.getLogger(__name__)

#: Resumable sessions live a week after they start, as in GCS.
SESSION_LIFETIME_S = 7 * 24 * 3600

#: How often expired sessions are looked for while running (they are also swept at start).
SESSION_SWEEP_INTERVAL_S = 3600

_SESSIONS_DIR = ".sessions"
_TMP_DIR = ".tmp"
_UPLOAD_ID = re.compile(r"[0-9a-f]{64}")


# -- objects and sessions on disk -----------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """What GCS would report about an object. ``generation`` is its mtime in microseconds."""

    size: int
    generation: int
    mtime: float

    @classmethod
    def from_stat(cls, st: os.stat_result) -> ObjectInfo:
        return cls(size=st.st_size, generation=st.st_mtime_ns // 1000, mtime=st.st_mtime)

    @property
    def etag(self) -> str:
        return f'"{self.generation:x}-{self.size:x}"'


@dataclass(frozen=True)
class UploadSession:
    """The persistent state of one resumable upload.

    ``committed`` bytes are in the part file and fsync'd; ``total`` is the size the
    client declared (once it has); ``done`` marks a session whose object was written
    (kept until it expires, so late status queries get GCS's answer).
    """

    upload_id: str
    bucket: str
    key: str
    expires_at: float
    committed: int = 0
    total: int | None = None
    generation_match: int | None = None
    length_range: tuple[int, int] | None = None
    done: bool = False

    @classmethod
    def from_json(cls, data: dict) -> UploadSession:
        length_range = data.get("length_range")
        return cls(
            upload_id=str(data["upload_id"]), bucket=str(data["bucket"]), key=str(data["key"]),
            expires_at=float(data["expires_at"]), committed=int(data["committed"]),
            total=None if data.get("total") is None else int(data["total"]),
            generation_match=(None if data.get("generation_match") is None
                              else int(data["generation_match"])),
            length_range=None if length_range is None else (int(length_range[0]),
                                                            int(length_range[1])),
            done=bool(data.get("done", False)),
        )


class LocalBucket:
    """The objects and upload sessions of a local bucket, under one directory.

    ``public_keys`` maps a signer's ``client_email`` to its RSA public key; the HTTP
    side reads it on every signed request, so keys may be added after construction.

    The methods are synchronous. ``path``, ``stat``, ``delete``, ``session``,
    ``check_precondition`` and ``install`` touch metadata only and may run on the event
    loop; ``sha1``, ``open_object``, ``create_session``, ``save_session`` and
    ``drop_session`` do blocking I/O and are meant for a worker thread.
    """

    def __init__(self, root: Path, public_keys: dict | None = None, *,
                 clock: Callable[[], float] = time.time):
        self.root = Path(root)
        self.public_keys = public_keys if public_keys is not None else {}
        self.clock = clock
        #: Whether object ``(bucket, key)`` is private: then an anonymous read of it is
        #: refused, as GCS refuses one of a bucket without ``allUsers`` access, and only a
        #: signed ``GET`` reads it. The hub sets it (a private channel's keys).
        self.is_private: Callable[[str, str], bool] = lambda bucket, key: False
        self._sessions_dir = self.root / _SESSIONS_DIR
        self._tmp_dir = self.root / _TMP_DIR
        for directory in (self.root, self._sessions_dir, self._tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._install_lock = threading.Lock()
        self._session_locks: dict[str, trio.Lock] = {}
        # The requests on each session that are waiting for its lock or hold it.
        self._session_turns: dict[str, list[_SessionTurn]] = {}
        # Running SHA-1 of each resumable session's committed bytes, so that the hub's check
        # of a finished upload need not read the object again: upload id -> (offset, hasher).
        # In memory only: after a restart the check falls back on reading the object.
        self._session_hashes: dict[str, tuple[int, hashlib._Hash]] = {}
        # Digests known without reading: (bucket, key) -> (size, mtime_ns, sha1 hex).
        self._known_sha1: dict[tuple[str, str], tuple[int, int, str]] = {}
        self._sweep_tmp()
        self._sessions = self._load_sessions()
        self._last_sweep = self.clock()

    # -- objects ----------------------------------------------------------------------------


    def path(self, bucket: str, key: str) -> Path:
        """The file of object ``bucket/key`` (which may not exist). InvalidInput if bad names."""
        return self.root / check_bucket_name(bucket) / check_key(key)

    def stat(self, bucket: str, key: str) -> tuple[int, int] | None:
        """``(size, generation)`` of the object, or ``None`` if there is none."""
        info = self.object_info(bucket, key)
        return None if info is None else (info.size, info.generation)

    def object_info(self, bucket: str, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self.path(bucket, key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo.from_stat(st) if stat.S_ISREG(st.st_mode) else None

    def open_object(self, bucket: str, key: str) -> tuple[int, ObjectInfo]:
        """An open file descriptor of the object and what it is. Blocking.

        Raises FileNotFoundError if there is no such object; the caller closes the fd.
        """
        try:
            fd = os.open(self.path(bucket, key), os.O_RDONLY | os.O_CLOEXEC)
        except NotADirectoryError:
            raise FileNotFoundError(key) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise FileNotFoundError(key)
        return fd, ObjectInfo.from_stat(st)

    def sha1(self, bucket: str, key: str) -> str:
        """The SHA-1 hex digest of the object's bytes. Blocking; NotFound if it is absent.

        An object just made by a resumable upload was hashed as it arrived: that digest is
        used while the file is unchanged (same size and mtime), and not read again.
        """
        try:
            f = open(self.path(bucket, key), "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFound(f"no object {bucket}/{key} in the local bucket") from None
        with f:
            st = os.fstat(f.fileno())
            known = self._known_sha1.pop((bucket, key), None)
            if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
                return known[2]
            return hashlib.file_digest(f, "sha1").hexdigest()

    def delete(self, bucket: str, key: str) -> None:
        """Remove the object if it exists, and any directories that it leaves empty."""
        path = self.path(bucket, key)
        with self._install_lock:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            _prune_empty_dirs(path.parent, stop=self.root / bucket)
        log.info("deleted %s/%s", bucket, key)

    def check_precondition(self, bucket: str, key: str, generation_match: int | None) -> None:
        """Raise ``412 PreconditionFailed`` unless the object's generation is as required.

        ``0`` requires that there is no object; ``None`` requires nothing.
        """
        if generation_match is None:
            return
        info = self.object_info(bucket, key)
        current = 0 if info is None else info.generation
        if current != generation_match:
            raise _precondition_failed()

    def install(self, source: Path, bucket: str, key: str, *,
                generation_match: int | None) -> ObjectInfo:
        """Make the (fsync'd) file ``source`` the object ``bucket/key``, atomically.

        The precondition is checked again here, under the same lock as the rename, so
        no-clobber holds even when two uploads of one key finish together. Quick (no
        data I/O), so it may run on the event loop. ``source`` must be on our filesystem.
        """
        path = self.path(bucket, key)
        with self._install_lock:
            self.check_precondition(bucket, key, generation_match)
            previous = self.object_info(bucket, key)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # The generation is the time of writing (to the microsecond, whatever the
                # filesystem's clock tick), and a replacement always gets a new one.
                now_us = time.time_ns() // 1000
                if previous is not None:
                    now_us = max(now_us, previous.generation + 1)
                os.utime(source, ns=(now_us * 1000, now_us * 1000))
                os.replace(source, path)
            except (NotADirectoryError, FileExistsError, IsADirectoryError):
                raise GcsError(409, "Conflict", f"the key {key!r} collides with an existing "
                               "object (a key cannot be both an object and a prefix here)"
                               ) from None
            return ObjectInfo.from_stat(os.stat(path))

    def temp_path(self) -> Path:
        """A fresh name for a file being received, on the objects' filesystem."""
        return self._tmp_dir / f"{secrets.token_hex(16)}.tmp"

    def _sweep_tmp(self) -> None:
        for entry in self._tmp_dir.iterdir():
            log.info("removing leftover temporary file %s", entry)
            entry.unlink(missing_ok=True)

    # -- upload sessions --------------------------------------------------------------------


    def session(self, upload_id: str) -> UploadSession | None:
        """The live session ``upload_id``, or ``None`` if it is unknown or expired."""
        session = self._sessions.get(upload_id)
        if session is not None and session.expires_at <= self.clock():
            self.drop_session(upload_id)
            return None
        return session

    def session_lock(self, upload_id: str) -> trio.Lock:
        """The lock that every change to session ``upload_id`` happens under."""
        return self._session_locks.setdefault(upload_id, trio.Lock())

    @contextmanager
    def session_turn(self, upload_id: str) -> Iterator[_SessionTurn]:
        """A request's turn on session ``upload_id``: the newest request wins.

        Entering cancels every earlier turn on the session that has not settled (is still
        waiting for the lock, or still receiving its body). The body runs in the turn's
        cancel scope; the caller checks ``turn.scope.cancelled_caught`` after it. Call
        :meth:`_SessionTurn.settle` once the request no longer waits for its client.
        """
        turn = _SessionTurn()
        turns = self._session_turns.setdefault(upload_id, [])
        for earlier in turns:
            earlier.supersede()
        turns.append(turn)
        try:
            with turn.scope:
                yield turn
        finally:
            turns.remove(turn)
            if not turns and self._session_turns.get(upload_id) is turns:
                del self._session_turns[upload_id]

    def part_path(self, upload_id: str) -> Path:
        return self._sessions_dir / f"{upload_id}.part"

    def create_session(self, bucket: str, key: str, *, generation_match: int | None,
                       length_range: tuple[int, int] | None) -> UploadSession:
        """Start a resumable upload of ``bucket/key``. Blocking (creates and fsyncs files)."""
        self._maybe_sweep_sessions()
        check_bucket_name(bucket)
        check_key(key)
        session = UploadSession(upload_id=secrets.token_hex(32), bucket=bucket, key=key,
                                expires_at=self.clock() + SESSION_LIFETIME_S,
                                generation_match=generation_match, length_range=length_range)
        self.part_path(session.upload_id).touch(exist_ok=False)
        self.save_session(session)
        return session

    def save_session(self, session: UploadSession) -> None:
        """Persist ``session`` atomically (temp file, fsync, rename), then adopt it. Blocking."""
        path = self._session_path(session.upload_id)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(session), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._sessions[session.upload_id] = session

    def drop_session(self, upload_id: str) -> None:
        """Forget session ``upload_id`` and remove its files (missing ones are fine)."""
        self._sessions.pop(upload_id, None)
        self._session_locks.pop(upload_id, None)
        self._session_hashes.pop(upload_id, None)
        for path in (self._session_path(upload_id), self.part_path(upload_id)):
            path.unlink(missing_ok=True)

    def _session_path(self, upload_id: str) -> Path:
        return self._sessions_dir / f"{upload_id}.json"

    def _load_sessions(self) -> dict[str, UploadSession]:
        """Sessions that survive a restart; expired, broken and orphaned files are removed.

        A part file longer than the session's committed size holds a chunk that was
        never acknowledged (we stopped mid-chunk): it is cut back.
        """
        now = self.clock()
        sessions: dict[str, UploadSession] = {}
        for entry in self._sessions_dir.glob("*.json"):
            upload_id = entry.stem
            session = _read_session(entry) if _UPLOAD_ID.fullmatch(upload_id) else None
            if session is None or session.upload_id != upload_id or session.expires_at <= now:
                continue
            if not session.done:
                part = self.part_path(upload_id)
                try:
                    if part.stat().st_size < session.committed:
                        continue
                    os.truncate(part, session.committed)
                except FileNotFoundError:
                    continue
            sessions[upload_id] = session
        keep = {f"{i}.json" for i in sessions} | {f"{i}.part" for i, s in sessions.items()
                                                  if not s.done}
        for entry in self._sessions_dir.iterdir():
            if entry.name not in keep:
                entry.unlink(missing_ok=True)
        if sessions:
            log.info("%d upload session(s) resumed from %s", len(sessions), self._sessions_dir)
        return sessions

    def _maybe_sweep_sessions(self) -> None:
        now = self.clock()
        if now - self._last_sweep < SESSION_SWEEP_INTERVAL_S:
            return
        self._last_sweep = now
        for upload_id, session in list(self._sessions.items()):
            if session.expires_at <= now:
                self.drop_session(upload_id)


class _SessionTurn:
    """One request on an upload session, cancellable by a newer one until it settles."""

    def __init__(self):
        self.scope = trio.CancelScope()
        self.settled = False

    def supersede(self) -> None:
        if not self.settled:
            self.scope.cancel()

    def settle(self) -> None:
        """From now on the request only finishes (fsync, persist, answer): a newer one
        waits for it instead of cancelling it."""
        self.settled = True


def _read_session(path: Path) -> UploadSession | None:
    try:
        return UploadSession.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        log.warning("ignoring unreadable upload session %s", path)
        return None


def _prune_empty_dirs(directory: Path, *, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)



def _open_for_append(path: Path, offset: int) -> BinaryIO:
    """``path`` opened for writing at ``offset``, with anything after it cut off."""
    f = open(path, "r+b")  # the caller closes it
    f.truncate(offset)
    f.seek(offset)
    return f


def _sync_and_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
