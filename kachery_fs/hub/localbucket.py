"""The local bucket: a directory served over HTTP with the semantics of GCS's XML API.

It lets a hub serve a channel's data itself, with the same wire behaviour a node sees
from Google Cloud Storage, so nodes have one code path for both:

* public ``GET``/``HEAD`` of ``/<bucket>/<key>``, with ``Range`` answered as GCS does;
* writes only through V4 signed URLs (``GOOG4-RSA-SHA256``), checked for real against
  the public keys of the signers we trust (:class:`kachery_fs.hub.signing.UrlSigner`):
  a signed single ``PUT``, or a signed ``POST`` (``x-goog-resumable: start``) that opens
  a resumable upload session, then chunked ``PUT``s to the session URI;
* the preconditions our signer puts in every URL: ``x-goog-if-generation-match``
  (``0`` = never overwrite) and ``x-goog-content-length-range``.

There is no ``DELETE`` over HTTP, no listing, and no ``/api/`` (the hub's own app owns it).

Layout on disk::

    <root>/<bucket>/<key>          the objects, one file each
    <root>/.sessions/<id>.json     an upload session's state (committed bytes, preconditions)
    <root>/.sessions/<id>.part     the bytes an upload session has committed so far
    <root>/.tmp/                   single PUTs being received (swept at start)

Concurrency: the HTTP side runs on one trio event loop and does file I/O in worker
threads. Every change to an upload session happens under that session's ``trio.Lock``;
the step that makes a file an object (precondition check, then ``os.replace``) and
:meth:`LocalBucket.delete` run under one ``threading.Lock``, so two uploads of one key
can never both pass a no-clobber check. Readers keep the file they opened: an object
replaced under a download is never seen half-written.

A new request on an upload session wins, as in GCS: it cancels any earlier request on
that session that is still waiting for the lock or still receiving its chunk's body
(:meth:`LocalBucket.session_turn`). A sender that vanished mid-chunk without closing its
connection (a frozen machine, a connection held by a proxy) therefore blocks its session
only until the next request on it, which is how a restarted uploader resumes. A chunk
cut off this way, or by its client going away, or by a body that stops arriving for
:data:`BODY_STALL_TIMEOUT_S`, commits nothing: the committed offset is persisted only
after a whole chunk is written and fsync'd, and the bytes past it are cut off by the
next chunk (or at the next start). A request whose body is all here is no longer
cancelled: it finishes (fsync, persist, answer) while newer requests wait for the lock.
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
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, unquote
from xml.sax.saxutils import escape

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from ..errors import InvalidInput, NotFound

log = logging.getLogger(__name__)

#: Non-final chunks of a resumable upload must be multiples of this (as in GCS).
CHUNK_GRANULARITY = 256 * 1024

#: How much of a file one read (and one ASGI body message) carries when serving it.
READ_CHUNK = 1 << 20

#: How much received body we gather before handing it to a worker thread to write.
WRITE_BATCH = 4 << 20

#: Resumable sessions live a week after they start, as in GCS.
SESSION_LIFETIME_S = 7 * 24 * 3600

#: Longest validity a V4 signature may claim (GCS's limit).
MAX_SIGNATURE_EXPIRY_S = 7 * 24 * 3600

#: How far in the future a signature's ``X-Goog-Date`` may be (clock skew we forgive).
MAX_FUTURE_SKEW_S = 300

#: How often expired sessions are looked for while running (they are also swept at start).
SESSION_SWEEP_INTERVAL_S = 3600

#: A request body that delivers nothing for this long is given up (``408``): its sender is
#: gone or stuck. Twice the uploader's own stall timeout, so that a slow but live sender
#: gives up first, on its side, and resumes.
BODY_STALL_TIMEOUT_S = 120.0

ALGORITHM = "GOOG4-RSA-SHA256"
CONTENT_TYPE = "application/octet-stream"

_SESSIONS_DIR = ".sessions"
_TMP_DIR = ".tmp"
_UPLOAD_ID = re.compile(r"[0-9a-f]{64}")
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+|\*)")
_BYTE_RANGE = re.compile(r"(\d{0,20})-(\d{0,20})")  # longer numbers: malformed
_SIGNATURE_PARAMS = ("X-Goog-Algorithm", "X-Goog-Credential", "X-Goog-Date",
                     "X-Goog-Expires", "X-Goog-SignedHeaders", "X-Goog-Signature")


class GcsError(Exception):
    """A refusal, answered the way GCS's XML API answers it (status, code, message)."""

    def __init__(self, status: int, code: str, message: str, *, details: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def _no_such_key(bucket: str, key: str) -> GcsError:
    return GcsError(404, "NoSuchKey", "The specified key does not exist.",
                    details=f"No such object: {bucket}/{key}")


def _no_such_upload() -> GcsError:
    return GcsError(404, "NoSuchUpload", "The requested upload was not found or has expired.")


def _invalid(message: str) -> GcsError:
    return GcsError(400, "InvalidArgument", message)


def _precondition_failed() -> GcsError:
    return GcsError(412, "PreconditionFailed",
                    "At least one of the pre-conditions you specified did not hold.")


# -- names ----------------------------------------------------------------------------------


def check_bucket_name(bucket: str) -> str:
    """``bucket`` if it is a valid bucket name (GCS's rules; never ``api``), else InvalidInput."""
    if not isinstance(bucket, str) or not _BUCKET_NAME.fullmatch(bucket) or bucket == "api":
        raise InvalidInput(f"invalid bucket name {bucket!r}")
    return bucket


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_key(key: str) -> str:
    """``key`` if it can name an object file, else InvalidInput.

    Refused: empty keys, absolute paths, empty, ``.`` or ``..`` segments, control
    characters, and keys over GCS's 1024-byte limit.
    """
    if not isinstance(key, str) or not key or len(key.encode("utf-8", "replace")) > 1024:
        raise InvalidInput(f"invalid object key {key!r}")
    if _CONTROL.search(key):
        raise InvalidInput(f"invalid object key {key!r}: control character")
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        raise InvalidInput(f"invalid object key {key!r}: empty, '.' or '..' path segment")
    return key


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
        self._session_hashes: dict[str, tuple[int, object]] = {}
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


# -- V4 signed URLs -------------------------------------------------------------------------


def verify_signed_request(request: _Request, public_keys: dict, now: float) -> None:
    """Check a V4 signed request the way GCS does; return quietly if it is genuine.

    The canonical request is rebuilt from what actually arrived (method, path, query
    without the signature, the signed headers' values), so re-pointing the URL at
    another object, or changing any signed header or query parameter, voids it.

    Raises GcsError: ``403 AccessDenied`` (no signature, unknown signer),
    ``400 ExpiredToken``, ``400 AuthorizationQueryParametersError`` (malformed),
    ``403 SignatureDoesNotMatch``.
    """
    params = _signature_params(request.query)
    if params["X-Goog-Algorithm"] != ALGORITHM:
        raise _malformed(f"X-Goog-Algorithm must be {ALGORITHM}")
    date = params["X-Goog-Date"]
    email, scope = _parse_credential(params["X-Goog-Credential"], date)
    public_key = public_keys.get(email)
    if public_key is None:
        raise GcsError(403, "AccessDenied", f"{email} is not a signer this bucket trusts.")
    _check_validity(date, params["X-Goog-Expires"], now)
    signed_headers = _parse_signed_headers(params["X-Goog-SignedHeaders"])
    canonical = _canonical_request(request, signed_headers)
    string_to_sign = "\n".join(
        [ALGORITHM, date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    try:
        signature = bytes.fromhex(params["X-Goog-Signature"])
        public_key.verify(signature, string_to_sign.encode(), padding.PKCS1v15(),
                          hashes.SHA256())
    except (ValueError, InvalidSignature):
        raise GcsError(403, "SignatureDoesNotMatch",
                       "The request signature we calculated does not match the signature "
                       "you provided.", details=canonical) from None


def _malformed(message: str) -> GcsError:
    return GcsError(400, "AuthorizationQueryParametersError", message)


def _signature_params(query: list[tuple[str, str]]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in query:
        if name in _SIGNATURE_PARAMS:
            if name in found:
                raise _malformed(f"{name} appears more than once")
            found[name] = value
    if "X-Goog-Signature" not in found:
        raise GcsError(403, "AccessDenied", "Anonymous caller does not have "
                       "storage.objects.create access: writes need a signed URL.")
    missing = [name for name in _SIGNATURE_PARAMS if name not in found]
    if missing:
        raise _malformed(f"missing query parameter(s) {', '.join(missing)}")
    return found


def _parse_credential(credential: str, date: str) -> tuple[str, str]:
    """``(client_email, credential scope)`` of ``email/date/region/storage/goog4_request``."""
    parts = credential.split("/")
    if len(parts) < 5 or not parts[0]:
        raise _malformed("X-Goog-Credential must be EMAIL/DATE/REGION/storage/goog4_request")
    datestamp, _region, service, terminator = parts[-4:]
    if datestamp != date[:8] or service != "storage" or terminator != "goog4_request":
        raise _malformed("X-Goog-Credential's scope does not match X-Goog-Date or the service")
    return "/".join(parts[:-4]), "/".join(parts[-4:])


def _check_validity(date: str, expires: str, now: float) -> None:
    try:
        signed_at = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        lifetime = int(expires)
    except ValueError:
        raise _malformed("X-Goog-Date or X-Goog-Expires is malformed") from None
    if not 1 <= lifetime <= MAX_SIGNATURE_EXPIRY_S:
        raise _malformed(f"X-Goog-Expires must be 1..{MAX_SIGNATURE_EXPIRY_S} seconds")
    if now > signed_at + lifetime:
        expired_at = formatdate(signed_at + lifetime, usegmt=True)
        raise GcsError(400, "ExpiredToken", "The provided token has expired.",
                       details=f"Request signature expired at: {expired_at}")
    if signed_at > now + MAX_FUTURE_SKEW_S:
        raise GcsError(403, "AccessDenied", "The request is not yet valid (X-Goog-Date is "
                       "in the future; check the clocks).")


def _parse_signed_headers(value: str) -> list[str]:
    names = value.split(";")
    if names != sorted(set(names)) or any(not n or n != n.lower() for n in names):
        raise _malformed("X-Goog-SignedHeaders must be sorted, unique, lowercase names")
    if "host" not in names:
        raise _malformed("the host header must be signed")
    if "x-goog-content-sha256" in names:
        raise _malformed("signed payload hashes (x-goog-content-sha256) are not supported "
                         "by the local bucket")
    return names


def _canonical_request(request: _Request, signed_headers: list[str]) -> str:
    """The canonical request of V4 signing (as ``google.cloud.storage._signing`` builds it)."""
    query = sorted(f"{_quote_param(k)}={_quote_param(v)}" for k, v in request.query
                   if k != "X-Goog-Signature")
    headers = []
    for name in signed_headers:
        values = request.headers.get(name)
        if values is None:
            raise GcsError(403, "SignatureDoesNotMatch",
                           f"The signed header {name!r} is missing from the request.")
        headers.append(f"{name}:{','.join(' '.join(v.split()) for v in values)}")
    return "\n".join([
        request.method,
        quote(request.path, safe="/~"),
        "&".join(query),
        "\n".join(headers) + "\n",
        ";".join(signed_headers),
        "UNSIGNED-PAYLOAD",
    ])


def _quote_param(value: str) -> str:
    return quote(value, safe="~")


# -- HTTP: requests and responses -----------------------------------------------------------


@dataclass
class _Request:
    """The parts of an ASGI HTTP request that we look at."""

    method: str
    path: str  # percent-decoded, as "/<bucket>/<key>"
    query: list[tuple[str, str]]
    headers: dict[str, list[str]]  # lowercase name -> values in order
    scheme: str
    receive: Callable

    @classmethod
    def from_scope(cls, scope: dict, receive: Callable) -> _Request:
        headers: dict[str, list[str]] = {}
        for name, value in scope.get("headers", ()):
            headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
        return cls(method=scope["method"].upper(), path=scope["path"],
                   query=_parse_query(scope.get("query_string", b"")), headers=headers,
                   scheme=scope.get("scheme", "http"), receive=receive)

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return None if values is None else ",".join(values)

    def query_value(self, name: str) -> str | None:
        return next((v for k, v in self.query if k == name), None)

    @property
    def host(self) -> str:
        return self.header("host") or "localhost"

    def object_name(self) -> tuple[str, str]:
        """``(bucket, key)`` named by the path; ``400`` if they are not valid names."""
        bucket, _, key = self.path.lstrip("/").partition("/")
        try:
            return check_bucket_name(bucket), check_key(key)
        except InvalidInput as exc:
            raise _invalid(str(exc)) from None

    def content_length(self) -> int | None:
        value = self.header("content-length")
        if value is None:
            return None
        if not value.isdigit():
            raise _invalid("Content-Length must be a number")
        return int(value)


def _parse_query(raw: bytes) -> list[tuple[str, str]]:
    """Query parameters, percent-decoded (``+`` stays ``+``, as in V4 canonicalization)."""
    pairs = []
    for part in raw.decode("latin-1").split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


class _ClientGone(Exception):
    """The client disconnected before we could answer."""


async def _respond(send: Callable, status: int, headers: list[tuple[str, str]],
                   body: bytes = b"") -> None:
    """A whole response; ``Content-Length`` is added unless ``headers`` has one."""
    if not any(name == "content-length" for name, _ in headers):
        headers = [*headers, ("content-length", str(len(body)))]
    await _start_response(send, status, headers)
    await send({"type": "http.response.body", "body": body})


async def _start_response(send: Callable, status: int, headers: list[tuple[str, str]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(n.encode("latin-1"), v.encode("latin-1")) for n, v in headers]})


async def _send_error(send: Callable, error: GcsError, *, head: bool) -> None:
    xml = f"<Code>{escape(error.code)}</Code><Message>{escape(error.message)}</Message>"
    if error.details:
        xml += f"<Details>{escape(error.details)}</Details>"
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error>{xml}</Error>".encode()
    headers = [("content-type", "application/xml; charset=UTF-8"), *error.headers,
               ("content-length", str(len(body)))]
    await _respond(send, error.status, headers, b"" if head else body)


def _object_headers(info: ObjectInfo) -> list[tuple[str, str]]:
    return [
        ("content-type", CONTENT_TYPE),
        ("accept-ranges", "bytes"),
        ("etag", info.etag),
        ("last-modified", formatdate(info.mtime, usegmt=True)),
        ("x-goog-generation", str(info.generation)),
        ("x-goog-metageneration", "1"),
        ("x-goog-stored-content-length", str(info.size)),
        ("x-goog-stored-content-encoding", "identity"),
    ]


def _upload_result_headers(info: ObjectInfo) -> list[tuple[str, str]]:
    return [("etag", info.etag), ("x-goog-generation", str(info.generation)),
            ("x-goog-stored-content-length", str(info.size))]


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- HTTP: ranges ---------------------------------------------------------------------------


def select_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range ``(first, last)`` that a ``Range`` header selects.

    ``None`` means "serve the whole object with 200": no header, a malformed one, or
    several ranges (GCS serves single ranges only; RFC 9110 lets a server ignore
    ``Range``). Raises ``416 InvalidRange`` (with ``Content-Range: bytes */size``) when
    the range starts at or past the end, for ``bytes=-0``, and for any range of an empty
    object, as GCS does.
    """
    if header is None:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    match = _BYTE_RANGE.fullmatch(spec.strip())
    if match is None or not (match[1] or match[2]):
        return None
    if match[1]:
        first = int(match[1])
        last = int(match[2]) if match[2] else size - 1
        if last < first and match[2]:
            return None  # syntactically invalid (RFC 9110 14.1.1): ignore the header
        if first >= size:
            raise _unsatisfiable(size)
        return first, min(last, size - 1)
    suffix = int(match[2])
    if suffix == 0 or size == 0:
        raise _unsatisfiable(size)
    return max(0, size - suffix), size - 1


def _unsatisfiable(size: int) -> GcsError:
    return GcsError(416, "InvalidRange", "The requested range cannot be satisfied.",
                    headers=(("content-range", f"bytes */{size}"),))


# -- HTTP: uploads --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ChunkRange:
    """A resumable-upload ``Content-Range``: bytes ``first..last`` of ``total``.

    ``first``/``last`` are ``None`` for a status query (``bytes */N``); ``total`` is
    ``None`` when the client does not know it yet (``/*``).
    """

    first: int | None
    last: int | None
    total: int | None

    @property
    def is_query(self) -> bool:
        return self.first is None

    @property
    def length(self) -> int:
        return 0 if self.first is None else self.last - self.first + 1


def _parse_content_range(request: _Request) -> _ChunkRange:
    """The chunk a session ``PUT`` carries. Without ``Content-Range`` the body is the
    whole object (as GCS treats it)."""
    value = request.header("content-range")
    if value is None:
        length = request.content_length()
        if length is None:
            raise GcsError(411, "MissingContentLength", "A session PUT needs Content-Range "
                           "or Content-Length.")
        return _ChunkRange(None, None, 0) if length == 0 else _ChunkRange(0, length - 1, length)
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match is None:
        raise _invalid(f"malformed Content-Range {value!r}")
    total = None if match[3] == "*" else int(match[3])
    if match[1] is None:
        return _ChunkRange(None, None, total)
    first, last = int(match[1]), int(match[2])
    if last < first:
        raise _invalid(f"malformed Content-Range {value!r}")
    return _ChunkRange(first, last, total)


def _generation_match(request: _Request) -> int | None:
    value = request.header("x-goog-if-generation-match")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise _invalid("x-goog-if-generation-match must be a number")
    return int(value)


def _length_range(request: _Request) -> tuple[int, int] | None:
    value = request.header("x-goog-content-length-range")
    if value is None:
        return None
    low, _, high = value.partition(",")
    if not (low.strip().isdigit() and high.strip().isdigit()) or int(low) > int(high):
        raise _invalid("x-goog-content-length-range must be MIN,MAX")
    return int(low), int(high)


def _check_length(size: int, length_range: tuple[int, int] | None) -> None:
    """``400 EntityTooSmall/EntityTooLarge`` unless ``size`` is within ``length_range``."""
    if length_range is None:
        return
    low, high = length_range
    if size > high:
        raise GcsError(400, "EntityTooLarge", f"The upload is {size} bytes or more; the "
                       f"signed length range allows at most {high}.")
    if size < low:
        raise GcsError(400, "EntityTooSmall", f"The upload is {size} bytes; the signed length "
                       f"range requires at least {low}.")


def _check_chunk(session: UploadSession, chunk: _ChunkRange) -> int | None:
    """Validate ``chunk`` against ``session``; return the upload's total size if known.

    A chunk may start before the committed offset (a re-sent chunk: we keep only its new
    part) but not after it (a gap). Non-final chunks are multiples of 256 KiB.
    """
    total = chunk.total if chunk.total is not None else session.total
    if session.total is not None and chunk.total is not None and chunk.total != session.total:
        raise _invalid(f"the upload was declared as {session.total} bytes, now {chunk.total}")
    if total is not None:
        if total < session.committed:
            raise _invalid(f"total size {total} is less than the {session.committed} bytes "
                           "already committed")
        _check_length(total, session.length_range)
    if chunk.is_query:
        return total
    if chunk.first > session.committed:
        raise _invalid(f"the chunk starts at byte {chunk.first}, but only "
                       f"{session.committed} bytes are committed (no gaps)")
    if total is not None and chunk.last >= total:
        raise _invalid(f"the chunk ends at byte {chunk.last}, past the total {total}")
    if session.length_range is not None and chunk.last + 1 > session.length_range[1]:
        _check_length(chunk.last + 1, session.length_range)  # raises EntityTooLarge
    final = total is not None and chunk.last + 1 == total
    if not final and chunk.length % CHUNK_GRANULARITY:
        raise _invalid(f"a non-final chunk must be a multiple of {CHUNK_GRANULARITY} bytes, "
                       f"not {chunk.length}")
    return total


def _range_header(committed: int) -> list[tuple[str, str]]:
    return [("range", f"bytes=0-{committed - 1}")] if committed else []


async def _receive_body(receive: Callable, write: Callable[[bytes], object], *,
                        limit: int | None, skip: int = 0) -> int:
    """Feed the request body, minus its first ``skip`` bytes, to the blocking ``write``
    (in a worker thread, in batches of :data:`WRITE_BATCH`); return the body's length.

    Raises ``400 EntityTooLarge`` as soon as the body exceeds ``limit``, ``408
    RequestTimeout`` when nothing arrives for :data:`BODY_STALL_TIMEOUT_S`, and
    :class:`_ClientGone` if the client disconnects.
    """
    received = 0
    batch = bytearray()
    while True:
        message = None
        with trio.move_on_after(BODY_STALL_TIMEOUT_S):
            message = await receive()
        if message is None:
            raise GcsError(408, "RequestTimeout", f"No part of the request body arrived "
                           f"for {BODY_STALL_TIMEOUT_S:g} s.")
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        data = message.get("body", b"")
        received += len(data)
        if limit is not None and received > limit:
            raise GcsError(400, "EntityTooLarge", f"The request body is longer than the "
                           f"{limit} bytes announced or allowed.")
        if skip:
            dropped = min(skip, len(data))
            data, skip = data[dropped:], skip - dropped
        batch += data
        more = message.get("more_body", False)
        if batch and (len(batch) >= WRITE_BATCH or not more):
            chunk, batch = bytes(batch), bytearray()
            await trio.to_thread.run_sync(write, chunk)
        if not more:
            return received


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


# -- HTTP: the application ------------------------------------------------------------------


def create_app(bucket: LocalBucket):
    """The ASGI app serving ``bucket`` at paths ``/<bucket>/<key>``."""
    return _BucketApp(bucket)


class _BucketApp:
    """A raw ASGI app: GET/HEAD public reads, signed PUT, resumable POST + session PUTs.

    Handlers raise :class:`GcsError` only before they start a response; it is turned
    into GCS's XML error answer here, and nowhere else.
    """

    def __init__(self, bucket: LocalBucket):
        self.bucket = bucket

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = _Request.from_scope(scope, receive)
        try:
            await self._dispatch(request, send)
        except GcsError as error:
            if error.status >= 500 or error.status in (403, 409):
                log.info("%s %s: %s", request.method, request.path, error)
            await _send_error(send, error, head=request.method == "HEAD")
        except _ClientGone:
            log.debug("%s %s: client went away", request.method, request.path)

    async def _dispatch(self, request: _Request, send) -> None:
        method = request.method
        if method in ("GET", "HEAD"):
            await self._get_object(request, send)
        elif method == "PUT" and request.query_value("upload_id") is not None:
            await self._put_session(request, send, request.query_value("upload_id"))
        elif method == "PUT":
            await self._put_object(request, send)
        elif method == "POST":
            await self._start_session(request, send)
        else:
            raise GcsError(405, "MethodNotAllowed",
                           f"{method} is not supported by the local bucket.")

    def _verify(self, request: _Request) -> None:
        verify_signed_request(request, self.bucket.public_keys, self.bucket.clock())

    # -- reads --------------------------------------------------------------------------------

    async def _get_object(self, request: _Request, send) -> None:
        bucket, key = request.object_name()
        try:
            fd, info = await trio.to_thread.run_sync(self.bucket.open_object, bucket, key)
        except FileNotFoundError:
            raise _no_such_key(bucket, key) from None
        try:
            selected = select_range(request.header("range"), info.size)
            headers = _object_headers(info)
            if selected is None:
                status, first, length = 200, 0, info.size
            else:
                status, first, length = 206, selected[0], selected[1] - selected[0] + 1
                headers.append(("content-range",
                                f"bytes {selected[0]}-{selected[1]}/{info.size}"))
            headers.append(("content-length", str(length)))
            await _start_response(send, status, headers)
            if request.method == "HEAD" or length == 0:
                await send({"type": "http.response.body", "body": b""})
            else:
                await _send_file(fd, first, length, request.receive, send)
        finally:
            os.close(fd)

    # -- single signed PUT ----------------------------------------------------------------------

    async def _put_object(self, request: _Request, send) -> None:
        bucket, key = request.object_name()
        self._verify(request)
        generation_match = _generation_match(request)
        length_range = _length_range(request)
        declared = request.content_length()
        if declared is not None:
            _check_length(declared, length_range)
        self.bucket.check_precondition(bucket, key, generation_match)
        tmp = self.bucket.temp_path()
        try:
            f = await trio.to_thread.run_sync(open, tmp, "xb")
            try:
                limits = [n for n in (declared, length_range and length_range[1])
                          if n is not None]
                size = await _receive_body(request.receive, f.write,
                                           limit=min(limits, default=None))
                await trio.to_thread.run_sync(_sync_and_close, f)
            finally:
                f.close()
            if declared is not None and size != declared:
                raise _invalid(f"the body has {size} bytes, Content-Length said {declared}")
            _check_length(size, length_range)
            info = self.bucket.install(tmp, bucket, key, generation_match=generation_match)
            await trio.to_thread.run_sync(_fsync_dir, self.bucket.path(bucket, key).parent)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("stored %s/%s (%d bytes)", bucket, key, info.size)
        await _respond(send, 200, _upload_result_headers(info))

    # -- resumable uploads ----------------------------------------------------------------------

    async def _start_session(self, request: _Request, send) -> None:
        bucket, key = request.object_name()
        self._verify(request)
        if (request.header("x-goog-resumable") or "").strip().lower() != "start":
            raise _invalid("POST to an object starts a resumable upload and needs "
                           "x-goog-resumable: start")
        generation_match = _generation_match(request)
        length_range = _length_range(request)
        self.bucket.check_precondition(bucket, key, generation_match)
        session = await trio.to_thread.run_sync(
            lambda: self.bucket.create_session(bucket, key, generation_match=generation_match,
                                               length_range=length_range))
        location = (f"{request.scheme}://{request.host}{quote(request.path, safe='/~')}"
                    f"?upload_id={session.upload_id}")
        log.debug("upload session %s… started for %s/%s", session.upload_id[:8], bucket, key)
        await _respond(send, 201, [("location", location),
                                   ("x-guploader-uploadid", session.upload_id)])

    async def _put_session(self, request: _Request, send, upload_id: str) -> None:
        bucket, key = request.object_name()
        session = self.bucket.session(upload_id) if _UPLOAD_ID.fullmatch(upload_id) else None
        if session is None or (session.bucket, session.key) != (bucket, key):
            raise _no_such_upload()
        with self.bucket.session_turn(upload_id) as turn:
            await self._take_turn(request, send, upload_id, turn)
        if turn.scope.cancelled_caught:
            # Cancelled by a newer request: nothing was answered yet, and nothing of this
            # request's chunk was committed (both come after a checkpoint that raised).
            log.info("PUT %s: superseded by a newer request on upload session %s…",
                     request.path, upload_id[:8])
            raise GcsError(503, "ServiceUnavailable", "A newer request on this upload "
                           "session replaced this one; ask the session where to resume.")

    async def _take_turn(self, request: _Request, send, upload_id: str,
                         turn: _SessionTurn) -> None:
        async with self.bucket.session_lock(upload_id):
            # Re-read: while we waited, another request may have moved or ended the session.
            session = self.bucket.session(upload_id)
            if session is None:
                turn.settle()
                raise _no_such_upload()
            chunk = None if session.done else _parse_content_range(request)
            if chunk is None or chunk.is_query:
                turn.settle()
            if session.done:
                await self._answer_completed(session, send)
                return
            total = _check_chunk(session, chunk)
            if not chunk.is_query:
                session = await self._receive_chunk(request, session, chunk, total, turn)
            if total is not None and session.committed == total and chunk.total is not None:
                # GCS finalizes once a request declares the total and all of it is here,
                # status queries ("bytes */N") included: that is how an empty object, or
                # one whose size was unknown until its last chunk was sent, is finished.
                # "bytes */*" only ever asks.
                await self._finalize(session, send)
            else:
                await _respond(send, 308, _range_header(session.committed))

    async def _receive_chunk(self, request: _Request, session: UploadSession,
                             chunk: _ChunkRange, total: int | None,
                             turn: _SessionTurn) -> UploadSession:
        """Append the new part of ``chunk`` to the session's data, fsync, and persist.

        Until the whole body is here a newer request may cancel this one (``turn``): then
        nothing is persisted, and the bytes written past ``committed`` are cut off by the
        next chunk.
        """
        skip = session.committed - chunk.first
        f = await trio.to_thread.run_sync(_open_for_append,
                                          self.bucket.part_path(session.upload_id),
                                          session.committed)
        hashes = self.bucket._session_hashes
        offset, hasher = hashes.get(session.upload_id, (0, hashlib.sha1()))
        # Hash the new bytes into a copy, adopted only once the chunk is committed.
        running = hasher.copy() if offset == session.committed else None

        def write(data: bytes) -> None:
            f.write(data)
            if running is not None:
                running.update(data)

        try:
            received = await _receive_body(request.receive, write, limit=chunk.length,
                                           skip=skip)
            # The body is all here: from now on we only fsync, persist and answer.
            turn.settle()
            if received != chunk.length:
                raise _invalid(f"the chunk has {received} bytes, Content-Range said "
                               f"{chunk.length}")
            await trio.to_thread.run_sync(_sync_and_close, f)
        finally:
            # A chunk cut short leaves bytes past `committed`: the next chunk truncates them.
            f.close()
        updated = replace(session, committed=max(session.committed, chunk.last + 1),
                          total=total)
        await trio.to_thread.run_sync(self.bucket.save_session, updated)
        if running is not None:
            hashes[session.upload_id] = (updated.committed, running)
        else:
            hashes.pop(session.upload_id, None)
        return updated

    async def _finalize(self, session: UploadSession, send) -> None:
        """Make the session's data the object (checks again: size, precondition)."""
        _check_length(session.committed, session.length_range)
        part = self.bucket.part_path(session.upload_id)
        try:
            info = self.bucket.install(part, session.bucket, session.key,
                                       generation_match=session.generation_match)
        except GcsError:
            await trio.to_thread.run_sync(self.bucket.drop_session, session.upload_id)
            raise
        await trio.to_thread.run_sync(
            _fsync_dir, self.bucket.path(session.bucket, session.key).parent)
        await trio.to_thread.run_sync(self.bucket.save_session, replace(session, done=True))
        offset, hasher = self.bucket._session_hashes.pop(session.upload_id, (None, None))
        if offset == session.committed == info.size:
            st = os.stat(self.bucket.path(session.bucket, session.key))
            self.bucket._known_sha1[(session.bucket, session.key)] = (
                st.st_size, st.st_mtime_ns, hasher.hexdigest())
        log.info("stored %s/%s (%d bytes, resumable)", session.bucket, session.key, info.size)
        await _respond(send, 200, _upload_result_headers(info))

    async def _answer_completed(self, session: UploadSession, send) -> None:
        """A request on a finished session gets the object's metadata, as from GCS."""
        info = self.bucket.object_info(session.bucket, session.key)
        if info is None:
            raise _no_such_key(session.bucket, session.key)
        await _respond(send, 200, _upload_result_headers(info))


async def _send_file(fd: int, first: int, length: int, receive: Callable, send: Callable) -> None:
    """Send ``length`` bytes of ``fd`` from ``first`` as body messages of up to 1 MiB.

    Each read runs in a worker thread (a cold disk must not stall the event loop); a
    client that disconnects stops the loop instead of letting it read to the end.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
        offset, end = first, first + length
        while offset < end:
            size = min(READ_CHUNK, end - offset)
            data = await trio.to_thread.run_sync(os.pread, fd, size, offset)
            if len(data) != size:
                # Objects are replaced, never rewritten in place, so this is a bug or a
                # hand-edited bucket; dropping the connection tells the client it is short.
                raise OSError(f"object shrank while being served ({offset + len(data)} bytes)")
            offset += size
            await send({"type": "http.response.body", "body": data, "more_body": offset < end})
        nursery.cancel_scope.cancel()


async def _cancel_on_disconnect(receive: Callable, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
