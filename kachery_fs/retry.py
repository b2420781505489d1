"""The retry policy of kachery-fs: what is worth another try, how long to wait, how often.

Every retry in kachery-fs, bounded or not, is built from the pieces here, so that one bad
answer is treated the same way whichever component met it.

**What is transient.** :func:`is_transient` is the one definition. Transient are:

- :class:`~kachery_fs.errors.Unavailable`: a ``5xx``, ``408`` or ``429`` answer (mapped
  by :func:`kachery_fs._http.error_for_response`), a service that said to come back later;
- its subclass :class:`~kachery_fs.errors.DeadlineExceeded` when it is one network wait
  that timed out (an ``httpx`` connect, read, write or pool timeout);
- the ``httpx`` transport errors that :func:`kachery_fs._http.error_for_exception` maps to
  those two: a refused, reset or dropped connection, a name that did not resolve, a
  connection closed in the middle of an answer, a timeout.

Nothing else is: not found, permission (including a server whose TLS certificate is not
trusted here, which ``error_for_exception`` maps to ``PermissionDenied``), invalid input,
integrity (bytes that do not match their hash), conflict, a protocol violation, a full
disk, and every exception that is not a :class:`~kachery_fs.errors.KacheryError` (a bug).
Asking again would get the same answer, so these surface at once. A component that knows
better for one operation says so explicitly (a ranged GET retries a truncated body with
``retrying(..., also=(IntegrityError,))``; the background uploader retries most errors,
because nobody waits on it and the hub or the file may change). Cancellation (a caller's
trio deadline) is never caught: it is a ``BaseException``.

**How long to wait.** :class:`Backoff`: exponential from :data:`BASE_DELAY_S` (0.25 s),
doubling each time up to a cap; the delay is drawn uniformly between half the current
step and the whole of it (jitter, so that nodes that failed together do not retry
together), and never exceeds the cap. Caps: :data:`MAX_DELAY_S` (30 s) for bounded
retries, :data:`FOREGROUND_MAX_S` (5 s) for long-running loops that someone is waiting on
(a file request, a provider's listen: they reconnect soon after a hub comes back), and
:data:`BACKGROUND_MAX_S` (60 s) for background work nobody waits on (the upload queue,
feed publishing). A loop resets its backoff after a success.

**Retry-After.** A server's hint (``Retry-After`` in seconds or as an HTTP date, carried
as ``Unavailable.retry_after``) is honoured: the delay is at least the hint, but never
more than the cap (a server cannot park us for an hour).

**How often.** :func:`retrying` tries :data:`ATTEMPTS` (5) times by default, then raises
the last transient error. Long-running loops do not count: they stop when their owner
cancels them or when their own stall deadline passes.

**Deadlines.** The caller bounds the total time with a trio cancel scope. :func:`pause`
(and so :func:`retrying`) does not begin a wait that would end past the effective
deadline: it raises the last error at once, so the caller learns why rather than only
that time ran out. A loop whose deadline means "no progress for N seconds" and which
reports the stall itself passes ``at_deadline="wait"``: the wait is cut at the deadline
and the loop's cancel scope (or its own check) ends it.

**Where.** Bounded (:func:`retrying`): the lookup ``HEAD`` and each ranged ``GET`` of a
download (``bucket``), the first ``requestFile`` of a file request (``requester``).
Long-running (:class:`Backoff` and :func:`pause`): a resumable upload asking its session
where to resume (``resumable``), a file request's long-poll (``requester``), a provider's
listen (``provider``), the upload queue (``uploader``), ``feed read --follow`` and the
feed engine. Download reports (``demand``) are not retried in a loop: one that fails
transiently is kept for the next report. The hub's Google Cloud Storage backend calls
``google-cloud-storage`` in worker threads, where trio cannot sleep, and uses that
library's own retry, bounded by its call timeout, on the same transient set (``429``,
``5xx``, connection errors).

**Why our own.** ``stamina`` (26.1) and ``tenacity`` (9.2) were considered. Both can
sleep with trio and both can be taught a custom wait (a Retry-After hook), but neither
knows trio's cancel-scope deadline: they would start a sleep that the deadline cancels,
and the caller would see a bare cancellation instead of the last error. They also only
model bounded retries of one call, while most of our loops run until cancelled and keep
state between tries (a resumable session, the upload queue's record), and stamina's
jitter is added on top of the delay rather than drawn within it. The pieces here are
forty lines and add no dependency, so kachery-fs keeps its own.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import httpx
import trio

from ._http import error_for_exception
from .errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The first delay's upper bound, in seconds; each further delay doubles it.
BASE_DELAY_S = 0.25
#: How much each delay grows over the previous one.
FACTOR = 2.0
#: The cap of a bounded retry's delay (and of the Retry-After it honours).
MAX_DELAY_S = 30.0
#: The cap for long-running loops that someone is waiting on.
FOREGROUND_MAX_S = 5.0
#: The cap for background loops that nobody is waiting on.
BACKGROUND_MAX_S = 60.0
#: How many times :func:`retrying` tries by default (the first try included).
ATTEMPTS = 5


class Backoff:
    """Exponential backoff with jitter, honouring a server's ``Retry-After``.

    ``attempt`` counts the delays handed out since the last :meth:`reset`.
    """

    def __init__(self, *, initial: float = BASE_DELAY_S, maximum: float = MAX_DELAY_S,
                 factor: float = FACTOR):
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.attempt = 0

    def next_delay(self, retry_after: float | None = None) -> float:
        cap = min(self.maximum, self.initial * (self.factor ** self.attempt))
        self.attempt += 1
        delay = random.uniform(cap / 2, cap)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.maximum))
        return delay

    def reset(self) -> None:
        self.attempt = 0


def foreground() -> Backoff:
    """The backoff of a long-running loop that someone is waiting on (capped at 5 s)."""
    return Backoff(maximum=FOREGROUND_MAX_S)


def background() -> Backoff:
    """The backoff of a background loop that nobody is waiting on (capped at 60 s)."""
    return Backoff(maximum=BACKGROUND_MAX_S)


def as_error(exc: BaseException, what: str) -> BaseException:
    """``exc`` in the project's tree: an ``httpx`` error is mapped by
    :func:`kachery_fs._http.error_for_exception`; anything else is returned unchanged."""
    if isinstance(exc, httpx.HTTPError):
        return error_for_exception(exc, what)
    return exc


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed (see the module's docstring for the list)."""
    return isinstance(as_error(exc, "request"), Unavailable)


