"""Signed upload URLs: one signing path for Google Cloud Storage and for the local bucket.

We sign with google-cloud-storage's own V4 code (``Blob.generate_signed_url``) and a
``google.oauth2.service_account.Credentials``, so the URLs the local bucket checks are
byte for byte the URLs GCS would check; the local bucket's verifier
(``kachery_fs.localbucket.sigv4``) rebuilds the same canonical request from what arrives.

Every URL we sign is scoped to one object key and one size, refuses to overwrite an
existing object, and expires soon. The headers it carries are *signed*: a client must
send exactly :attr:`SignedRequest.headers`, and changing any of them voids the signature.

For the local bucket, the hub keeps an RSA key in a service-account-style JSON file
(:meth:`UrlSigner.for_local_bucket`); its public half is handed to the local bucket's
verifier through :meth:`UrlSigner.public_keys`. For ``gs://`` channels,
:mod:`kachery_fs.hub.gcs` makes a signer from a service-account key file, for
``https://storage.googleapis.com`` or an emulator.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import secrets
from dataclasses import replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.cloud import storage
from google.oauth2 import service_account

from ..errors import InvalidInput
from ..protocol import SignedRequest
from ..resumable import mark_emulator

log = logging.getLogger(__name__)

#: The file, in a hub directory, holding the key the hub signs local-bucket URLs with.
LOCAL_KEY_FILE = "local-bucket-key.json"

#: The identity local-bucket URLs are signed as (an RSA "service account" of our own).
LOCAL_CLIENT_EMAIL = "local-bucket@kachery-fs.local"

#: GCS refuses V4 signed URLs that live longer than seven days.
MAX_EXPIRY_S = 7 * 24 * 3600

CONTENT_TYPE = "application/octet-stream"


class UrlSigner:
    """Signs V4 URLs for uploads, as one service account, for one API endpoint.

    ``api_access_endpoint`` is ``scheme://host[:port]`` without a path (for GCS
    ``https://storage.googleapis.com``; for the local bucket the hub's public URL):
    its host is signed, and the object path follows it directly.

    ``public_key`` is the credentials' RSA public key, if the caller has it: only the
    local bucket needs it (GCS checks its own signatures).

    ``emulator`` says that the endpoint is a GCS emulator (fake-gcs-server), whose gaps
    resumable uploads must work around (see :meth:`resumable_upload`).
    """

    def __init__(self, credentials: service_account.Credentials, *, api_access_endpoint: str,
                 public_key: rsa.RSAPublicKey | None = None, emulator: bool = False):
        self.credentials = credentials
        self.api_access_endpoint = api_access_endpoint.rstrip("/")
        self._public_key = public_key
        self.emulator = emulator
        # Blob.generate_signed_url wants a client only to read its universe domain; an
        # anonymous one makes no request and needs no project.
        self._client = storage.Client.create_anonymous_client()

    @classmethod
    def for_local_bucket(cls, key_dir: Path, endpoint: str) -> UrlSigner:
        """A signer for the local bucket served at ``endpoint``.

        Loads ``key_dir/local-bucket-key.json``, creating it first (RSA 2048, mode 0600,
        atomically: a concurrent creator's key wins and is the one loaded) if it is
        missing. Blocking: it may generate a key.
        """
        path = Path(key_dir) / LOCAL_KEY_FILE
        info = _load_or_create_key_file(path)
        credentials = service_account.Credentials.from_service_account_info(info)
        private_key = serialization.load_pem_private_key(info["private_key"].encode(),
                                                         password=None)
        if not isinstance(private_key, rsa.RSAPrivateKey):  # GCS signs with RSA only
            raise InvalidInput(f"{path} does not hold an RSA private key")
        return cls(credentials, api_access_endpoint=endpoint,
                   public_key=private_key.public_key())

    @property
    def client_email(self) -> str:
        return self.credentials.signer_email

    def public_keys(self) -> dict[str, rsa.RSAPublicKey]:
        """``{client_email: public key}`` for a verifier; empty if we were not given the key."""
        if self._public_key is None:
            return {}
        return {self.client_email: self._public_key}

    def resumable_upload(self, bucket: str, key: str, *, size: int,
                         expires_s: int = 900) -> SignedRequest:
        """A signed ``POST`` that starts a resumable upload session for exactly ``size`` bytes.

        The answer is ``201`` with the session URI in ``Location`` (GCS answers ``201``
        too), or ``412`` if the object already exists.

        For an emulator, and only there: fake-gcs-server takes the object's name from a
        ``name`` query parameter (the path is not enough; without it the object has an
        empty name), so the URL carries one, signed like the rest; and the URL is marked
        with :data:`~kachery_fs.resumable.EMULATOR_MARK` so that nodes avoid the
        emulator's other gaps (see there).
        """
        headers = {"x-goog-resumable": "start", **_upload_headers(size)}
        if not self.emulator:
            return self._sign(bucket, key, method="POST", headers=headers, expires_s=expires_s)
        signed = self._sign(bucket, key, method="POST", headers=headers, expires_s=expires_s,
                            query_parameters={"name": key})
        return replace(signed, url=mark_emulator(signed.url))

    def put(self, bucket: str, key: str, *, size: int, expires_s: int = 900,
            overwrite: bool = False) -> SignedRequest:
        """A signed single ``PUT`` of exactly ``size`` bytes that never overwrites the object
        (unless ``overwrite``: for the few mutable objects, such as a subfeed's index)."""
        headers = _upload_headers(size)
        if overwrite:
            del headers["x-goog-if-generation-match"]
        return self._sign(bucket, key, method="PUT", headers=headers, expires_s=expires_s)

    def get(self, bucket: str, key: str, *, expires_s: int) -> SignedRequest:
        """A signed ``GET`` of one object (ranges allowed: ``Range`` is not signed), for a
        private channel's readers. It reads that object only, until it expires."""
        return self._sign(bucket, key, method="GET", headers={}, expires_s=expires_s)

    def _sign(self, bucket: str, key: str, *, method: str, headers: dict[str, str],
              expires_s: int, query_parameters: dict[str, str] | None = None
              ) -> SignedRequest:
        if not bucket or not key:
            raise InvalidInput("a signed URL needs a bucket and an object key")
        if not 1 <= expires_s <= MAX_EXPIRY_S:
            raise InvalidInput(f"signed URL expiry must be 1..{MAX_EXPIRY_S} s, not {expires_s}")
        blob = storage.Bucket(self._client, name=bucket).blob(key)
        url = blob.generate_signed_url(
            version="v4",
            expiration=datetime.timedelta(seconds=expires_s),
            method=method,
            # generate_signed_url adds "host" to the dict it is given: hand it a copy.
            headers=dict(headers),
            credentials=self.credentials,
            api_access_endpoint=self.api_access_endpoint,
            query_parameters=query_parameters,
        )
        return SignedRequest(method=method, url=url, headers=dict(headers))


def _upload_headers(size: int) -> dict[str, str]:
    """The signed headers of every upload: no clobbering, exactly ``size`` bytes."""
    if size < 0:
        raise InvalidInput(f"invalid object size {size}")
    return {
        "x-goog-if-generation-match": "0",
        "x-goog-content-length-range": f"{size},{size}",
        "content-type": CONTENT_TYPE,
    }


def _load_or_create_key_file(path: Path) -> dict:
    """The service-account JSON at ``path``, created first if it does not exist."""
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(_new_key_info(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link, not replace: if another process created the key meanwhile, keep theirs.
            os.link(tmp, path)
            log.info("created the local bucket's signing key %s", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read_key_file(path)


def _read_key_file(path: Path) -> dict:
    info = json.loads(path.read_text())
    if not isinstance(info, dict) or not {"client_email", "private_key"} <= info.keys():
        raise InvalidInput(f"{path} is not a service-account key file")
    return info


def _new_key_info() -> dict:
    """A fresh service-account-style key (the fields google.oauth2 needs to load it)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    return {
        "type": "service_account",
        "project_id": "kachery-fs-local",
        "private_key_id": secrets.token_hex(20),
        "private_key": pem,
        "client_email": LOCAL_CLIENT_EMAIL,
        "client_id": "0",
        # Never contacted: we only ever sign with this key, we never ask for a token.
        "token_uri": "https://oauth2.googleapis.com/token",
    }
