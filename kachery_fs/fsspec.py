"""An fsspec file system for content URIs, registered for ``sha1://`` and ``kachery``.

::

    import fsspec, h5py

    with fsspec.open("sha1://<hash>/rec.nwb?manifest=<hash>") as f:
        with h5py.File(f) as h5:       # reads the metadata: a few chunks, not the file
            print(list(h5))

``open()`` returns a seekable, read-only file whose bytes are fetched on demand through the
node's read path (:mod:`kachery_fs.api`: local store, kachery stores on this machine, the
channel's bucket, a request to other nodes) and verified before they are returned: a file
with a manifest (kachery's ``?manifest=`` form for files over 20,000,000 bytes, or one
whose manifest the node trusts) is read by chunk, each chunk checked against its SHA-1 in
the manifest, and only the chunks the reads touch are fetched; any other file is fetched
whole and checked against its SHA-1 before its first byte is returned.

fsspec splits a URL on ``::`` and on ``://``, so kachery 2's ``kachery:<zone>:sha1:<hash>``
forms reach this file system only when the protocol is named:
``fsspec.open("kachery::sha1:<hash>:x.nwb", protocol="kachery")``; or open them with
:func:`kachery_fs.open`, or ``KacheryFileSystem().open(uri)``, which take every form.
"""

from __future__ import annotations

import threading
from typing import Any

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

from .api import Client, ContentHandle, client
from .errors import InvalidInput, KacheryError, NotFound
from .uris import format_uri, parse_uri

#: The clients made for ``node_dir=``/``channel=``, one for each pair: fsspec makes a file
#: system for every ``fsspec.open``.
_clients: dict[tuple[str | None, str | None], Client] = {}
_clients_lock = threading.Lock()


def _client_for(node_dir: str | None, channel: str | None) -> Client:
    with _clients_lock:
        found = _clients.get((node_dir, channel))
        if found is None or found.closed:
            found = _clients[(node_dir, channel)] = Client(node_dir, channel=channel)
        return found


class KacheryFileSystem(AbstractFileSystem):
    """Content by URI, read-only. ``client``: the :class:`~kachery_fs.api.Client` to read
    through (default: the one for ``$KACHERY_FS_DIR``); ``node_dir`` and ``channel``
    make a client of their own instead."""

    protocol = ("sha1", "kachery")
    root_marker = ""
    cachable = False  # one instance per client, not per argument set

    def __init__(self, *args: Any, client: Client | None = None,
                 node_dir: str | None = None, channel: str | None = None, **kwargs: Any):
        # fsspec splits "kachery::sha1:<hash>:label" at "::" and gives this file system
        # the part after it as ``fo`` (with target_protocol and target_options), and an
        # empty path: that part is the URI.
        self._fo = kwargs.pop("fo", None)
        for key in ("target_protocol", "target_options"):
            kwargs.pop(key, None)
        super().__init__(*args, **kwargs)
        if client is None and (node_dir is not None or channel is not None):
            client = _client_for(node_dir, channel)
        self._client = client

    @property
    def client(self) -> Client:
        return self._client if self._client is not None else client()

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        """The URI in kachery-fs's one form, ``sha1://<hash>[?label=|/name?manifest=]``, so
        that every spelling of one content is one path."""
        if isinstance(path, (list, tuple)):
            return [cls._strip_protocol(p) for p in path]  # type: ignore[return-value]
        text = str(path)
        if text.startswith("kachery://"):  # "kachery::..." as fsspec splits it: see _path
            text = text[len("kachery://"):]
        if not text:
            return ""
        if text[:5].lower() == "sha1:" and not text[5:7] == "//":
            text = "kachery::" + text  # kachery 2's default form, cut at its "::"
        try:
            uri = parse_uri(text)
            return format_uri(uri.sha1, uri.label, manifest=uri.manifest)
        except InvalidInput as exc:  # what fsspec's callers expect of a bad path
            raise ValueError(str(exc)) from None

    def _path(self, path: str) -> str:
        """``path`` as a URI in one form; the empty path of a chained
        ``kachery::sha1:...`` is the ``fo`` fsspec gave."""
        uri = self._strip_protocol(path)
        if not uri and isinstance(self._fo, str):
            uri = self._strip_protocol(self._fo)
        if not uri:
            raise FileNotFoundError("no content URI given")
        return uri

    @classmethod
    def _parent(cls, path: str) -> str:
        return ""

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        uri = self._path(path)
        try:
            size = self.client.size(uri)
        except NotFound as exc:
            raise FileNotFoundError(str(exc)) from None
        return {"name": uri, "size": size, "type": "file"}

    def ls(self, path: str, detail: bool = True, **kwargs: Any):
        info = self.info(path)
        return [info] if detail else [info["name"]]

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
        except (FileNotFoundError, ValueError):
            return False
        return True

    def cat_file(self, path: str, start: int | None = None, end: int | None = None,
                 **kwargs: Any) -> bytes:
        uri = self._path(path)
        if (start is not None and start < 0) or (end is not None and end < 0):
            size = self.info(uri)["size"]
            start = max(0, size + start) if start is not None and start < 0 else start
            end = max(0, size + end) if end is not None and end < 0 else end
        try:
            return self.client.load_bytes(uri, start, end)
        except NotFound as exc:
            raise FileNotFoundError(str(exc)) from None

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None,
              autocommit: bool = True, cache_options: dict | None = None,
              **kwargs: Any) -> KacheryFile:
        if mode != "rb":
            raise PermissionError(f"{path}: content by hash is read-only (mode {mode!r});"
                                  " store new content with kachery_fs.store_file")
        return KacheryFile(self, self._path(path), block_size=block_size,
                           cache_options=cache_options, **kwargs)

    def ukey(self, path: str) -> str:
        return parse_uri(self._path(path)).sha1  # the content never changes


class KacheryFile(AbstractBufferedFile):
    """A read-only file on content by URI; reads fetch (and verify) only what they touch."""

    DEFAULT_BLOCK_SIZE = 1 << 20

    def __init__(self, fs: KacheryFileSystem, path: str, *, block_size: int | None = None,
                 cache_type: str = "readahead", **kwargs: Any):
        try:
            self._handle: ContentHandle | None = fs.client.open_content(path)
        except NotFound as exc:
            raise FileNotFoundError(str(exc)) from None
        super().__init__(fs, path, mode="rb", block_size=block_size or "default",
                         cache_type=cache_type, size=self._handle.size, **kwargs)

    def _fetch_range(self, start: int, end: int) -> bytes:
        if self._handle is None:
            raise ValueError("I/O operation on closed file")
        try:
            return self._handle.read(start, end)
        except KacheryError as exc:
            raise OSError(str(exc)) from exc

    def close(self) -> None:
        super().close()
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()
