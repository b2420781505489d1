"""Channel buckets as the hub sees them: one protocol, its backends, and the URI resolver.

A channel's bucket URI names where its objects live: ``local://NAME`` (a bucket of this
hub's local bucket, :class:`LocalBucketBackend`) or ``gs://NAME`` (Google Cloud Storage,
:class:`~kachery_fs.hub.gcs.GcsBucketBackend`). :class:`Buckets` resolves a URI to its
backend; the hub speaks to every backend through :class:`BucketBackend` only.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import BinaryIO, Protocol

import trio

from ..errors import InvalidInput, NotFound
from ..protocol import SignedRequest
from .gcs import GoogleCloudStorage
from .gcs import check_bucket_name as check_gcs_bucket_name


class BucketBackend(Protocol):
    """One channel bucket, for the hub: metadata, deletions, and signed uploads.

    The hub never carries file bytes: nodes read objects at :meth:`base_url` and write them
    through the URLs that :meth:`resumable_upload` and :meth:`put` sign. ``key`` is always a
    whole object key (``<channel>/sha1/ab/cd/ef/<sha1>``, or a feed key); a key the bucket
    cannot name is refused with ``InvalidInput``.

    **Sizes.** :meth:`stat` gives the size the bucket stores, never a node's claim. A signed
    upload carries ``x-goog-content-length-range: size,size`` and
    ``x-goog-if-generation-match: 0``, so the bucket refuses a body of another size and never
    replaces an object: an object that went up through a URL signed for ``size`` has that
    size. The hub relies on this to compare what a node claims (``initiateUpload``,
    ``finalizeUpload``) with what is there, and to account the channel's usage; an object
    put there some other way (an earlier kachery's) may have any size, which :meth:`stat`
    shows.

    **Content.** ``can_hash`` says whether :meth:`sha1` is cheap enough to check every
    finalized upload (the local bucket: the file is on this machine, and a resumable
    upload was hashed as it arrived). Where it is False (GCS), :meth:`sha1` reads the whole
    object through the hub, and is used only when a reader disputes an object. The same
    goes for :meth:`range_sha1s` (a vouched manifest's chunks, checked only where
    ``can_hash``); :meth:`read` is for small objects (manifests) on every backend.

    **Errors.** Only the project's errors (:mod:`kachery_fs.errors`): ``NotFound`` (the
    object, for :meth:`sha1`; the bucket itself, for any call of a backend that can tell
    that it does not exist), ``PermissionDenied`` (the
    bucket refuses the hub's credentials), ``Unavailable`` (the bucket cannot be reached
    now: worth retrying), ``InvalidInput`` (a key, size or expiry the bucket cannot take).
    """

    #: Whether :meth:`sha1` is cheap (see above). A class attribute.
    can_hash: bool

    def base_url(self) -> str:
        """The public URL nodes read objects under, as ``<base_url>/<key>``, without a
        trailing slash (``https://storage.googleapis.com/NAME``, ``<hub>/NAME``)."""
        ...

    async def stat(self, key: str) -> int | None:
        """The size in bytes of the object ``key`` as stored, or ``None`` if there is none."""
        ...

    async def sha1(self, key: str) -> str:
        """The lowercase SHA-1 hex digest of the object's bytes; ``NotFound`` if absent."""
        ...

    async def read(self, key: str, *, max_bytes: int) -> bytes:
        """The bytes of a small object (a manifest, which the hub checks before vouching
        for it): ``NotFound`` if absent, ``InvalidInput`` if it has more than
        ``max_bytes`` (at most ``max_bytes + 1`` are read)."""
        ...

    async def range_sha1s(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[str]:
        """The lowercase SHA-1 of the object's bytes ``[start, end)`` for each range, in
        order (a manifest's chunks); ``NotFound`` if absent, ``InvalidInput`` if a range
        is not within the object. Reads the ranges' bytes: the hub calls it only where
        ``can_hash``."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object ``key``; one that is not there is no error (already gone)."""
        ...

    def resumable_upload(self, key: str, *, size: int, expires_s: int) -> SignedRequest:
        """A signed ``POST`` (``x-goog-resumable: start``) that opens a resumable upload
        session for exactly ``size`` bytes at ``key``, which never replaces an existing
        object (``412``) and may be sent for ``expires_s`` seconds. Synchronous: signing
        is CPU work (about 1 ms), no I/O."""
        ...

    def put(self, key: str, *, size: int, expires_s: int,
            overwrite: bool = False) -> SignedRequest:
        """A signed single ``PUT`` of exactly ``size`` bytes at ``key``, valid for
        ``expires_s`` seconds, which never replaces an existing object unless
        ``overwrite`` (for the few mutable objects, such as a subfeed's index).
        Synchronous, like :meth:`resumable_upload`."""
        ...


    def signed_get(self, key: str, *, expires_s: int) -> str:
        """A signed ``GET`` URL of object ``key`` (a private channel's reads). Synchronous."""
        ...

    async def anyone_can_read(self) -> bool:
        """Whether the bucket lets anyone read its objects without a signature, whatever
        the hub says of its channels (a private channel on such a bucket hides nothing)."""
        ...


class LocalBucketBackend:
    """A channel bucket that is a bucket of this hub's local bucket
    (:class:`~kachery_fs.localbucket.LocalBucket`), with URLs signed by the hub's own key."""

    can_hash = True

    def __init__(self, local, signer, public_url: str, bucket: str):
        self.local = local
        self.signer = signer
        self.public_url = public_url.rstrip("/")
        self.bucket = bucket

    def base_url(self) -> str:
        return f"{self.public_url}/{self.bucket}"

    async def stat(self, key: str) -> int | None:
        st = self.local.stat(self.bucket, key)
        return None if st is None else st[0]

    async def sha1(self, key: str) -> str:
        return await trio.to_thread.run_sync(self.local.sha1, self.bucket, key)

    async def read(self, key: str, *, max_bytes: int) -> bytes:
        def read() -> bytes:
            with self._open(key) as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                raise InvalidInput(f"{self.bucket}/{key} has more than {max_bytes:,} bytes")
            return data
        return await trio.to_thread.run_sync(read)

    async def range_sha1s(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[str]:
        def digests() -> list[str]:
            out = []
            with self._open(key) as f:
                size = os.fstat(f.fileno()).st_size
                for start, end in ranges:
                    if not 0 <= start <= end <= size:
                        raise InvalidInput(f"bytes {start:,} to {end:,} are not within"
                                           f" {self.bucket}/{key} ({size:,} bytes)")
                    f.seek(start)
                    hasher, left = hashlib.sha1(), end - start
                    while left:
                        block = f.read(min(left, 1 << 20))
                        if not block:
                            raise NotFound(f"{self.bucket}/{key} was cut short while read")
                        hasher.update(block)
                        left -= len(block)
                    out.append(hasher.hexdigest())
            return out
        # Not abandoned when cancelled: the read ends, and its result is still delivered.
        return await trio.to_thread.run_sync(digests)

    def _open(self, key: str) -> BinaryIO:
        """The object's file, open for reading (blocking: on a worker thread)."""
        try:
            fd, _ = self.local.open_object(self.bucket, key)
        except FileNotFoundError:
            raise NotFound(f"no object {self.bucket}/{key} in the local bucket") from None
        return os.fdopen(fd, "rb")

    async def delete(self, key: str) -> None:
        self.local.delete(self.bucket, key)

    def resumable_upload(self, key: str, *, size: int, expires_s: int) -> SignedRequest:
        return self.signer.resumable_upload(self.bucket, key, size=size, expires_s=expires_s)

    def put(self, key: str, *, size: int, expires_s: int,
            overwrite: bool = False) -> SignedRequest:
        return self.signer.put(self.bucket, key, size=size, expires_s=expires_s,
                               overwrite=overwrite)

    def signed_get(self, key: str, *, expires_s: int) -> str:
        return self.signer.get(self.bucket, key, expires_s=expires_s).url

    async def anyone_can_read(self) -> bool:
        return False  # the local bucket refuses anonymous reads of private channels' keys


class Buckets:
    """Resolves a channel's bucket URI (``local://NAME`` or ``gs://NAME``) to a backend.

    ``gcs`` is the hub's Google Cloud Storage access
    (:class:`~kachery_fs.hub.gcs.GoogleCloudStorage`); without one, the first ``gs://``
    bucket looks for credentials in the environment, and says what is missing.
    """

    def __init__(self, *, local=None, signer=None, public_url: str | None = None, gcs=None):
        self.local = local
        self.signer = signer
        self.public_url = public_url
        self.gcs = gcs

    def for_uri(self, uri: str) -> BucketBackend:
        if not isinstance(uri, str):
            raise InvalidInput("bucket must be a string")
        if uri.startswith("local://"):
            name = uri[len("local://"):]
            if not re.match(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$", name) or name == "api":
                raise InvalidInput(f"invalid local bucket name {name!r}")
            if self.local is None:
                raise InvalidInput("this hub serves no local bucket (started with --no-local-bucket)")
            assert self.public_url is not None  # set as the hub starts listening
            return LocalBucketBackend(self.local, self.signer, self.public_url, name)
        if uri.startswith("gs://"):
            name = check_gcs_bucket_name(uri[len("gs://"):])
            if self.gcs is None:
                self.gcs = GoogleCloudStorage.from_environment()
            return self.gcs.bucket(name)
        raise InvalidInput(f"unknown bucket URI {uri!r}: expected local://NAME or gs://NAME")