def retry_after(exc: BaseException) -> float | None:
    """The server's Retry-After hint that came with ``exc``, in seconds, if any."""
    return getattr(exc, "retry_after", None)


async def pause(backoff: Backoff, err: BaseException, *, what: str | None = None,
                level: int = logging.INFO,
                at_deadline: Literal["raise", "wait"] = "raise") -> float:
    """Wait before the next try after ``err``: the next delay of ``backoff`` (at least the
    server's Retry-After, up to the cap), logged in one line at ``level``; return it.

    ``what`` (the operation, for the log line) prefixes ``err``'s message. If the delay
    would end past the caller's effective trio deadline, ``at_deadline="raise"`` raises
    ``err`` (mapped into the project's tree) at once; ``"wait"`` waits until the deadline
    only and lets the caller's cancel scope or stall check end the loop.
    """
    err = as_error(err, what or "request")
    delay = backoff.next_delay(retry_after(err))
    remaining = trio.current_effective_deadline() - trio.current_time()
    if delay >= remaining:
        if at_deadline == "raise":
            raise err from None
        delay = max(0.0, remaining)
    log.log(level, "%s%s; retrying in %.1f s", f"{what}: " if what else "", err, delay)
    await trio.sleep(delay)
    return delay


async def retrying(operation: Callable[[], Awaitable[T]], *, what: str,
                   attempts: int = ATTEMPTS, backoff: Backoff | None = None,
                   also: tuple[type[Exception], ...] = (),
                   at_deadline: Literal["raise", "wait"] = "raise") -> T:
    """Run ``operation`` and retry it on a transient error (:func:`is_transient`) with
    backoff; return its result.

    Other errors propagate at once (an ``httpx`` one mapped into the project's tree), as
    does the last transient error after ``attempts`` tries, or as soon as the next try
    could not begin before the caller's trio deadline. ``also`` names further errors that
    this operation knows to be worth another try (a truncated body). ``at_deadline`` is
    :func:`pause`'s: ``"wait"`` under a stall deadline that its owner reports.
    """
    backoff = backoff or Backoff()
    while True:
        try:
            return await operation()
        except Exception as exc:
            err = as_error(exc, what)
            if not isinstance(err, (Unavailable, *also)):
                if err is exc:
                    raise
                raise err from None
        if backoff.attempt + 1 >= attempts:
            raise err from None
        await pause(backoff, err, at_deadline=at_deadline)
