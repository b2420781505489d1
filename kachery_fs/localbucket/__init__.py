"""The local bucket: a directory served over HTTP with the semantics of GCS's XML API.

It lets a hub serve a channel's data itself, with the same wire behaviour a node sees
from Google Cloud Storage, so nodes have one code path for both:

* public ``GET``/``HEAD`` of ``/<bucket>/<key>``, with ``Range`` answered as GCS does,
  but for private objects (``LocalBucket.is_private``: a private channel's), which only a
  V4 signed ``GET`` reads, as in a GCS bucket without ``allUsers`` access;
* writes only through V4 signed URLs (``GOOG4-RSA-SHA256``), checked for real against
  the public keys of the signers we trust (:class:`kachery_fs.hub.signing.UrlSigner`):
  a signed single ``PUT``, or a signed ``POST`` (``x-goog-resumable: start``) that opens
  a resumable upload session, then chunked ``PUT``s to the session URI;
* the preconditions our signer puts in every URL: ``x-goog-if-generation-match``
  (``0`` = never overwrite) and ``x-goog-content-length-range``.

There is no ``DELETE`` over HTTP, no listing, and no ``/api/`` (the hub's own app owns it).

Layout on disk::

    <root>/<bucket>/<key>          the objects, one file each
    <root>/.sessions/<id>.json     an upload session's state (committed bytes, preconditions)
    <root>/.sessions/<id>.part     the bytes an upload session has committed so far
    <root>/.tmp/                   single PUTs being received (swept at start)

Concurrency: the HTTP side runs on one trio event loop and does file I/O in worker
threads. Every change to an upload session happens under that session's ``trio.Lock``;
the step that makes a file an object (precondition check, then ``os.replace``) and
:meth:`LocalBucket.delete` run under one ``threading.Lock``, so two uploads of one key
can never both pass a no-clobber check. Readers keep the file they opened: an object
replaced under a download is never seen half-written.

A new request on an upload session wins, as in GCS: it cancels any earlier request on
that session that is still waiting for the lock or still receiving its chunk's body
(:meth:`LocalBucket.session_turn`). A sender that vanished mid-chunk without closing its
connection (a frozen machine, a connection held by a proxy) therefore blocks its session
only until the next request on it, which is how a restarted uploader resumes. A chunk
cut off this way, or by its client going away, or by a body that stops arriving for
:data:`BODY_STALL_TIMEOUT_S`, commits nothing: the committed offset is persisted only
after a whole chunk is written and fsync'd, and the bytes past it are cut off by the
next chunk (or at the next start). A request whose body is all here is no longer
cancelled: it finishes (fsync, persist, answer) while newer requests wait for the lock.

Modules, each using only those before it:

* :mod:`~kachery_fs.localbucket.http`: GCS's error answers (:class:`GcsError`), its names
  (:func:`check_bucket_name`, :func:`check_key`), a raw ASGI request, ranges, bodies;
* :mod:`~kachery_fs.localbucket.store`: the objects and upload sessions on disk
  (:class:`LocalBucket`);
* :mod:`~kachery_fs.localbucket.sigv4`: the check of V4 signatures
  (:func:`verify_signed_request`);
* :mod:`~kachery_fs.localbucket.app`: the ASGI app (:func:`create_app`).

The hub serves it (``kachery_fs.hub.serve``); nothing here knows the hub.
"""

from .app import CHUNK_GRANULARITY, create_app
from .http import (
    BODY_STALL_TIMEOUT_S,
    READ_CHUNK,
    WRITE_BATCH,
    GcsError,
    check_bucket_name,
    check_key,
    select_range,
)
from .sigv4 import MAX_FUTURE_SKEW_S, MAX_SIGNATURE_EXPIRY_S, verify_signed_request
from .store import SESSION_LIFETIME_S, LocalBucket, ObjectInfo, UploadSession

__all__ = [
    "BODY_STALL_TIMEOUT_S",
    "CHUNK_GRANULARITY",
    "MAX_FUTURE_SKEW_S",
    "MAX_SIGNATURE_EXPIRY_S",
    "READ_CHUNK",
    "SESSION_LIFETIME_S",
    "WRITE_BATCH",
    "GcsError",
    "LocalBucket",
    "ObjectInfo",
    "UploadSession",
    "check_bucket_name",
    "check_key",
    "create_app",
    "select_range",
    "verify_signed_request",
]
