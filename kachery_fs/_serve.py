"""Serve an ASGI app over HTTP with hypercorn's trio worker, inside the caller's nursery.

Every server kachery-fs runs goes through :func:`serve_asgi`, so every socket it answers
on has ``TCP_NODELAY``: hypercorn sets it on the listening socket, Linux hands it down
to accepted sockets, and trio's ``SocketStream`` sets it again on each one. Without it
small responses (a ``308`` to an upload chunk, a JSON answer) wait for Nagle's delayed
ACK and every round trip costs tens of milliseconds.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import hypercorn.trio.tcp_server
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from .errors import InvalidInput

log = logging.getLogger(__name__)

# hypercorn reads a connection 64 KiB at a time (``MAX_RECV``), and every read then goes
# through h11 and the ASGI queue in Python: request bodies (uploads to the local bucket)
# top out near 100 MiB/s. Reading 1 MiB at a time measured +40% on a 2-core machine.
# hypercorn has no setting for it, so the module constant is raised where it exists.
_RECV_SIZE = 1 << 20
if getattr(hypercorn.trio.tcp_server, "MAX_RECV", _RECV_SIZE) < _RECV_SIZE:
    hypercorn.trio.tcp_server.MAX_RECV = _RECV_SIZE


@dataclass(frozen=True)
class Tls:
    """A server's certificate chain and private key (PEM files), for https."""

    cert_file: Path
    key_file: Path

    def check(self) -> Tls:
        """InvalidInput, naming the file, unless both load as a certificate and its key."""
        for path in (self.cert_file, self.key_file):
            if not Path(path).is_file():
                raise InvalidInput(f"TLS file {path} does not exist")
        try:
            # No passphrase: OpenSSL would otherwise ask for one on the terminal.
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(self.cert_file), str(self.key_file), password="")
        except (ssl.SSLError, OSError) as exc:
            raise InvalidInput(f"TLS certificate {self.cert_file} and key {self.key_file} do"
                               f" not load together (a key must be unencrypted): {exc}"
                               ) from None
        return self


def server_config(host: str, port: int, tls: Tls | None = None) -> Config:
    """The hypercorn configuration of our servers: one bind (https with ``tls``), no access
    log. Idle connections close after hypercorn's 5 s keep-alive timeout and incomplete
    request heads with it; a TLS handshake gets 10 s. Request bodies are timed by the
    apps (each knows how long its bodies may take)."""
    config = Config()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("kachery_fs.http")
    config.include_server_header = False
    config.keep_alive_timeout = 5
    # Connections waiting to be accepted: a hub's nodes reconnect together (after a restart,
    # say), and each holds long-polls; hypercorn's default of 100 drops the rest of a burst.
    config.backlog = 1024
    config.ssl_handshake_timeout = 10
    if tls is not None:
        config.certfile, config.keyfile = str(tls.cert_file), str(tls.key_file)
    return config


async def serve_asgi(app, *, host: str, port: int, tls: Tls | None = None,
                     shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` on ``host:port`` until cancelled, or until ``shutdown_trigger`` returns.

    ``port=0`` picks a free port; ``task_status.started(port)`` reports the port actually
    bound, once the socket is listening. Cancelling stops at once; ``shutdown_trigger``
    stops gracefully (requests in flight get hypercorn's grace period to finish).
    """
    config = server_config(host, port, tls)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config,
                                            shutdown_trigger=shutdown_trigger))
        bound = _port_of(binds[0])
        log.debug("serving on %s", binds[0])
        task_status.started(bound)


def _port_of(bind: str) -> int:
    """The port of a hypercorn bind description such as ``http://127.0.0.1:8080``."""
    return int(bind.rsplit(":", 1)[1])
