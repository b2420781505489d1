"""File requests: a node asks for a hash that is in no bucket; a provider node uploads it.

The earlier kachery generations broadcast a request to every holder, polled once a second
and gave up after 3 s / 30 s (reference: kachery.md §4.3). Here:

* Providers hold a long-poll open (``listenRequests``); a new offer wakes it at once.
* The hub offers a request to **one** provider at a time, chosen among the connected nodes
  that may provide on that channel (fewest current assignments first), and moves on to the
  next when it declines, fails, does not answer, disconnects or stops making progress.
* Requesters long-poll the request's state (``requestFile`` with the version they have
  seen); every state change and every progress report wakes them.
* Requests for one (channel, hash) from any number of nodes share one record, one provider
  and one upload.
* Records live in SQLite, so a restarted hub picks its requests up again; providers
  reconnect by themselves and get their pending offers back.

State of a request: ``pending`` (looking for a provider) → ``offered`` (one provider asked)
→ ``uploading`` (it accepted; ``bytes`` grows) → ``finished`` (the object is in the bucket
and finalized) or ``failed`` (with the reasons). A failed or finished record is kept a while
for requesters still watching it; a new request for the same hash starts it afresh.

**Requests that stream.** A provider that holds the manifest of a large file accepts with
its hash (``manifest``; the manifest object is in the bucket by then), and uploads the
file's chunks as objects of their own, in order, before the whole object. Its progress
reports then say how many chunks, from the first, are in the bucket (``chunks``), and the
hub relays both in the request's state, so that requesters read each chunk (verified
against the manifest) as soon as it is there rather than at ``finished``. The hub takes
both as the provider's word: requesters verify every chunk, and the whole file at the end.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import trio

from ..errors import InvalidInput, NotFound
from . import storage

log = logging.getLogger(__name__)

#: Longest a long-poll is held by the hub (clients ask for less).
MAX_WAIT_S = 25.0
#: A provider counts as connected while a listen is open or for this long after one ended.
PROVIDER_GRACE_S = 3.0
#: An offer not answered within this time goes to the next provider.
OFFER_TIMEOUT_S = 5.0
#: An accepted upload with no progress report for this long goes to the next provider.
PROVIDER_STALL_S = 15.0
#: A request no requester has asked about for this long is dropped (unless uploading).
WAITER_TTL_S = 60.0
#: Finished and failed records are kept this long for requesters still watching.
TERMINAL_TTL_S = 120.0
#: After the hub starts, providers get this long to reconnect before "no provider online".
STARTUP_GRACE_S = 5.0

ACTIVE = ("pending", "offered", "uploading")


@dataclass
class FileRequest:
    channel: str
    sha1: str
    state: str = "pending"
    provider: str | None = None
    size: int | None = None
    bytes: int = 0
    #: A streaming provider's manifest of the file, and how many chunks from the first it
    #: has put in the bucket as objects of their own.
    manifest: str | None = None
    chunks: int = 0
    version: int = 0
    tried: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requesters: list[str] = field(default_factory=list)
    created_at: float = 0.0
    changed_at: float = 0.0
    progress_at: float = 0.0
    asked_at: float = 0.0

    def public(self) -> dict:
        out = {"channel": self.channel, "sha1": self.sha1, "state": self.state,
               "version": self.version, "bytes": self.bytes}
        if self.size is not None:
            out["size"] = self.size
        if self.provider:
            out["provider"] = self.provider
        if self.manifest:
            out["manifest"] = self.manifest
            out["chunks"] = self.chunks
        if self.errors:
            out["errors"] = self.errors[-5:]
        if self.state == "failed":
            out["error"] = self.errors[-1] if self.errors else "failed"
        return out


class FileRequests:
    """The hub's request broker. ``run`` must be running for timeouts to be applied."""

    def __init__(self, db, *, providers_of, object_size, clock=time.monotonic,
                 wall=time.time):
        """``providers_of(channel)`` is the set of node ids that may provide on a channel;
        ``object_size(channel, sha1)`` is an async check of the bucket (``None``: absent)."""
        self._db = db
        self._providers_of = providers_of
        self._object_size = object_size
        self._clock = clock
        self._wall = wall
        self._started = clock()
        self._requests: dict[tuple[str, str], FileRequest] = {}
        self._request_changed: dict[tuple[str, str], trio.Event] = {}
        self._offers_changed: dict[str, trio.Event] = {}
        self._listening: Counter[str] = Counter()
        self._last_listen: dict[str, float] = {}
        storage.SCHEMA.migrate(db)  # a no-op on the hub's connection: the tables are there
        for (record,) in db.execute("SELECT record FROM file_requests"):
            req = FileRequest(**json.loads(record))
            # Monotonic times do not survive a restart: restart the clocks of live requests.
            now = clock()
            req.changed_at = req.progress_at = req.asked_at = now
            self._requests[(req.channel, req.sha1)] = req
        if self._requests:
            log.info("resuming %d file request(s)", len(self._requests))

    # -- persistence and notification ---------------------------------------------------

    def _save(self, req: FileRequest) -> None:
        self._db.execute("INSERT OR REPLACE INTO file_requests (channel, sha1, record)"
                         " VALUES (?, ?, ?)", (req.channel, req.sha1, json.dumps(asdict(req))))

    def _drop(self, req: FileRequest) -> None:
        self._requests.pop((req.channel, req.sha1), None)
        self._db.execute("DELETE FROM file_requests WHERE channel = ? AND sha1 = ?",
                         (req.channel, req.sha1))
        self._wake_request(req)

    def _wake_request(self, req: FileRequest) -> None:
        event = self._request_changed.pop((req.channel, req.sha1), None)
        if event is not None:
            event.set()

    def _wake_node(self, node_id: str) -> None:
        event = self._offers_changed.pop(node_id, None)
        if event is not None:
            event.set()

    def _changed(self, req: FileRequest, *, state_change: bool = True) -> None:
        req.version += 1
        if state_change:
            req.changed_at = self._clock()
        self._save(req)
        self._wake_request(req)

    # -- providers ------------------------------------------------------------------------

    def connected(self, node_id: str | None) -> bool:
        if node_id is None:  # a request's provider, when it has none
            return False
        if self._listening[node_id] > 0:
            return True
        last = self._last_listen.get(node_id)
        return last is not None and self._clock() - last < PROVIDER_GRACE_S

    def _assignments(self) -> Counter[str]:
        return Counter(r.provider for r in self._requests.values()
                       if r.state in ("offered", "uploading") and r.provider)

    def _advance(self, req: FileRequest, reason: str | None = None) -> None:
        """Give the request to the next provider, or fail it when there is none."""
        if req.provider and reason:
            req.errors.append(f"{req.provider[:12]}…: {reason}")
            log.info("request %s/%s: provider %s… %s", req.channel, req.sha1[:12],
                     req.provider[:12], reason)
        if req.provider and req.provider not in req.tried:
            req.tried.append(req.provider)
        req.provider, req.bytes = None, 0
        candidates = [n for n in self._providers_of(req.channel)
                      if n not in req.tried and n not in req.requesters and self.connected(n)]
        if candidates:
            load = self._assignments()
            random.shuffle(candidates)
            candidates.sort(key=lambda n: load[n])
            req.provider, req.state = candidates[0], "offered"
            req.asked_at = self._clock()
            log.info("request %s/%s offered to %s…", req.channel, req.sha1[:12],
                     req.provider[:12])
            self._changed(req)
            self._wake_node(req.provider)
            return
        if not req.tried and self._clock() - self._started < STARTUP_GRACE_S:
            req.state = "pending"  # providers may still be reconnecting to a restarted hub
            self._changed(req)
            return
        if req.tried:
            req.errors.append(f"no other provider is online for channel {req.channel!r}"
                              f" ({len(req.tried)} tried)")
        else:
            allowed = len(self._providers_of(req.channel))
            req.errors.append(
                f"no provider online for channel {req.channel!r}" if allowed else
                f"no node may provide files on channel {req.channel!r}")
        req.state = "failed"
        log.info("request %s/%s failed: %s", req.channel, req.sha1[:12], req.errors[-1])
        self._changed(req)

    async def listen(self, node_id: str, wait_s: float) -> list[dict]:
        """Long-poll of a provider: its current offers, at once if any, else when one comes."""
        self._listening[node_id] += 1
        try:
            deadline = self._clock() + min(max(wait_s, 0.0), MAX_WAIT_S)
            newly_connected = self._last_listen.get(node_id) is None or not self.connected(
                node_id)
            if newly_connected:
                self._offer_pending()
            while True:
                offers = [{"channel": r.channel, "sha1": r.sha1, "version": r.version}
                          for r in self._requests.values()
                          if r.provider == node_id and r.state == "offered"]
                remaining = deadline - self._clock()
                if offers or remaining <= 0:
                    return offers
                event = self._offers_changed.setdefault(node_id, trio.Event())
                with trio.move_on_after(remaining):
                    await event.wait()
        finally:
            self._listening[node_id] -= 1
            self._last_listen[node_id] = self._clock()

    def _offer_pending(self) -> None:
        for req in list(self._requests.values()):
            if req.state == "pending":
                self._advance(req)

    def _current(self, node_id: str, channel: str, sha1: str) -> FileRequest:
        req = self._requests.get((channel, sha1))
        if req is None or req.provider != node_id or req.state not in ("offered", "uploading"):
            raise NotFound(f"no request for sha1://{sha1} on {channel!r} is assigned to this node")
        return req

    def answer(self, node_id: str, channel: str, sha1: str, *, accept: bool,
               size: int | None, reason: str | None, manifest: str | None = None) -> None:
        """A provider's answer to its offer; ``manifest``: it streams the file's chunks
        (see the module docstring)."""
        req = self._current(node_id, channel, sha1)
        if accept:
            if req.state == "offered":
                req.state = "uploading"
                req.progress_at = self._clock()
                if isinstance(size, int) and size >= 0:
                    req.size = size
                if manifest is not None and manifest != req.manifest:
                    req.manifest, req.chunks = manifest, 0
                log.info("request %s/%s accepted by %s…", channel, sha1[:12], node_id[:12])
                self._changed(req)
            return
        self._advance(req, reason or "declined")

    def progress(self, node_id: str, channel: str, sha1: str, nbytes: object,
                 chunks: object = None) -> bool:
        """A provider's progress report (``nbytes`` as sent: ignored unless a byte count;
        ``chunks``: of a streaming provider, how many chunks from the first are in the
        bucket); False tells it the request was given to another."""
        try:
            req = self._current(node_id, channel, sha1)
        except NotFound:
            return False
        if req.state == "uploading" and isinstance(nbytes, int) and nbytes >= req.bytes:
            req.bytes = nbytes
            req.progress_at = self._clock()
            if (req.manifest and isinstance(chunks, int) and not isinstance(chunks, bool)
                    and chunks > req.chunks):
                req.chunks = chunks
            self._changed(req, state_change=False)
        return True

    def object_finalized(self, channel: str, sha1: str, size: int) -> None:
        """The object is in the bucket (finalized, or found present): finish the request."""
        req = self._requests.get((channel, sha1))
        if req is None or req.state not in ACTIVE:
            return
        req.state, req.size, req.bytes = "finished", size, size
        log.info("request %s/%s finished (%d bytes)", channel, sha1[:12], size)
        self._changed(req)

    # -- requesters ------------------------------------------------------------------------

    async def request(self, node_id: str, channel: str, sha1: str, *, version: int | None,
                      wait_s: float) -> dict:
        """Start or join the request for (channel, sha1), or wait for a change after
        ``version``. Returns the request's public state."""
        key = (channel, sha1)
        req = self._requests.get(key)
        if version is None:
            if req is None or req.state not in ACTIVE:
                size = await self._object_size(channel, sha1)
                req = self._requests.get(key)  # the await may have let another in
                if size is not None:
                    if req is not None and req.state in ACTIVE:
                        self.object_finalized(channel, sha1, size)
                        return req.public()
                    return {"channel": channel, "sha1": sha1, "state": "finished",
                            "size": size, "bytes": size, "version": 0}
                if req is None or req.state not in ACTIVE:
                    old_version = req.version if req is not None else 0
                    req = FileRequest(channel, sha1, version=old_version,
                                      created_at=self._wall(), requesters=[node_id])
                    req.asked_at = self._clock()
                    self._requests[key] = req
                    log.info("request %s/%s from %s…", channel, sha1[:12], node_id[:12])
                    self._advance(req)
                    return req.public()
        if req is None:
            raise NotFound(f"no request for sha1://{sha1} on channel {channel!r}"
                           " (it expired: ask again)")
        if node_id not in req.requesters:
            req.requesters.append(node_id)
            self._save(req)
        req.asked_at = self._clock()
        if version is not None and req.version == version and req.state in ACTIVE:
            event = self._request_changed.setdefault(key, trio.Event())
            with trio.move_on_after(min(max(wait_s, 0.0), MAX_WAIT_S)):
                await event.wait()
            req = self._requests.get(key) or req
        return req.public()

    def held(self, channel: str) -> set[str]:
        """Hashes on ``channel`` whose object must stay in the bucket: requests that are
        live, or finished recently enough that their requesters may still be fetching."""
        return {sha1 for (c, sha1), req in self._requests.items()
                if c == channel and req.state != "failed"}

    def requests_of(self, node_id: str) -> list[dict]:
        return [r.public() for r in self._requests.values()
                if node_id in r.requesters or r.provider == node_id]

    def permissions_changed(self) -> None:
        """An idle provider may now be able to take pending requests."""
        self._offer_pending()

    # -- time-based transitions ---------------------------------------------------------

    def tick(self) -> None:
        now = self._clock()
        for req in list(self._requests.values()):
            if req.state == "offered":
                if now - req.asked_at > WAITER_TTL_S:
                    log.info("request %s/%s expired (no requester is waiting)", req.channel,
                             req.sha1[:12])
                    self._drop(req)
                elif not self.connected(req.provider):
                    self._advance(req, "disconnected")
                elif now - req.changed_at > OFFER_TIMEOUT_S:
                    self._advance(req, f"did not answer within {OFFER_TIMEOUT_S:.0f} s")
            elif req.state == "uploading":
                if not self.connected(req.provider) and now - req.progress_at > PROVIDER_GRACE_S:
                    self._advance(req, "disconnected during the upload")
                elif now - req.progress_at > PROVIDER_STALL_S:
                    self._advance(req, f"made no progress for {PROVIDER_STALL_S:.0f} s")
            elif req.state == "pending":
                if now - req.asked_at > WAITER_TTL_S:
                    self._drop(req)
                elif now - self._started >= STARTUP_GRACE_S:
                    self._advance(req)
            elif now - req.changed_at > TERMINAL_TTL_S:
                self._drop(req)

    async def run(self) -> None:
        while True:
            try:
                self.tick()
            except Exception:
                log.exception("file request bookkeeping failed")
            await trio.sleep(0.5)


def check_wait(body: dict) -> float:
    wait_ms = body.get("waitMs", 0)
    if not isinstance(wait_ms, int) or wait_ms < 0:
        raise InvalidInput("waitMs must be a non-negative integer")
    return min(wait_ms / 1000, MAX_WAIT_S)

