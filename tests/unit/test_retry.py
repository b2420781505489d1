"""The retry policy (kachery_fs.retry): what is transient, backoff, Retry-After, attempts and
deadlines. Time is trio's autojump clock, so waits cost nothing."""

from __future__ import annotations

import ssl

import httpx
import pytest
import trio

from kachery_fs import retry
from kachery_fs.errors import (
    Conflict,
    DeadlineExceeded,
    IntegrityError,
    InvalidInput,
    NoSpace,
    NotFound,
    PermissionDenied,
    ProtocolError,
    Unavailable,
)
from kachery_fs.retry import Backoff, is_transient, pause, retrying

REQUEST = httpx.Request("GET", "http://bucket.test/x")


# -- what is transient -------------------------------------------------------------------


@pytest.mark.parametrize("exc", [
    Unavailable("HTTP 503"),
    Unavailable("HTTP 429", retry_after=3),
    DeadlineExceeded("timed out"),
    httpx.ConnectError("refused", request=REQUEST),
    httpx.ReadError("reset", request=REQUEST),
    httpx.RemoteProtocolError("closed mid-answer", request=REQUEST),
    httpx.ReadTimeout("slow", request=REQUEST),
    httpx.ConnectTimeout("slow", request=REQUEST),
    httpx.PoolTimeout("busy", request=REQUEST),
])
def test_transient(exc):
    assert is_transient(exc)


def _untrusted_certificate() -> httpx.ConnectError:
    cause = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cause.verify_message = "self-signed certificate"
    exc = httpx.ConnectError("TLS", request=REQUEST)
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize("exc", [
    NotFound("HTTP 404"),
    PermissionDenied("HTTP 403"),
    InvalidInput("HTTP 400"),
    IntegrityError("sha1 mismatch"),
    Conflict("HTTP 412"),
    ProtocolError("200 to a Range request"),
    NoSpace("disk full"),
    ValueError("a bug"),
    _untrusted_certificate(),
])
def test_not_transient(exc):
    assert not is_transient(exc)


# -- backoff -----------------------------------------------------------------------------


def test_backoff_grows_with_jitter_up_to_its_cap():
    b = Backoff(initial=1.0, maximum=8.0)
    for step in (1.0, 2.0, 4.0, 8.0, 8.0, 8.0):
        delay = b.next_delay()
        assert step / 2 <= delay <= step
    b.reset()
    assert b.next_delay() <= 1.0


def test_retry_after_is_honoured_up_to_the_cap():
    assert Backoff(initial=0.25, maximum=30.0).next_delay(7.0) >= 7.0
    assert Backoff(initial=0.25, maximum=5.0).next_delay(3600.0) == 5.0
    assert retry.foreground().maximum == retry.FOREGROUND_MAX_S
    assert retry.background().maximum == retry.BACKGROUND_MAX_S


# -- retrying ----------------------------------------------------------------------------


class Flaky:
    """Fails with ``errors`` in turn, then returns "ok"; counts calls and their times."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls: list[float] = []

    async def __call__(self) -> str:
        self.calls.append(trio.current_time())
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def test_retrying_retries_transient_errors(autojump_clock):
    op = Flaky(Unavailable("HTTP 503"), httpx.ConnectError("refused", request=REQUEST))
    assert await retrying(op, what="GET x") == "ok"
    assert len(op.calls) == 3


async def test_retrying_surfaces_other_errors_at_once(autojump_clock):
    op = Flaky(NotFound("HTTP 404"))
    with pytest.raises(NotFound):
        await retrying(op, what="GET x")
    assert len(op.calls) == 1
    op = Flaky(_untrusted_certificate())
    with pytest.raises(PermissionDenied, match="not trusted"):
        await retrying(op, what="GET x")
    assert len(op.calls) == 1


async def test_retrying_maps_httpx_errors_into_the_tree(autojump_clock):
    op = Flaky(*[httpx.ReadTimeout("slow", request=REQUEST)] * 5)
    with pytest.raises(DeadlineExceeded, match="GET x: timed out"):
        await retrying(op, what="GET x")


async def test_attempts_bound_the_tries(autojump_clock):
    op = Flaky(*[Unavailable(f"HTTP 503 #{i}") for i in range(10)])
    with pytest.raises(Unavailable, match="#3"):
        await retrying(op, what="GET x", attempts=4)
    assert len(op.calls) == 4


async def test_also_names_further_retryable_errors(autojump_clock):
    op = Flaky(IntegrityError("truncated"))
    assert await retrying(op, what="GET x", also=(IntegrityError,)) == "ok"
    assert len(op.calls) == 2


async def test_retrying_honours_retry_after(autojump_clock):
    op = Flaky(Unavailable("HTTP 429", retry_after=4.0))
    assert await retrying(op, what="GET x") == "ok"
    assert op.calls[1] - op.calls[0] >= 4.0


async def test_a_deadline_that_cannot_fit_the_next_delay_raises_the_last_error_at_once(
        autojump_clock):
    op = Flaky(*[Unavailable("HTTP 503", retry_after=10.0)] * 3)
    start = trio.current_time()
    with trio.move_on_after(5) as scope, pytest.raises(Unavailable, match="HTTP 503"):
        await retrying(op, what="GET x")
    assert not scope.cancelled_caught
    assert len(op.calls) == 1
    assert trio.current_time() == start  # no wait begun


# -- pause (long-running loops) ----------------------------------------------------------


async def test_pause_waits_the_next_delay_and_returns_it(autojump_clock):
    b = Backoff(initial=1.0, maximum=60.0)
    start = trio.current_time()
    delay = await pause(b, Unavailable("HTTP 503", retry_after=20.0), what="publishing")
    assert delay >= 20.0 and trio.current_time() - start == pytest.approx(delay)
    assert b.attempt == 1


async def test_pause_raises_at_a_deadline_it_cannot_fit(autojump_clock):
    start = trio.current_time()
    with trio.move_on_after(2), pytest.raises(DeadlineExceeded, match="listen: timed out"):
        await pause(Backoff(initial=30.0, maximum=60.0),
                    httpx.ReadTimeout("slow", request=REQUEST), what="listen")
    assert trio.current_time() == start  # raised at once, as the error of the tree


async def test_pause_can_wait_until_the_deadline_instead(autojump_clock):
    start = trio.current_time()
    with trio.move_on_after(2):
        delay = await pause(Backoff(initial=30.0, maximum=60.0), Unavailable("HTTP 503"),
                            what="polling", at_deadline="wait")
        assert delay == pytest.approx(2.0)
    assert trio.current_time() - start == pytest.approx(2.0)
