"""systemd's readiness protocol (``Type=notify``), without libsystemd.

A service started with ``Type=notify`` finds the manager's socket in ``$NOTIFY_SOCKET``
and sends it ``READY=1`` once it serves (``STOPPING=1`` when it begins to stop): see
sd_notify(3). Outside systemd the variable is unset and :func:`notify` does nothing.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    """Send ``state`` (``"READY=1"``, ``"STOPPING=1"``...) to ``$NOTIFY_SOCKET``, if set.

    An AF_UNIX datagram socket: a path, or with a leading ``@`` a name in the abstract
    namespace. Never raises: a service manager that cannot be told is no reason to stop
    serving (a debug log line says why)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET=%s: not an AF_UNIX address; %s not sent", address, state)
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in a path
        log.debug("could not send %s to NOTIFY_SOCKET %s: %s", state,
                  os.environ.get("NOTIFY_SOCKET"), exc)
