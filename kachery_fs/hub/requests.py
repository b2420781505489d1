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
* Records live in the hub's database, so a restarted hub picks its requests up again, and
  every hub process on one database serves the same requests; providers reconnect by
  themselves and get their pending offers back.

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

from ..errors import InvalidInput, NotFound, Unavailable
from . import storage
from .wakeups import RECHECK_S, Wakeups

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
#: How often each hub process publishes the providers connected to it (``listeners``).
PRESENCE_S = 1.0

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
    """The hub's request broker. ``run`` must be running for timeouts to be applied.

    The rows of ``file_requests`` are the truth, shared by every hub process on the
    database: each change reads its record and writes it back in one transaction that
    keeps every other writer out (``Database.transaction``), so a request is offered to one
    provider at a time whichever hub processes the requester and the providers talk to.
    Which providers are connected is each process's own knowledge, published to the others
    in ``listeners`` every :data:`PRESENCE_S`. Long-polls wait on wake-ups
    (``hub.wakeups``) and read the rows again when woken.
    """

    def __init__(self, db, *, providers_of, object_size, clock=time.time,
                 wakeups: Wakeups | None = None):
        """``providers_of(channel)`` is the set of node ids that may provide on a channel;
        ``object_size(channel, sha1)`` is an async check of the bucket (``None``: absent).
        ``clock`` gives the times kept in the records (seconds; every hub process on one
        database must agree on it: the time of day)."""
        self._db = storage.as_database(db)
        self._providers_of = providers_of
        self._object_size = object_size
        self._clock = clock
        self._wakeups = wakeups if wakeups is not None else Wakeups()
        self._wakeups.on("r", self._woken_request, wake_all=self._wake_all)
        self._wakeups.on("o", self._woken_node, wake_all=self._wake_all)
        self._started = clock()
        self._request_changed: dict[tuple[str, str], trio.Event] = {}
        self._offers_changed: dict[str, trio.Event] = {}
        self._listening: Counter[str] = Counter()
        self._last_listen: dict[str, float] = {}
        self._published: set[str] = set()  # the providers this process last published
        self._published_at = -PRESENCE_S
        now = clock()
        with self._db.transaction():
            live = [r for r in self.records() if r.state in ACTIVE]
            # Providers need time to reconnect to a restarted hub: restart the clocks of
            # live requests (which also gives every other hub process's a little more).
            for req in live:
                req.changed_at = req.progress_at = req.asked_at = now
                self._save(req)
        if live:
            log.info("resuming %d file request(s)", len(live))

    # -- persistence and notification ---------------------------------------------------

    def get(self, channel: str, sha1: str) -> FileRequest | None:
        """The record of the request for (channel, sha1), if there is one."""
        row = self._db.execute("SELECT record FROM file_requests WHERE channel = ? AND"
                               " sha1 = ?", (channel, sha1)).fetchone()
        return FileRequest(**json.loads(row[0])) if row else None

    def records(self, channel: str | None = None) -> list[FileRequest]:
        """Every request's record (of ``channel``, if given)."""
        if channel is None:
            rows = self._db.execute("SELECT record FROM file_requests")
        else:
            rows = self._db.execute("SELECT record FROM file_requests WHERE channel = ?",
                                    (channel,))
        return [FileRequest(**json.loads(record)) for (record,) in rows]

    def _save(self, req: FileRequest) -> None:
        self._db.execute("INSERT INTO file_requests (channel, sha1, record) VALUES (?, ?, ?)"
                         " ON CONFLICT (channel, sha1) DO UPDATE SET record = excluded.record",
                         (req.channel, req.sha1, json.dumps(asdict(req))))

    def _drop(self, req: FileRequest) -> None:
        self._db.execute("DELETE FROM file_requests WHERE channel = ? AND sha1 = ?",
                         (req.channel, req.sha1))
        self._wake_request(req)

    def _wake_request(self, req: FileRequest) -> None:
        self._wakeups.send("r", f"{req.channel}/{req.sha1}")

    def _wake_node(self, node_id: str) -> None:
        self._wakeups.send("o", node_id)

    def _woken_request(self, key: str) -> None:
        channel, _, sha1 = key.partition("/")
        event = self._request_changed.pop((channel, sha1), None)
        if event is not None:
            event.set()

    def _woken_node(self, node_id: str) -> None:
        event = self._offers_changed.pop(node_id, None)
        if event is not None:
            event.set()

    def _wake_all(self) -> None:
        for events in (self._request_changed, self._offers_changed):
            for event in events.values():
                event.set()
            events.clear()

    def _changed(self, req: FileRequest, *, state_change: bool = True) -> None:
        req.version += 1
        if state_change:
            req.changed_at = self._clock()
        self._save(req)
        self._wake_request(req)

    # -- providers ------------------------------------------------------------------------

    def _here(self, node_id: str) -> bool:
        """Whether ``node_id`` is connected to this process (listening, or in its grace)."""
        if self._listening[node_id] > 0:
            return True
        last = self._last_listen.get(node_id)
        return last is not None and self._clock() - last < PROVIDER_GRACE_S

    def connected(self, node_id: str | None) -> bool:
        """Whether provider ``node_id`` is connected to this hub process or, as they last
        published it, to another on the database."""
        if node_id is None:  # a request's provider, when it has none
            return False
        if self._here(node_id):
            return True
        row = self._db.execute("SELECT MAX(seen_at) FROM listeners WHERE node_id = ? AND"
                               " hub <> ?", (node_id, self._wakeups.hub_id)).fetchone()
        return row[0] is not None and self._clock() - row[0] < PROVIDER_GRACE_S + PRESENCE_S

    def _publish_presence(self, *, force: bool = False) -> None:
        """Tell the other hub processes which providers are connected here (at most every
        :data:`PRESENCE_S` unless ``force``), and forget what dead processes published."""
        now = self._clock()
        if not force and now - self._published_at < PRESENCE_S:
            return
        here = {n: (now if self._listening[n] > 0 else self._last_listen[n])
                for n in set(self._listening) | set(self._last_listen) if self._here(n)}
        for node in [n for n in self._last_listen if not self._here(n)]:
            del self._last_listen[node]
        if not here and not self._published and now - self._published_at < 60:
            return  # nothing to say, and nothing said before to take back
        self._published_at = now
        hub = self._wakeups.hub_id
        with self._db.transaction():
            self._db.execute("DELETE FROM listeners WHERE hub = ? OR seen_at < ?",
                             (hub, now - 60))
            self._db.executemany("INSERT INTO listeners (hub, node_id, seen_at) VALUES"
                                 " (?, ?, ?)", [(hub, n, at) for n, at in here.items()])
        self._published = set(here)

    def _assignments(self, requests: list[FileRequest]) -> Counter[str]:
        return Counter(r.provider for r in requests
                       if r.state in ("offered", "uploading") and r.provider)

    def _advance(self, req: FileRequest, reason: str | None = None, *,
                 load: Counter[str] | None = None) -> None:
        """Give the request to the next provider, or fail it when there is none (in a
        transaction; ``load``: the providers' assignments, if the caller has them)."""
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
            if load is None:
                load = self._assignments(self.records())
            random.shuffle(candidates)
            candidates.sort(key=lambda n: load[n])
            req.provider, req.state = candidates[0], "offered"
            load[req.provider] += 1
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
        newly_connected = not self._here(node_id) and not self.connected(node_id)
        self._listening[node_id] += 1
        try:
            deadline = trio.current_time() + min(max(wait_s, 0.0), MAX_WAIT_S)
            if newly_connected:
                self._publish_presence(force=True)
                with self._db.transaction():
                    self._offer_pending()
            while True:
                offers = [{"channel": r.channel, "sha1": r.sha1, "version": r.version}
                          for r in self.records()
                          if r.provider == node_id and r.state == "offered"]
                remaining = deadline - trio.current_time()
                if offers or remaining <= 0:
                    return offers
                event = self._offers_changed.setdefault(node_id, trio.Event())
                with trio.move_on_after(min(remaining, RECHECK_S)):
                    await event.wait()
        finally:
            self._listening[node_id] -= 1
            if not self._listening[node_id]:
                del self._listening[node_id]
            self._last_listen[node_id] = self._clock()

    def _offer_pending(self) -> None:
        """(In a transaction.)"""
        requests = self.records()
        load = self._assignments(requests)
        for req in requests:
            if req.state == "pending":
                self._advance(req, load=load)

    def _current(self, node_id: str, channel: str, sha1: str) -> FileRequest:
        req = self.get(channel, sha1)
        if req is None or req.provider != node_id or req.state not in ("offered", "uploading"):
            raise NotFound(f"no request for sha1://{sha1} on {channel!r} is assigned to this node")
        return req

    def answer(self, node_id: str, channel: str, sha1: str, *, accept: bool,
               size: int | None, reason: str | None, manifest: str | None = None) -> None:
        """A provider's answer to its offer; ``manifest``: it streams the file's chunks
        (see the module docstring)."""
        with self._db.transaction():
            req = self._current(node_id, channel, sha1)
            if not accept:
                self._advance(req, reason or "declined")
            elif req.state == "offered":
                req.state = "uploading"
                req.progress_at = self._clock()
                if isinstance(size, int) and size >= 0:
                    req.size = size
                if manifest is not None and manifest != req.manifest:
                    req.manifest, req.chunks = manifest, 0
                log.info("request %s/%s accepted by %s…", channel, sha1[:12], node_id[:12])
                self._changed(req)

    def progress(self, node_id: str, channel: str, sha1: str, nbytes: object,
                 chunks: object = None) -> bool:
        """A provider's progress report (``nbytes`` as sent: ignored unless a byte count;
        ``chunks``: of a streaming provider, how many chunks from the first are in the
        bucket); False tells it the request was given to another."""
        with self._db.transaction():
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
        with self._db.transaction():
            req = self.get(channel, sha1)
            if req is not None and req.state in ACTIVE:
                self._finish(req, size)

    def _finish(self, req: FileRequest, size: int) -> None:
        req.state, req.size, req.bytes = "finished", size, size
        log.info("request %s/%s finished (%d bytes)", req.channel, req.sha1[:12], size)
        self._changed(req)

    # -- requesters ------------------------------------------------------------------------

    async def request(self, node_id: str, channel: str, sha1: str, *, version: int | None,
                      wait_s: float) -> dict:
        """Start or join the request for (channel, sha1), or wait for a change after
        ``version``. Returns the request's public state."""
        key = (channel, sha1)
        req = self.get(channel, sha1)
        if version is None and (req is None or req.state not in ACTIVE):
            size = await self._object_size(channel, sha1)
            with self._db.transaction():
                req = self.get(channel, sha1)  # the await let others in
                if size is not None:
                    if req is not None and req.state in ACTIVE:
                        self._finish(req, size)
                        return req.public()
                    return {"channel": channel, "sha1": sha1, "state": "finished",
                            "size": size, "bytes": size, "version": 0}
                if req is None or req.state not in ACTIVE:
                    old_version = req.version if req is not None else 0
                    req = FileRequest(channel, sha1, version=old_version,
                                      created_at=self._clock(), requesters=[node_id])
                    req.asked_at = self._clock()
                    log.info("request %s/%s from %s…", channel, sha1[:12], node_id[:12])
                    self._advance(req)
                    return req.public()
        with self._db.transaction():
            req = self.get(channel, sha1)
            if req is not None and (req.state in ACTIVE or version is not None):
                if node_id not in req.requesters:
                    req.requesters.append(node_id)
                req.asked_at = self._clock()
                self._save(req)
        if req is None or (version is None and req.state not in ACTIVE):
            if version is None:
                # dropped or ended by another hub process since it was read: ask afresh
                return await self.request(node_id, channel, sha1, version=None,
                                          wait_s=wait_s)
            raise NotFound(f"no request for sha1://{sha1} on channel {channel!r}"
                           " (it expired: ask again)")
        deadline = trio.current_time() + min(max(wait_s, 0.0), MAX_WAIT_S)
        while version is not None and req.version == version and req.state in ACTIVE:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                break
            event = self._request_changed.setdefault(key, trio.Event())
            with trio.move_on_after(min(remaining, RECHECK_S)):
                await event.wait()
            req = self.get(channel, sha1) or req
        return req.public()

    def held(self, channel: str) -> set[str]:
        """Hashes on ``channel`` whose object must stay in the bucket: requests that are
        live, or finished recently enough that their requesters may still be fetching."""
        return {req.sha1 for req in self.records(channel) if req.state != "failed"}

    def requests_of(self, node_id: str) -> list[dict]:
        return [r.public() for r in self.records()
                if node_id in r.requesters or r.provider == node_id]

    def permissions_changed(self) -> None:
        """An idle provider may now be able to take pending requests."""
        with self._db.transaction():
            self._offer_pending()

    # -- time-based transitions ---------------------------------------------------------

    def tick(self) -> None:
        self._publish_presence()
        now = self._clock()
        if self._db.execute("SELECT 1 FROM file_requests LIMIT 1").fetchone() is None:
            return
        with self._db.transaction():
            requests = self.records()
            load = self._assignments(requests)
            for req in requests:
                self._tick(req, now, load)

    def _tick(self, req: FileRequest, now: float, load: Counter[str]) -> None:
        if req.state == "offered":
            if now - req.asked_at > WAITER_TTL_S:
                log.info("request %s/%s expired (no requester is waiting)", req.channel,
                         req.sha1[:12])
                self._drop(req)
            elif not self.connected(req.provider):
                self._advance(req, "disconnected", load=load)
            elif now - req.changed_at > OFFER_TIMEOUT_S:
                self._advance(req, f"did not answer within {OFFER_TIMEOUT_S:.0f} s", load=load)
        elif req.state == "uploading":
            if not self.connected(req.provider) and now - req.progress_at > PROVIDER_GRACE_S:
                self._advance(req, "disconnected during the upload", load=load)
            elif now - req.progress_at > PROVIDER_STALL_S:
                self._advance(req, f"made no progress for {PROVIDER_STALL_S:.0f} s", load=load)
        elif req.state == "pending":
            if now - req.asked_at > WAITER_TTL_S:
                self._drop(req)
            elif now - self._started >= STARTUP_GRACE_S:
                self._advance(req, load=load)
        elif now - req.changed_at > TERMINAL_TTL_S:
            self._drop(req)

    async def run(self) -> None:
        warned_at = -60.0
        while True:
            try:
                self.tick()
            except Unavailable as exc:  # the database, for a while: one line a minute
                if trio.current_time() - warned_at >= 60:
                    warned_at = trio.current_time()
                    log.warning("file request bookkeeping paused: %s", exc)
            except Exception:
                log.exception("file request bookkeeping failed")
            await trio.sleep(0.5)


def check_wait(body: dict) -> float:
    wait_ms = body.get("waitMs", 0)
    if not isinstance(wait_ms, int) or wait_ms < 0:
        raise InvalidInput("waitMs must be a non-negative integer")
    return min(wait_ms / 1000, MAX_WAIT_S)

