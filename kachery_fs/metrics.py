"""Prometheus metrics: what a node and a hub count, and ``--metrics ADDR:PORT`` to serve
them (Prometheus's text format, at ``/metrics``).

Events are counted where they happen (a chunk verified, a hub call answered), in
prometheus-client's thread-safe metrics. Quantities that live in the node's or the hub's
databases (the store's usage, the upload queue, a channel's bucket usage) are read on the
event loop once a second by :func:`keep_node_gauges` / :func:`keep_hub_gauges`, never from
the HTTP server's thread, which serves the last figures.

Every name starts with ``kachery_fs_``; the hub's with ``kachery_fs_hub_``. The README's
table lists them all (a test checks that it does).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import InvalidInput, KacheryError

log = logging.getLogger(__name__)

#: Latencies, in seconds: from a page served out of memory to a file requested from a
#: node across the world.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: How often the gauges read from databases are brought up to date: a node's (cheap), and
#: a hub's (a sum over each channel's objects: with a million of them, some 150 ms).
GAUGE_INTERVAL_S = 1.0
HUB_GAUGE_INTERVAL_S = 5.0
#: The gauges are read only while something scrapes them: within this long of a scrape.
SCRAPED_WITHIN_S = 120.0

# -- a node: its reads ------------------------------------------------------------------

SERVED_BYTES = Counter(
    "kachery_fs_served_bytes", "Bytes of content returned to readers: the mount's reads,"
    " cat, the Python API", ["via"])
FETCHED_BYTES = Counter(
    "kachery_fs_fetched_bytes", "Bytes received from buckets: whole files, or chunks of"
    " large files", ["how"])
VERIFIED_BYTES = Counter(
    "kachery_fs_verified_bytes", "Bytes fetched that matched their SHA-1 (a file's, or a"
    " chunk's in a trusted manifest; such a chunk is refused later, as cause manifest, if"
    " its whole file does not match)", ["how"])
REFUSED_BYTES = Counter(
    "kachery_fs_refused_bytes", "Bytes fetched and refused, by cause: sha1 (a file that does"
    " not match its hash), chunk (a chunk that does not match its manifest), manifest"
    " (chunks that matched a manifest whose whole file did not)", ["cause"])
FIRST_BYTE_SECONDS = Histogram(
    "kachery_fs_first_byte_seconds", "From the open of content that is not in the local"
    " store to its first verified byte", buckets=LATENCY_BUCKETS)
READ_SECONDS = Histogram(
    "kachery_fs_read_seconds", "How long the mount's read calls take", buckets=LATENCY_BUCKETS)
STORE_LOOKUPS = Counter(
    "kachery_fs_store_lookups", "Opens of content by hash, by whether this machine had it"
    " (hit: the local store or a kachery store here; miss: fetched)", ["result"])
FILE_REQUESTS = Counter(
    "kachery_fs_file_requests", "Files this node asked the channel's other nodes for, by"
    " outcome (done, failed)", ["outcome"])

# -- a node: its uploads and what it provides --------------------------------------------

UPLOADED_BYTES = Counter(
    "kachery_fs_uploaded_bytes", "Bytes this node uploaded to buckets")
UPLOADS_ENDED = Counter(
    "kachery_fs_uploads_ended", "Uploads that ended, by outcome (done, failed: refused, not"
    " retried)", ["outcome"])
PROVIDED = Counter(
    "kachery_fs_provided", "Other nodes' file requests this node answered, by outcome"
    " (uploaded, failed)", ["outcome"])

# -- the hub -----------------------------------------------------------------------------

HUB_CALLS = Counter(
    "kachery_fs_hub_calls", "Calls the hub answered, by kind and outcome (ok, or the"
    " error's kind: permission_denied, invalid_input, not_found, unavailable...)",
    ["call", "outcome"])
HUB_CALL_SECONDS = Histogram(
    "kachery_fs_hub_call_seconds", "How long the hub takes to answer a call (a long-poll:"
    " how long it was held)", ["call"], buckets=LATENCY_BUCKETS)
HUB_LONG_POLLS = Gauge(
    "kachery_fs_hub_long_polls", "Long-polls this hub process holds now (providers"
    " listening, requesters and feed readers waiting)")
HUB_TRANSACTION_SECONDS = Histogram(
    "kachery_fs_hub_transaction_seconds", "How long the hub's database transactions take,"
    " waiting for the lock included", buckets=LATENCY_BUCKETS)


def outcome_of(exc: BaseException | None) -> str:
    """A short label for an error's kind: ``PermissionDenied`` -> ``permission_denied``."""
    if exc is None:
        return "ok"
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


