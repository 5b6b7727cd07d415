"""The stall timeout: the learned rule (pure), the watchdog and the call stage
on a fake clock (``looptime``): a stuck request is cut in seconds and retried,
a slow one is not lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline.call import CallStage, ChatRequest
from pipeline.classify import classify
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.stall import (
    STALL_DEFAULT_S,
    STALL_FLOOR_S,
    STALL_MULTIPLE,
    STALL_WARMUP,
    StalledRequest,
    StallLimit,
    StallTimeout,
    Watchdog,
)
from pipeline.transport import Completion, Messages

# -- the learned rule ----------------------------------------------------------


def warmed(silences: list[float], *, ceiling: float = 60.0, streamed: bool = True) -> StallTimeout:
    stall = StallTimeout(None, ceiling)
    for silence in silences:
        stall.observe(silence, streamed=streamed)
    return stall


def test_before_the_warm_up_the_stall_timeout_is_the_conservative_default() -> None:
    stall = warmed([0.2] * (STALL_WARMUP - 1))

    assert stall.value() == STALL_DEFAULT_S
    assert not stall.learned
    # The default is never above the total timeout.
    assert warmed([], ceiling=5.0).value() == 5.0


def test_the_stall_timeout_is_a_multiple_of_the_p99_of_recent_silences() -> None:
    # 100 answers: 98 silent for 1 s at most, 2 for 2.5 s; the p99 is 2.5 s.
    silences = [1.0] * 98 + [2.5] * 2
    stall = warmed(silences)

    assert stall.learned
    assert stall.value() == pytest.approx(STALL_MULTIPLE * 2.5)
    # One straggler in a hundred is beyond the p99: it does not set the timeout.
    assert warmed([1.0] * 99 + [9.0]).value() == pytest.approx(STALL_MULTIPLE * 1.0)


def test_fast_regular_answers_give_the_floor_not_less() -> None:
    stall = warmed([0.05] * 200)

    assert stall.value() == STALL_FLOOR_S


def test_slow_answers_give_at_most_the_total_timeout() -> None:
    stall = warmed([30.0] * 200, ceiling=60.0)

    assert stall.value() == 60.0


def test_the_window_forgets_old_answers() -> None:
    # A server that was slow and is fast again: after a window of fast
    # answers, the timeout is back at the floor.
    stall = warmed([10.0] * 600 + [0.1] * 600)

    assert stall.value() == STALL_FLOOR_S


def test_a_given_stall_timeout_is_used_as_is_up_to_the_total_timeout() -> None:
    assert StallTimeout(0.5, 60.0).value() == 0.5  # below the floor: the user's call
    assert StallTimeout(90.0, 60.0).value() == 60.0
    fixed = StallTimeout(7.0, 60.0)
    for _ in range(100):
        fixed.observe(0.01, streamed=True)
    assert fixed.value() == 7.0
    assert not fixed.learned


def test_each_stall_of_a_row_doubles_its_next_timeout_up_to_the_total() -> None:
    stall = warmed([0.1] * 100, ceiling=20.0)

    assert [stall.for_attempt(n) for n in range(5)] == [3.0, 6.0, 12.0, 20.0, 20.0]


def test_answers_that_stop_being_streamed_start_a_new_window() -> None:
    # Silences between chunks say nothing about whole latencies.
    stall = warmed([0.1] * 100)
    learned_before = stall.learned

    stall.observe(4.0, streamed=False)

    assert learned_before
    assert stall.streamed is False
    assert not stall.learned
    assert stall.value() == STALL_DEFAULT_S
    for _ in range(STALL_WARMUP):
        stall.observe(4.0, streamed=False)
    assert stall.value() == pytest.approx(STALL_MULTIPLE * 4.0)


def test_answers_without_a_measured_silence_teach_nothing() -> None:
    stall = warmed([])
    for _ in range(100):
        stall.observe(None, streamed=True)

    assert stall.value() == STALL_DEFAULT_S


def test_a_stalled_request_is_a_transient_failure_counted_as_stalled() -> None:
    failure = classify(StalledRequest(3.0, started=False), model="m")

    assert (failure.kind, failure.stalled) == ("retry", True)
    assert failure.reason == "request stalled: no data for 3.0 s before the first byte"


# -- the watchdog on the fake clock ---------------------------------------------


async def watched(
    gaps: list[float], *, stall_s: StallLimit, total_s: float, seen: list[Watchdog] | None = None
) -> Watchdog:
    """Beats after each gap; TimeoutError if the watchdog cut it first."""
    async with asyncio.timeout(None) as scope:
        watch = Watchdog(scope, stall_s, total_s)
        if seen is not None:
            seen.append(watch)
        try:
            for gap in gaps:
                await asyncio.sleep(gap)
                watch.beat()
        finally:
            watch.close()
    return watch


@pytest.mark.looptime
async def test_a_request_that_keeps_sending_is_not_cut_however_long_it_takes() -> None:
    # 100 chunks 0.9 s apart: 90 s in all, never 1 s silent.
    watch = await watched([0.9] * 100, stall_s=1.0, total_s=120.0)

    assert watch.longest == pytest.approx(0.9)
    assert watch.expired is None


@pytest.mark.looptime
async def test_a_silent_request_is_cut_after_the_stall_timeout() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[Watchdog] = []
    with pytest.raises(TimeoutError):
        await watched([0.5, 0.5, 100.0], stall_s=2.0, total_s=60.0, seen=seen)

    assert seen[0].expired == "stall"
    assert loop.time() - start == pytest.approx(3.0)  # 1 s of chunks, then 2 s of silence


@pytest.mark.looptime
async def test_the_total_timeout_cuts_a_request_that_never_stalls() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[Watchdog] = []
    with pytest.raises(TimeoutError):
        await watched([0.5] * 1000, stall_s=1.0, total_s=10.0, seen=seen)

    assert seen[0].expired == "total"
    assert loop.time() - start == pytest.approx(10.0)


@pytest.mark.looptime
async def test_without_a_stall_timeout_only_the_total_applies() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[Watchdog] = []
    with pytest.raises(TimeoutError):
        await watched([100.0], stall_s=None, total_s=30.0, seen=seen)

    assert seen[0].expired == "total"
    assert loop.time() - start == pytest.approx(30.0)


@pytest.mark.looptime
async def test_a_waiting_request_gets_a_stall_timeout_learned_meanwhile() -> None:
    limit = [STALL_DEFAULT_S]

    async def learn() -> None:
        await asyncio.sleep(1.5)
        limit[0] = STALL_FLOOR_S

    loop = asyncio.get_running_loop()
    start = loop.time()
    learning = asyncio.create_task(learn())
    seen: list[Watchdog] = []
    with pytest.raises(TimeoutError):
        await watched([100.0], stall_s=lambda: limit[0], total_s=60.0, seen=seen)
    await learning

    assert seen[0].cut_after == STALL_FLOOR_S
    assert loop.time() - start == pytest.approx(STALL_FLOOR_S)


# -- the call stage: cut, retried with more patience, learned ---------------------


class SilentFirst:
    """A transport whose answers start after a scripted silence per call
    (the rest: ``latency_s``), cut by the real ``Watchdog`` like the real
    transports are."""

    def __init__(self, *silences: float, latency_s: float = 0.1) -> None:
        self._silences = list(silences)
        self.latency_s = latency_s
        self.stall_limits: list[float | None] = []  # when each request was sent

    async def complete(self, messages: Messages, *, stall_s: StallLimit = None) -> Completion:
        self.stall_limits.append(stall_s() if callable(stall_s) else stall_s)
        silence = self._silences.pop(0) if self._silences else self.latency_s
        try:
            async with asyncio.timeout(None) as scope:
                watch = Watchdog(scope, stall_s, 60.0)
                try:
                    await asyncio.sleep(silence)
                    watch.beat()
                finally:
                    watch.close()
        except TimeoutError:
            raise StalledRequest(watch.cut_after or 0.0, started=False) from None
        return Completion("ok", "stop", "m", 10, 5, {}, silence_s=silence, streamed=True)

    async def aclose(self) -> None:
        return None


def call_stage(transport: SilentFirst, **model: Any) -> CallStage:
    limits = LimitsConfig(concurrency=1, max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.1)
    return CallStage(ModelConfig(name="m", **model), limits, transport)


def ask(row_id: int = 0) -> ChatRequest:
    return ChatRequest(row_id, [{"role": "user", "content": "hi"}])


@pytest.mark.looptime
async def test_a_hung_request_is_cut_at_the_learned_timeout_and_retried() -> None:
    transport = SilentFirst()
    stage = call_stage(transport)
    for row in range(50):  # warm up on 0.1 s answers: the floor applies
        await stage.call(ask(row))
    loop = asyncio.get_running_loop()
    transport._silences = [3600.0]  # the next request hangs for an hour
    start = loop.time()

    result = await stage.call(ask(99))

    assert (result.status, result.attempts) == ("ok", 2)
    assert loop.time() - start < STALL_FLOOR_S + 1.0  # not the 60 s total timeout
    assert stage.stats.stalled == 1
    assert transport.stall_limits[-2:] == [STALL_FLOOR_S, 2 * STALL_FLOOR_S]


@pytest.mark.looptime
async def test_a_row_slower_to_start_than_the_rest_still_gets_its_answer() -> None:
    # A huge prompt: 10 s to the first byte while the rest take 0.1 s. Cut at
    # 3 s and 6 s, it is answered at the third attempt (12 s of patience).
    transport = SilentFirst()
    stage = call_stage(transport)
    for row in range(50):
        await stage.call(ask(row))
    transport._silences = [10.0, 10.0, 10.0]

    result = await stage.call(ask(99))

    assert (result.status, result.attempts) == ("ok", 3)
    assert stage.stats.stalled == 2


@pytest.mark.looptime
async def test_a_hang_in_the_first_wave_is_cut_once_the_timeout_is_learned() -> None:
    # Row 0 hangs from the start, before any answer; the other rows teach the
    # stall timeout meanwhile, and row 0 is cut at it, not at the default.
    transport = SilentFirst(3600.0)
    limits = LimitsConfig(concurrency=4, max_attempts=4, backoff_base_s=0.01, backoff_max_s=0.1)
    stage = CallStage(ModelConfig(name="m"), limits, transport)
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def rows() -> AsyncIterator[ChatRequest]:
        for row in range(200):
            yield ask(row)

    finished = {}
    async for result in stage.results(rows()):
        finished[result.row_id] = (result, loop.time() - start)

    first, when = finished[0]
    assert (first.status, first.attempts) == ("ok", 2)
    assert when < STALL_DEFAULT_S / 2
    assert stage.stats.stalled == 1


@pytest.mark.looptime
async def test_the_stats_say_which_stall_timeout_the_run_used() -> None:
    stage = call_stage(SilentFirst(latency_s=2.0))
    for row in range(STALL_WARMUP):
        await stage.call(ask(row))

    assert stage.stats.stall_timeout_s == pytest.approx(STALL_MULTIPLE * 2.0)
    assert stage.stats.streamed is True
    assert call_stage(SilentFirst(), stall_timeout_s=1.5).stall.value() == 1.5
