"""The composition root: the one place where a node's running parts are built and wired.

Every entry point — the mount, ``serve``, ``up``, ``cat`` and ``put`` — opens the node
(:class:`~kachery_fs.node.Node`: identity, databases, store, HTTP client, memberships) and
runs :func:`running` with what it needs. So the mount and ``cat`` read through the same
:class:`~kachery_fs.resolver.Resolver` (one download per hash, the same retries and
errors), and the mount, ``serve`` and ``put`` upload through the same
:class:`~kachery_fs.uploader.Uploader` (a saved session resumes, ``--bwlimit`` holds).
Every part receives the parts it uses as arguments; none reaches through the node.

What runs, in the nursery :func:`running` opens:

- the download reports to the hubs (flushed at exit), and the store's eviction loop
  unless ``keep_cache=False`` (``cat``, ``put``);
- the uploader's background workers, unless ``upload_workers=0`` (``cat``, ``put``);
- with ``provide=True``, the provider, which answers other nodes' file requests;
- with ``feeds=True``, the feed engine (the mount's ``feeds/`` directories).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import trio

from . import metrics, status
from .feeds import FeedFiles, FeedStore
from .node import Node
from .provider import Provider
from .requester import DEFAULT_STALL_TIMEOUT_S
from .resolver import Resolver
from .resumable import RateLimit
from .sources import Sources
from .uploader import Uploader

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """A node's running parts, as wired by :func:`running`."""

    node: Node
    nursery: trio.Nursery
    sources: Sources
    resolver: Resolver
    uploader: Uploader
    provider: Provider | None = None
    feeds: FeedFiles | None = None


async def start(node: Node, nursery: trio.Nursery, *, provide: bool = False,
                feeds: bool = False, upload_workers: int = 2, keep_cache: bool = True,
                bwlimit: float | None = None,
                request_timeout: float = DEFAULT_STALL_TIMEOUT_S,
                strict: bool = False) -> Parts:
    """Build ``node``'s parts and start their background tasks in ``nursery``.

    A one-shot command (``cat``, ``put``) passes ``upload_workers=0`` (it uploads only
    what it is asked to) and ``keep_cache=False`` (the store evicts only after its own
    inserts, not in a background pass over what is already there). ``strict``: serve
    no byte of a large file before the whole file is verified (no reads by chunk).

    The caller closes ``parts.feeds`` once ``nursery`` has ended and then flushes the
    download reports (:func:`running` does both)."""
    sources = Sources.load(node.dir)
    if keep_cache:
        nursery.start_soon(node.store.cache.run)
    nursery.start_soon(node.downloads.run)
    uploader = await Uploader.create(
        node.db, node.store, node.channels, node.client, nursery=nursery,
        workers=upload_workers, rate_limit=RateLimit(bwlimit) if bwlimit else None)
    resolver = Resolver(node.store, node.channels, node.client, urls=node.urls,
                        ranges=node.ranges,
                        sources=sources,
                        downloads=node.downloads, nursery=nursery,
                        request_stall_timeout=request_timeout, strict=strict)
    parts = Parts(node, nursery, sources, resolver, uploader)
    if provide:
        parts.provider = Provider(node.channels, node.store, uploader, sources)
        nursery.start_soon(parts.provider.run)
    if feeds:
        parts.feeds = FeedFiles(node.channels, node.db, FeedStore.for_node(node.dir),
                                node.client, nursery, urls=node.urls)
    nursery.start_soon(metrics.keep_node_gauges, partial(metrics_snapshot, parts))
    return parts


def metrics_snapshot(parts: Parts) -> dict:
    """What the node's gauges show (:mod:`kachery_fs.metrics`): ``status``'s snapshot,
    with the uploads in flight and the long-polls held."""
    snapshot = status.collect(parts.node, provider=parts.provider, resolver=parts.resolver)
    listening = sum(1 for conn in snapshot["hubs"].values() if conn["state"] == "connected")
    return {**snapshot, "uploadsInFlight": parts.uploader.in_flight,
            "longPolls": len(snapshot["requests"]) + listening}


@asynccontextmanager
async def running(node: Node, **options) -> AsyncIterator[Parts]:
    """``node``'s parts (see :func:`start` for the options), running until the ``async
    with`` body ends; then they are cancelled, and the downloads made are reported."""
    removed = await trio.to_thread.run_sync(node.store.sweep_temp)
    if removed:
        log.info("removed %d temporary file(s) left by processes that ended", removed)
    parts = None
    try:
        async with trio.open_nursery() as nursery:
            parts = await start(node, nursery, **options)
            try:
                yield parts
            finally:
                nursery.cancel_scope.cancel()
    finally:
        if parts is not None and parts.feeds is not None:  # once its tasks have ended
            parts.feeds.close()
    # Downloads cut short by the end are reported too.
    await node.downloads.final_flush()
