"""This node's channel memberships: their records, their hubs, and the node's permissions.

A membership (hub URL, bucket base URL, permissions) lives in the node database
(:class:`~kachery_fs.state.NodeDB`). :class:`Channels` is what the other parts ask about
it: the record of a channel, the :class:`~kachery_fs.hub_client.HubClient` of its hub
(one per hub URL, sharing the node's HTTP client), and the node's permissions, which the
hub may change at any time and are therefore asked again when they are more than
:data:`PERMISSIONS_TTL_S` old.
"""

from __future__ import annotations

import logging
import time

import httpx
import trio

from .errors import DeadlineExceeded, PermissionDenied
from .hub_client import HubClient
from .identity import NodeKey
from .state import Channel, NodeDB

log = logging.getLogger(__name__)

#: How long a node trusts its cached view of its own channel permissions; also how long
#: it waits after a failed refresh before asking the hub again.
PERMISSIONS_TTL_S = 5.0
#: How long one permission refresh may wait for the hub. Callers are file operations
#: (``create``), which must not hang on a hub that does not answer.
REFRESH_TIMEOUT_S = 2.0


class Channels:
    """The channels a node has joined, and a client for each of their hubs."""

    def __init__(self, db: NodeDB, key: NodeKey, client: httpx.AsyncClient):
        self.db = db
        self.key = key
        self.client = client
        self._hubs: dict[str, HubClient] = {}
        self._refresh_failed_at: dict[str, float] = {}  # channel -> time.monotonic()

    @property
    def node_id(self) -> str:
        return self.key.node_id

    def get(self, name: str) -> Channel:
        """The membership record of ``name`` (``NotFound`` if this node has not joined it)."""
        return self.db.channel(name)

    def all(self) -> list[Channel]:
        return self.db.channels()

    def hub(self, url: str) -> HubClient:
        """The client of the hub at ``url`` (one per URL)."""
        if url not in self._hubs:
            self._hubs[url] = HubClient(url, self.key, self.client)
        return self._hubs[url]

    def hub_of(self, name: str) -> HubClient:
        """The client of the hub that brokers channel ``name``."""
        return self.hub(self.db.channel(name).hub_url)

    async def refresh(self, name: str) -> Channel:
        """Ask the hub for this node's current permissions on ``name`` and remember them.

        Waits at most REFRESH_TIMEOUT_S for the hub (``DeadlineExceeded``).
        """
        ch = self.db.channel(name)
        try:
            with trio.move_on_after(REFRESH_TIMEOUT_S) as scope:
                info = await self.hub(ch.hub_url).get_channel(name)
            if scope.cancelled_caught:
                raise DeadlineExceeded(f"hub {ch.hub_url} did not answer within"
                                       f" {REFRESH_TIMEOUT_S:g} s")
        except PermissionDenied:
            raise
        except Exception:
            self._refresh_failed_at[name] = time.monotonic()
            raise
        self._refresh_failed_at.pop(name, None)
        private = info.get("private")
        self.db.set_permissions(name, set(info.get("permissions", [])),
                                info.get("bucketBaseUrl"),
                                private=private if isinstance(private, bool) else None)
        return self.db.channel(name)

    def hub_recently_failed(self, name: str) -> bool:
        """True while a failed permission refresh on ``name`` is less than the TTL old."""
        failed_at = self._refresh_failed_at.get(name)
        return failed_at is not None and time.monotonic() - failed_at < PERMISSIONS_TTL_S

    async def permissions(self, name: str) -> frozenset[str]:
        """This node's permissions on a channel, at most PERMISSIONS_TTL_S old when the hub
        answers; the last known ones when it does not.

        A refresh waits at most REFRESH_TIMEOUT_S; after a failed one the hub is left alone
        for PERMISSIONS_TTL_S, so a hub that hangs costs one short wait, not one per call.
        """
        ch = self.db.channel(name)
        if time.time() - ch.checked_at < PERMISSIONS_TTL_S:
            return ch.permissions
        if self.hub_recently_failed(name):
            return ch.permissions
        try:
            return (await self.refresh(name)).permissions
        except PermissionDenied:
            raise
        except Exception as exc:  # hub down: fall back on what we knew
            log.warning("could not refresh permissions on %s (%s); using the last known", name, exc)
            return ch.permissions
