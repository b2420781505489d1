"""A node's client for the hub's JSON API: every request signed, timestamped and nonced.

:class:`HubClient` has one method for each :class:`~kachery_fs.protocol.Request`; they all
go through :meth:`HubClient.call`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable
from typing import Any, TypedDict

import httpx

from ._http import check_response, error_for_exception
from .errors import KacheryError, PermissionDenied, ProtocolError
from .identity import NodeKey
from .protocol import Request, SignedRequest
from .uris import is_sha1

log = logging.getLogger(__name__)

#: The rate (bytes/s) at which a hub is assumed to read a file whose manifest it checks,
#: at the least: a finalize with a manifest waits that long for its answer, and 30 s more.
MANIFEST_CHECK_RATE = 50e6


class ChannelChanges(TypedDict, total=False):
    """What ``setChannel`` changes: a channel's bucket allocation (bytes, or None for none)
    and its low watermark (the fraction of the allocation that eviction brings usage to)."""

    allocation: int | None
    lowWatermark: float
    private: bool


class HubClient:
    """Talks to one hub as one node. The ``httpx`` client is injected (STYLE rule 5)."""

    def __init__(self, url: str, key: NodeKey, client: httpx.AsyncClient):
        self.url = url.rstrip("/")
        self.key = key
        self.client = client

    def envelope(self, kind: Request, fields: dict, cosign: NodeKey | None = None) -> dict:
        body = {**fields, "type": kind, "timestamp": int(time.time() * 1000),
                "nonce": secrets.token_hex(16)}
        if cosign is not None:
            # A second key (a feed's owner) vouches for this very request: its signature
            # covers the whole body, the caller's node id included, so no other node can
            # reuse it and nothing in it can be changed.
            body["nodeId"] = self.key.node_id
            body["feedSignature"] = cosign.sign(body)
        return {"body": body, "nodeId": self.key.node_id, "signature": self.key.sign(body)}

    async def call(self, kind: Request, *, wait_s: float = 0.0, cosign: NodeKey | None = None,
                   timeout_s: float | None = None, **fields) -> dict:
        """Send one signed request; returns the JSON answer or raises a project error.

        The one way to the hub's API: the typed methods below call it. ``wait_s`` > 0 makes
        it a long-poll: the hub may hold it that long. ``cosign``: a second key (a feed's
        owner) signs the request too. ``timeout_s``: how long the answer may take, for a
        request the hub works on longer than the client's timeout.
        """
        what = f"hub {self.url} {kind}"
        kwargs: dict[str, Any] = {}  # for client.post
        if wait_s > 0:
            fields["waitMs"] = int(wait_s * 1000)
            kwargs["timeout"] = httpx.Timeout(wait_s + 15, connect=10)
        elif timeout_s is not None:
            kwargs["timeout"] = httpx.Timeout(timeout_s, connect=10)
        try:
            response = await self.client.post(f"{self.url}/api/node",
                                              json=self.envelope(kind, fields, cosign),
                                              **kwargs)
        except httpx.HTTPError as exc:
            raise error_for_exception(exc, what) from None
        if response.status_code == 401:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise PermissionDenied(f"{what}: the hub refused this node's signature: {message}")
        check_response(response, what)
        try:
            answer = response.json()
        except ValueError:
            raise ProtocolError(f"{what}: answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ProtocolError(f"{what}: answer is not a JSON object")
        return answer

    async def info(self) -> dict:
        what = f"hub {self.url}"
        try:
            response = await self.client.get(f"{self.url}/api/info")
        except httpx.HTTPError as exc:
            raise error_for_exception(exc, what) from None
        check_response(response, what)
        return response.json()

    # -- typed calls ---------------------------------------------------------------------

    async def get_channel(self, channel: str) -> dict:
        return await self.call(Request.GET_CHANNEL, channel=channel)

    async def create_channel(self, channel: str, bucket: str | None = None, *,
                             allocation: int | None = None, private: bool = False) -> dict:
        fields: dict[str, Any] = {"channel": channel}
        if bucket:
            fields["bucket"] = bucket
        if allocation:
            fields["allocation"] = allocation
        if private:
            fields["private"] = True
        return await self.call(Request.CREATE_CHANNEL, **fields)

    async def authorize_node(self, channel: str, node_id: str, permissions: list[str],
                             label: str | None = None) -> dict:
        fields: dict[str, Any] = {"channel": channel, "targetNodeId": node_id,
                                  "permissions": permissions}
        if label:
            fields["label"] = label
        return await self.call(Request.AUTHORIZE_NODE, **fields)

    async def list_channels(self) -> list[dict]:
        return (await self.call(Request.LIST_CHANNELS))["channels"]

    async def set_channel(self, channel: str, changes: ChannelChanges) -> dict:
        """Change a channel's allocation, low watermark and/or privacy (the owner's);
        returns the channel's settings: ``channel``, ``allocation``, ``lowWatermark``,
        ``private`` (and a ``warning`` for a private channel on a bucket anyone can read)."""
        return await self.call(Request.SET_CHANNEL, channel=channel, **changes)

    async def channel_stats(self, channel: str) -> dict:
        """A channel's bucket cache figures (the owner's; see ``hub.cache``) and its bucket."""
        return await self.call(Request.CHANNEL_STATS, channel=channel)

    async def initiate_upload(self, channel: str, sha1: str, size: int) -> SignedRequest | None:
        """A signed resumable-upload request, or ``None`` if the bucket already has it."""
        answer = await self.call(Request.INITIATE_UPLOAD, channel=channel, sha1=sha1, size=size)
        if answer.get("status") == "present":
            return None
        if answer.get("status") == "upload" and isinstance(answer.get("upload"), dict):
            return SignedRequest.from_json(answer["upload"])
        raise ProtocolError(f"hub {self.url}: unexpected initiateUpload answer {answer!r}")

    async def sign_reads(self, channel: str, keys: list[str]) -> tuple[list[str], int]:
        """Signed ``GET`` URLs of objects ``keys`` of ``channel`` (a private channel's
        reads), in the same order, and how many seconds they stay valid."""
        answer = await self.call(Request.SIGN_READS, channel=channel, keys=list(keys))
        urls, expires_in = answer.get("urls"), answer.get("expiresIn")
        if (not isinstance(urls, list) or len(urls) != len(keys)
                or not all(isinstance(u, str) for u in urls)
                or not isinstance(expires_in, int) or expires_in <= 0):
            raise ProtocolError(f"hub {self.url}: unexpected signReads answer")
        return urls, expires_in

    async def finalize_upload(self, channel: str, sha1: str, size: int, *,
                              manifest: str | None = None) -> str | None:
        """The upload of ``sha1`` is in the bucket: the hub checks it and records it. With
        ``manifest``, this node also vouches that the manifest of that SHA-1 (in the bucket
        already) is the file's; returns the hub's word on it: ``"vouched"`` or
        ``"refused: <why>"`` (the finalize stands either way), or None without a manifest
        or from a hub that keeps no manifests."""
        fields: dict[str, Any] = {"channel": channel, "sha1": sha1, "size": size}
        kwargs: dict[str, Any] = {}
        if manifest is not None:
            fields["manifest"] = manifest
            # A hub that can hash its bucket reads the whole file to check the chunks.
            kwargs["timeout_s"] = 30.0 + size / MANIFEST_CHECK_RATE
        answer = await self.call(Request.FINALIZE_UPLOAD, **kwargs, **fields)
        said = answer.get("manifest") if manifest is not None else None
        return said if isinstance(said, str) else None

    async def get_manifest(self, channel: str, sha1: str) -> str | None:
        """The SHA-1 of the manifest of ``sha1`` that the hub has on record (a node vouched
        for it and the hub checked it), or None."""
        answer = await self.call(Request.GET_MANIFEST, channel=channel, sha1=sha1)
        manifest = answer.get("manifest")
        if manifest is not None and not (isinstance(manifest, str) and is_sha1(manifest)):
            raise ProtocolError(f"hub {self.url}: unexpected getManifest answer {answer!r}")
        return manifest.lower() if manifest is not None else None

    async def report_manifest(self, channel: str, sha1: str, manifest: str,
                              actual_sha1: str) -> None:
        """Tell the hub that the chunks of ``manifest`` (on record for ``sha1``) each
        matched, yet together hash to ``actual_sha1``: it drops the record."""
        await self.call(Request.REPORT_MANIFEST, channel=channel, sha1=sha1,
                        manifest=manifest, actualSha1=actual_sha1)

    async def report_downloads(self, channel: str, downloads: Iterable[tuple[str, int]]) -> None:
        """Tell the hub how many bytes of which objects this node downloaded from the
        channel's bucket (``(sha1, bytes)`` pairs): the demand that keeps them cached."""
        await self.call(Request.REPORT_DOWNLOADS, channel=channel,
                        downloads=[[sha1, n] for sha1, n in downloads])

    # -- file requests ---------------------------------------------------------------------

    async def request_file(self, channel: str, sha1: str, *, version: int | None = None,
                           wait_s: float = 0.0, bad: bool = False) -> dict:
        """Start or join a request (``version`` None), or wait for a change after
        ``version``; returns the request's state. ``bad``: the bucket's object failed
        verification here (the hub checks it, and deletes it if it is bad)."""
        fields: dict[str, Any] = {"channel": channel, "sha1": sha1}
        if version is not None:
            fields["version"] = version
        if bad:
            fields["bad"] = True
        return await self.call(Request.REQUEST_FILE, wait_s=wait_s, **fields)

    async def listen_requests(self, wait_s: float) -> list[dict]:
        answer = await self.call(Request.LISTEN_REQUESTS, wait_s=wait_s)
        offers = answer.get("offers")
        if not isinstance(offers, list):
            raise ProtocolError(f"hub {self.url}: unexpected listenRequests answer")
        return offers

    async def answer_request(self, channel: str, sha1: str, *, accept: bool,
                             size: int | None = None, reason: str | None = None,
                             manifest: str | None = None) -> None:
        """Accept or decline an offer; ``manifest``: the file's chunks are streamed (the
        manifest is in the bucket, its chunks follow as objects: ``chunks`` in
        :meth:`report_progress`)."""
        fields: dict[str, Any] = {"channel": channel, "sha1": sha1, "accept": accept}
        if size is not None:
            fields["size"] = size
        if manifest is not None:
            fields["manifest"] = manifest
        if reason is not None:
            fields["reason"] = reason
        await self.call(Request.ANSWER_REQUEST, **fields)

    async def report_progress(self, channel: str, sha1: str, nbytes: int,
                              chunks: int | None = None) -> bool:
        """Report upload progress (``chunks``: of a streamed file, how many chunks from the
        first are in the bucket); False means the hub gave the request to another node."""
        fields: dict[str, Any] = {"channel": channel, "sha1": sha1, "bytes": nbytes}
        if chunks is not None:
            fields["chunks"] = chunks
        answer = await self.call(Request.REQUEST_PROGRESS, **fields)
        return bool(answer.get("continue", False))

    async def my_requests(self) -> list[dict]:
        return (await self.call(Request.MY_REQUESTS))["requests"]

    # -- feeds -------------------------------------------------------------------------------

    async def feed_upload_urls(self, channel: str, feed_id: str, subfeed_hash: str, *,
                               owner: NodeKey, start: int, sizes: list[int],
                               index_size: int | None = None,
                               batch: tuple[int, int, int] | None = None) -> dict:
        """Signed PUTs for a subfeed's messages ``start..start+len(sizes)-1`` (``messages``,
        one per size), for its index of ``index_size`` bytes (``index``), and for the batch
        object ``(start, end, size)`` of messages ``start..end-1`` (``batch``); ``None`` for
        what was not asked. Co-signed by the feed's ``owner`` key."""
        fields: dict = {"start": start, "sizes": sizes}
        if index_size is not None:
            fields["indexSize"] = index_size
        if batch is not None:
            fields["batch"] = list(batch)
        return await self.call(Request.FEED_UPLOAD_URLS, cosign=owner, channel=channel,
                               feedId=feed_id, subfeedHash=subfeed_hash, **fields)

    async def feed_updated(self, channel: str, feed_id: str, subfeed_hash: str, *,
                           owner: NodeKey, message_count: int, batch_start: int | None = None,
                           repair: bool = False) -> int:
        """Tell the hub that the subfeed's first ``message_count`` messages are in the
        bucket (``batch_start``: the last ones as the batch from there); returns the count
        the hub now has. A count at or below the hub's changes nothing (``0`` only asks),
        unless ``repair``: then it lowers the hub's count. Co-signed by the feed's ``owner``."""
        fields: dict = {"messageCount": message_count}
        if batch_start is not None:
            fields["batchStart"] = batch_start
        if repair:
            fields["repair"] = True
        answer = await self.call(Request.FEED_UPDATED, cosign=owner, channel=channel,
                                 feedId=feed_id, subfeedHash=subfeed_hash, **fields)
        return answer["messageCount"]

    async def watch_feeds(self, channel: str, subscriptions: list[dict], *,
                          wait_s: float = 0.0) -> dict:
        """The subscribed subfeeds (``{feedId, subfeedHash, position}``) that the hub counts
        beyond their position (``updates``), and the channel's ``bucketBaseUrl``; with
        ``wait_s``, a long-poll that answers at the first such update."""
        return await self.call(Request.WATCH_FEEDS, wait_s=wait_s, channel=channel,
                               subscriptions=subscriptions)


__all__ = ["HubClient", "KacheryError"]
