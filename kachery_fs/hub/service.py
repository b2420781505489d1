"""The hub's logic: authenticate node requests, administer channels, broker uploads.

The hub is the control plane. It never carries file bytes: it signs URLs that let a
node write exactly one object of exactly one size into a channel's bucket, and checks
that object before recording it. A node that uploads a large file may vouch for its
manifest at the finalize; the hub checks and records that too, for readers that read by
chunk (``hub.manifests``).

Every node request is an envelope ``{"body": {...}, "nodeId": <hex>, "signature": <hex>}``
(kachery's shape) whose body also carries ``type``, ``timestamp`` (ms) and ``nonce``:
requests more than :data:`~kachery_fs.protocol.MAX_CLOCK_SKEW_S` off the hub's clock, and
nonces seen before, are refused, so a captured request cannot be replayed.

Each request type (:class:`~kachery_fs.protocol.Request`) has one handler, listed in
:data:`HANDLERS`; any other type is refused. Handlers raise the project's exceptions;
``hub.app`` maps them to HTTP statuses.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import trio
from cachetools import TTLCache

from .. import metrics
from ..errors import (
    Conflict,
    IntegrityError,
    InvalidInput,
    KacheryError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from ..identity import is_node_id, verify_signature
from ..localbucket.http import check_key
from ..protocol import MAX_CLOCK_SKEW_S, PERMISSIONS, Request, feed_prefix, object_key
from ..uris import is_sha1
from .backends import BucketBackend, Buckets
from .cache import BucketCache, parse_allocation
from .feeds import FeedIndex
from .manifests import ManifestRecords, check_manifest
from .requests import FileRequests, check_wait
from .storage import HubDB
from .wakeups import Wakeups

log = logging.getLogger(__name__)

NONCE_RE = re.compile(r"[0-9A-Za-z_-]{16,128}")
#: The largest request a node that is on no channel may send (asking for its permissions).
MAX_STRANGER_BODY = 8192

CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

#: How long a signed upload URL stays valid. Short: the session URI it yields outlives it.
UPLOAD_URL_EXPIRY_S = 600

#: How long a signed read URL of a private channel's object stays valid (the longest a
#: node whose permission is revoked can go on reading what it was already given).
READ_URL_EXPIRY_S = 300
#: The most objects one ``signReads`` may ask for.
MAX_SIGNED_READS = 500

#: A feed message object's largest size (kachery: under 10,000 characters of JSON, which
#: is at most 40,000 bytes of UTF-8) and the most messages signed in one batch.
MAX_FEED_MESSAGE_BYTES = 40_000
MAX_FEED_BATCH = 500
#: The most messages one subfeed may have.
MAX_FEED_MESSAGES = 10**9

#: Long-polls one node may hold at once (file requests waiting, a provider listening,
#: feed watches), and feed watches among them (each up to 1,000 subfeeds; a mount holds
#: one per channel).
MAX_LONG_POLLS = 64
MAX_WATCHES = 8

#: Worker threads that sign read URLs (about 0.25 ms a URL), apart from those that read
#: the local bucket's files and call GCS; and the ``signReads`` one node may have in
#: progress at once.
SIGNING_THREADS = 2
MAX_SIGNING_PER_NODE = 4

#: An object found good in a dispute is not read again for this long; a node whose
#: disputes were wrong this many times is not heard for as long.
DISPUTE_TTL_S = 3600.0
MAX_FALSE_DISPUTES = 3

#: The largest file the hub signs an upload for (5 TiB, GCS's object limit).
MAX_OBJECT_SIZE = 5 * 1024**4

#: Vouched manifests whose chunks are checked against the bucket's bytes at once (each
#: reads a whole large file on a worker thread), and how long a refused vouch is answered
#: without checking it again.
MANIFEST_CHECKS = 2
REFUSED_VOUCH_TTL_S = 3600.0


class AuthError(PermissionDenied):
    """The request's signature, timestamp or nonce was not acceptable (HTTP 401)."""


def check_channel_name(name: object) -> str:
    if (not isinstance(name, str) or not (3 <= len(name) <= 40)
            or not CHANNEL_NAME_RE.fullmatch(name)):
        raise InvalidInput(
            f"invalid channel name {name!r}: use 3-40 characters from A-Z a-z 0-9 _ - "
            "in segments joined by '.'")
    return name


def _flag(body: dict, field: str) -> bool | None:
    """``body[field]``, a true or false (None when absent); InvalidInput for anything else."""
    value = body.get(field)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{field} must be true or false")
    return value


def check_permissions(perms: Any) -> set[str]:
    if not isinstance(perms, list | tuple | set | frozenset):
        raise InvalidInput("permissions must be a list")
    if not all(isinstance(p, str) for p in perms):
        raise InvalidInput("permissions must be names")
    unknown = set(perms) - set(PERMISSIONS)
    if unknown:
        raise InvalidInput(f"unknown permission(s) {sorted(unknown)}; known: {', '.join(PERMISSIONS)}")
    return set(perms)


@dataclass
class Caller:
    node_id: str
    is_owner: bool


