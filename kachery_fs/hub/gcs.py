"""Channels on Google Cloud Storage (``gs://BUCKET``): the hub's side.

The hub never carries file bytes. For a ``gs://`` channel it

* signs V4 URLs (resumable upload starts, single PUTs) with a service account's private
  key, through the same :class:`~kachery_fs.hub.signing.UrlSigner` as the local bucket;
* stats and deletes objects with google-cloud-storage's client, which blocks: it
  runs on worker threads (``trio.to_thread``), with one client per thread;
* tells nodes the bucket's public base URL ``https://storage.googleapis.com/BUCKET``,
  where they read objects (the bucket must let ``allUsers`` view objects).

**Credentials.** Signing needs a private key, so the hub uses a service-account key file:
``hub serve --gcs-credentials KEY.json``, else ``GOOGLE_APPLICATION_CREDENTIALS``, else
gcloud's Application Default Credentials file if it holds a service-account key. Other
Application Default Credentials (a user's ``gcloud auth application-default login``, a
VM's metadata server) cannot sign without the IAM signBlob API, which the hub does not
use: they get an error that says what to do. The same service account stats and
deletes objects, so one account holds every right the hub needs.

**Emulator.** With ``STORAGE_EMULATOR_HOST`` (``http://HOST:PORT``) in the hub's
environment, everything goes to that emulator instead: URLs are signed for its host, the
client talks to it with anonymous credentials (no token is ever fetched from Google),
and nodes are told its base URL, so they need no setting of their own. The key file
still signs (the emulator checks no signature, but nodes get real V4 URLs). Uploads
signed for an emulator are marked for fake-gcs-server's gaps (see
:data:`kachery_fs.resumable.EMULATOR_MARK`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import requests
import trio
from google.api_core import exceptions as api_exceptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import service_account

from ..errors import InvalidInput, NotFound, PermissionDenied, Unavailable
from ..protocol import SignedRequest
from .signing import UrlSigner

T = TypeVar("T")

#: Where GCS's XML API (signed URLs) and public objects are.
GCS_ENDPOINT = "https://storage.googleapis.com"

#: The environment variable that points google-cloud-storage (and this hub) at an emulator.
EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

#: How long one metadata call (stat, delete) may take, retries included: a
#: node's request waits on it.
CALL_TIMEOUT_S = 20

#: Retry transient failures (429, 5xx, connection errors) within that time.
_RETRY = DEFAULT_RETRY.with_timeout(CALL_TIMEOUT_S)

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")

_KEY_ADVICE = (
    "create a key for the hub's service account (`gcloud iam service-accounts keys create"
    " KEY.json --iam-account=SERVICE_ACCOUNT_EMAIL`) and start the hub with"
    " `kachery-fs hub serve --gcs-credentials KEY.json` (or set GOOGLE_APPLICATION_CREDENTIALS"
    " to that file)")


def check_bucket_name(name: str) -> str:
    """``name`` if GCS accepts it as a bucket name, else InvalidInput (GCS's naming rules)."""
    if "/" in name:
        raise InvalidInput(f"invalid bucket gs://{name}: give a whole bucket, gs://NAME"
                           " (a channel's objects go under <channel>/ in it)")
    parts = name.split(".")
    if (not _BUCKET_NAME.fullmatch(name) or any(not 1 <= len(p) <= 63 for p in parts)
            or ("." not in name and len(name) > 63) or name.startswith("goog")
            or "google" in name or re.fullmatch(r"[0-9.]+", name)):
        raise InvalidInput(
            f"invalid bucket name {name!r}: GCS bucket names are 3-63 characters from a-z"
            " 0-9 - _ . (up to 222 with dots, 63 per dot-separated part), start and end with"
            " a letter or digit, and neither start with 'goog' nor contain 'google'")
    return name


def emulator_host(environ: Mapping[str, str] = os.environ) -> str | None:
    """The emulator's base URL from ``STORAGE_EMULATOR_HOST`` (``http://`` if no scheme)."""
    host = environ.get(EMULATOR_ENV, "").strip().rstrip("/")
    if not host:
        return None
    return host if "://" in host else f"http://{host}"


class GoogleCloudStorage:
    """Google Cloud Storage as the hub reaches it: one service account, or an emulator."""

    def __init__(self, credentials: service_account.Credentials, *,
                 emulator: str | None = None):
        self.credentials = credentials
        self.emulator = emulator
        self.endpoint = emulator or GCS_ENDPOINT
        self.signer = UrlSigner(credentials, api_access_endpoint=self.endpoint,
                                emulator=emulator is not None)
        self._threads = threading.local()

    @classmethod
    def from_environment(cls, key_file: str | Path | None = None,
                         environ: Mapping[str, str] = os.environ) -> GoogleCloudStorage:
        """Load the signing key (see the module's docstring) and note any emulator.

        Reads files only: never asks a metadata server or Google for anything. Raises
        InvalidInput saying what to do when no usable key is found.
        """
        emulator = emulator_host(environ)
        if key_file is None:
            key_file = environ.get("GOOGLE_APPLICATION_CREDENTIALS") or None
        if key_file is None:
            adc = _gcloud_adc_file(environ)
            if adc.is_file():
                key_file = adc
        if key_file is None:
            where = f" (even with the emulator at {emulator})" if emulator else ""
            raise InvalidInput(
                f"gs:// channels need a service-account key to sign upload URLs{where}, and"
                f" this hub has none: {_KEY_ADVICE}. Application Default Credentials without"
                " a private key (a VM's metadata server) cannot sign them")
        return cls(_load_key_file(Path(key_file)), emulator=emulator)

    @property
    def client_email(self) -> str:
        return self.credentials.signer_email

    def bucket(self, name: str) -> GcsBucketBackend:
        return GcsBucketBackend(self, check_bucket_name(name))

    def client(self) -> storage.Client:
        """This thread's client (requests sessions are not shared between threads)."""
        client = getattr(self._threads, "client", None)
        if client is None:
            if self.emulator:
                # Anonymous: nothing to refresh, so no token is ever fetched from Google.
                client = storage.Client(project=None, credentials=AnonymousCredentials(),
                                        client_options={"api_endpoint": self.emulator})
            else:
                client = storage.Client(project=self.credentials.project_id,
                                        credentials=self.credentials)
            self._threads.client = client
        return client

    def __repr__(self) -> str:
        return f"GoogleCloudStorage({self.client_email} at {self.endpoint})"


class GcsBucketBackend:
    """A channel bucket that is a Google Cloud Storage bucket (or an emulator's): a
    :class:`~kachery_fs.hub.backends.BucketBackend`.

    GCS cannot give an object's SHA-1 without reading its bytes, and the hub never
    carries file bytes, so ``can_hash`` is False: at finalize the hub checks that the
    object exists and has the announced size, nothing about its content. GCS keeps an
    MD5 and a CRC32C of every object, but the hub has nothing to compare them with (a
    node announces only the SHA-1), and GCS checks them against the upload only when the
    client sends them, which nodes do not. Content is checked where it is used: nodes
    check the SHA-1 of a file before its last byte goes up, and readers verify every byte
    against the SHA-1 before serving any; an object with the right size and the wrong
    content is refused by every reader (and never cached), until it is deleted.
    """

    can_hash = False  # at finalize; a reader's dispute is checked by reading (sha1)

    def __init__(self, gcs: GoogleCloudStorage, bucket: str):
        self.gcs = gcs
        self.bucket = bucket

    def base_url(self) -> str:
        return f"{self.gcs.endpoint}/{self.bucket}"

    async def stat(self, key: str) -> int | None:
        def stat() -> int | None:
            blob = self.gcs.client().bucket(self.bucket).get_blob(
                key, timeout=CALL_TIMEOUT_S, retry=_RETRY)
            return None if blob is None else int(blob.size)
        return await self._call(stat, f"looking up gs://{self.bucket}/{key}")

    async def sha1(self, key: str) -> str:
        """The SHA-1 of the object's bytes, read through. Only for a dispute: a reader
        found that the object does not hash to its name (``Hub._dispute``); the bytes
        go nowhere but into the hash."""
        def digest() -> str:
            hasher = hashlib.sha1()

            class Sink:
                def write(self, data: bytes) -> int:
                    hasher.update(data)
                    return len(data)
            self.gcs.client().bucket(self.bucket).blob(key).download_to_file(
                Sink(), timeout=(10, 60), retry=_RETRY)
            return hasher.hexdigest()
        return await self._call(digest, f"reading gs://{self.bucket}/{key} to check it")

    async def read(self, key: str, *, max_bytes: int) -> bytes:
        """A small object's bytes (a manifest the hub checks before vouching for it)."""
        def read() -> bytes:
            try:
                return self.gcs.client().bucket(self.bucket).blob(key).download_as_bytes(
                    start=0, end=max_bytes, timeout=CALL_TIMEOUT_S, retry=_RETRY)
            except api_exceptions.NotFound:
                raise NotFound(f"no object gs://{self.bucket}/{key}") from None
        data = await self._call(read, f"reading gs://{self.bucket}/{key}")
        if len(data) > max_bytes:
            raise InvalidInput(f"gs://{self.bucket}/{key} has more than {max_bytes:,} bytes")
        return data

    async def range_sha1s(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[str]:
        """The SHA-1 of each range, read through. The hub does not call it (``can_hash``
        is False: it would carry every byte of the object); it keeps the protocol whole."""
        def digests() -> list[str]:
            blob = self.gcs.client().bucket(self.bucket).blob(key)
            out = []
            for start, end in ranges:
                if not 0 <= start <= end:
                    raise InvalidInput(f"bytes {start:,} to {end:,} are no range")
                hasher = hashlib.sha1()
                if end > start:
                    try:
                        data = blob.download_as_bytes(start=start, end=end - 1,
                                                      timeout=(10, 60), retry=_RETRY)
                    except api_exceptions.NotFound:
                        raise NotFound(f"no object gs://{self.bucket}/{key}") from None
                    except api_exceptions.RequestRangeNotSatisfiable:
                        data = b""
                    if len(data) != end - start:
                        raise InvalidInput(f"bytes {start:,} to {end:,} are not within"
                                           f" gs://{self.bucket}/{key}")
                    hasher.update(data)
                out.append(hasher.hexdigest())
            return out
        return await self._call(digests, f"reading gs://{self.bucket}/{key} to check it")

    async def delete(self, key: str) -> None:
        def delete() -> None:
            try:
                self.gcs.client().bucket(self.bucket).blob(key).delete(
                    timeout=CALL_TIMEOUT_S, retry=_RETRY)
            except api_exceptions.NotFound:
                pass  # already gone
        await self._call(delete, f"deleting gs://{self.bucket}/{key}")

    def resumable_upload(self, key: str, *, size: int, expires_s: int) -> SignedRequest:
        return self.gcs.signer.resumable_upload(self.bucket, key, size=size,
                                                expires_s=expires_s)

    def put(self, key: str, *, size: int, expires_s: int,
            overwrite: bool = False) -> SignedRequest:
        return self.gcs.signer.put(self.bucket, key, size=size, expires_s=expires_s,
                                   overwrite=overwrite)

    def signed_get(self, key: str, *, expires_s: int) -> str:
        return self.gcs.signer.get(self.bucket, key, expires_s=expires_s).url

    async def anyone_can_read(self) -> bool:
        """An anonymous ``GET`` of an object that does not exist: ``404`` where anyone may
        read objects (``allUsers``), ``401``/``403`` where the bucket is private."""
        url = f"{self.base_url()}/kachery-fs-access-probe/{os.urandom(8).hex()}"

        def probe() -> int:
            with requests.get(url, timeout=CALL_TIMEOUT_S, stream=True) as answer:
                return answer.status_code

        try:
            status = await trio.to_thread.run_sync(probe, abandon_on_cancel=True)
        except requests.RequestException as exc:
            raise Unavailable(f"asking whether gs://{self.bucket} is public:"
                              f" {type(exc).__name__}: {exc}") from None
        if status in (401, 403):
            return False
        if status in (200, 404):
            return True
        raise Unavailable(f"asking whether gs://{self.bucket} is public: HTTP {status}")

    async def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run a blocking client call on a worker thread; its errors become ours."""
        try:
            return await trio.to_thread.run_sync(fn, abandon_on_cancel=True)
        except (api_exceptions.Unauthorized, api_exceptions.Forbidden) as exc:
            raise PermissionDenied(
                f"{what}: refused ({exc.code}): the hub's service account {self.gcs.client_email}"
                f" needs storage.objects.create, .get, .list and .delete on gs://{self.bucket}"
                " (README, Google Cloud Storage: the kacheryFsHub role)") from None
        except auth_exceptions.RefreshError as exc:
            raise PermissionDenied(f"{what}: Google refused the key of"
                                   f" {self.gcs.client_email}: {exc}") from None
        except api_exceptions.NotFound:
            raise NotFound(f"{what}: there is no bucket gs://{self.bucket}") from None
        except (api_exceptions.GoogleAPIError, auth_exceptions.TransportError,
                requests.RequestException) as exc:
            raise Unavailable(f"{what}: {type(exc).__name__}: {exc}") from None


def _gcloud_adc_file(environ: Mapping[str, str]) -> Path:
    """Where gcloud keeps Application Default Credentials (on Linux and macOS)."""
    config = environ.get("CLOUDSDK_CONFIG") or Path(environ.get("HOME") or Path.home(),
                                                    ".config", "gcloud")
    return Path(config, "application_default_credentials.json")


def _load_key_file(path: Path) -> service_account.Credentials:
    """The service account of a key file, with a clear error for anything else."""
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file (the service-account key for gs://"
                           f" channels): {_KEY_ADVICE}") from None
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: cannot read it as a JSON key file: {exc}") from None
    kind = info.get("type") if isinstance(info, dict) else None
    if kind != "service_account":
        what = {"authorized_user": "a user's Application Default Credentials (`gcloud auth"
                                   " application-default login`)",
                "external_account": "workload identity federation credentials",
                "impersonated_service_account": "impersonation credentials"}.get(
            str(kind), f"a credentials file of type {kind!r}")  # str: JSON may hold a list
        raise InvalidInput(f"{path} holds {what}, which have no private key to sign upload"
                           f" URLs with: {_KEY_ADVICE}")
    try:
        return service_account.Credentials.from_service_account_info(info)
    except (ValueError, KeyError) as exc:
        raise InvalidInput(f"{path}: not a usable service-account key: {exc}") from None
