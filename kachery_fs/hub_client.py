"""A node's client for the hub's JSON API: every request signed, timestamped and nonced."""

from __future__ import annotations

import logging
import secrets
import time

import httpx

from ._http import check_response, error_for_exception
from .errors import KacheryError, PermissionDenied, ProtocolError
from .identity import NodeKey
from .protocol import SignedRequest

log = logging.getLogger(__name__)


class HubClient:
    """Talks to one hub as one node. The ``httpx`` client is injected (STYLE rule 5)."""

    def __init__(self, url: str, key: NodeKey, client: httpx.AsyncClient):
        self.url = url.rstrip("/")
        self.key = key
        self.client = client

    def envelope(self, kind: str, fields: dict, cosign: NodeKey | None = None) -> dict:
        body = {**fields, "type": kind, "timestamp": int(time.time() * 1000),
                "nonce": secrets.token_hex(16)}
        if cosign is not None:
            # A second key (a feed's owner) vouches for this very request: its signature
            # covers the whole body, the caller's node id included, so no other node can
            # reuse it and nothing in it can be changed.
            body["nodeId"] = self.key.node_id
            body["feedSignature"] = cosign.sign(body)
        return {"body": body, "nodeId": self.key.node_id, "signature": self.key.sign(body)}

    async def call(self, kind: str, *, wait_s: float = 0.0, cosign: NodeKey | None = None,
                   **fields) -> dict:
        """Send one signed request; returns the JSON answer or raises a project error.

        ``wait_s`` > 0 makes it a long-poll: the hub may hold it that long.
        """
        what = f"hub {self.url} {kind}"
        kwargs = {}
        if wait_s > 0:
            fields["waitMs"] = int(wait_s * 1000)
            kwargs["timeout"] = httpx.Timeout(wait_s + 15, connect=10)
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
        return await self.call("getChannel", channel=channel)

    async def create_channel(self, channel: str, bucket: str | None = None, *,
                             allocation: int | None = None) -> dict:
        fields = {"channel": channel}
        if bucket:
            fields["bucket"] = bucket
        if allocation:
            fields["allocation"] = allocation
        return await self.call("createChannel", **fields)

    async def authorize_node(self, channel: str, node_id: str, permissions: list[str],
                             label: str | None = None) -> dict:
        fields = {"channel": channel, "targetNodeId": node_id, "permissions": permissions}
        if label:
            fields["label"] = label
        return await self.call("authorizeNode", **fields)

    async def list_channels(self) -> list[dict]:
        return (await self.call("listChannels"))["channels"]

    async def initiate_upload(self, channel: str, sha1: str, size: int) -> SignedRequest | None:
        """A signed resumable-upload request, or ``None`` if the bucket already has it."""
        answer = await self.call("initiateUpload", channel=channel, sha1=sha1, size=size)
        if answer.get("status") == "present":
            return None
        if answer.get("status") == "upload" and isinstance(answer.get("upload"), dict):
            return SignedRequest.from_json(answer["upload"])
        raise ProtocolError(f"hub {self.url}: unexpected initiateUpload answer {answer!r}")

    async def finalize_upload(self, channel: str, sha1: str, size: int) -> None:
        await self.call("finalizeUpload", channel=channel, sha1=sha1, size=size)

    # -- file requests ---------------------------------------------------------------------

    async def request_file(self, channel: str, sha1: str, *, version: int | None = None,
                           wait_s: float = 0.0, bad: bool = False) -> dict:
        """Start or join a request (``version`` None), or wait for a change after
        ``version``; returns the request's state. ``bad``: the bucket's object failed
        verification here (the hub checks it, and deletes it if it is bad)."""
        fields = {"channel": channel, "sha1": sha1}
        if version is not None:
            fields["version"] = version
        if bad:
            fields["bad"] = True
        return await self.call("requestFile", wait_s=wait_s, **fields)

    async def listen_requests(self, wait_s: float) -> list[dict]:
        answer = await self.call("listenRequests", wait_s=wait_s)
        offers = answer.get("offers")
        if not isinstance(offers, list):
            raise ProtocolError(f"hub {self.url}: unexpected listenRequests answer")
        return offers

    async def answer_request(self, channel: str, sha1: str, *, accept: bool,
                             size: int | None = None, reason: str | None = None) -> None:
        fields = {"channel": channel, "sha1": sha1, "accept": accept}
        if size is not None:
            fields["size"] = size
        if reason is not None:
            fields["reason"] = reason
        await self.call("answerRequest", **fields)

    async def report_progress(self, channel: str, sha1: str, nbytes: int) -> bool:
        """Report upload progress; False means the hub gave the request to another node."""
        answer = await self.call("requestProgress", channel=channel, sha1=sha1, bytes=nbytes)
        return bool(answer.get("continue", False))

    async def my_requests(self) -> list[dict]:
        return (await self.call("myRequests"))["requests"]


__all__ = ["HubClient", "KacheryError"]
