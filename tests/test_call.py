"""The call stage on a fake clock (``looptime``), with a scripted transport:
what a row's retries, the run-wide pause and the token budget look like."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest

from pipeline.call import CallStage, ChatRequest, TokenReservation
from pipeline.classify import classify
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.errors import FatalAPIError
from pipeline.prompt import DEFAULT_COMPLETION_ESTIMATE, estimate_prompt_tokens
from pipeline.results import RowResult
from pipeline.stall import StallLimit
from pipeline.transport import Completion, Messages
from pipeline.transport_errors import APIStatus


def rate_limit_error(
    headers: Mapping[str, str] | None = None,
    *,
    code: str | None = "rate_limit_exceeded",
    type_: str | None = "requests",
) -> APIStatus:
    body = {"message": "Rate limit reached", "type": type_, "code": code, "param": None}
    return APIStatus(
        429,
        headers=headers,
        body=body,
        code=code,
        type=type_,
        message="Rate limit reached",
    )


def answer(headers: Mapping[str, str] | None = None, completion_tokens: int = 5) -> Completion:
    return Completion(
        text="ok",
        finish_reason="stop",
        model="m",
        prompt_tokens=10,
        completion_tokens=completion_tokens,
        headers=headers or {},
    )


class Scripted:
    """A transport that plays a script: each item is an answer or an error to
    raise; past the end of the script it answers. Records when it was called."""

    def __init__(self, *script: Completion | Exception, latency_s: float = 0.05) -> None:
        self._script: Iterator[Completion | Exception] = iter(script)
        self.latency_s = latency_s
        self.calls: list[float] = []

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        self.calls.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.latency_s)
        step = next(self._script, None)
        if isinstance(step, Exception):
            raise step
        return step or answer()

    async def aclose(self) -> None:
        return None


def stage(transport: Scripted, *, max_tokens: int | None = None, **limits: Any) -> CallStage:
    settings: dict[str, Any] = {
        "concurrency": 4,
        "max_attempts": 5,
        "backoff_base_s": 0.01,
        "backoff_max_s": 1.0,
    }
    settings.update(limits)
    return CallStage(
        ModelConfig(name="m", max_tokens=max_tokens), LimitsConfig(**settings), transport
    )


def request(row_id: int = 0, text: str = "hello") -> ChatRequest:
    return ChatRequest(row_id, [{"role": "user", "content": text}])


async def collect(call_stage: CallStage, rows: int) -> list[RowResult]:
    async def requests() -> AsyncIterator[ChatRequest]:
        for row_id in range(rows):
            yield request(row_id)

    return [result async for result in call_stage.results(requests())]


# -- classification --------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "type_"),
    [
        ("insufficient_quota", "insufficient_quota"),
        (None, "insufficient_quota"),
        ("billing_hard_limit_reached", "invalid_request_error"),
    ],
)
def test_a_429_for_quota_or_billing_stops_the_run_instead_of_retrying(
    code: str | None, type_: str
) -> None:
    failure = classify(rate_limit_error(code=code, type_=type_), model="m")

    assert failure.kind == "fatal"
    assert "quota" in failure.reason


def test_a_rate_limit_429_is_retried_with_its_wait_and_headers() -> None:
    headers = {"retry-after-ms": "250", "x-ratelimit-limit-requests": "500"}

    failure = classify(rate_limit_error(headers), model="m")

    assert (failure.kind, failure.rate_limited) == ("retry", True)
    assert failure.retry_after == pytest.approx(0.25)
    assert failure.headers["x-ratelimit-limit-requests"] == "500"


@pytest.mark.parametrize("type_", ["tokens", "requests"])
def test_a_rate_limit_429_says_which_limit_it_is_about(type_: str) -> None:
    failure = classify(rate_limit_error(type_=type_), model="m")

    assert failure.limit == type_


# -- retries and the run-wide pause ------------------------------------------------


@pytest.mark.looptime
async def test_a_retry_after_beyond_the_backoff_cap_pauses_the_run_and_the_row_succeeds() -> None:
    transport = Scripted(rate_limit_error({"retry-after": "120"}))
    call_stage = stage(transport, backoff_max_s=1.0, max_attempts=2)

    result = await call_stage.call(request())

    assert result.status == "ok"
    assert result.attempts == 2
    assert transport.calls[1] - transport.calls[0] >= 120.0
    assert call_stage.stats.rate_limited == 1
    assert call_stage.stats.paused_s == pytest.approx(120.0, abs=0.1)


@pytest.mark.looptime
async def test_one_429_holds_back_every_worker_not_just_its_own_row() -> None:
    # The first request is refused with a 30 s retry-after; the others are
    # sent after it returns, and none of them may go out during the pause.
    transport = Scripted(rate_limit_error({"retry-after": "30"}), latency_s=0.0)
    call_stage = stage(transport, concurrency=1)
    call_stage.limiter.gate.limit = 4.0  # four workers in flight at once

    results = await collect(call_stage, rows=6)

    start = transport.calls[0]
    assert [result.status for result in results] == ["ok"] * 6
    assert all(called - start >= 30.0 for called in transport.calls[1:])


@pytest.mark.looptime
async def test_a_retry_after_longer_than_max_pause_ends_the_run_instead_of_waiting() -> None:
    # A daily limit: come back in eight hours.
    transport = Scripted(rate_limit_error({"retry-after": "28800"}), latency_s=0.0)
    call_stage = stage(transport, concurrency=1, max_pause_s=900.0)
    start = asyncio.get_running_loop().time()

    with pytest.raises(FatalAPIError, match=r"28,800 s .*--max-pause 900 s.*resume"):
        await collect(call_stage, rows=3)

    assert asyncio.get_running_loop().time() - start < 1.0
    assert len(transport.calls) == 1


@pytest.mark.looptime
async def test_a_retry_after_within_max_pause_is_waited_out() -> None:
    transport = Scripted(rate_limit_error({"retry-after": "600"}), latency_s=0.0)
    call_stage = stage(transport, max_pause_s=900.0)

    results = await collect(call_stage, rows=2)

    assert [result.status for result in results] == ["ok", "ok"]
    assert transport.calls[-1] - transport.calls[0] >= 600.0


@pytest.mark.looptime
async def test_429s_cost_a_row_a_quarter_attempt_each() -> None:
    # Ten 429s in a row (a window full for everyone) with max_attempts 3: being
    # paced is not the row's failure, so it is still answered.
    refusals = [rate_limit_error({"retry-after-ms": "100"}) for _ in range(10)]
    transport = Scripted(*refusals, latency_s=0.0)
    result = await stage(transport, concurrency=1, max_attempts=3).call(request())

    assert (result.status, result.attempts) == ("ok", 11)


@pytest.mark.looptime
async def test_a_row_refused_with_429_forever_still_ends_in_error() -> None:
    refusals = [rate_limit_error({"retry-after-ms": "100"}) for _ in range(50)]
    transport = Scripted(*refusals, latency_s=0.0)
    result = await stage(transport, concurrency=1, max_attempts=3).call(request())

    assert (result.status, result.attempts) == ("error", 12)  # 12 x 0.25 = 3 attempts
    assert result.error is not None and "--max-attempts" in result.error


@pytest.mark.looptime
async def test_a_quota_429_ends_the_run_with_a_fatal_error() -> None:
    transport = Scripted(rate_limit_error(code="insufficient_quota", type_="insufficient_quota"))
    call_stage = stage(transport)

    with pytest.raises(FatalAPIError, match="quota"):
        await collect(call_stage, rows=3)


@pytest.mark.looptime
async def test_limits_reported_in_headers_show_in_the_stats() -> None:
    headers = {"x-ratelimit-limit-requests": "3000", "x-ratelimit-limit-tokens": "150000"}
    transport = Scripted(answer(headers))
    call_stage = stage(transport)

    await call_stage.call(request())

    assert call_stage.stats.learned_rpm == 3000
    assert call_stage.stats.learned_tpm == 150000
    assert call_stage.stats.concurrency_limit >= 1


# -- the token budget ----------------------------------------------------------------


def test_the_prompt_estimate_needs_no_tokenizer_and_counts_every_message() -> None:
    messages = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "y" * 8}]

    assert estimate_prompt_tokens(messages) == (10 + 4) + (2 + 4) + 3


def test_the_reserved_completion_is_max_tokens_when_set() -> None:
    reservation = TokenReservation(max_tokens=300)
    for _ in range(100):
        reservation.observe(40, 40, 20)

    assert reservation.reserve(40) == 40 + 300


def test_without_max_tokens_the_reserved_completion_is_the_mean_of_recent_answers() -> None:
    reservation = TokenReservation(max_tokens=None, recent=16, warmup=4)
    assert reservation.reserve(10) == 10 + DEFAULT_COMPLETION_ESTIMATE
    for tokens in (20, 36, 12, 12):
        reservation.observe(10, 10, tokens)
    # The mean, not the largest: settling a guess that is high on average
    # hands the next window tokens the server counted in this one.
    assert reservation.reserve(10) == 10 + 20

    for _ in range(16):
        reservation.observe(10, 10, 8)
    assert reservation.reserve(10) == 10 + 8  # the long answers left the recent window


def test_the_prompt_estimate_is_scaled_by_the_prompt_tokens_answers_report() -> None:
    # A language or tokenizer for which four bytes a token is half the truth.
    reservation = TokenReservation(max_tokens=50, recent=16, warmup=4)
    assert reservation.reserve(100) == 100 + 50
    for estimate in (80, 100, 120, 100):
        reservation.observe(estimate, 2 * estimate, 10)

    assert reservation.prompt_scale == pytest.approx(2.0)
    assert reservation.reserve(100) == 200 + 50


def test_odd_prompt_reports_cannot_swing_the_reservation_beyond_bounds() -> None:
    reservation = TokenReservation(max_tokens=1, recent=8, warmup=1)
    reservation.observe(10, 10_000, 1)
    assert reservation.prompt_scale == 4.0
    for _ in range(8):
        reservation.observe(10_000, 1, 1)
    assert reservation.prompt_scale == 0.25


@pytest.mark.looptime
async def test_a_reservation_is_settled_with_the_usage_the_api_reports() -> None:
    transport = Scripted(answer(completion_tokens=5), latency_s=0.0)
    call_stage = stage(transport, tpm=60_000, max_tokens=500)
    bucket = call_stage.limiter.tokens
    assert bucket is not None
    assert estimate_prompt_tokens(request().messages) + 500 > bucket.capacity

    await call_stage.call(request())

    # The reservation is larger than the bucket: it went once the bucket was
    # full and left a debt. The answer used 10 + 5, the rest came back at
    # once, so the bucket is down by exactly what the API counted.
    assert bucket.level == pytest.approx(bucket.capacity - 15, abs=0.5)


@pytest.mark.looptime
async def test_a_request_bigger_than_the_whole_token_budget_still_goes_out() -> None:
    transport = Scripted(answer(), latency_s=0.0)
    call_stage = stage(transport, tpm=600, max_tokens=4000)  # 10 tokens/s, bucket of 10

    result = await asyncio.wait_for(call_stage.call(request()), timeout=60)

    assert result.status == "ok"
