"""The limiter on a fake event-loop clock (``looptime``): no test sleeps.

The last part drives whole runs against a model of a rate-limited server (a
sliding window, like the simulator's) in fake time, which is what lets these
tests run thousands of requests and assert rates and 429 shares exactly."""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from pipeline.call import CallStage, ChatRequest, TokenReservation
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.errors import FatalAPIError
from pipeline.ratelimit import (
    RATE_HEADROOM,
    ConcurrencyGate,
    Quota,
    RateLimiter,
    RateLimitHeaders,
    TokenBucket,
    _SendLog,
    exhausted_limit,
    parse_count,
    parse_duration,
    retry_after_seconds,
)
from pipeline.results import RowResult
from pipeline.stall import StallLimit
from pipeline.transport import Completion, Messages
from pipeline.transport_errors import APIStatus


def now() -> float:
    return asyncio.get_running_loop().time()


# -- header parsing -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h2m3s", 3723.0),
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("12ms", 0.012),
        ("0s", 0.0),
        ("20", 20.0),
        ("0.25", 0.25),
        ("1s500ms", 1.5),
        ("2m", 120.0),
        ("750us", 0.00075),
        (" 3s ", 3.0),
    ],
)
def test_reset_durations_in_every_format_are_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "-1", "0", "-5s", "soon", "1x", "s", "1h-2m", "nan"])
def test_missing_placeholder_or_garbage_reset_is_unknown(text: str | None) -> None:
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("text", "count"), [("100", 100), ("0", 0), (" 42 ", 42), ("7.0", 7), ("-1", None), ("x", None)]
)
def test_counts_are_whole_and_non_negative(text: str, count: int | None) -> None:
    assert parse_count(text) == count


def test_openai_style_headers_give_both_quotas_whatever_the_case() -> None:
    headers = {
        "X-RateLimit-Limit-Requests": "500",
        "x-ratelimit-remaining-requests": "499",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-limit-tokens": "200000",
        "x-ratelimit-remaining-tokens": "0",
        "x-ratelimit-reset-tokens": "6m0s",
    }

    parsed = RateLimitHeaders.parse(headers)

    assert (parsed.requests.limit, parsed.requests.remaining) == (500, 499)
    assert parsed.requests.reset_s == pytest.approx(0.12)
    assert parsed.tokens == Quota(200000, 0, 360.0)


@pytest.mark.parametrize("placeholder", ["-1", "0"])
def test_a_placeholder_limit_means_no_limit_and_its_other_headers_are_ignored(
    placeholder: str,
) -> None:
    headers = {
        "x-ratelimit-limit-requests": placeholder,
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "5s",
    }

    assert RateLimitHeaders.parse(headers).requests == Quota()


def test_a_server_without_rate_headers_reports_nothing() -> None:
    assert RateLimitHeaders.parse({"content-type": "application/json"}) == RateLimitHeaders()


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"Retry-After": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),
        ({}, None),
    ],
)
def test_retry_after_prefers_milliseconds_and_accepts_fractions(
    headers: Mapping[str, str], seconds: float | None
) -> None:
    assert retry_after_seconds(headers) == (None if seconds is None else pytest.approx(seconds))


# -- the token bucket ----------------------------------------------------------


