"""One node: identity, local store, state database and the HTTP client they share.

A node directory (``$KACHERY_FS_DIR``) holds ``private.pem``/``public.pem`` (kachery's
PEM format), ``node.db`` (SQLite), ``sha1/``, ``tmp/`` and ``store.db`` (the store and
its cache index), and ``config.toml`` (settings, if any).
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx

from . import _http
from .channels import Channels
from .config import private_directory, private_files
from .demand import DownloadReports
from .errors import NotFound
from .identity import NodeKey
from .ranges import RangeReader
from .readurls import ReadUrls
from .state import NodeDB
from .store import Store

log = logging.getLogger(__name__)

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
    """What every entry point opens: the identity, the node database, the store, the HTTP
    client and the channel memberships. The parts that run on them are built by
    :mod:`kachery_fs.parts`, each given what it uses."""

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
        self.ranges = RangeReader()  # large ranged GETs (chunks), on worker threads
        self.channels = Channels(self.db, self.key, self.client)
        self.urls = ReadUrls(self.channels)  # where bucket objects are read: signed or not
        self.downloads = DownloadReports(self.channels)

    @property
    def node_id(self) -> str:
        return self.key.node_id

    async def aclose(self) -> None:
        await self.client.aclose()
        self.ranges.close()
        self.store.close()
        self.db.close()