# -- gauges read from the databases -------------------------------------------------------

class SnapshotCollector(Collector):
    """Metrics made from the last snapshot a loop on the event loop took."""

    def __init__(self, families: Callable[[dict], Iterator[Any]]):
        self.snapshot: dict | None = None
        self.scraped: float | None = None  # when a scrape last asked (time.monotonic())
        self._families = families

    def collect(self):
        self.scraped = time.monotonic()
        snapshot = self.snapshot
        if snapshot is not None:
            yield from self._families(snapshot)


def _node_families(status: dict) -> Iterator[Any]:
    """From :func:`kachery_fs.status.collect`'s snapshot."""
    store = status["store"]
    g = GaugeMetricFamily("kachery_fs_store_bytes", "Bytes of content in the local store")
    g.add_metric([], store["bytes"])
    yield g
    g = GaugeMetricFamily("kachery_fs_store_objects", "Objects in the local store")
    g.add_metric([], store["objects"])
    yield g
    g = GaugeMetricFamily("kachery_fs_store_limit_bytes", "The local store's limit"
                          " (cache-size); absent when it has none")
    if store["limit"] is not None:
        g.add_metric([], store["limit"])
    yield g
    g = GaugeMetricFamily("kachery_fs_store_pinned_bytes", "Bytes the store keeps whatever"
                          " its limit (added by put or store add, named, being uploaded)")
    g.add_metric([], store["pinnedBytes"])
    yield g
    c = CounterMetricFamily("kachery_fs_store_evictions", "Objects evicted from the local"
                            " store, in this node's life")
    c.add_metric([], store["evictions"])
    yield c
    c = CounterMetricFamily("kachery_fs_store_evicted_bytes", "Bytes evicted from the local"
                            " store, in this node's life")
    c.add_metric([], store["evictedBytes"])
    yield c
    uploads = status["uploads"]
    g = GaugeMetricFamily("kachery_fs_uploads", "Uploads in this node's queue, by state"
                          " (pending: waiting or retrying; in_flight: being sent now;"
                          " failed: refused, kept for status)", labels=["state"])
    g.add_metric(["pending"], uploads["pending"])
    g.add_metric(["in_flight"], status.get("uploadsInFlight", 0))
    g.add_metric(["failed"], uploads["failed"])
    yield g
    g = GaugeMetricFamily("kachery_fs_requests_waiting", "Files this node is waiting for"
                          " from other nodes now")
    g.add_metric([], len(status["requests"]))
    yield g
    g = GaugeMetricFamily("kachery_fs_providing", "Files this node is uploading for other"
                          " nodes' requests now")
    g.add_metric([], len(status["providing"]))
    yield g
    g = GaugeMetricFamily("kachery_fs_hub_connected", "1 while this node's connection to a"
                          " hub works, 0 while it does not", labels=["hub"])
    for url, conn in status["hubs"].items():
        g.add_metric([url], 1 if conn["state"] == "connected" else 0)
    yield g
    g = GaugeMetricFamily("kachery_fs_long_polls", "Long-polls this node holds on its hubs"
                          " now (a provider listening, requests waiting)")
    g.add_metric([], status.get("longPolls", 0))
    yield g