@pytest.mark.parametrize(
    ("error_type", "message", "headers", "limit"),
    [
        ("tokens", None, {}, "tokens"),
        ("requests", None, {}, "requests"),
        (
            None,
            "Rate limit reached for gpt-4o in organization org-x on tokens per min (TPM): "
            "Limit 30000, Used 29500, Requested 900. Please try again in 1.8s.",
            {},
            "tokens",
        ),
        (
            None,
            "Rate limit reached for gpt-4o in organization org-x on requests per min (RPM): "
            "Limit 500, Used 500, Requested 1. Please try again in 120ms.",
            {},
            "requests",
        ),
        (
            None,
            "Too many requests",
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-limit-tokens": "1000"},
            "requests",
        ),
        (
            "rate_limit_exceeded",
            "slow down",
            {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-limit-tokens": "1000"},
            "tokens",
        ),
        (
            None,
            "slow down",
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "5"},
            "requests",
        ),
        # Both empty, or nothing said: unknown.
        (
            None,
            None,
            {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"},
            None,
        ),
        (None, "Rate limit exceeded", {}, None),
    ],
)
def test_a_429_is_attributed_to_the_limit_it_names(
    error_type: str | None, message: str | None, headers: dict[str, str], limit: str | None
) -> None:
    assert exhausted_limit(error_type, message, headers) == limit


@pytest.mark.looptime
async def test_a_bucket_spreads_a_rate_evenly_instead_of_bursting_at_the_start() -> None:
    bucket = TokenBucket(rate=10.0, capacity=1.0, level=1.0)
    start = now()
    times = []
    for _ in range(20):
        await bucket.acquire(1)
        times.append(now() - start)

    assert times[0] == 0.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([0.1] * 19)


@pytest.mark.looptime
async def test_settling_a_reservation_gives_the_unused_part_to_the_next_request() -> None:
    bucket = TokenBucket(rate=10.0, capacity=100.0, level=100.0)
    await bucket.acquire(100)  # reserved 100, the answer used 20

    bucket.settle(100 - 20)
    start = now()
    await bucket.acquire(80)

    assert now() == start  # no wait: the refund covered it


@pytest.mark.looptime
async def test_usage_above_the_reservation_is_charged_afterwards() -> None:
    bucket = TokenBucket(rate=10.0, capacity=100.0, level=100.0)
    await bucket.acquire(50)

    bucket.settle(50 - 150)  # the answer cost 100 more than reserved
    start = now()
    await bucket.acquire(10)

    assert now() - start == pytest.approx(6.0)  # from -50 back to 10 at 10/s


@pytest.mark.looptime
async def test_a_request_larger_than_the_whole_bucket_goes_out_and_leaves_a_debt() -> None:
    bucket = TokenBucket(rate=100.0, capacity=100.0, level=0.0)
    start = now()

    await asyncio.wait_for(bucket.acquire(250), timeout=5)  # no deadlock
    sent_big = now() - start
    await bucket.acquire(100)
    sent_next = now() - start

    assert sent_big == pytest.approx(1.0)  # waited for a full bucket, no longer
    assert sent_next - sent_big == pytest.approx(2.5)  # the debt of 150, then 100


@pytest.mark.looptime
async def test_an_amount_given_as_a_callable_is_asked_when_the_request_reaches_the_bucket() -> None:
    bucket = TokenBucket(rate=100.0, capacity=100.0)  # empty: 1 s per 100
    start = now()
    asked: list[float] = []

    def amount() -> float:
        asked.append(now() - start)
        return 100.0

    await asyncio.gather(bucket.acquire(amount), bucket.acquire(amount))

    # The second was queued at once but estimated only when the first had
    # been served: an estimate made at queueing time is as old as the queue.
    assert asked == [pytest.approx(0.0), pytest.approx(1.0)]


@pytest.mark.looptime
async def test_small_requests_do_not_starve_a_large_one_waiting_before_them() -> None:
    bucket = TokenBucket(rate=10.0, capacity=50.0, level=0.0)
    order: list[str] = []

    async def take(name: str, amount: int) -> None:
        await bucket.acquire(amount)
        order.append(name)

    big = asyncio.create_task(take("big", 50))
    await asyncio.sleep(0)
    smalls = [asyncio.create_task(take(f"small{i}", 1)) for i in range(3)]
    await asyncio.gather(big, *smalls)

    assert order[0] == "big"


@pytest.mark.looptime
async def test_a_pause_holds_the_bucket_so_its_end_is_not_a_burst() -> None:
    bucket = TokenBucket(rate=10.0, capacity=5.0, level=5.0)
    bucket.hold_until(now() + 3.0)
    start = now()
    times = []
    for _ in range(3):
        await bucket.acquire(1)
        times.append(now() - start)

    assert times == pytest.approx([3.1, 3.2, 3.3])


@pytest.mark.looptime
async def test_a_new_rate_applies_to_requests_already_waiting() -> None:
    bucket = TokenBucket(rate=1.0, capacity=1.0, level=0.0)
    start = now()
    waiter = asyncio.create_task(bucket.acquire(1))
    await asyncio.sleep(0.1)

    bucket.reconfigure(rate=100.0, capacity=1.0)
    await waiter

    assert now() - start < 0.2


# -- the adaptive in-flight limit ---------------------------------------------


def test_slow_start_doubles_the_limit_every_round_trip_up_to_the_ceiling() -> None:
    gate = ConcurrencyGate(ceiling=64, start=8)
    for _ in range(8):  # one round trip of answers
        gate.increase()
    assert gate.limit == 16
    for _ in range(100):
        gate.increase()
    assert gate.limit == 64


def test_after_a_429_the_limit_grows_by_one_per_round_trip() -> None:
    gate = ConcurrencyGate(ceiling=64, start=20)
    assert gate.decrease(gate.sent())
    assert gate.limit == pytest.approx(16)

    for _ in range(16):
        gate.increase()

    assert gate.limit == pytest.approx(17, abs=0.05)


def test_a_burst_of_429s_from_one_round_trip_cuts_the_limit_once() -> None:
    gate = ConcurrencyGate(ceiling=64, start=20)
    in_flight = [gate.sent() for _ in range(20)]

    cuts = [gate.decrease(sequence) for sequence in in_flight]

    assert cuts.count(True) == 1
    assert gate.limit == pytest.approx(16)
    assert gate.decrease(gate.sent())  # a request sent after the cut counts again
    assert gate.limit == pytest.approx(12.8)


def test_the_limit_never_drops_below_one_request() -> None:
    gate = ConcurrencyGate(ceiling=8, start=2)
    for _ in range(10):
        gate.decrease(gate.sent())
    assert gate.limit == 1.0
    assert gate.slots == 1


def test_a_fixed_gate_keeps_the_configured_concurrency() -> None:
    gate = ConcurrencyGate(ceiling=32, adaptive=False)
    assert gate.limit == 32
    assert not gate.decrease(gate.sent())
    gate.increase()
    assert gate.limit == 32


@pytest.mark.looptime
async def test_the_gate_admits_only_its_limit_and_wakes_waiters_in_order() -> None:
    gate = ConcurrencyGate(ceiling=4, start=2)
    order: list[int] = []

    async def hold(index: int) -> None:
        await gate.acquire()
        order.append(index)
        await asyncio.sleep(1)
        gate.release()

    tasks = [asyncio.create_task(hold(i)) for i in range(5)]
    await asyncio.sleep(0.5)
    assert gate.in_flight == 2
    await asyncio.gather(*tasks)

    assert order == [0, 1, 2, 3, 4]
    assert gate.in_flight == 0


@pytest.mark.looptime
async def test_a_cancelled_waiter_does_not_lose_a_slot() -> None:
    gate = ConcurrencyGate(ceiling=1, start=1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    gate.release()
    with pytest.raises(asyncio.CancelledError):
        await waiter

    await asyncio.wait_for(gate.acquire(), timeout=1)
    assert gate.in_flight == 1


# -- the run-wide limiter -------------------------------------------------------


def openai_headers(rpm: int, remaining: int = 100, tpm: int | None = None) -> dict[str, str]:
    headers = {
        "x-ratelimit-limit-requests": str(rpm),
        "x-ratelimit-remaining-requests": str(remaining),
        "x-ratelimit-reset-requests": "1s",
    }
    if tpm is not None:
        headers |= {
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": str(tpm),
            "x-ratelimit-reset-tokens": "1s",
        }
    return headers


@pytest.mark.looptime
async def test_configured_rpm_is_paced_just_below_the_limit_from_the_first_request() -> None:
    limiter = RateLimiter(rpm=600, concurrency=100)
    start = now()
    for _ in range(60):
        async with limiter.request(10):
            pass

    elapsed = now() - start
    assert elapsed == pytest.approx(59 / (10 * RATE_HEADROOM), rel=0.01)


@pytest.mark.looptime
async def test_the_limit_a_server_reports_is_learned_and_paces_the_run() -> None:
    limiter = RateLimiter(concurrency=100)
    async with limiter.request(10) as permit:
        limiter.succeeded(permit, 10, openai_headers(rpm=1200, tpm=90_000))
    assert (limiter.rpm, limiter.tpm) == (1200, 90_000)

    start = now()
    for _ in range(40):
        async with limiter.request(1) as permit:
            limiter.succeeded(permit, 1, {})

    assert now() - start == pytest.approx(40 / (20 * RATE_HEADROOM), rel=0.05)


@pytest.mark.looptime
async def test_a_configured_limit_below_the_reported_one_wins_and_vice_versa() -> None:
    below = RateLimiter(rpm=300)
    above = RateLimiter(rpm=6000)
    for limiter in (below, above):
        async with limiter.request(1) as permit:
            limiter.succeeded(permit, 1, openai_headers(rpm=1200))

    assert below.rpm == 300
    assert above.rpm == 1200
    assert above.requests is not None
    assert above.requests.rate == pytest.approx(20 * RATE_HEADROOM)


@pytest.mark.looptime
async def test_a_server_that_reports_nothing_left_stops_the_next_request_until_a_refill() -> None:
    limiter = RateLimiter(concurrency=100)
    async with limiter.request(1) as permit:
        limiter.succeeded(permit, 1, openai_headers(rpm=60, remaining=5))
    async with limiter.request(1) as permit:
        limiter.succeeded(permit, 1, openai_headers(rpm=60, remaining=0))

    start = now()
    async with limiter.request(1):
        pass

    assert now() - start == pytest.approx(1 / RATE_HEADROOM, rel=0.01)


@pytest.mark.looptime
async def test_remaining_zero_without_a_limit_pauses_until_the_reset() -> None:
    limiter = RateLimiter(concurrency=100)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2.5s"}
    async with limiter.request(1) as permit:
        limiter.succeeded(permit, 1, headers)

    start = now()
    async with limiter.request(1):
        pass

    assert now() - start == pytest.approx(2.5)


@pytest.mark.looptime
async def test_a_429_pauses_every_worker_for_its_retry_after_however_long() -> None:
    limiter = RateLimiter(rpm=6000, concurrency=8)
    start = now()
    async with limiter.request(1) as permit:
        limiter.rate_limited(permit, 300.0, {})  # five minutes: longer than any backoff cap

    sent: list[float] = []

    async def worker() -> None:
        async with limiter.request(1):
            sent.append(now() - start)

    await asyncio.gather(*(worker() for _ in range(5)))

    assert min(sent) >= 300.0
    # Not a burst at the end of the pause: the rate applies from there.
    assert max(sent) - min(sent) == pytest.approx(4 / (100 * RATE_HEADROOM), rel=0.05)
    assert limiter.stats.paused_s == pytest.approx(300.0)


@pytest.mark.looptime
async def test_a_429_gives_back_the_token_reservation() -> None:
    limiter = RateLimiter(tpm=60_000, concurrency=8)  # 1,000 tokens/s
    async with limiter.request(100) as permit:
        limiter.rate_limited(permit, 0.0, {})

    # The server counted nothing: the next request of the same size does not
    # wait to pay for the refused one (it would wait 0.1 s).
    start = now()
    async with limiter.request(100):
        pass
    assert now() - start == pytest.approx(0.0, abs=1e-3)


@pytest.mark.looptime
async def test_tokens_settled_with_real_usage_let_more_requests_through() -> None:
    async def requests_in(seconds: float, *, settle: bool) -> int:
        limiter = RateLimiter(tpm=60_000, concurrency=64)  # 1000 tokens/s
        count = 0
        start = now()
        while now() - start < seconds:
            async with limiter.request(500) as permit:  # prompt + max_tokens
                limiter.succeeded(permit, 50 if settle else None, {})
                count += 1
        return count

    settled = await requests_in(10, settle=True)
    reserved_only = await requests_in(10, settle=False)

    assert reserved_only == pytest.approx(10 * 1000 * RATE_HEADROOM / 500, abs=2)
    assert settled == pytest.approx(10 * 1000 * RATE_HEADROOM / 50, rel=0.05)


@pytest.mark.looptime
async def test_without_adaptation_the_configured_limits_are_used_as_they_are() -> None:
    limiter = RateLimiter(rpm=600, concurrency=4, adaptive=False)
    async with limiter.request(1) as permit:
        limiter.succeeded(permit, 1, openai_headers(rpm=60))
        limiter.rate_limited(permit, 1.0, {})

    assert limiter.rpm == 600
    assert limiter.gate.limit == 4
    assert limiter.stats.paused_s == 1.0  # retry-after is honoured regardless


# -- whole runs against a model of a rate-limited server -------------------------


@dataclass
class RunReport:
    rows: int
    seconds: float
    requests: int
    rate_limited: int

    @property
    def share_429(self) -> float:
        return self.rate_limited / self.requests


class WindowServer:
    """Admits ``rpm`` requests per minute over a sliding window of
    ``window_s``, like ``pipeline.simulate``; 429s carry the exact wait."""

    def __init__(
        self,
        rpm: int | None,
        window_s: float,
        latency_s: tuple[float, float],
        *,
        headers: bool,
        spurious_429: float = 0.0,
        seed: int = 1,
    ) -> None:
        self.rpm = rpm
        self.per_window = None if rpm is None else round(rpm * window_s / 60)
        self.window_s = window_s
        self.latency_s = latency_s
        self.headers = headers
        self.spurious_429 = spurious_429
        self.rng = random.Random(seed)
        self.log: deque[float] = deque()
        self.requests = 0
        self.rate_limited = 0

    def _headers(self) -> dict[str, str]:
        if not self.headers or self.rpm is None or self.per_window is None:
            return {}
        return {
            "x-ratelimit-limit-requests": str(self.rpm),
            "x-ratelimit-remaining-requests": str(self.per_window - len(self.log)),
            "x-ratelimit-reset-requests": f"{self.window_s}s",
        }

    async def send(self, limiter: RateLimiter) -> bool:
        async with limiter.request(100) as permit:
            self.requests += 1
            arrived = now()
            while self.log and self.log[0] <= arrived - self.window_s:
                self.log.popleft()
            full = self.per_window is not None and len(self.log) >= self.per_window
            if full or self.rng.random() < self.spurious_429:
                self.rate_limited += 1
                wait = self.log[0] + self.window_s - arrived if full else 0.1
                limiter.rate_limited(permit, wait, self._headers())
                return False
            self.log.append(arrived)
            headers = self._headers()
            await asyncio.sleep(self.rng.uniform(*self.latency_s))
            limiter.succeeded(permit, 100, headers)
            return True


async def run(server: WindowServer, limiter: RateLimiter, rows: int) -> RunReport:
    """``concurrency`` workers send ``rows`` rows, each until it is answered."""
    todo = list(range(rows))
    start = now()

    async def worker() -> None:
        while todo:
            todo.pop()
            while not await server.send(limiter):
                pass

    await asyncio.gather(*(worker() for _ in range(limiter.gate.ceiling)))
    return RunReport(rows, now() - start, server.requests, server.rate_limited)


def achieved(report: RunReport, rpm: int) -> float:
    return report.rows / report.seconds / (rpm / 60)


@pytest.mark.slow
@pytest.mark.looptime
async def test_configured_mode_sustains_95_percent_of_the_limit_with_under_1_percent_429() -> None:
    server = WindowServer(1200, window_s=1.0, latency_s=(0.1, 0.3), headers=True)

    report = await run(server, RateLimiter(rpm=1200, concurrency=32), rows=1000)

    assert achieved(report, 1200) >= 0.95
    assert report.share_429 < 0.01


@pytest.mark.slow
@pytest.mark.looptime
async def test_auto_mode_learns_the_limit_from_headers() -> None:
    server = WindowServer(1200, window_s=1.0, latency_s=(0.1, 0.3), headers=True)
    limiter = RateLimiter(concurrency=32)

    report = await run(server, limiter, rows=1000)

    assert limiter.learned_rpm == 1200
    assert achieved(report, 1200) >= 0.90
    assert report.share_429 < 0.02


@pytest.mark.parametrize(
    ("latency_s", "rows"),
    [
        ((0.1, 0.3), 1500),
        # Answers far faster than the limit: one request in flight is too many.
        ((0.001, 0.01), 1500),
        # Slow answers: the ramp-up takes longer, so the run must be too.
        ((0.5, 1.5), 3000),
    ],
)
@pytest.mark.slow
@pytest.mark.looptime
async def test_auto_mode_finds_the_limit_of_a_server_that_sends_no_headers(
    latency_s: tuple[float, float], rows: int
) -> None:
    server = WindowServer(1200, window_s=1.0, latency_s=latency_s, headers=False)
    limiter = RateLimiter(concurrency=64)

    report = await run(server, limiter, rows=rows)

    assert limiter.learned_rpm is None
    assert achieved(report, 1200) >= 0.90
    assert report.share_429 < 0.02


@pytest.mark.slow
@pytest.mark.looptime
async def test_random_429s_unrelated_to_the_rate_are_not_taken_for_a_rate_limit() -> None:
    # No rate limit at all, but one request in twelve is refused for 0.1 s.
    server = WindowServer(None, window_s=1.0, latency_s=(0.001, 0.01), headers=False)
    server.spurious_429 = 0.08
    limiter = RateLimiter(concurrency=16)

    report = await run(server, limiter, rows=2000)

    # Slowing down did not make them rarer, so the limiter stopped pacing by
    # them instead of ratcheting the rate down. (Each 429 still pauses the
    # whole run for its 0.1 s: that alone caps this run near 110 rows/s.)
    assert limiter.estimated_rpm is None
    assert report.rows / report.seconds >= 40


class TokenWindowServer:
    """Admits ``tpm`` tokens per minute over a sliding window of ``window_s``
    and counts each request's real tokens (prompt plus a completion of
    varying length) when it arrives; a 429 says it is about tokens, as
    OpenAI's do."""

    def __init__(
        self,
        tpm: int,
        window_s: float,
        *,
        headers: bool,
        completion: tuple[int, int] = (40, 60),
        seed: int = 2,
    ) -> None:
        self.tpm = tpm
        self.completion = completion
        self.per_window = round(tpm * window_s / 60)
        self.window_s = window_s
        self.headers = headers
        self.rng = random.Random(seed)
        self.log: deque[tuple[float, int]] = deque()
        self.used = 0
        self.requests = 0
        self.rate_limited = 0
        self.tokens = 0

    def _headers(self) -> dict[str, str]:
        if not self.headers:
            return {}
        return {
            "x-ratelimit-limit-tokens": str(self.tpm),
            "x-ratelimit-remaining-tokens": str(self.per_window - self.used),
            "x-ratelimit-reset-tokens": f"{self.window_s}s",
        }

    async def send(self, limiter: RateLimiter, reservation: TokenReservation) -> bool:
        prompt = self.rng.randint(20, 60)
        completion = self.rng.randint(*self.completion)
        async with limiter.request(lambda: reservation.reserve(prompt)) as permit:
            self.requests += 1
            arrived = now()
            while self.log and self.log[0][0] <= arrived - self.window_s:
                self.used -= self.log.popleft()[1]
            if self.used + prompt + completion > self.per_window:
                self.rate_limited += 1
                wait = self.log[0][0] + self.window_s - arrived
                limiter.rate_limited(permit, wait, self._headers(), "tokens")
                return False
            self.log.append((arrived, prompt + completion))
            self.used += prompt + completion
            self.tokens += prompt + completion
            headers = self._headers()
            await asyncio.sleep(self.rng.uniform(0.1, 0.3))
            limiter.succeeded(permit, prompt + completion, headers)
            reservation.observe(prompt, prompt, completion)
            return True


async def run_tokens(server: TokenWindowServer, limiter: RateLimiter, rows: int) -> float:
    """Send ``rows`` rows; the share of the server's token limit achieved."""
    todo = list(range(rows))
    reservation = TokenReservation(max_tokens=None)
    start = now()

    async def worker() -> None:
        while todo:
            todo.pop()
            while not await server.send(limiter, reservation):
                pass

    await asyncio.gather(*(worker() for _ in range(limiter.gate.ceiling)))
    return server.tokens / (now() - start) / (server.tpm / 60)


@pytest.mark.slow
@pytest.mark.looptime
async def test_configured_tpm_sustains_95_percent_of_the_token_limit_with_under_1_percent_429() -> (
    None
):
    server = TokenWindowServer(600_000, window_s=1.0, headers=True)

    share = await run_tokens(server, RateLimiter(tpm=600_000, concurrency=64), rows=4000)

    assert share >= 0.95
    assert server.rate_limited / server.requests < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("headers", [True, False])
@pytest.mark.looptime
async def test_auto_mode_reaches_90_percent_of_a_token_limit(headers: bool) -> None:
    server = TokenWindowServer(600_000, window_s=1.0, headers=headers)
    limiter = RateLimiter(concurrency=64)

    share = await run_tokens(server, limiter, rows=4000)

    assert share >= 0.90
    assert server.rate_limited / server.requests < 0.02
    if headers:
        # Paced by tokens: a request rate measured from token 429s would
        # hold the budget back whenever prompts run short.
        assert limiter.learned_tpm == 600_000
        assert limiter.estimated_rpm is None


@pytest.mark.slow
@pytest.mark.looptime
async def test_answers_of_unpredictable_length_cost_some_rate_not_a_stream_of_429s() -> None:
    # About 11 requests per one-second window, each 10-90 completion tokens
    # that no estimate can know in advance: a window often holds more than
    # its reservations said, and aiming at 97% of the limit draws a 429 for
    # one request in eleven. The limiter aims lower instead of colliding.
    server = TokenWindowServer(60_000, window_s=1.0, headers=True, completion=(10, 90))
    limiter = RateLimiter(tpm=60_000, concurrency=32)

    share = await run_tokens(server, limiter, rows=2000)

    assert server.rate_limited / server.requests < 0.03
    assert limiter.token_share < 0.97
    assert share >= 0.75


# -- limits a server does not report, over windows of any length -----------------
#
# These drive the call stage itself (its retries, backoff and pauses) against a
# model of a provider on the loop clock, given to it as its transport.


def rate_limit_error(headers: Mapping[str, str]) -> APIStatus:
    body = {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}
    return APIStatus(
        429,
        headers=headers,
        body=body,
        code="rate_limit_exceeded",
        type="requests",
        message="Rate limit reached",
    )


class SlidingWindowAPI:
    """A provider as a transport: admits ``rpm`` requests a minute over a
    sliding window of ``window_s``, like ``pipeline.simulate``, the limit
    changing at the ``schedule`` steps (seconds since the first request, rpm;
    0 refuses everything until the next step that admits). A 429 says when
    the window frees room in ``retry-after-ms`` (unless ``retry_after`` is
    off); answers carry ``x-ratelimit-*`` headers for the first
    ``headers_until`` seconds only."""

    def __init__(
        self,
        rpm: int,
        window_s: float,
        *,
        schedule: tuple[tuple[float, int], ...] = (),
        retry_after: bool = True,
        headers_until: float = 0.0,
        latency_s: tuple[float, float] = (0.1, 0.3),
        seed: int = 3,
    ) -> None:
        self.rpm = rpm
        self.window_s = window_s
        self.schedule = schedule
        self.retry_after = retry_after
        self.headers_until = headers_until
        self.latency_s = latency_s
        self.rng = random.Random(seed)
        self.log: deque[float] = deque()
        self.started = 0.0
        # Times since the first request of every admitted and refused request.
        self.admitted: list[float] = []
        self.refused: list[float] = []

    def rpm_at(self, elapsed: float) -> int:
        rpm = self.rpm
        for at, scheduled in self.schedule:
            if elapsed >= at:
                rpm = scheduled
        return rpm

    def _wait(self, elapsed: float, capacity: int) -> float:
        if capacity:
            return self.log[len(self.log) - capacity] + self.window_s - now()
        later = [at for at, rpm in self.schedule if at > elapsed and rpm > 0]
        return later[0] - elapsed if later else self.window_s

    def _headers(self, elapsed: float, rpm: int, capacity: int) -> dict[str, str]:
        if elapsed >= self.headers_until:
            return {}
        return {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(max(0, capacity - len(self.log))),
            "x-ratelimit-reset-requests": f"{self.window_s}s",
        }

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        arrived = now()
        if not self.admitted and not self.refused:
            self.started = arrived
        elapsed = arrived - self.started
        while self.log and self.log[0] <= arrived - self.window_s:
            self.log.popleft()
        rpm = self.rpm_at(elapsed)
        capacity = round(rpm * self.window_s / 60)
        if len(self.log) >= capacity:
            self.refused.append(elapsed)
            headers = self._headers(elapsed, rpm, capacity)
            if self.retry_after:
                wait_ms = math.ceil(self._wait(elapsed, capacity) * 1000)
                headers["retry-after-ms"] = str(max(1, wait_ms))
            raise rate_limit_error(headers)
        self.log.append(arrived)
        self.admitted.append(elapsed)
        headers = self._headers(elapsed, rpm, capacity)
        await asyncio.sleep(self.rng.uniform(*self.latency_s))
        return Completion("ok", "stop", "m", 10, 5, headers)

    async def aclose(self) -> None:
        return None

    def rate(self, start: float, end: float) -> float:
        """Requests admitted per minute between two times since the first request."""
        count = bisect.bisect_left(self.admitted, end) - bisect.bisect_left(self.admitted, start)
        return count / (end - start) * 60.0

    def share_429(self, start: float, end: float) -> float:
        refused = bisect.bisect_left(self.refused, end) - bisect.bisect_left(self.refused, start)
        admitted = bisect.bisect_left(self.admitted, end) - bisect.bisect_left(self.admitted, start)
        return refused / max(1, refused + admitted)


def call_stage(api: SlidingWindowAPI, *, seed: int = 4, **limits: Any) -> CallStage:
    """The call stage with the default limits (backoff, attempts), 64 workers,
    its backoff jitter seeded."""
    settings = LimitsConfig(**{"concurrency": 64, **limits})
    return CallStage(ModelConfig(name="m"), settings, api, rng=random.Random(seed))


async def enrich_rows(
    stage: CallStage, rows: int, into: list[RowResult] | None = None
) -> list[RowResult]:
    async def requests() -> AsyncIterator[ChatRequest]:
        for row_id in range(rows):
            yield ChatRequest(row_id, [{"role": "user", "content": f"row {row_id}"}])

    results = [] if into is None else into
    async for result in stage.results(requests()):
        results.append(result)
    return results


# (window, rpm, rows): five windows or more at the limit, a few thousand
# requests at most (fake time is free, the loop's work is not).
WINDOWS = [(1.0, 1200, 600), (6.0, 1200, 720), (20.0, 600, 1200), (60.0, 300, 1800)]


@pytest.mark.slow
@pytest.mark.parametrize(("window_s", "rpm", "rows"), WINDOWS, ids=lambda v: f"{v}")
@pytest.mark.looptime
async def test_auto_mode_learns_a_window_of_any_length_from_retry_after_and_runs_at_its_limit(
    window_s: float, rpm: int, rows: int
) -> None:
    api = SlidingWindowAPI(rpm, window_s)

    results = await enrich_rows(call_stage(api), rows)

    assert [result.status for result in results] == ["ok"] * rows
    # The first window goes on finding it: a burst, then the pause the
    # retry-after asks for. From then on the run keeps to the limit.
    end = api.admitted[-1]
    assert api.rate(window_s, end) >= 0.90 * rpm
    assert api.share_429(window_s, end) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize(("window_s", "rpm", "rows"), WINDOWS, ids=lambda v: f"{v}")
@pytest.mark.looptime
async def test_without_retry_after_auto_mode_dates_the_window_by_when_429s_stop(
    window_s: float, rpm: int, rows: int
) -> None:
    # A 429 without retry-after says only that the window is full. While the
    # window is unknown, one request at a time tests it, at pauses a tenth of
    # how long the 429s have lasted, until one is admitted: capacity freed
    # between the last refused send and that one, which dates the window to
    # within a few percent, long or short (a retry-after dates it exactly).
    # Later 429s are read against a span a little longer than that window.
    # The first window costs more 429s than with retry-after (one a probe);
    # measured over seeds from then on: 93-98% of the limit, under 1.2%
    # 429s. Asserted: 85% (against 90% with retry-after) and 2%.
    api = SlidingWindowAPI(rpm, window_s, retry_after=False)

    results = await enrich_rows(call_stage(api), rows)

    assert [result.status for result in results] == ["ok"] * rows
    end = api.admitted[-1]
    assert api.rate(window_s, end) >= 0.85 * rpm
    assert api.share_429(window_s, end) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize(("window_s", "rpm"), [(1.0, 3000), (6.0, 1200)], ids=str)
@pytest.mark.parametrize("headers", [False, True], ids=["no-headers", "headers-stop"])
@pytest.mark.looptime
async def test_after_a_storm_the_rate_climbs_back_to_the_recovered_limit_within_a_few_windows(
    window_s: float, rpm: int, headers: bool
) -> None:
    # The full limit for 5 windows, a tenth of it for 5 (the window refuses
    # everything until it has drained below the new limit), then the full
    # limit again. With headers, the server reports the lowered limit during
    # the storm and stops reporting anything once it is over.
    storm, recovered = 5 * window_s, 10 * window_s
    api = SlidingWindowAPI(
        rpm,
        window_s,
        schedule=((storm, rpm // 10), (recovered, rpm)),
        headers_until=recovered if headers else 0.0,
    )
    per_window = rpm / 60 * window_s
    rows = round(per_window * (5 + 0.5 + 14))

    results = await enrich_rows(call_stage(api), rows)

    assert [result.status for result in results] == ["ok"] * rows
    # The storm's limit was followed down: a climb back towards the old limit
    # that the server stops costs a 429 or two, and climbs are spaced out.
    refused = [at for at in api.refused if storm + window_s <= at < recovered]
    assert len(refused) <= 2 * 4
    # ...and, within a few windows of the server recovering, back up.
    assert api.admitted[-1] > recovered + 11 * window_s
    assert api.rate(recovered + 5 * window_s, recovered + 11 * window_s) >= 0.90 * rpm


@pytest.mark.slow
@pytest.mark.parametrize("retry_after", [True, False], ids=["retry-after", "no-retry-after"])
@pytest.mark.looptime
async def test_every_answer_a_429_for_longer_than_max_refusal_ends_the_run_after_its_results(
    retry_after: bool,
) -> None:
    # 20 requests a second for 5 s, then none: a quota used up without the
    # server saying so.
    api = SlidingWindowAPI(1200, 1.0, schedule=((5.0, 0),), retry_after=retry_after)
    stage = call_stage(api, max_refusal_s=60.0, backoff_max_s=10.0)
    results: list[RowResult] = []

    with pytest.raises(FatalAPIError) as raised:
        await enrich_rows(stage, 1000, into=results)

    refused_from = api.started + api.refused[bisect.bisect_left(api.refused, 5.0)]
    # Ended by the first 429 past the bound (the next retry: a pause away).
    assert 60.0 <= now() - refused_from <= 60.0 + 10.0 + 1.0
    # Everything answered before (and paid for) was handed over first.
    assert sum(result.status == "ok" for result in results) == len(api.admitted) >= 50
    message = str(raised.value)
    assert "every request with 429" in message
    assert "--max-refusal 60 s" in message
    assert "checkpoint is kept" in message
    assert "rerun later" in message and "quota" in message


@pytest.mark.looptime
async def test_a_retry_after_longer_than_max_refusal_is_waited_out_if_the_server_then_admits() -> (
    None
):
    # Nothing admitted from 1 s to 1,200 s, as the retry-after says; then the
    # limit is back. A pause, not a sustained refusal.
    api = SlidingWindowAPI(1200, 1.0, schedule=((1.0, 0), (1200.0, 1200)))
    stage = call_stage(api, max_refusal_s=900.0)

    results = await enrich_rows(stage, 100)

    assert [result.status for result in results] == ["ok"] * 100
    assert api.admitted[-1] >= 1200.0


def test_the_send_log_keeps_a_bounded_history_and_counts_what_was_admitted() -> None:
    log = _SendLog(horizon_s=10.0, max_sends=5_000)
    for number in range(100_000):  # 1,000 a second for 100 s
        assert log.append(number / 1000.0) == number
        if number % 10 == 0:
            log.refuse(number)

    assert log.count == 100_000
    # Never more than the size bound (a trim drops an eighth more, in a batch).
    assert len(log._times) <= 5_000
    # What is still logged is counted exactly: every tenth request refused.
    assert log.admitted(98.0, 99.0 - 1e-9) == 900
    assert log.counts(98.0, 99.0 - 1e-9) == (1000, 100)
    assert log.last_refused_before(99.0) == pytest.approx(98.99)
    assert log.first_admitted_after(98.995) == pytest.approx(98.996, abs=1e-6)
