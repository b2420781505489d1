"""Wake-ups of the hub's long-polls, in this process and in every other hub process on the
same database.

A long-poll (a provider's ``listenRequests``, a requester's ``requestFile``, a node's
``watchFeeds``) waits on an event of this process. What changes the state it waits on
sends a wake-up of a *kind* and a *key* (``"o"`` and a provider's node id: its offers
changed; ``"r"`` and ``channel/sha1``: a file request changed; ``"f"`` and
``channel/feed/subfeed``: a subfeed's count grew), after writing the rows.

* :class:`Wakeups` (one hub process, SQLite): the wake-up runs the handler of its kind in
  this process, at once.
* :class:`PostgresWakeups`: also ``pg_notify`` on the database (delivered when the
  transaction that sent it commits, so the rows are there first), and a thread of its own
  ``LISTEN``\\ s and hands what other hub processes sent to the same handlers.

A wake-up is a hint: the rows stay the truth. A woken long-poll reads them again, every
long-poll reads them again every :data:`RECHECK_S` anyway, and after the listening
connection was lost (notifications missed meanwhile) every long-poll of the process is
woken. A missed notification costs latency, never correctness.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable

import trio

from .database import KEEPALIVES

log = logging.getLogger(__name__)

#: The longest a long-poll waits without reading the rows again.
RECHECK_S = 5.0
#: The PostgreSQL notification channel of kachery-fs hubs.
CHANNEL = "kachery_fs_hub"
#: Pause before listening again after the listening connection failed (doubling).
RELISTEN_S = (0.2, 5.0)


class Wakeups:
    """Wake-ups within this process (see the module docstring)."""

    def __init__(self, hub_id: str | None = None):
        #: This hub process among those on one database (random at each start).
        self.hub_id = hub_id or secrets.token_hex(4)
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._wake_all: list[Callable[[], None]] = []

    def on(self, kind: str, handler: Callable[[str], None], *,
           wake_all: Callable[[], None]) -> None:
        """``handler(key)`` for wake-ups of ``kind``; ``wake_all()`` when any may have been
        missed."""
        assert len(kind) == 1 and kind not in self._handlers
        self._handlers[kind] = handler
        self._wake_all.append(wake_all)

    def send(self, kind: str, key: str) -> None:
        self._dispatch(kind, key)

    def _dispatch(self, kind: str, key: str) -> None:
        handler = self._handlers.get(kind)
        if handler is not None:
            handler(key)

    def _everyone(self) -> None:
        for wake in self._wake_all:
            wake()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Receive the wake-ups of other processes until cancelled (none here)."""
        task_status.started()


class PostgresWakeups(Wakeups):
    """Wake-ups through PostgreSQL's ``NOTIFY``/``LISTEN`` as well."""

    def __init__(self, database, hub_id: str | None = None):
        """``database``: the hub's :class:`~kachery_fs.hub.database.PostgresDatabase`
        (notifications are sent on its connection, inside its transactions)."""
        super().__init__(hub_id)
        self._db = database
        self._warned_at = -60.0

    def send(self, kind: str, key: str) -> None:
        self._dispatch(kind, key)
        self._db.execute("SELECT pg_notify(?, ?)", (CHANNEL, f"{self.hub_id} {kind}{key}"))

    def _received(self, payload: str) -> None:
        """A notification from the database: anyone who may connect to it can send one,
        so one that is not a wake-up of ours is dropped with a warning (at most one a
        minute), never allowed to stop the listening."""
        sender, _, message = payload.partition(" ")
        if sender == self.hub_id or not message:
            return
        try:
            self._dispatch(message[0], message[1:])
        except Exception as exc:
            now = time.monotonic()
            if now - self._warned_at >= 60:
                self._warned_at = now
                log.warning("ignored a notification on %s that is not a kachery-fs hub's"
                            " wake-up (%r: %s)", CHANNEL, payload[:100], exc)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``task_status.started()`` once the first ``LISTEN`` is
        in force."""
        import psycopg

        token = trio.lowlevel.current_trio_token()
        stop = threading.Event()
        listening = trio.Event()
        url = self._db.url

        def call(fn, *args) -> bool:
            try:
                trio.from_thread.run_sync(fn, *args, trio_token=token)
            except trio.RunFinishedError:
                stop.set()
                return False
            return True

        def connected() -> None:
            if listening.is_set():
                log.info("listening for other hub processes' wake-ups again")
            listening.set()
            self._everyone()  # what was sent while no connection listened

        def listen() -> None:
            pause = RELISTEN_S[0]
            while not stop.is_set():
                try:
                    with psycopg.connect(url, autocommit=True, connect_timeout=10,
                                         application_name="kachery-fs hub (listen)",
                                         **KEEPALIVES) as conn:
                        conn.execute(f"LISTEN {CHANNEL}")
                        if not call(connected):
                            return
                        pause = RELISTEN_S[0]
                        while not stop.is_set():
                            for note in conn.notifies(timeout=0.5):
                                if not call(self._received, note.payload):
                                    return
                except psycopg.Error as exc:
                    if stop.is_set():
                        return
                    log.warning("listening for other hub processes' wake-ups failed (%s);"
                                " again in %.1f s (long-polls read the state every %.0f s"
                                " meanwhile)", str(exc).strip(), pause, RECHECK_S)
                    stop.wait(pause)
                    pause = min(pause * 2, RELISTEN_S[1])

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: trio.to_thread.run_sync(listen,
                                                                   abandon_on_cancel=True))
                await listening.wait()
                task_status.started()
        finally:
            stop.set()
