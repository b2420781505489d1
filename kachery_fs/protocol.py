"""Wire types shared by the hub and the nodes (plain data, no I/O)."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field

#: Hub requests older or newer than this (seconds) are refused as stale.
MAX_CLOCK_SKEW_S = 300

#: Permissions a node can hold on a channel (kachery's names).
PERMISSIONS = ("requestFiles", "provideFiles", "requestFeeds", "provideFeeds")


class Request(enum.StrEnum):
    """The requests a node sends the hub, by the name they carry as the body's ``type``.

    The one list of them: the hub dispatches each to its handler
    (:data:`kachery_fs.hub.service.HANDLERS`), and the node's
    :class:`~kachery_fs.hub_client.HubClient` has a method for each. A request of any
    other type is refused (``InvalidInput``, HTTP 400: ``unknown request type``).
    """

    # channels (the owner administers; a member asks for its own permissions)
    GET_CHANNEL = "getChannel"
    CREATE_CHANNEL = "createChannel"
    SET_CHANNEL = "setChannel"
    CHANNEL_STATS = "channelStats"
    AUTHORIZE_NODE = "authorizeNode"
    LIST_CHANNELS = "listChannels"
    # uploads and the bucket cache
    INITIATE_UPLOAD = "initiateUpload"
    FINALIZE_UPLOAD = "finalizeUpload"
    REPORT_DOWNLOADS = "reportDownloads"
    # reads of a private channel's bucket, through signed URLs
    SIGN_READS = "signReads"
    # the manifests of large files that the hub vouches for (see hub.manifests)
    GET_MANIFEST = "getManifest"
    REPORT_MANIFEST = "reportManifest"
    # file requests between nodes
    REQUEST_FILE = "requestFile"
    LISTEN_REQUESTS = "listenRequests"
    ANSWER_REQUEST = "answerRequest"
    REQUEST_PROGRESS = "requestProgress"
    MY_REQUESTS = "myRequests"
    # feeds
    FEED_UPLOAD_URLS = "feedUploadUrls"
    FEED_UPDATED = "feedUpdated"
    WATCH_FEEDS = "watchFeeds"


@dataclass(frozen=True)
class SignedRequest:
    """A request the hub signed for a node: send exactly this method, URL and headers."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> SignedRequest:
        return cls(method=str(data["method"]), url=str(data["url"]),
                   headers={str(k): str(v) for k, v in dict(data.get("headers") or {}).items()})


def object_key(channel: str, sha1: str) -> str:
    """The bucket key of a file: ``<channel>/sha1/ab/cd/ef/<sha1>`` (kachery hub layout)."""
    return f"{channel}/sha1/{sha1[0:2]}/{sha1[2:4]}/{sha1[4:6]}/{sha1}"


def feed_prefix(channel: str, feed_id: str, subfeed_hash: str) -> str:
    """The bucket prefix of a subfeed (kachery hub layout): ``<channel>/feeds/<pathify(feed
    id)>/subfeeds/<pathify(subfeed hash)>``; messages are ``<prefix>/<i>``, the index is
    ``<prefix>/subfeed.json``."""
    def pathify(h: str) -> str:
        return f"{h[0:2]}/{h[2:4]}/{h[4:6]}/{h}"
    return f"{channel}/feeds/{pathify(feed_id)}/subfeeds/{pathify(subfeed_hash)}"