class Hub:
    """Request handling for one hub. ``buckets`` maps a channel's bucket URI to a backend."""

    def __init__(self, db: HubDB, *, owner_id: str, buckets: Buckets,
                 default_bucket_uri: str | None, wakeups: Wakeups | None = None):
        """``wakeups``: how long-polls are woken (``hub.wakeups``; across hub processes on
        a PostgreSQL database: :class:`~kachery_fs.hub.wakeups.PostgresWakeups`)."""
        self.db = db
        self.owner_id = owner_id
        self.buckets = buckets
        self.default_bucket_uri = default_bucket_uri
        self.read_url_expiry_s = READ_URL_EXPIRY_S
        self.wakeups = wakeups if wakeups is not None else Wakeups()
        self.requests = FileRequests(db.database, providers_of=db.providers,
                                     object_size=self._object_in_bucket, wakeups=self.wakeups)
        self.feeds = FeedIndex(db.database, wakeups=self.wakeups)
        self.cache = BucketCache(db.database, backend_of=self._backend,
                                 held=self.requests.held)
        self._polls: Counter[tuple[str, str | None]] = Counter()
        # Disputes of bucket objects (see _dispute): in progress, found good, and the
        # nodes that made wrong ones.
        self._disputes: dict[tuple[str, str], trio.Event] = {}
        self._checked: TTLCache = TTLCache(maxsize=100_000, ttl=DISPUTE_TTL_S)
        self._false_disputes: TTLCache = TTLCache(maxsize=100_000, ttl=DISPUTE_TTL_S)
        # Vouched manifests (see hub.manifests): the checks running (one at a time for a
        # file), their bound, and the refusals of the last hour.
        self.manifests = ManifestRecords(db.database)
        self._vouching: dict[tuple[str, str], trio.Event] = {}
        self._manifest_checks = trio.CapacityLimiter(MANIFEST_CHECKS)
        self._signing = trio.CapacityLimiter(SIGNING_THREADS)
        self._signing_by: Counter[str] = Counter()  # node id -> signReads in progress
        self._refused_vouches: TTLCache = TTLCache(maxsize=100_000, ttl=REFUSED_VOUCH_TTL_S)
        # (channel, sha1) -> (chunk ranges, their SHA-1s): a file read for one vouch's
        # check is not read again for the next (another manifest, a lie, say).
        self._chunk_digests: TTLCache = TTLCache(maxsize=10_000, ttl=REFUSED_VOUCH_TTL_S)

    # -- authentication ---------------------------------------------------------------

    def authenticate(self, envelope: Any, *, now: float | None = None,
                     size: int = 0) -> tuple[Caller, dict]:
        """Check an envelope's signature, freshness and nonce; return the caller and body.

        The cheap checks come first, and a node that is neither the owner nor authorized
        on any channel may send only a small request (``size``: the body's bytes), so that
        checking the signature of a large body cannot be had for free."""
        if not isinstance(envelope, dict):
            raise InvalidInput("request must be a JSON object")
        body, node_id, signature = envelope.get("body"), envelope.get("nodeId"), envelope.get("signature")
        if not isinstance(body, dict) or not isinstance(node_id, str) or not isinstance(signature, str):
            raise InvalidInput("request must have body, nodeId and signature")
        if not is_node_id(node_id):
            raise InvalidInput("nodeId must be 64 hex characters")
        if body.get("nodeId", node_id) != node_id:
            raise AuthError("body.nodeId does not match the signer")
        now = time.time() if now is None else now
        ts = body.get("timestamp")
        if not isinstance(ts, int) or abs(ts / 1000 - now) > MAX_CLOCK_SKEW_S:
            raise AuthError(
                f"stale or missing timestamp: the request is more than {MAX_CLOCK_SKEW_S} s "
                "off the hub's clock (check this machine's clock)")
        nonce = body.get("nonce")
        if not isinstance(nonce, str) or not NONCE_RE.fullmatch(nonce):
            raise AuthError("missing or malformed nonce")
        is_owner = node_id.lower() == self.owner_id
        if size > MAX_STRANGER_BODY and not is_owner and not self.db.channels_of(node_id.lower()):
            raise AuthError(f"node {node_id[:12]}… is not authorized on any channel of this"
                            f" hub, and may send requests of {MAX_STRANGER_BODY} bytes at most")
        if not verify_signature(body, signature, node_id):
            raise AuthError("bad signature")
        if not self.db.remember_nonce(node_id, nonce, now=now, keep_s=2 * MAX_CLOCK_SKEW_S + 60):
            raise AuthError("replayed request (nonce already used)")
        return Caller(node_id=node_id.lower(), is_owner=is_owner), body

    async def handle(self, envelope: Any, *, size: int = 0) -> dict:
        started = time.monotonic()
        # The call's kind for the metrics: only a known one (labels stay few).
        claimed = envelope.get("body") if isinstance(envelope, dict) else None
        claimed = claimed.get("type") if isinstance(claimed, dict) else None
        call = claimed if isinstance(claimed, str) and claimed in HANDLERS else "unknown"
        error: BaseException | None = None
        try:
            caller, body = self.authenticate(envelope, size=size)
            kind = body.get("type")
            if not isinstance(kind, str) or kind not in HANDLERS:
                raise InvalidInput(f"unknown request type {kind!r}")
            request = Request(kind)
            try:
                with self._long_poll(caller, request, body):
                    return await HANDLERS[request](self, caller, body)
            except KacheryError as exc:
                log.info("%s from %s… refused: %s", kind, caller.node_id[:12], exc)
                raise
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not isinstance(error, trio.Cancelled):  # the caller went away: no answer
                metrics.HUB_CALLS.labels(call, metrics.outcome_of(error)).inc()
                metrics.HUB_CALL_SECONDS.labels(call).observe(time.monotonic() - started)

    @contextmanager
    def _long_poll(self, caller: Caller, kind: Request, body: dict):
        """Count a node's long-polls while they are held; refuse one past the node's limits
        (:data:`MAX_LONG_POLLS`, :data:`MAX_WATCHES`), so that one node cannot hold the
        hub's memory or tasks. A request that does not wait is not counted."""
        if not (isinstance(body.get("waitMs"), int) and body["waitMs"] > 0):
            yield
            return
        keys = [(caller.node_id, None)] + ([(caller.node_id, kind)]
                                           if kind == Request.WATCH_FEEDS else [])
        for key, limit in zip(keys, (MAX_LONG_POLLS, MAX_WATCHES), strict=False):
            if self._polls[key] >= limit:
                raise Unavailable(f"node {caller.node_id[:12]}… already holds {limit}"
                                  f" {'watchFeeds ' if key[1] else ''}long-polls on this hub;"
                                  " try again when one ends", retry_after=5)
        for key in keys:
            self._polls[key] += 1
        metrics.HUB_LONG_POLLS.inc()
        try:
            yield
        finally:
            metrics.HUB_LONG_POLLS.dec()
            for key in keys:
                self._polls[key] -= 1
                if not self._polls[key]:
                    del self._polls[key]

    # -- helpers ------------------------------------------------------------------------

    def _require_owner(self, caller: Caller) -> None:
        if not caller.is_owner:
            raise PermissionDenied(
                f"only the hub's owner may administer channels (owner is {self.owner_id[:12]}…,"
                f" you are {caller.node_id[:12]}…)")

    def _require(self, caller: Caller, channel: str, permission: str) -> None:
        """PermissionDenied unless the caller holds ``permission`` on ``channel``; the same
        for a channel that does not exist (names cannot be probed), but for the owner,
        who is told of a wrong name (NotFound)."""
        if caller.is_owner:
            self.db.channel(channel)
        if permission not in self.db.permissions(channel, caller.node_id):
            raise PermissionDenied(
                f"node {caller.node_id[:12]}… lacks the {permission} permission on channel"
                f" {channel!r}; the channel owner can grant it with `kachery-fs hub channel"
                f" authorize {channel} {caller.node_id} --add {permission}`")

    def _backend(self, channel: str) -> BucketBackend:
        return self.buckets.for_uri(self.db.bucket_uri(channel))

    @staticmethod
    def _sha1_and_size(body: dict) -> tuple[str, int]:
        sha1, size = body.get("sha1"), body.get("size")
        if not isinstance(sha1, str) or not is_sha1(sha1):
            raise InvalidInput(f"invalid sha1 {sha1!r}")
        if not isinstance(size, int) or not (0 <= size <= MAX_OBJECT_SIZE):
            raise InvalidInput(f"invalid size {size!r}")
        return sha1.lower(), size

    # -- handlers -------------------------------------------------------------------------

    async def _on_getChannel(self, caller: Caller, body: dict) -> dict:
        """A node's permissions on a channel, and where its bucket is. A node that is not a
        member gets the same answer whether the channel exists or not (no bucket, no
        permissions), so that names cannot be probed; the owner is told of a wrong name."""
        name = check_channel_name(body.get("channel"))
        permissions = self.db.permissions(name, caller.node_id)
        if not caller.is_owner and not permissions:
            return {"channel": name, "permissions": [], "isOwner": False}
        record = self.db.channel(name)
        backend = self.buckets.for_uri(record.bucket_uri)
        return {
            "channel": record.name,
            "bucketBaseUrl": backend.base_url(),
            "permissions": sorted(permissions),
            "isOwner": caller.is_owner,
            "private": record.private,
        }

    async def _on_signReads(self, caller: Caller, body: dict) -> dict:
        """Signed ``GET`` URLs of objects of a channel, one per key, in the order asked,
        valid for :attr:`read_url_expiry_s` (``expiresIn``): a file's object
        (``<channel>/sha1/...``) for a node that may request files, a feed's
        (``<channel>/feeds/...``) for one that may request feeds. How a private channel's
        members read its bucket; URLs that are already out stay valid until they expire."""
        channel = check_channel_name(body.get("channel"))
        keys = body.get("keys")
        if not isinstance(keys, list) or not 1 <= len(keys) <= MAX_SIGNED_READS:
            raise InvalidInput(f"keys must be a list of 1 to {MAX_SIGNED_READS} object keys")
        needed = set()
        for key in keys:
            needed.add(self._read_permission(channel, key))
        for permission in sorted(needed):
            self._require(caller, channel, permission)
        backend = self._backend(channel)
        expires_s = self.read_url_expiry_s
        node = caller.node_id
        if self._signing_by[node] >= MAX_SIGNING_PER_NODE:
            raise Unavailable(f"node {node[:12]}… already has {MAX_SIGNING_PER_NODE} signReads"
                              " in progress on this hub; try again when one ends",
                              retry_after=1)
        self._signing_by[node] += 1
        try:
            unique = sorted(set(keys))
            # Signing is CPU work: off the event loop, on threads of its own, so that a
            # node asking much delays other signing, not the hub's answers or its files.
            signed = await trio.to_thread.run_sync(lambda: {
                key: backend.signed_get(key, expires_s=expires_s) for key in unique},
                limiter=self._signing)
        finally:
            self._signing_by[node] -= 1
            if not self._signing_by[node]:
                del self._signing_by[node]
        return {"urls": [signed[key] for key in keys], "expiresIn": expires_s}

    @staticmethod
    def _read_permission(channel: str, key: object) -> str:
        """The permission a read of object ``key`` of ``channel`` needs; InvalidInput for a
        key that is not one of the channel's objects."""
        if isinstance(key, str) and key.startswith(f"{channel}/sha1/"):
            sha1 = key.rpartition("/")[2]
            if is_sha1(sha1) and key == object_key(channel, sha1.lower()):
                return "requestFiles"
        elif isinstance(key, str) and key.startswith(f"{channel}/feeds/"):
            check_key(key)
            return "requestFeeds"
        raise InvalidInput(f"{key!r} is not the key of an object of channel {channel!r}")

    async def _on_createChannel(self, caller: Caller, body: dict) -> dict:
        self._require_owner(caller)
        name = check_channel_name(body.get("channel"))
        bucket_uri = body.get("bucket") or self.default_bucket_uri
        if not bucket_uri:
            raise InvalidInput("this hub serves no local bucket: give the channel a --bucket")
        backend = self.buckets.for_uri(bucket_uri)  # validates the URI, that we serve it
        allocation = parse_allocation(body.get("allocation"))
        private = _flag(body, "private")
        record = self.db.create_channel(name, bucket_uri, private=bool(private))
        self.cache.configure(name, allocation=allocation)
        log.info("channel %s created on %s%s", name, bucket_uri, " (private)" if private else "")
        answer = {"channel": record.name, "bucket": record.bucket_uri, "allocation": allocation,
                  "private": record.private}
        if record.private:
            answer |= await self._privacy_warning(record.name, backend)
        return answer

    async def _privacy_warning(self, name: str, backend) -> dict:
        """``{"warning": ...}`` when private channel ``name`` is on a bucket anyone can read
        (its privacy is the bucket's to enforce, on GCS); else nothing."""
        try:
            public = await backend.anyone_can_read()
        except KacheryError as exc:
            return {"warning": f"could not check that the bucket refuses anonymous reads: {exc}"}
        if not public:
            return {}
        warning = (f"channel {name} is private, but its bucket lets anyone read its objects:"
                   " remove allUsers from the bucket's permissions (README: private channels)")
        log.warning("%s", warning)
        return {"warning": warning}

    async def _on_setChannel(self, caller: Caller, body: dict) -> dict:
        """Change a channel's bucket allocation (bytes, or null for none), low watermark, or
        whether it is private (``private``: a channel made public can be read by anyone who
        learns its bucket; one made private, only through URLs signed from then on, apart
        from URLs already out, until they expire)."""
        self._require_owner(caller)
        name = check_channel_name(body.get("channel"))
        record = self.db.channel(name)
        private = _flag(body, "private")
        changes = {k: body[v] for k, v in (("allocation", "allocation"),
                                            ("low_watermark", "lowWatermark")) if v in body}
        self.cache.configure(name, **changes)
        if private is not None and private != record.private:
            record = self.db.set_private(name, private)
            log.info("channel %s is %s now", name, "private" if private else "public")
        allocation, low = self.cache.settings(name)
        log.info("channel %s: allocation %s, low watermark %g", name, allocation, low)
        answer = {"channel": name, "allocation": allocation, "lowWatermark": low,
                  "private": record.private}
        if private:
            answer |= await self._privacy_warning(name, self.buckets.for_uri(record.bucket_uri))
        return answer

    async def _on_channelStats(self, caller: Caller, body: dict) -> dict:
        """A channel's bucket cache figures, its bucket, the manifests on record
        (``manifests``) and each node's vouches (``vouchers``: recorded, refused,
        disputed)."""
        self._require_owner(caller)
        name = check_channel_name(body.get("channel"))
        return {**self.cache.stats(name), **self.manifests.stats(name),
                "bucket": self.db.channel(name).bucket_uri}

    async def _on_reportDownloads(self, caller: Caller, body: dict) -> dict:
        """A node reports what it downloaded from the bucket: the demand that decides which
        objects stay cached, and the egress figure in the stats."""
        name = check_channel_name(body.get("channel"))
        self._require(caller, name, "requestFiles")
        downloads = body.get("downloads")
        if not isinstance(downloads, list) or len(downloads) > 10_000 or not all(
                isinstance(d, list) and len(d) == 2 and isinstance(d[0], str)
                and is_sha1(d[0]) and isinstance(d[1], int) and 0 <= d[1] <= MAX_OBJECT_SIZE
                for d in downloads):
            raise InvalidInput("downloads must be a list of up to 10,000 [sha1, bytes] pairs")
        # A claim counts for an object on record, for at most its size: a node keeps what
        # it downloads, so one report (every few seconds) holds one download of each.
        claims: dict[str, int] = {}
        for sha1, n in downloads:
            claims[sha1.lower()] = claims.get(sha1.lower(), 0) + n
        bounded = [(sha1, min(n, size)) for sha1, n in claims.items()
                   if (size := self.cache.size_of(name, sha1)) is not None]
        self.cache.downloaded(name, bounded)
        return {}

    async def _on_authorizeNode(self, caller: Caller, body: dict) -> dict:
        self._require_owner(caller)
        name = check_channel_name(body.get("channel"))
        self.db.channel(name)
        node_id = body.get("targetNodeId")
        if not isinstance(node_id, str) or not is_node_id(node_id):
            raise InvalidInput(f"invalid node id {node_id!r}: expected 64 hex characters")
        perms = check_permissions(body.get("permissions", []))
        label = body.get("label")
        if label is not None and (not isinstance(label, str) or len(label) > 200
                                  or not label.isprintable()):
            raise InvalidInput("label must be printable text of at most 200 characters")
        self.db.set_permissions(name, node_id.lower(), perms, label)
        log.info("channel %s: node %s… now has %s", name, node_id[:12], sorted(perms) or "nothing")
        self.requests.permissions_changed()
        return {"channel": name, "nodeId": node_id.lower(), "permissions": sorted(perms)}

    async def _on_listChannels(self, caller: Caller, body: dict) -> dict:
        self._require_owner(caller)
        return {"channels": [
            {"channel": c.name, "bucket": c.bucket_uri, "private": c.private,
             "allocation": self.cache.settings(c.name)[0],
             "authorizedNodes": self.db.authorizations(c.name)}
            for c in self.db.channels()]}

    async def _on_initiateUpload(self, caller: Caller, body: dict) -> dict:
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "provideFiles")
        sha1, size = self._sha1_and_size(body)
        allocation, _ = self.cache.settings(channel)
        if allocation is not None and size > allocation:
            raise InvalidInput(f"sha1://{sha1} has {size} bytes, more than the allocation of"
                               f" channel {channel!r} ({allocation} bytes)")
        backend = self._backend(channel)
        present = await backend.stat(object_key(channel, sha1))
        if present is not None and await self._settle(backend, caller, channel, sha1,
                                                      size, present):
            return {"status": "present"}
        self.cache.upload_signed(channel, sha1, caller.node_id)
        signed = backend.resumable_upload(object_key(channel, sha1), size=size,
                                          expires_s=UPLOAD_URL_EXPIRY_S)
        return {"status": "upload", "upload": signed.to_json()}

    async def _on_finalizeUpload(self, caller: Caller, body: dict) -> dict:
        """The node's upload of ``sha1`` is in the bucket: check it and record it. With
        ``manifest`` (a SHA-1), the node also vouches for that manifest as the file's:
        the answer's ``manifest`` is ``"vouched"`` or ``"refused: <why>"`` (see
        ``hub.manifests``); a refused vouch leaves the finalize as it is."""
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "provideFiles")
        sha1, size = self._sha1_and_size(body)
        manifest = body.get("manifest")
        if manifest is not None and (not isinstance(manifest, str) or not is_sha1(manifest)):
            raise InvalidInput(f"invalid manifest {manifest!r}: expected the SHA-1 of the"
                               " file's manifest")
        backend = self._backend(channel)
        actual = await backend.stat(object_key(channel, sha1))
        if actual is None:
            raise NotFound(f"sha1://{sha1} is not in the bucket of channel {channel!r}")
        # Only the node whose upload put the file there may vouch for a manifest: on GCS
        # the hub cannot check the chunks, and another member must not be able to name a
        # manifest for a file it never put there. (Its upload lands in this finalize, or
        # its own earlier finalize put the file on record.)
        own_upload = caller.node_id in (self.cache.uploading_node(channel, sha1),
                                        self.cache.finalized_by(channel, sha1))
        await self._settle(backend, caller, channel, sha1, size, actual, uploaded=True)
        if manifest is None:
            return {"status": "finalized"}
        return {"status": "finalized",
                "manifest": await self._vouch(caller, channel, sha1, size, manifest.lower(),
                                              own_upload=own_upload)}

    async def _vouch(self, caller: Caller, channel: str, sha1: str, size: int,
                     manifest: str, *, own_upload: bool) -> str:
        """``caller`` vouches for ``manifest`` as that of ``sha1`` (finalized, ``size``
        bytes): ``"vouched"`` once it is on record, or ``"refused: <why>"``. A vouch on
        record is not checked again, nor, for :data:`REFUSED_VOUCH_TTL_S`, one refused
        for its content; the vouches of a file are taken one at a time. A new one is
        taken only with ``own_upload``: the caller's own upload put the file there."""
        key = (channel, sha1)
        while (running := self._vouching.get(key)) is not None:
            await running.wait()
        on_record = self.manifests.get(channel, sha1)
        if on_record == manifest:
            return "vouched"
        why: str | None
        if on_record is not None:
            why = f"manifest {on_record} is on record for it"
        elif not own_upload:
            why = "only the node whose upload put the file there may vouch for its manifest"
        else:
            why = self._refused_vouches.get((channel, sha1, manifest))
        if why is None:
            self._vouching[key] = done = trio.Event()
            try:
                try:
                    async with self._manifest_checks:
                        await check_manifest(self._backend(channel), channel, sha1, size,
                                             manifest, digests=self._chunk_digests)
                except (IntegrityError, NotFound, InvalidInput) as exc:
                    why = str(exc)
                    if not isinstance(exc, NotFound):  # a missing object may come yet
                        self._refused_vouches[(channel, sha1, manifest)] = why
                else:
                    # At once, with no checkpoint between: a check that ran to its end is
                    # recorded even if the finalize was cancelled meanwhile.
                    if self.manifests.record(channel, sha1, manifest, caller.node_id):
                        log.info("channel %s: manifest %s of sha1://%s on record, vouched for"
                                 " by %s…", channel, manifest, sha1, caller.node_id[:12])
                        return "vouched"
                    why = f"manifest {self.manifests.get(channel, sha1)} is on record for it"
            finally:
                del self._vouching[key]
                done.set()
        self.manifests.refused(channel, caller.node_id)
        log.warning("channel %s: %s… vouched for manifest %s as that of sha1://%s; refused:"
                    " %s", channel, caller.node_id[:12], manifest, sha1, why)
        return f"refused: {why}"

    async def _on_getManifest(self, caller: Caller, body: dict) -> dict:
        """The manifest on record for ``sha1`` (its SHA-1; ``manifest``), or null: one a
        node vouched for at the file's finalize and the hub checked (``hub.manifests``)."""
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "requestFiles")
        sha1 = body.get("sha1")
        if not isinstance(sha1, str) or not is_sha1(sha1):
            raise InvalidInput(f"invalid sha1 {sha1!r}")
        return {"manifest": self.manifests.get(channel, sha1.lower())}

    async def _on_reportManifest(self, caller: Caller, body: dict) -> dict:
        """A reader reports that the chunks of ``manifest``, the manifest on record for
        ``sha1``, each matched their SHA-1 but together hash to ``actualSha1``: the
        manifest lies. The record is dropped (if it is still that manifest's), with a
        warning that names the node that vouched for it and the reporter, and the dispute
        is counted against the voucher (``hub channel stats``). ``dropped`` in the answer
        says whether there was such a record.

        Any member that may request files can drop a record this way, a true one too:
        that costs readers speed only (without a manifest on record they read the whole
        file and verify it before serving a byte), never correctness, and the dispute
        counted shows who reported what in the log."""
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "requestFiles")
        sha1, manifest, actual = body.get("sha1"), body.get("manifest"), body.get("actualSha1")
        for name, value in (("sha1", sha1), ("manifest", manifest), ("actualSha1", actual)):
            if not isinstance(value, str) or not is_sha1(value):
                raise InvalidInput(f"invalid {name} {value!r}: expected a SHA-1")
        assert isinstance(sha1, str) and isinstance(manifest, str) and isinstance(actual, str)
        sha1, manifest, actual = sha1.lower(), manifest.lower(), actual.lower()
        if actual == sha1:
            raise InvalidInput(f"actualSha1 is sha1://{sha1} itself: the manifest made the"
                               " file it names, there is nothing to report")
        voucher = self.manifests.drop(channel, sha1, manifest)
        if voucher is None:
            return {"dropped": False}
        log.warning("channel %s: %s… reports that manifest %s, vouched for by %s…, makes"
                    " sha1://%s, not sha1://%s; dropped it", channel, caller.node_id[:12],
                    manifest, voucher[:12], actual, sha1)
        return {"dropped": True}

    async def _settle(self, backend: BucketBackend, caller: Caller, channel: str, sha1: str,
                      size: int, actual: int, *, uploaded: bool = False) -> bool:
        """Decide about the object of ``actual`` bytes in the bucket under ``sha1``, which
        ``caller`` says has ``size`` bytes. True: it is checked and on record, with that
        size. False: it was a bad or unfinished upload, and is deleted (``IntegrityError``
        instead, for the upload's own finalize).

        A caller's claim alone never deletes anything: an object on record, or one whose
        content checks, stays, and a claim of another size is refused (``Conflict``). Where
        the hub cannot hash (GCS), an object of another size is deleted only if it is an
        upload this hub signed and nobody finalized; one this hub did not put there (an
        earlier kachery's, say) is left alone, since readers verify every byte anyway.
        """
        key = object_key(channel, sha1)
        recorded = self.cache.size_of(channel, sha1)
        if recorded is not None and recorded == actual:  # checked before: not again
            if size != actual:
                raise self._size_conflict(channel, sha1, size, actual)
            # A finalize retried after its first try recorded the object and failed (or
            # its hub process died) before the request was told: tell it now.
            self.requests.object_finalized(channel, sha1, actual)
            return True
        problem = None
        if backend.can_hash:
            digest = await backend.sha1(key)
            if digest != sha1:
                problem = f"content hashes to {digest}"
        elif actual != size:
            if recorded is not None or not self.cache.upload_in_flight(channel, sha1):
                raise self._size_conflict(channel, sha1, size, actual)
            problem = f"size {actual} instead of {size}"
        if problem:
            await self._delete_bad(backend, channel, sha1, f"{problem}; {caller.node_id[:12]}…"
                                   f" claimed {size} bytes")
            if uploaded:
                raise IntegrityError(f"uploaded object sha1://{sha1} is bad ({problem});"
                                     " deleted")
            return False
        self.cache.record(channel, sha1, actual, caller.node_id,
                          uploaded=uploaded and size == actual)
        self.requests.object_finalized(channel, sha1, actual)
        if size != actual:
            raise self._size_conflict(channel, sha1, size, actual)
        return True

    async def _dispute(self, caller: Caller, channel: str, sha1: str) -> None:
        """A reader says the bucket's object does not hash to its name: read and hash it
        (the one time the hub reads an object's bytes on GCS), and delete it if the reader
        is right, so that the request goes on to the providers. An object is checked at
        most once per :data:`DISPUTE_TTL_S` however many say so, and a node whose disputes
        were wrong :data:`MAX_FALSE_DISPUTES` times is not heard for that long."""
        key = (channel, sha1)
        if key in self._checked or self._false_disputes.get(caller.node_id, 0) >= \
                MAX_FALSE_DISPUTES:
            return
        running = self._disputes.get(key)
        if running is not None:
            await running.wait()
            return
        self._disputes[key] = done = trio.Event()
        try:
            backend = self._backend(channel)
            if await backend.stat(object_key(channel, sha1)) is None:
                return
            digest = await backend.sha1(object_key(channel, sha1))
            if digest != sha1:
                await self._delete_bad(backend, channel, sha1, f"it hashes to {digest};"
                                       f" reported by {caller.node_id[:12]}…")
                return
            self._checked[key] = True
            self._false_disputes[caller.node_id] = self._false_disputes.get(
                caller.node_id, 0) + 1
            log.warning("channel %s: %s… reported sha1://%s as bad, but it checks",
                        channel, caller.node_id[:12], sha1)
        finally:
            del self._disputes[key]
            done.set()

    async def _delete_bad(self, backend: BucketBackend, channel: str, sha1: str,
                          why: str) -> None:
        log.warning("channel %s: the object of sha1://%s is bad (%s); deleting it", channel,
                    sha1, why)
        await backend.delete(object_key(channel, sha1))
        self.cache.forget(channel, sha1)

    @staticmethod
    def _size_conflict(channel: str, sha1: str, size: int, actual: int) -> Conflict:
        return Conflict(f"sha1://{sha1} is in the bucket of channel {channel!r} with"
                        f" {actual} bytes, not {size}; it stays as it is")

    async def _object_in_bucket(self, channel: str, sha1: str) -> int | None:
        """The size of a verified object in the channel's bucket, or None."""
        size = self.cache.size_of(channel, sha1)
        backend = self._backend(channel)
        actual = await backend.stat(object_key(channel, sha1))
        if actual is None:
            if size is not None:
                log.warning("channel %s: sha1://%s is on record but not in the bucket;"
                            " forgetting it", channel, sha1)
                self.cache.forget(channel, sha1)
            return None
        if size is None and not await self._settle(backend, Caller(self.owner_id, True),
                                                   channel, sha1, actual, actual):
            return None
        return actual

    # -- file requests (see hub.requests) -------------------------------------------------

    async def _on_requestFile(self, caller: Caller, body: dict) -> dict:
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "requestFiles")
        sha1 = body.get("sha1")
        if not isinstance(sha1, str) or not is_sha1(sha1):
            raise InvalidInput(f"invalid sha1 {sha1!r}")
        version = body.get("version")
        if version is not None and not isinstance(version, int):
            raise InvalidInput("version must be an integer")
        if version is None:
            if body.get("bad") is True:
                await self._dispute(caller, channel, sha1.lower())
            self.cache.requested(channel, sha1.lower())
        return await self.requests.request(caller.node_id, channel, sha1.lower(),
                                           version=version, wait_s=check_wait(body))

    async def _on_listenRequests(self, caller: Caller, body: dict) -> dict:
        if not caller.is_owner and not self.db.channels_of(caller.node_id):
            raise PermissionDenied(f"node {caller.node_id[:12]}… is not authorized on any"
                                   " channel of this hub")
        return {"offers": await self.requests.listen(caller.node_id, check_wait(body))}

    async def _on_answerRequest(self, caller: Caller, body: dict) -> dict:
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "provideFiles")
        sha1 = body.get("sha1")
        accept = body.get("accept")
        if not isinstance(sha1, str) or not is_sha1(sha1) or not isinstance(accept, bool):
            raise InvalidInput("answerRequest needs sha1 and accept (true or false)")
        reason = body.get("reason")
        manifest = body.get("manifest")
        if manifest is not None and (not isinstance(manifest, str) or not is_sha1(manifest)):
            raise InvalidInput(f"invalid manifest {manifest!r}: expected a SHA-1")
        self.requests.answer(caller.node_id, channel, sha1.lower(), accept=accept,
                             size=body.get("size"),
                             reason=str(reason)[:300] if reason is not None else None,
                             manifest=manifest.lower() if manifest else None)
        return {}

    async def _on_requestProgress(self, caller: Caller, body: dict) -> dict:
        channel = check_channel_name(body.get("channel"))
        sha1 = body.get("sha1")
        if not isinstance(sha1, str) or not is_sha1(sha1):
            raise InvalidInput(f"invalid sha1 {sha1!r}")
        go_on = self.requests.progress(caller.node_id, channel, sha1.lower(), body.get("bytes"),
                                       body.get("chunks"))
        return {"continue": go_on}

    async def _on_myRequests(self, caller: Caller, body: dict) -> dict:
        return {"requests": self.requests.requests_of(caller.node_id)}

    # -- feeds (see hub.feeds) -------------------------------------------------------------

    @staticmethod
    def _subfeed(body: dict) -> tuple[str, str]:
        feed_id, subfeed_hash = body.get("feedId"), body.get("subfeedHash")
        if not is_node_id(feed_id):
            raise InvalidInput(f"invalid feed id {feed_id!r}: expected 64 hex characters")
        if not isinstance(subfeed_hash, str) or not is_sha1(subfeed_hash):
            raise InvalidInput(f"invalid subfeed hash {subfeed_hash!r}")
        return feed_id, subfeed_hash  # as written: kachery keys a subfeed by it as given

    def _require_feed_owner(self, caller: Caller, body: dict, feed_id: str) -> None:
        """The request must also be signed by the feed's own key, over the whole body
        (request type, channel, subfeed, positions, sizes, count, timestamp, nonce) and the
        caller's node id: a co-signature seen on the wire authorizes nothing else."""
        signed = {k: v for k, v in body.items() if k != "feedSignature"}
        if signed.get("nodeId") != caller.node_id or not verify_signature(
                signed, body.get("feedSignature"), feed_id):
            raise PermissionDenied(f"only the owner of feed {feed_id[:12]}… (the holder of its"
                                   " private key) may upload its messages")

    async def _on_feedUploadUrls(self, caller: Caller, body: dict) -> dict:
        """Signed PUTs for messages ``start..start+len(sizes)-1`` of a subfeed, and one for
        its ``subfeed.json`` (which is overwritten as the subfeed grows)."""
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "provideFeeds")
        feed_id, subfeed_hash = self._subfeed(body)
        self._require_feed_owner(caller, body, feed_id)
        start, sizes = body.get("start"), body.get("sizes")
        if not isinstance(start, int) or start < 0 or not isinstance(sizes, list) or not all(
                isinstance(n, int) and 0 < n <= MAX_FEED_MESSAGE_BYTES for n in sizes):
            raise InvalidInput("feedUploadUrls needs start and sizes (1 to"
                               f" {MAX_FEED_MESSAGE_BYTES} bytes each)")
        if len(sizes) > MAX_FEED_BATCH:
            raise InvalidInput(f"at most {MAX_FEED_BATCH} messages per batch")
        backend = self._backend(channel)
        prefix = feed_prefix(channel, feed_id, subfeed_hash)
        # RSA signing costs about 1 ms a URL: a batch is signed off the event loop.
        urls = await trio.to_thread.run_sync(lambda: [
            backend.put(f"{prefix}/{start + i}", size=n, expires_s=UPLOAD_URL_EXPIRY_S)
            .to_json() for i, n in enumerate(sizes)])
        index_size, index = body.get("indexSize"), None
        if isinstance(index_size, int) and 0 < index_size < 1000:
            index = backend.put(f"{prefix}/subfeed.json", size=index_size,
                                expires_s=UPLOAD_URL_EXPIRY_S, overwrite=True).to_json()
        batch, batch_url = body.get("batch"), None
        if batch is not None:  # [start, end, size]: messages start..end-1 as one object
            if not (isinstance(batch, list) and len(batch) == 3
                    and all(isinstance(x, int) for x in batch)
                    and 0 <= batch[0] < batch[1] and batch[1] - batch[0] <= MAX_FEED_BATCH
                    and 0 < batch[2] <= MAX_FEED_BATCH * MAX_FEED_MESSAGE_BYTES):
                raise InvalidInput("batch must be [start, end, size]")
            batch_url = backend.put(f"{prefix}/batch/{batch[0]}-{batch[1]}", size=batch[2],
                                    expires_s=UPLOAD_URL_EXPIRY_S).to_json()
        return {"messages": urls, "index": index, "batch": batch_url}

    async def _on_feedUpdated(self, caller: Caller, body: dict) -> dict:
        """The owner uploaded messages: record the count, wake the watchers."""
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "provideFeeds")
        feed_id, subfeed_hash = self._subfeed(body)
        self._require_feed_owner(caller, body, feed_id)
        count = body.get("messageCount")
        if not isinstance(count, int) or not 0 <= count <= MAX_FEED_MESSAGES:
            raise InvalidInput(f"messageCount must be an integer from 0 to {MAX_FEED_MESSAGES}")
        current = self.feeds.count(channel, feed_id, subfeed_hash)
        repair = body.get("repair") is True
        if count > current or (repair and count < current):
            batch_start = body.get("batchStart", current)
            if not isinstance(batch_start, int):
                raise InvalidInput("batchStart must be an integer")
            if count > 0 and not await self._published(channel, feed_id, subfeed_hash,
                                                        batch_start, count):
                raise InvalidInput(
                    f"message {count - 1} of subfeed {subfeed_hash[:12]}… is not in the"
                    f" bucket of channel {channel!r}: upload the messages before announcing"
                    " them")
            if repair and count < current:
                log.warning("channel %s: feed %s… subfeed %s… repaired by its owner: %d"
                            " message(s), not %d", channel, feed_id[:12], subfeed_hash[:12],
                            count, current)
                return {"messageCount": self.feeds.set_count(channel, feed_id,
                                                             subfeed_hash, count, lower=True)}
        return {"messageCount": self.feeds.set_count(channel, feed_id, subfeed_hash, count)}

    async def _published(self, channel: str, feed_id: str, subfeed_hash: str, start: int,
                         count: int) -> bool:
        """Whether the bucket holds message ``count - 1`` of the subfeed: as its single
        object, or in the batch ``start..count-1`` (an owner uploads a batch from the count
        the hub knows)."""
        backend = self._backend(channel)
        prefix = feed_prefix(channel, feed_id, subfeed_hash)
        for key in (f"{prefix}/batch/{start}-{count}", f"{prefix}/{count - 1}"):
            if await backend.stat(key) is not None:
                return True
        return False

    async def _on_watchFeeds(self, caller: Caller, body: dict) -> dict:
        """Long-poll: the subscribed subfeeds whose count is beyond the position given."""
        channel = check_channel_name(body.get("channel"))
        self._require(caller, channel, "requestFeeds")
        subs = body.get("subscriptions")
        if not isinstance(subs, list) or not subs or len(subs) > 1000:
            raise InvalidInput("subscriptions must be a list of 1 to 1000 subfeeds")
        parsed = []
        for sub in subs:
            if not isinstance(sub, dict):
                raise InvalidInput("each subscription is {feedId, subfeedHash, position}")
            feed_id, subfeed_hash = self._subfeed(sub)
            position = sub.get("position", 0)
            if not isinstance(position, int) or position < 0:
                raise InvalidInput("position must be a non-negative integer")
            parsed.append((feed_id, subfeed_hash, position))
        return {"updates": await self.feeds.watch(channel, parsed, check_wait(body)),
                "bucketBaseUrl": self._backend(channel).base_url()}


