"""kachery-fs from Python: content by URI, without a mount.

::

    import kachery_fs

    uri = kachery_fs.store_file("results.csv")   # 'sha1://<hash>?label=results.csv'
    path = kachery_fs.load_file(uri)             # a path in the node's local store
    head = kachery_fs.load_bytes(uri, 0, 100)    # bytes [0, 100), verified
    uri = kachery_fs.store_json({"rate": 30000})
    kachery_fs.load_json(uri)                    # {'rate': 30000}

Every call goes through the parts the mount, ``cat`` and ``put`` use (:mod:`kachery_fs.parts`):
the :class:`~kachery_fs.resolver.Resolver` (the local store, a kachery store on this machine,
the channel's bucket, then a request through the hub that another node answers), which
verifies every byte it returns against the file's SHA-1 or, for a large file read by
chunk, each chunk's SHA-1 in a trusted manifest; and the :class:`~kachery_fs.uploader.Uploader`
(resumable; an upload cut short stays queued, and the next ``put``, ``mount`` or ``serve``
finishes it). URIs are ``sha1://<hash>[...]``, kachery 2's ``kachery:<zone>:sha1:<hash>[:label]``
or a bare hash.

A :class:`Client` runs those parts on a thread of its own, with its own trio event loop,
for as long as it is open, so consecutive calls share connections, downloads in progress
and the chunks of large files already read. The module's functions use one client for the
node in ``$KACHERY_FS_DIR`` (default ``~/.kachery-fs``), opened at the first call and
closed at exit. Calls are blocking and may come from any thread but the client's own (so
not from inside its own callbacks); they work inside a Jupyter cell.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import weakref
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import metrics
from .config import node_dir as default_node_dir
from .errors import InvalidInput, KacheryError, NotFound
from .requester import DEFAULT_STALL_TIMEOUT_S
from .resolver import LocalContent
from .uris import ContentUri, format_uri, parse_uri

if TYPE_CHECKING:
    from .node import Node
    from .parts import Parts
    from .resolver import Content

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How much of a file one read of :meth:`Client.load_file` copies at a time.
READ_STEP = 1 << 20


# -- the shared steps (also those of `cat` and `put`) ---------------------------------

def _channels(parts: Parts, uri: ContentUri, channel: str | None) -> list[str]:
    """Where to look for ``uri``: ``channel``, else every joined channel."""
    if channel is not None:
        parts.node.channels.get(channel)  # NotFound with advice
        return [channel]
    channels = [c.name for c in parts.node.channels.all()]
    if not channels:
        raise NotFound(f"sha1://{uri.sha1} is neither in the local store nor in a kachery"
                       " store on this machine, and this node has joined no channel to look"
                       " in")
    return channels


async def open_uri(parts: Parts, uri: ContentUri, *, channel: str | None = None) -> Content:
    """The verified content ``uri`` names: from this machine, else through ``channel``
    (or the first joined channel that can get it): the bucket, then a request. By chunk
    through the URI's ``?manifest=``, or a manifest the node trusts for the hash (the
    hub's too: looked up first, as the mount's lookup does before its open)."""
    resolver = parts.resolver
    manifest = uri.manifest  # InvalidInput before anything is looked for
    content = await resolver.open_here(uri.sha1)
    if content is not None:
        return content
    errors = []
    for name in _channels(parts, uri, channel):
        try:
            await resolver.size(name, uri.sha1, manifest=manifest)
            return await resolver.open(name, uri.sha1, manifest=manifest)
        except KacheryError as exc:
            errors.append(f"{name}: {exc}")
    raise NotFound(f"could not get sha1://{uri.sha1}: {'; '.join(errors)}")


async def size_of(parts: Parts, uri: ContentUri, *, channel: str | None = None) -> int:
    """The size of the content ``uri`` names, fetching none of it: from this machine, the
    manifest, or the bucket (or, in no bucket, from the node a request reaches, as the
    mount's lookup of ``sha1/<hash>``)."""
    manifest = uri.manifest  # InvalidInput before anything is looked for
    local = parts.node.store.size(uri.sha1)
    if local is not None:
        return local
    errors = []
    for name in _channels(parts, uri, channel):
        try:
            return await parts.resolver.size(name, uri.sha1, manifest=manifest)
        except KacheryError as exc:
            errors.append(f"{name}: {exc}")
    raise NotFound(f"could not find sha1://{uri.sha1}: {'; '.join(errors)}")


async def read_range(content: Content, start: int, end: int, *, via: str = "api") -> bytes:
    """Bytes ``[start, end)`` of ``content`` (clipped to its size), read whole; counted
    as served ``via`` (a metrics label)."""
    end = min(end, content.size)
    pieces = []
    offset = start
    while offset < end:
        piece = await content.read(offset, min(end - offset, READ_STEP))
        if not piece:
            raise KacheryError(f"content ended at byte {offset} of {content.size}")
        pieces.append(piece)
        offset += len(piece)
        metrics.SERVED_BYTES.labels(via).inc(len(piece))
    return b"".join(pieces)


def pick_channel(node: Node, name: str | None, *, choose: str = "--channel") -> str:
    """The channel to upload to: ``name``, else the one channel the node joined
    (``choose``: how the caller names one, for the error's message)."""
    channels = [c.name for c in node.db.channels()]
    if name:
        node.db.channel(name)  # NotFound with advice
        return name
    if len(channels) == 1:
        return channels[0]
    if not channels:
        raise NotFound("this node has joined no channel (see `kachery-fs join HUB_URL CHANNEL`)")
    raise InvalidInput(f"this node has joined several channels ({', '.join(channels)}):"
                       f" choose one with {choose}")


async def store_path(parts: Parts, path: Path, *, label: str | None = None,
                     channel: str | None, upload: bool = True,
                     hashed: Callable[[int], None] | None = None,
                     sent: Callable[[int], None] | None = None,
                     stored: Callable[[str, str], None] | None = None,
                     again: str = "store it again") -> str:
    """Store ``path`` (and, over one chunk, its manifest) in the local store, upload it
    to ``channel`` unless ``upload`` is false, and return its URI (kachery's
    ``?manifest=`` form for a large file). ``hashed(n)``: n more bytes hashed;
    ``sent(n)``: n bytes of the upload in the bucket so far; ``stored(sha1, uri)``: in the
    local store, the upload about to begin.

    A transient failure of the upload (the hub or bucket unreachable) raises with the
    upload left queued, its session saved: the same call again, or the next ``mount``
    or ``serve``, resumes it (``again`` says how, in the error's message)."""
    node = parts.node
    target = pick_channel(node, channel, choose="channel=") if upload else None
    sha1, size, manifest = await trio.to_thread.run_sync(
        partial(node.store.add_file_with_manifest, path, progress=hashed))
    uri = format_uri(sha1, label if label is not None else path.name,
                     manifest=manifest.hash if manifest is not None else None)
    if stored is not None:
        stored(sha1, uri)
    if target is None:
        return uri
    await upload_stored(parts, target, sha1, size, uri, what=str(path), sent=sent,
                        again=again)
    return uri


async def upload_stored(parts: Parts, channel: str, sha1: str, size: int, uri: str, *,
                        what: str | None = None,
                        sent: Callable[[int], None] | None = None,
                        again: str = "store it again") -> None:
    """Upload stored content ``sha1`` (and its manifest, if it has one) to ``channel``,
    now; see :func:`store_path` for what a failure leaves."""
    try:
        # (A manifest goes up first, with the file's finalize: the uploader.)
        await parts.uploader.upload_now(channel, sha1, size, on_progress=sent, retry=False)
    except KacheryError as exc:
        up = parts.node.db.upload(channel, sha1)
        if up is not None and up.state == "failed":
            raise  # refused: retrying would not help
        raise KacheryError(
            f"{what or uri}: {exc}; the upload of {uri} stays queued: {again} to resume"
            " it, or the next `kachery-fs mount` or `kachery-fs serve` finishes it") from None


# -- the client -----------------------------------------------------------------------

class Client:
    """A node's read and upload paths, running on a thread of their own until
    :meth:`close` (or the end of a ``with`` block).

    ``node_dir``: the node's directory (default ``$KACHERY_FS_DIR``, else
    ``~/.kachery-fs``), created if missing (a node that has joined no channel reads only
    what this machine holds). ``channel``: where to look and upload (default: look in
    every joined channel, upload to the only one). ``request_timeout``: how long a file
    requested from other nodes may make no progress before the read fails."""

    def __init__(self, node_dir: str | os.PathLike[str] | None = None, *,
                 channel: str | None = None,
                 request_timeout: float = DEFAULT_STALL_TIMEOUT_S):
        self.node_dir = Path(node_dir).expanduser().resolve() if node_dir \
            else default_node_dir()
        self.channel = channel
        self.request_timeout = request_timeout
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._parts: Parts | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False
        _open_clients.add(self)  # closed at exit, if not before

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<kachery_fs.Client {self.node_dir}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # -- reads --------------------------------------------------------------------------

    def load_file(self, uri: str) -> str:
        """The path of the content ``uri`` names, in this node's local store: fetched
        whole and verified if it is not there yet. Read it; do not write to it. It stays
        while the store keeps it (always, with no ``cache-size``; otherwise until it is
        the least recently used content over the limit): copy it to keep it."""
        parsed = parse_uri(uri)
        return self._run(partial(self._load_file, parsed))

    def load_bytes(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of the content ``uri`` names (default: all of it), each
        verified before it is returned. A large file with a manifest (kachery's
        ``sha1://…?manifest=`` URI) is read by chunk: only the chunks the range touches
        are fetched."""
        parsed = parse_uri(uri)
        if (start is not None and start < 0) or (end is not None and end < 0):
            raise InvalidInput(f"byte offsets are counted from 0: start={start}, end={end}")
        return self._run(partial(self._load_bytes, parsed, start or 0, end))

    def size(self, uri: str) -> int:
        """The size in bytes of the content ``uri`` names (for a large file with a
        manifest, without fetching any of it)."""
        parsed = parse_uri(uri)
        return self._run(partial(self._size, parsed))

    def open_content(self, uri: str) -> ContentHandle:
        """An open handle on the content ``uri`` names, for many reads of ranges of it
        (``handle.read(start, end)``, ``handle.size``), each verified; close it when
        done. A large file's chunks already read stay with the handle."""
        parsed = parse_uri(uri)
        content = self._run(partial(self._open_only, parsed))
        return ContentHandle(self, parsed, content)

    def load_json(self, uri: str) -> Any:
        """The JSON document ``uri`` names, parsed."""
        data = self.load_bytes(uri)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{uri} is not a JSON document: {exc}") from None

    def load_text(self, uri: str, encoding: str = "utf-8") -> str:
        return self.load_bytes(uri).decode(encoding)

    def open(self, uri: str, *, block_size: int = 1 << 20, **kwargs: Any):
        """A seekable, read-only binary file on the content ``uri`` names, fetched
        lazily and verified (see :mod:`kachery_fs.fsspec`): what h5py and pynwb open."""
        from .fsspec import KacheryFileSystem

        return KacheryFileSystem(client=self).open(uri, "rb", block_size=block_size,
                                                   **kwargs)

    # -- writes -------------------------------------------------------------------------

    def store_file(self, path: str | os.PathLike[str], *, label: str | None = None,
                   upload: bool = True) -> str:
        """Store the file at ``path`` in the local store, upload it to the channel (unless
        ``upload=False``) and return its URI, ``sha1://<hash>?label=<name>`` (kachery's
        ``sha1://<hash>/<name>?manifest=<hash>`` for a file over 20,000,000 bytes). The
        upload resumes where it stopped if it was interrupted."""
        source = Path(path)
        if source.is_dir():
            raise InvalidInput(f"{path} is a directory: store_file takes a file")
        if not source.is_file():
            raise NotFound(f"{path}: no such file" if not source.exists()
                           else f"{path} is not a regular file")
        return self._run(partial(self._store, source, label, upload))

    def store_bytes(self, data: bytes, *, label: str | None = None,
                    upload: bool = True) -> str:
        """:meth:`store_file` for bytes in memory."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"store_bytes takes bytes, not {type(data).__name__}")
        return self._run(partial(self._store_bytes, bytes(data), label, upload))

    def store_json(self, obj: Any, *, label: str | None = None, upload: bool = True) -> str:
        """Store ``obj`` as JSON (compact, keys sorted, so equal objects get one hash)."""
        try:
            text = json.dumps(obj, separators=(",", ":"), sort_keys=True,
                              allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"cannot store this as JSON: {exc}") from None
        return self.store_bytes(text.encode(), label=label, upload=upload)

    def store_text(self, text: str, *, label: str | None = None, upload: bool = True) -> str:
        return self.store_bytes(text.encode(), label=label, upload=upload)

    # -- life -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the client's parts (downloads in progress end; what they fetched is
        reported to the hubs). Calls after this raise."""
        with self._lock:
            self._closed = True
            token, stop, thread = self._token, self._stop, self._thread
            self._token = self._stop = self._thread = None
        if token is not None and stop is not None and self._pid == os.getpid():
            try:
                trio.from_thread.run_sync(stop.set, trio_token=token)
            except trio.RunFinishedError:
                pass
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)

    def _start(self) -> None:
        with self._lock:
            if self._closed:
                raise KacheryError(f"{self!r} is closed")
            if self._pid != os.getpid():  # forked: the parent's thread is not here
                self._token = self._stop = self._thread = self._parts = None
                self._pid = os.getpid()
            if self._token is not None:
                return
            started: list[BaseException | None] = []
            ready = threading.Event()
            thread = threading.Thread(target=trio.run, args=(self._main, started, ready),
                                      name=f"kachery-fs {self.node_dir}", daemon=True)
            thread.start()
            ready.wait()
            if started and started[0] is not None:
                thread.join()
                raise started[0]
            self._thread = thread

    async def _main(self, started: list[BaseException | None], ready: threading.Event) -> None:
        from .node import Node
        from .parts import running

        try:
            node = Node(self.node_dir, create=True)
        except BaseException as exc:
            started.append(exc)
            ready.set()
            return
        try:
            async with running(node, upload_workers=0, keep_cache=False,
                               request_timeout=self.request_timeout) as parts:
                self._parts = parts
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                started.append(None)
                ready.set()
                await self._stop.wait()
        except BaseException as exc:  # noqa: BLE001 - the thread's end: said once, here
            if not started:
                started.append(exc)
            elif isinstance(exc, KacheryError):
                log.error("the kachery-fs client of %s stopped: %s; the next call starts"
                          " it again", self.node_dir, exc)
            else:
                log.exception("the kachery-fs client of %s stopped; the next call starts it"
                              " again", self.node_dir)
        finally:
            # The next call (unless closed) starts the parts again, on a new thread.
            self._token = self._stop = self._parts = None
            ready.set()
            await node.aclose()

    def _run(self, fn: Callable[[Parts], Awaitable[T]]) -> T:
        """``fn(parts)`` on the client's thread; a KeyboardInterrupt while it runs (Ctrl-C
        in a terminal, Jupyter's interrupt) cancels it there too."""
        self._start()
        token = self._token
        if token is None:
            raise KacheryError(f"{self!r} has stopped")
        scope = trio.CancelScope()  # entered there, cancelled from here

        async def call() -> T:
            parts = self._parts
            if parts is None:
                raise KacheryError(f"{self!r} has stopped")
            with scope:
                return await fn(parts)
            raise KacheryError("interrupted")  # cancelled by the interrupt below

        try:
            return trio.from_thread.run(call, trio_token=token)
        except (trio.Cancelled, trio.RunFinishedError):  # its event loop ended meanwhile
            raise KacheryError(f"{self!r} stopped during the call; call again to start it"
                               " again") from None
        except KeyboardInterrupt:
            try:  # (a scope cancelled before it is entered cancels what enters it)
                trio.from_thread.run_sync(scope.cancel, trio_token=token)
            except trio.RunFinishedError:
                pass
            raise

    # -- on the client's thread -------------------------------------------------------

    async def _open(self, parts: Parts, uri: ContentUri) -> Content:
        return await open_uri(parts, uri, channel=self.channel)

    async def _open_only(self, uri: ContentUri, parts: Parts) -> Content:
        return await self._open(parts, uri)

    async def _load_file(self, uri: ContentUri, parts: Parts) -> str:
        store = parts.node.store
        content: Content | None = await self._open(parts, uri)
        if isinstance(content, LocalContent):  # whole and verified in the store already
            content.close()
            content = None
        try:
            offset = 0
            while content is not None and offset < content.size:
                # A download or a read by chunk ends in the store.
                piece = await content.read(offset, READ_STEP)
                if not piece:
                    raise KacheryError(f"{uri} ended at byte {offset} of {content.size}")
                offset += len(piece)
        finally:
            if content is not None:
                content.close()
        final = store.path(uri.sha1)
        for _ in range(200):  # a file read by chunk is installed moments after its end
            if final.exists():
                return str(final)
            if store.has(uri.sha1):  # written through a mount, not yet moved from pending/
                await trio.to_thread.run_sync(store.sync_pending, uri.sha1)
                await trio.to_thread.run_sync(store.install_pending, [uri.sha1])
            else:
                await trio.sleep(0.05)
        raise KacheryError(f"{uri} was read and verified but is not in the local store"
                           f" ({final.parent}): is the disk full?")

    async def _load_bytes(self, uri: ContentUri, start: int, end: int | None,
                          parts: Parts) -> bytes:
        content = await self._open(parts, uri)
        try:
            return await read_range(content, start, content.size if end is None else end)
        finally:
            content.close()

    async def _size(self, uri: ContentUri, parts: Parts) -> int:
        return await size_of(parts, uri, channel=self.channel)

    async def _store(self, path: Path, label: str | None, upload: bool, parts: Parts) -> str:
        return await store_path(parts, path, label=label, channel=self.channel,
                                upload=upload)

    async def _store_bytes(self, data: bytes, label: str | None, upload: bool,
                           parts: Parts) -> str:
        store = parts.node.store
        target = pick_channel(parts.node, self.channel, choose="channel=") if upload else None

        def add() -> tuple[str, str | None]:
            sha1 = store.add_bytes(data)
            manifest = store.make_manifest(sha1)
            return sha1, manifest.hash if manifest is not None else None

        sha1, manifest = await trio.to_thread.run_sync(add)
        uri = format_uri(sha1, label, manifest=manifest)
        if target is not None:
            await upload_stored(parts, target, sha1, len(data), uri)
        return uri


class ContentHandle:
    """Content opened by :meth:`Client.open_content`: reads of ranges, verified."""

    def __init__(self, client: Client, uri: ContentUri, content: Content):
        self.client = client
        self.uri = uri
        self.size: int = content.size
        self._content: Content | None = content

    def read(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` (clipped to the size)."""
        content = self._content
        if content is None:
            raise InvalidInput(f"{self.uri} is closed")
        if start < 0 or end < start:
            raise InvalidInput(f"not a range of bytes: [{start}, {end})")

        async def read(_parts: Parts) -> bytes:
            return await read_range(content, start, end)

        return self.client._run(read)

    def close(self) -> None:
        content, self._content = self._content, None
        if content is not None:
            async def close(_parts: Parts) -> None:
                content.close()
            try:
                self.client._run(close)
            except KacheryError:  # the client has stopped: its contents are gone too
                pass

    def __enter__(self) -> ContentHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- the module's functions: one client for $KACHERY_FS_DIR -------------------------------

_default: Client | None = None
_default_lock = threading.Lock()


def client() -> Client:
    """The client the module's functions use: for ``$KACHERY_FS_DIR`` (default
    ``~/.kachery-fs``), opened at the first call, closed at exit."""
    global _default
    with _default_lock:
        if _default is None or _default._closed or _default.node_dir != default_node_dir():
            if _default is not None:
                _default.close()
            _default = Client()
        return _default


#: Every client not yet collected: those still open at exit are closed then, so that
#: what their downloads fetched is reported to the hubs.
_open_clients: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for c in list(_open_clients):
        c.close()


def load_file(uri: str) -> str:
    return client().load_file(uri)


def load_bytes(uri: str, start: int | None = None, end: int | None = None) -> bytes:
    return client().load_bytes(uri, start, end)


def load_json(uri: str) -> Any:
    return client().load_json(uri)


def load_text(uri: str) -> str:
    return client().load_text(uri)


def store_file(path: str | os.PathLike[str], *, label: str | None = None) -> str:
    return client().store_file(path, label=label)


def store_json(obj: Any, *, label: str | None = None) -> str:
    return client().store_json(obj, label=label)


def store_text(text: str, *, label: str | None = None) -> str:
    return client().store_text(text, label=label)


def open(uri: str, **kwargs: Any):  # noqa: A001 (kachery_fs.open, as fsspec.open)
    return client().open(uri, **kwargs)


for _name, _method in (("load_file", Client.load_file), ("load_bytes", Client.load_bytes),
                       ("load_json", Client.load_json), ("load_text", Client.load_text),
                       ("store_file", Client.store_file), ("store_json", Client.store_json),
                       ("store_text", Client.store_text), ("open", Client.open)):
    globals()[_name].__doc__ = _method.__doc__