def _hub_families(snapshot: dict) -> Iterator[Any]:
    used = GaugeMetricFamily("kachery_fs_hub_channel_bytes", "Bytes of a channel's files in"
                             " its bucket, as the hub counts them", labels=["channel"])
    allocated = GaugeMetricFamily("kachery_fs_hub_channel_allocation_bytes", "A channel's"
                                  " allocation; absent for a channel with none",
                                  labels=["channel"])
    objects = GaugeMetricFamily("kachery_fs_hub_channel_objects", "Objects of a channel's"
                                " files in its bucket", labels=["channel"])
    for name, usage in snapshot["channels"].items():
        used.add_metric([name], usage["bytes"])
        objects.add_metric([name], usage["objects"])
        if usage["allocation"] is not None:
            allocated.add_metric([name], usage["allocation"])
    yield from (used, allocated, objects)
    g = GaugeMetricFamily("kachery_fs_hub_file_requests_pending", "File requests not yet"
                          " answered, in every channel of the hub's database")
    g.add_metric([], snapshot["requestsPending"])
    yield g


NODE_GAUGES = SnapshotCollector(_node_families)
HUB_GAUGES = SnapshotCollector(_hub_families)
REGISTRY.register(NODE_GAUGES)
REGISTRY.register(HUB_GAUGES)


async def keep_node_gauges(take: Callable[[], dict], *,
                           interval: float = GAUGE_INTERVAL_S) -> None:
    """Take the node's snapshot (``take``, on the event loop) every ``interval`` seconds."""
    await _keep(NODE_GAUGES, take, interval, "node")


async def keep_hub_gauges(take: Callable[[], dict], *,
                          interval: float = HUB_GAUGE_INTERVAL_S) -> None:
    await _keep(HUB_GAUGES, take, interval, "hub")


async def _keep(collector: SnapshotCollector, take: Callable[[], dict], interval: float,
                what: str) -> None:
    failing = False
    try:
        while True:
            scraped = collector.scraped
            if not _serving or scraped is None or \
                    time.monotonic() - scraped > SCRAPED_WITHIN_S:
                # Nobody looks: nothing to read (a first scrape shows them a moment later).
                collector.snapshot = None
                await trio.sleep(min(interval, 1.0))
                continue
            try:
                collector.snapshot = take()
                failing = False
            except Exception as exc:  # noqa: BLE001 - figures go stale, nothing stops
                if not failing:
                    log.warning("metrics: could not read the %s's figures: %s", what, exc)
                failing = True
            await trio.sleep(interval)
    finally:
        collector.snapshot = None


# -- serving --------------------------------------------------------------------------------

#: How many metrics servers this process runs (the gauges are read only while one does).
_serving = 0

def parse_address(text: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[ADDR]:PORT`` or ``PORT`` (on 127.0.0.1) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise InvalidInput(f"--metrics {text!r}: expected ADDR:PORT or PORT, e.g."
                           " 127.0.0.1:9420")
    return host, int(port)


class MetricsServer:
    """Prometheus's text at ``http://HOST:PORT/metrics``, on a thread of its own."""

    def __init__(self, host: str, port: int):
        global _serving
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=REGISTRY)
        except (OSError, UnicodeError, ValueError) as exc:  # in use; not an address
            reason = getattr(exc, "strerror", None) or str(exc)
            raise KacheryError(f"--metrics {_bracketed(host)}:{port}: {reason}; choose"
                               " another address or port") from None
        _serving += 1
        self._closed = False
        self.host = host
        self.port = self._server.server_port
        self.started = time.monotonic()
        log.info("metrics at http://%s:%d/metrics", _bracketed(host), self.port)

    @property
    def url(self) -> str:
        return f"http://{_bracketed(self.host)}:{self.port}/metrics"

    def close(self) -> None:
        global _serving
        if self._closed:
            return
        self._closed = True
        _serving -= 1
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(address: str | None) -> MetricsServer | None:
    """The metrics server for ``--metrics ADDRESS``, or None without one."""
    if not address:
        return None
    return MetricsServer(*parse_address(address))