#: A request's handler: ``handler(hub, caller, body)`` gives the JSON answer, or raises.
Handler = Callable[[Hub, Caller, dict], Awaitable[dict]]

#: The hub's API, one handler for each :class:`~kachery_fs.protocol.Request` (a test
#: checks that none is missing and that no handler is left out).
HANDLERS: Mapping[Request, Handler] = {
    Request.GET_CHANNEL: Hub._on_getChannel,
    Request.CREATE_CHANNEL: Hub._on_createChannel,
    Request.SET_CHANNEL: Hub._on_setChannel,
    Request.CHANNEL_STATS: Hub._on_channelStats,
    Request.AUTHORIZE_NODE: Hub._on_authorizeNode,
    Request.LIST_CHANNELS: Hub._on_listChannels,
    Request.INITIATE_UPLOAD: Hub._on_initiateUpload,
    Request.FINALIZE_UPLOAD: Hub._on_finalizeUpload,
    Request.GET_MANIFEST: Hub._on_getManifest,
    Request.REPORT_MANIFEST: Hub._on_reportManifest,
    Request.REPORT_DOWNLOADS: Hub._on_reportDownloads,
    Request.SIGN_READS: Hub._on_signReads,
    Request.REQUEST_FILE: Hub._on_requestFile,
    Request.LISTEN_REQUESTS: Hub._on_listenRequests,
    Request.ANSWER_REQUEST: Hub._on_answerRequest,
    Request.REQUEST_PROGRESS: Hub._on_requestProgress,
    Request.MY_REQUESTS: Hub._on_myRequests,
    Request.FEED_UPLOAD_URLS: Hub._on_feedUploadUrls,
    Request.FEED_UPDATED: Hub._on_feedUpdated,
    Request.WATCH_FEEDS: Hub._on_watchFeeds,
}
