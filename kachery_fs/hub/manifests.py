"""The manifests of large files that the hub vouches for (kachery.md §1.4).

A reader may serve a large file's bytes chunk by chunk, each checked against its SHA-1 in
the file's manifest, only if it trusts that the manifest is the file's: a manifest found
in the bucket proves nothing (any node that may upload can publish one that claims any
file). So a node that uploads a large file and computed its manifest from the file itself
*vouches* for it in the file's ``finalizeUpload`` (field ``manifest``), and the hub keeps
the vouch once it checks:

* the manifest object ``<channel>/sha1/<manifest>`` is in the bucket, at most
  :data:`MAX_MANIFEST_BYTES`, hashes to its name, is a well-formed kachery manifest of
  the file (:meth:`~kachery_fs.manifest.Manifest.parse`) and of the file's size;
* where the hub can hash the bucket's objects (``BucketBackend.can_hash``: the local
  bucket), every chunk's SHA-1 against the file's bytes. On GCS the hub cannot read the
  file without carrying it, so there a vouch rests on the node's word and the checks of
  the manifest object alone.

A vouch that fails a check is refused (nothing recorded; the file's finalize stands). A
vouch on record is answered to any member that may request files (``getManifest``), and
dropped when a reader reports that chunks which all matched it made another file
(``reportManifest``): each node's vouches, refused vouches and disputed vouches are
counted per channel, for ``hub channel stats``. Dropping a true record costs readers
speed only (they read the whole file and verify it), never correctness.

The tables are migration 3 of :data:`kachery_fs.hub.storage.SCHEMA`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import MutableMapping

from .. import manifest as manifest_module
from ..errors import IntegrityError, InvalidInput, NotFound
from ..manifest import Manifest
from ..protocol import object_key
from .backends import BucketBackend
from .database import Database
from .storage import as_database

#: The largest manifest object the hub reads (as a reader: :data:`kachery_fs.manifest.MAX_BYTES`).
MAX_MANIFEST_BYTES = manifest_module.MAX_BYTES


async def check_manifest(backend: BucketBackend, channel: str, sha1: str, size: int,
                         manifest: str, *, digests: MutableMapping | None = None) -> None:
    """Check that the manifest object ``manifest`` in the channel's bucket is that of
    ``sha1`` (``size`` bytes): see the module docstring. ``IntegrityError`` says which
    check failed; ``NotFound`` if the manifest or the file is not in the bucket (now);
    ``Unavailable`` and the backend's other errors as they come. ``digests`` keeps the
    chunk hashes of files read for a check (objects never change): a second manifest
    for the same file is checked without reading it again."""
    key = object_key(channel, manifest)
    stored = await backend.stat(key)
    if stored is None:
        raise NotFound(f"the manifest sha1://{manifest} is not in the bucket (upload it"
                       " before the file it describes)")
    if stored > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"the manifest object has {stored:,} bytes, more than the"
                             f" {MAX_MANIFEST_BYTES:,} the hub reads")
    try:
        data = await backend.read(key, max_bytes=MAX_MANIFEST_BYTES)
    except InvalidInput as exc:  # it grew since the stat
        raise IntegrityError(str(exc)) from None
    digest = hashlib.sha1(data).hexdigest()
    if digest != manifest:
        raise IntegrityError(f"the manifest object hashes to {digest}, not to its name")
    parsed = Manifest.parse(data, sha1=sha1)  # IntegrityError for anything else
    if parsed.size != size:
        raise IntegrityError(f"it is a manifest of {parsed.size:,} bytes, not of"
                             f" {size:,}")
    if not backend.can_hash:
        return
    ranges = tuple((c.start, c.end) for c in parsed.chunks)
    known = digests.get((channel, sha1)) if digests is not None else None
    if known is not None and known[0] == ranges:
        found = known[1]
    else:
        found = await backend.range_sha1s(object_key(channel, sha1), list(ranges))
        if digests is not None:
            digests[(channel, sha1)] = (ranges, found)
    for i, (chunk, actual) in enumerate(zip(parsed.chunks, found, strict=True)):
        if actual != chunk.sha1:
            raise IntegrityError(f"chunk {i} (bytes {chunk.start:,} to {chunk.end:,}) of"
                                 f" sha1://{sha1} hashes to {actual}, not {chunk.sha1}")


class ManifestRecords:
    """The vouched manifests and each node's vouches, on the hub's connection."""

    def __init__(self, db: Database | sqlite3.Connection, *, clock=time.time):
        self._db = as_database(db)
        self._clock = clock

    def get(self, channel: str, sha1: str) -> str | None:
        """The manifest on record for ``sha1``, or None."""
        row = self._db.execute("SELECT manifest FROM manifests WHERE channel = ? AND sha1 = ?",
                               (channel, sha1)).fetchone()
        return row[0] if row else None

    def voucher(self, channel: str, sha1: str) -> str | None:
        """The node whose vouch the record of ``sha1`` is, or None."""
        row = self._db.execute("SELECT vouched_by FROM manifests WHERE channel = ?"
                               " AND sha1 = ?", (channel, sha1)).fetchone()
        return row[0] if row else None

    def record(self, channel: str, sha1: str, manifest: str, node_id: str) -> bool:
        """``node_id``'s vouch for ``manifest`` as that of ``sha1`` passed its checks:
        record it. False if another manifest is on record for it (recorded by another hub
        process while this one checked)."""
        if not self._db.execute("INSERT INTO manifests (channel, sha1, manifest, vouched_by,"
                                " vouched_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (channel,"
                                " sha1) DO NOTHING",
                                (channel, sha1, manifest, node_id, self._clock())).rowcount:
            # another hub process recorded a vouch for it meanwhile
            return self.get(channel, sha1) == manifest
        self._count(channel, node_id, "vouched")
        return True

    def refused(self, channel: str, node_id: str) -> None:
        """A vouch of ``node_id``'s failed its checks."""
        self._count(channel, node_id, "refused")

    def drop(self, channel: str, sha1: str, manifest: str) -> str | None:
        """A reader reports that ``manifest`` is not that of ``sha1``: drop the record if it
        is that one, and count the dispute against the node that vouched for it. Returns
        that node, or None when no such record was there."""
        voucher = self.voucher(channel, sha1)
        cursor = self._db.execute("DELETE FROM manifests WHERE channel = ? AND sha1 = ?"
                                  " AND manifest = ?", (channel, sha1, manifest))
        if not cursor.rowcount or voucher is None:
            return None
        self._count(channel, voucher, "disputed")
        return voucher

    def _count(self, channel: str, node_id: str, column: str) -> None:
        assert column in ("vouched", "refused", "disputed")
        self._db.execute(
            f"INSERT INTO manifest_vouchers (channel, node_id, {column}) VALUES (?, ?, 1)"
            f" ON CONFLICT (channel, node_id) DO UPDATE SET {column} ="
            f" manifest_vouchers.{column} + 1",
            (channel, node_id))

    def stats(self, channel: str) -> dict:
        """``manifests``: how many are on record; ``vouchers``: per node, its vouches
        recorded, refused, and disputed by readers."""
        count = self._db.execute("SELECT COUNT(*) FROM manifests WHERE channel = ?",
                                 (channel,)).fetchone()[0]
        vouchers = {node: {"vouched": v, "refused": r, "disputed": d}
                    for node, v, r, d in self._db.execute(
                        "SELECT node_id, vouched, refused, disputed FROM manifest_vouchers"
                        " WHERE channel = ? ORDER BY node_id", (channel,))}
        return {"manifests": count, "vouchers": vouchers}
