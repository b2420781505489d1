"""Bucket downloads a node made, reported to the channels' hubs in batches.

A hub keeps each channel's bucket as a cache and evicts the objects least recently in
demand (``hub.cache``). Reads go straight to the bucket's public URLs, so the hub sees
them only when the nodes tell it: every few seconds, one ``reportDownloads`` per channel
with what was downloaded since. A report that fails transiently is kept for the next one
(one that the hub refuses is dropped: it would be refused again); demand is a hint, so
at most :data:`MAX_PENDING` hashes wait and a node that stops loses the last few seconds,
never anything of the user's.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import trio

from .channels import Channels
from .retry import is_transient

log = logging.getLogger(__name__)

#: How often a mount reports its downloads (``cat`` reports its one download at once).
REPORT_INTERVAL_S = 10.0
#: How long a final report at exit may take.
FINAL_REPORT_TIMEOUT_S = 2.0
#: The most hashes kept waiting per channel while the hub does not answer.
MAX_PENDING = 10_000


class DownloadReports:
    def __init__(self, channels: Channels):
        self._channels = channels
        self._pending: dict[str, dict[str, int]] = defaultdict(dict)

    def add(self, channel: str, sha1: str, nbytes: int) -> None:
        """Record that ``nbytes`` of ``sha1`` came from ``channel``'s bucket."""
        pending = self._pending[channel]
        if sha1 in pending or len(pending) < MAX_PENDING:
            pending[sha1] = pending.get(sha1, 0) + nbytes

    async def flush(self) -> None:
        """Send what is pending, one request per channel; keep what could not be sent
        because of a transient error (:func:`kachery_fs.retry.is_transient`)."""
        for channel in list(self._pending):
            batch = self._pending.pop(channel)
            if not batch:
                continue
            try:
                hub = self._channels.hub_of(channel)
                await hub.report_downloads(channel, batch.items())
            except Exception as exc:
                if not is_transient(exc):
                    # Refused (or a bug): the same report would be refused again.
                    log.info("dropped a report of %d download(s) on %s: %s", len(batch),
                             channel, exc)
                    continue
                log.debug("could not report %d download(s) on %s to its hub (%s); will retry",
                          len(batch), channel, exc)
                for sha1, n in batch.items():
                    self.add(channel, sha1, n)

    async def run(self) -> None:
        """Report every :data:`REPORT_INTERVAL_S` until cancelled. The owner calls
        :meth:`final_flush` once the downloads have ended."""
        while True:
            await trio.sleep(REPORT_INTERVAL_S)
            await self.flush()

    async def final_flush(self) -> None:
        """Report what is left, waiting at most :data:`FINAL_REPORT_TIMEOUT_S`."""
        with trio.CancelScope(shield=True), trio.move_on_after(FINAL_REPORT_TIMEOUT_S):
            await self.flush()
