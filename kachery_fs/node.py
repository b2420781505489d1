"""One node: identity, local store, state database and the HTTP client they share.

A node directory (``$KACHERY_FS_DIR``) holds ``private.pem``/``public.pem`` (kachery's
PEM format), ``node.db`` (SQLite), ``sha1/``, ``tmp/`` and ``store.db`` (the store and
its cache index), and ``config.toml`` (settings, if any).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import trio

from . import _http
from .config import private_directory, private_files
from .demand import DownloadReports
from .errors import DeadlineExceeded, NotFound, PermissionDenied
from .hub_client import HubClient
from .identity import NodeKey
from .state import Channel, NodeDB
from .store import Store

log = logging.getLogger(__name__)

#: How long a node trusts its cached view of its own channel permissions; also how long
#: it waits after a failed refresh before asking the hub again.
PERMISSIONS_TTL_S = 5.0
#: How long one permission refresh may wait for the hub. Callers are file operations
#: (``create``), which must not hang on a hub that does not answer.
REFRESH_TIMEOUT_S = 2.0


def init_node(directory: Path) -> NodeKey:
    """Create the node directory (private) and identity if missing; return the identity."""
    private_directory(directory)
    try:
        return NodeKey.load(directory)
    except NotFound:
        key = NodeKey.generate()
        key.save(directory)
        log.info("created node %s in %s", key.node_id, directory)
        return key


class Node:
    def __init__(self, directory: Path, *, client: httpx.AsyncClient | None = None,
                 create: bool = False):
        self.dir = Path(directory)
        if create:
            self.key = init_node(self.dir)
        else:
            if not (self.dir / "private.pem").exists():
                raise NotFound(f"no node in {self.dir}: run `kachery-fs init` first")
            self.key = NodeKey.load(self.dir)
        private_directory(self.dir)
        self.db = NodeDB(self.dir / "node.db")
        private_files(self.db.path)
        self.store = Store.for_node(self.dir, self.db)
        self.client = client or _http.create_client()
        self._hubs: dict[str, HubClient] = {}
        self._refresh_failed_at: dict[str, float] = {}  # channel -> time.monotonic()
        self.downloads = DownloadReports(self)

    @property
    def node_id(self) -> str:
        return self.key.node_id

    def hub(self, url: str) -> HubClient:
        if url not in self._hubs:
            self._hubs[url] = HubClient(url, self.key, self.client)
        return self._hubs[url]

    def channel(self, name: str) -> Channel:
        return self.db.channel(name)

    async def refresh_channel(self, name: str) -> Channel:
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
        self.db.set_permissions(name, set(info.get("permissions", [])),
                                info.get("bucketBaseUrl"))
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
        failed_at = self._refresh_failed_at.get(name)
        if failed_at is not None and time.monotonic() - failed_at < PERMISSIONS_TTL_S:
            return ch.permissions
        try:
            return (await self.refresh_channel(name)).permissions
        except PermissionDenied:
            raise
        except Exception as exc:  # hub down: fall back on what we knew
            log.warning("could not refresh permissions on %s (%s); using the last known", name, exc)
            return ch.permissions

    async def aclose(self) -> None:
        await self.client.aclose()
        self.store.close()
        self.db.close()
