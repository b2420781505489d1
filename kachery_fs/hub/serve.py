"""Assemble and run a hub: its state (SQLite, or PostgreSQL), the local bucket, the URL
signer, the HTTP server.

Layout of a hub directory::

    hub.db                    channels, authorizations, nonces, objects
    local-bucket/             the local bucket's objects and upload sessions
    local-bucket-key.json     the RSA key the hub signs local-bucket URLs with (0600)

``gs://`` channels use Google Cloud Storage (``hub.gcs``), with a service-account key
given to the hub (``--gcs-credentials``) or found in its environment.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import trio

from .. import metrics
from .._serve import Tls, serve_asgi
from ..config import private_directory, private_files
from ..localbucket import LocalBucket, create_app
from .app import compose, create_api
from .backends import Buckets
from .gcs import GoogleCloudStorage
from .requests import ACTIVE
from .service import Hub
from .signing import UrlSigner
from .storage import HubDB
from .wakeups import PostgresWakeups, Wakeups

log = logging.getLogger(__name__)

DEFAULT_LOCAL_BUCKET = "local://kachery"


class HubServer:
    """One hub, ready to serve. The public URL is known only once the port is bound."""

    def __init__(self, directory: Path, *, owner_id: str, local_bucket: bool = True,
                 gcs: GoogleCloudStorage | None = None, database: str | None = None):
        """``database``: a ``postgresql://`` URL of the hub's state (shared with any other
        hub process on it), instead of ``hub.db`` in ``directory``."""
        self.directory = Path(directory)
        private_directory(self.directory)
        if database is not None:
            self.db = HubDB(database)
            wakeups: Wakeups = PostgresWakeups(self.db.database)
            log.info("hub state in %s (hub process %s)", self.db.database.describe(),
                     wakeups.hub_id)
        else:
            self.db = HubDB(self.directory / "hub.db")
            private_files(self.directory / "hub.db")
            wakeups = Wakeups()
        self.local = LocalBucket(self.directory / "local-bucket", {}) if local_bucket else None
        self.buckets = Buckets(local=self.local, gcs=gcs)
        if gcs is not None:
            log.info("gs:// channels: %r", gcs)
        self.hub = Hub(self.db, owner_id=owner_id.lower(), buckets=self.buckets,
                       default_bucket_uri=DEFAULT_LOCAL_BUCKET if local_bucket else None,
                       wakeups=wakeups)
        if self.local is not None:
            # Anonymous reads only of a public channel's objects (keys "<channel>/..."):
            # those of a private channel, or of no channel at all, are read signed only.
            self.local.is_private = lambda bucket, key: not self.db.is_public(
                key.partition("/")[0])
        api = create_api(self.hub)
        self.app = compose(api, create_app(self.local) if self.local is not None else None)
        self.url: str | None = None

    def _set_public_url(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.buckets.public_url = self.url
        if self.local is not None:
            signer = UrlSigner.for_local_bucket(self.directory, self.url)
            self.buckets.signer = signer
            self.local.public_keys.update(signer.public_keys())

    async def run(self, *, host: str = "127.0.0.1", port: int = 0, public_url: str | None = None,
                  tls: Tls | None = None, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (https with ``tls``); ``task_status.started(url)`` once
        listening."""
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(partial(serve_asgi, self.app, host=host, port=port,
                                                tls=tls))
            await nursery.start(self.hub.wakeups.run)
            nursery.start_soon(self.hub.requests.run)
            nursery.start_soon(self.hub.cache.run)
            nursery.start_soon(metrics.keep_hub_gauges, self.metrics_snapshot)
            scheme = "https" if tls is not None else "http"
            self._set_public_url(public_url or f"{scheme}://{host}:{bound}")
            log.info("hub listening on %s (owner %s…)", self.url, self.hub.owner_id[:12])
            task_status.started(self.url)

    def metrics_snapshot(self) -> dict:
        """What the hub's gauges show (:mod:`kachery_fs.metrics`): each channel's bucket
        usage and allocation, and the file requests not yet answered."""
        cache = self.hub.cache
        channels = {}
        for record in self.db.channels():
            used, objects = cache.usage(record.name)
            channels[record.name] = {"bytes": used, "objects": objects,
                                     "allocation": cache.settings(record.name)[0]}
        pending = sum(1 for r in self.hub.requests.records() if r.state in ACTIVE)
        return {"channels": channels, "requestsPending": pending}

    def close(self) -> None:
        self.db.close()
