"""Helpers for the local store's tests (tests/*/test_store_cache.py): content of a known
size, installed the way a bucket download installs it."""

from __future__ import annotations

import hashlib
import os

from kachery_fs.store import Store

SIZE = 1000


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def content(tag: str, size: int = SIZE) -> bytes:
    return (tag.encode() * size)[:size]


def fetched(store: Store, data: bytes) -> str:
    """Install ``data`` the way a bucket download does (verified temp file, renamed in)."""
    temp, fd = store.new_temp_file()
    try:
        os.write(fd, data)
        store.install_verified(temp, sha1(data), actual_sha1=sha1(data))
    finally:
        os.close(fd)
    return sha1(data)


def present(store: Store, *hashes: str) -> set[str]:
    return {h for h in hashes if store.has(h)}


def read(store: Store, h: str) -> None:
    """Open and close ``h`` as a reader does (the store notes the use)."""
    os.close(store.open(h))


def stored(store: Store, h: str) -> bytes:
    """The bytes of ``h`` in the store, wherever it is (``sha1/``, or ``pending/`` for
    content a mount committed that a sync has not yet put on the disk)."""
    with os.fdopen(store.open(h), "rb") as f:
        return f.read()
