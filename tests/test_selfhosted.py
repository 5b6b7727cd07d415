"""Self-hosted servers (issue 17): a server with a fixed number of slots
queues what it cannot compute, and computes what its client abandoned.

End to end against the simulator's slot model over real HTTP on 127.0.0.1,
on a fake clock (``looptime``: the simulator serves in the test's own loop,
so its service times pass in no real time); the rules themselves as pure
functions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import pytest

from pipeline.call import CallStage, ChatRequest
from pipeline.concurrency import ConcurrencyGate, LatencyLimit, QueueClock, Sample
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.errors import ConfigError
from pipeline.ratelimit import RateLimiter
from pipeline.simulate import (
    STREAM_CHUNK_CHARS,
    Simulator,
    SimulatorConfig,
    _Slots,
    expected_answer,
)
from pipeline.transport import make_transport

MODEL = "sim-1"
# About 2 s an answer: a small local model's pace (the took 40-60 s).
SLOW: dict[str, Any] = {"latency_ms": 500.0, "token_ms": 100.0}


async def rows(count: int) -> AsyncIterator[ChatRequest]:
    for row in range(count):
        yield ChatRequest(row, [{"role": "user", "content": f"question number {row}"}])


async def run(
    sim: Simulator,
    count: int,
    model: dict[str, Any] | None = None,
    *,
    kind: str = "h11",
    **limits: Any,
) -> tuple[CallStage, dict[int, Any], float]:
    config = ModelConfig(name=MODEL, base_url=sim.base_url, **(model or {}))
    transport = make_transport(config, "key", kind)
    stage = CallStage(config, LimitsConfig(**limits), transport)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        results = {result.row_id: result async for result in stage.results(rows(count))}
    finally:
        await transport.aclose()
    return stage, results, loop.time() - start


async def plain_loop(sim: Simulator, count: int) -> float:
    """One request after the other, as a synchronous loop sends them."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with aiohttp.ClientSession() as session:
        async for request in rows(count):
            body = {"model": MODEL, "messages": request.messages}
            async with session.post(f"{sim.base_url}/chat/completions", json=body) as response:
                assert response.status == 200
                await response.read()
    return loop.time() - start


# -- the simulator's slot model ------------------------------------------------


@pytest.mark.looptime
async def test_the_slot_model_queues_beyond_its_slots_and_reports_the_slot_time() -> None:
    async with Simulator(SimulatorConfig(slots=2, **SLOW)) as sim:
        stage, results, elapsed = await run(sim, 6, concurrency=6, adaptive=False)
    assert {result.status for result in results.values()} == {"ok"}
    stats = sim.stats
    assert (stats.computed, stats.abandoned, stats.max_queued) == (6, 0, 4)
    assert stats.queue_wait_s > 0
    # Three waves of two: the slots, not the six in flight, set the pace.
    one = 0.5 + 0.1 * results[0].completion_tokens
    assert elapsed == pytest.approx(3 * one, rel=0.05)
    # llama.cpp's timings say the slot's time; the rest of the latency was the queue.
    assert stage.stats.server_count == 6
    assert stage.stats.server_s_sum == pytest.approx(6 * one, rel=0.05)
    assert stage.stats.waiting_s_sum == pytest.approx((0 + 0 + 1 + 1 + 2 + 2) * one, rel=0.05)


@pytest.mark.looptime
@pytest.mark.parametrize("order", ["fifo", "any"])
async def test_the_slot_model_serves_its_queue_in_the_order_it_came_or_in_any(
    order: Literal["fifo", "any"],
) -> None:
    async with Simulator(SimulatorConfig(slots=1, slot_order=order, **SLOW)) as sim:
        _, results, _ = await run(sim, 6, concurrency=6, adaptive=False)
    latencies = [results[row].latency_ms for row in range(6)]
    # Six answers a service time apart, whichever request each one was.
    assert sorted(latencies) == pytest.approx([(n + 1) * latencies[0] for n in range(6)], rel=0.05)
    assert (latencies == sorted(latencies)) == (order == "fifo")
    with pytest.raises(ConfigError, match="slot_order"):
        SimulatorConfig(slots=1, slot_order="lifo")  # type: ignore[arg-type]


async def test_a_request_cancelled_while_queued_for_a_slot_leaves_the_slots_whole() -> None:
    slots = _Slots(1, random.Random(0))
    await slots.acquire()
    queued = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    # Cancelled, and the slot freed before the cancelled request runs again:
    # the freed slot skips it, and it must not look for itself in the queue.
    queued.cancel()
    slots.release()
    with pytest.raises(asyncio.CancelledError):
        await queued
    async with asyncio.timeout(1):
        await slots.acquire()  # the slot is free


@pytest.mark.looptime
async def test_a_request_its_client_abandons_is_still_computed_and_counted() -> None:
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await session.post(f"{sim.base_url}/chat/completions", json=body)
            await asyncio.sleep(5.0)
    assert (sim.stats.computed, sim.stats.abandoned, sim.stats.answered) == (1, 1, 0)


@pytest.mark.looptime
async def test_a_slot_streams_its_answer_as_it_generates_the_tokens() -> None:
    # Two at once into one slot: each answer's first token comes a prompt's
    # time (500 ms) and a token's (100 ms) after its slot was free, the rest
    # a token's time apart. The queue shows before the first token only.
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
        loop = asyncio.get_running_loop()

        async def token_times(session: aiohttp.ClientSession) -> list[float]:
            start, times = loop.time(), []
            async with session.post(f"{sim.base_url}/chat/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        choices = json.loads(line[6:])["choices"]
                        if choices and choices[0]["delta"].get("content"):
                            times.append(loop.time() - start)
            return times

        async with aiohttp.ClientSession() as session:
            answers = sorted(await asyncio.gather(token_times(session), token_times(session)))
    tokens = len(answers[0])
    one = 0.5 + 0.1 * tokens
    assert tokens > 1 and len(answers[1]) == tokens
    for waited, times in enumerate(answers):
        expected = [waited * one + 0.5 + 0.1 * (n + 1) for n in range(tokens)]
        assert times == pytest.approx(expected, abs=0.02)


@pytest.mark.looptime
async def test_timings_come_in_the_whole_answer_and_the_last_chunk_of_a_stream() -> None:
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{sim.base_url}/chat/completions", json=body) as response:
                whole = await response.json()
            body["stream"] = True
            async with session.post(f"{sim.base_url}/chat/completions", json=body) as response:
                events = (await response.read()).decode().split("\n\n")
    timings = whole["timings"]
    assert timings["prompt_ms"] == 500.0
    assert timings["predicted_ms"] == pytest.approx(100.0 * timings["predicted_n"])
    chunks = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert [c["timings"] for c in chunks if "timings" in c] == [timings]


# -- each row's own times ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.looptime
@pytest.mark.parametrize("kind", ["h11", "aiohttp", "openai"])
@pytest.mark.parametrize("stream", [True, False])
async def test_each_row_says_the_servers_own_time_apart_from_its_wait(
    kind: str, stream: bool
) -> None:
    # Three at once into one slot: the second waits one answer, the third two.
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        _, results, _ = await run(
            sim, 3, {"stream": stream}, kind=kind, concurrency=3, adaptive=False
        )
    ordered = sorted(results.values(), key=lambda result: result.latency_ms)
    for waited, result in enumerate(ordered):
        one_ms = 500.0 + 100.0 * result.completion_tokens
        assert result.server_ms == pytest.approx(one_ms, rel=0.01)
        assert result.generation_ms == pytest.approx(100.0 * result.completion_tokens, rel=0.01)
        # The rest of the latency is the queue: whole answers ahead of it.
        assert result.latency_ms - result.server_ms == pytest.approx(
            sum(500.0 + 100.0 * r.completion_tokens for r in ordered[:waited]), abs=50.0
        )
        if result.first_token_ms is not None:
            # Streamed: the slot streams tokens as it generates them, the
            # first a token's time after the prompt's.
            generating_ms = 100.0 * (result.completion_tokens - 1)
            assert result.first_token_ms == pytest.approx(
                result.latency_ms - generating_ms, abs=50.0
            )
    # One streams (trying the server's streams); the two sent meanwhile go
    # whole. (Which of them the slot takes first is down to the client's
    # connections: the openai SDK's pool does not keep the order they came.)
    streamed = [result.first_token_ms is not None for result in ordered]
    assert streamed.count(True) == (1 if stream else 0)


@pytest.mark.slow
@pytest.mark.looptime
@pytest.mark.parametrize("kind", ["h11", "aiohttp", "openai"])
@pytest.mark.parametrize("stream", [True, False])
async def test_vllms_per_request_metrics_fill_the_same_columns(kind: str, stream: bool) -> None:
    # vLLM with --enable-per-request-metrics: `metrics` instead of `timings`,
    # with the time queued; three at once into one slot, as above.
    async with Simulator(SimulatorConfig(slots=1, timings="vllm", **SLOW)) as sim:
        _, results, _ = await run(
            sim, 3, {"stream": stream}, kind=kind, concurrency=3, adaptive=False
        )
    ordered = sorted(results.values(), key=lambda result: result.latency_ms or 0.0)
    for waited, result in enumerate(ordered):
        one_ms = 500.0 + 100.0 * (result.completion_tokens or 0)
        queued_ms = sum(500.0 + 100.0 * (r.completion_tokens or 0) for r in ordered[:waited])
        assert result.server_ms == pytest.approx(one_ms, rel=0.01)
        assert result.generation_ms == pytest.approx(one_ms - 500.0, rel=0.01)
        # Streamed (the first only: it tries the server's streams): as the
        # client saw it, the first token a token's time after the prompt's;
        # whole: the server's queue and prompt time.
        expected = queued_ms + 500.0 + (100.0 if stream and waited == 0 else 0.0)
        assert result.first_token_ms == pytest.approx(expected, abs=50.0)


@pytest.mark.slow
@pytest.mark.looptime
@pytest.mark.parametrize("kind", ["h11", "aiohttp", "openai"])
async def test_a_stream_without_server_timings_measures_the_tokens_as_they_come(
    kind: str,
) -> None:
    # A hosted API: no timings; the stream's chunks 50 ms apart after 200 ms.
    # One at a time: the first tries the server's streams, the second then streams.
    async with Simulator(SimulatorConfig(latency_ms=200.0, chunk_delay_ms=50.0)) as sim:
        _, results, _ = await run(sim, 2, kind=kind, concurrency=1)
    for result in results.values():
        assert result.server_ms is None
        contents = -(-len(result.response) // STREAM_CHUNK_CHARS)
        # The role chunk goes with the headers; each content chunk 50 ms later.
        assert result.first_token_ms == pytest.approx(250.0, abs=20.0)
        assert result.generation_ms == pytest.approx(50.0 * (contents - 1), abs=20.0)


# -- the latency limit end to end ------------------------------------------------


@pytest.mark.looptime
@pytest.mark.parametrize("order", ["fifo", "any"])
@pytest.mark.parametrize("slots", [1, 4, 16])
async def test_defaults_settle_at_the_slot_count_and_compute_nothing_for_nothing(
    slots: int, order: Literal["fifo", "any"]
) -> None:
    count = 30 * slots
    async with Simulator(SimulatorConfig(slots=slots, slot_order=order, **SLOW)) as sim:
        stage, results, _ = await run(sim, count)
    assert {result.status for result in results.values()} == {"ok"}
    assert len(results) == count
    assert abs(stage.limiter.gate.slots - slots) <= 1
    assert "latency" in (stage.stats.concurrency_reason or "")
    # Every completion computed was delivered, and none twice.
    assert (sim.stats.computed, sim.stats.abandoned, sim.stats.answered) == (count, 0, count)
    assert stage.stats.abandoned == 0


@pytest.mark.slow
@pytest.mark.looptime
@pytest.mark.parametrize("timings", ["llama.cpp", None])
@pytest.mark.parametrize("jitter_ms", [0.0, 400.0])
@pytest.mark.parametrize("slots", [1, 4, 16])
async def test_defaults_keep_95_percent_of_the_best_fixed_concurrencys_throughput(
    slots: int, jitter_ms: float, timings: Literal["llama.cpp"] | None
) -> None:
    # 30 answers a slot: the start (a burst of 4, then 16 at once) costs
    # about one of them at 16 slots. With jitter, a burst's answers come
    # apart, and fewer and fewer of it are in flight as they come. Without
    # server times, drains idled 16 slots now and then: 94%.
    count = 30 * slots
    elapsed = {}
    variants: tuple[tuple[str, dict[str, Any]], ...] = (
        ("defaults", {}),
        ("fixed", {"concurrency": slots, "adaptive": False}),
        ("fixed x2", {"concurrency": 2 * slots, "adaptive": False}),
    )
    config = SimulatorConfig(slots=slots, jitter_ms=jitter_ms, timings=timings, **SLOW)
    for name, limits in variants:
        async with Simulator(config) as sim:
            _, results, elapsed[name] = await run(sim, count, **limits)
        assert {result.status for result in results.values()} == {"ok"}
        assert (sim.stats.computed, sim.stats.abandoned) == (count, 0)
    best = min(elapsed["fixed"], elapsed["fixed x2"])
    assert best / elapsed["defaults"] >= 0.95


@pytest.mark.slow
async def test_defaults_against_sixteen_slots_over_real_time_settle_and_waste_nothing() -> None:
    # Real clock and real HTTP, the simulator in a thread of its own: about
    # 0.7 s an answer (slow enough that this process's own CPU, on a shared
    # machine, does not read as the server's queue), 15 answers a slot.
    slots, count = 16, 240
    with Simulator.run_in_thread(
        SimulatorConfig(slots=slots, latency_ms=400.0, token_ms=10.0)
    ) as sim:
        async with asyncio.timeout(120):
            stage, results, _ = await run(sim, count)
        stats = sim.stats
    assert {result.status for result in results.values()} == {"ok"}
    assert len(results) == count
    assert (stats.computed, stats.abandoned, stats.answered) == (count, 0, count)
    assert abs(stage.limiter.gate.slots - slots) <= 1
    assert "latency" in (stage.stats.concurrency_reason or "")


@pytest.mark.looptime
async def test_a_slow_first_answer_does_not_become_the_latency_without_a_queue() -> None:
    # llama-cpp-python's server (no timings), one slot, its first answer 15 s
    # slower than the rest (a model's warm-up; a machine under load): the
    # first burst's answers all wait behind it. Against their latency the
    # queue of the next rounds looks flat; the next burst's first request,
    # sent alone, answers far faster than any of them, and re-bases it.
    config = SimulatorConfig(slots=1, timings=None, warmup_ms=15_000.0, **SLOW)
    async with Simulator(config) as sim:
        stage, results, _ = await run(sim, 40)
    assert {result.status for result in results.values()} == {"ok"}
    assert (sim.stats.computed, sim.stats.abandoned, stage.stats.abandoned) == (40, 0, 0)
    assert stage.limiter.gate.slots <= 2
    assert "latency" in (stage.stats.concurrency_reason or "")


@pytest.mark.looptime
@pytest.mark.parametrize("slots", [1, 4])
async def test_a_reference_taken_while_the_server_was_slow_is_remeasured_by_a_drain(
    slots: int,
) -> None:
    # llama-cpp-python's server (no timings), slow for its first answers (a
    # spell of load: 6 s more each), then fast. The starting rounds' answers
    # are all slow, the first sent alone included, and become the latency
    # without a queue; past slow start the queue kept on purpose never
    # drains, so no answer is sent alone again, and against that reference
    # a queue of several requests looked flat: the cap stayed at 9 on one
    # slot, 8 on four. A drain now and then sends one request alone, whose
    # latency re-bases the reference. (Not streamed, as llama-cpp-python's
    # server answers a run: streamed, the slow spell is in the tokens'
    # time, which is no queue's.)
    count = 150 * slots
    config = SimulatorConfig(
        slots=slots, timings=None, warmup_ms=6000.0, warmup_answers=12 * slots, **SLOW
    )
    async with Simulator(config) as sim:
        stage, results, _ = await run(sim, count, {"stream": False})
    assert {result.status for result in results.values()} == {"ok"}
    assert (sim.stats.computed, sim.stats.abandoned, stage.stats.abandoned) == (count, 0, 0)
    assert stage.limiter.gate.slots <= slots + 1
    assert "latency" in (stage.stats.concurrency_reason or "")


@pytest.mark.looptime
@pytest.mark.parametrize("order", ["fifo", "any"])
@pytest.mark.parametrize("count", [15, 30, 50])
@pytest.mark.parametrize("timings", [None, "llama.cpp"])
async def test_one_slot_settles_at_two_from_the_first_burst_it_queued(
    count: int, timings: Literal["llama.cpp"] | None, order: Literal["fifo", "any"]
) -> None:
    # llama-cpp-python's server and Ollama send no timings. The first burst
    # (4 at once) comes back from one slot as a staircase: 2 s, 4 s, 6 s,
    # 8 s, in the order sent, or in any (llama-cpp-python's). Its mean was
    # the latency without a queue, and the run stayed in slow start (15
    # rows: the other 11 at once) or settled at 4 to 7. The first answer,
    # with nothing of ours ahead of it, is that latency.
    config = SimulatorConfig(slots=1, timings=timings, slot_order=order, **SLOW)
    async with Simulator(config) as sim:
        stage, results, _ = await run(sim, count)
    assert {result.status for result in results.values()} == {"ok"}
    assert (sim.stats.computed, sim.stats.abandoned, sim.stats.answered) == (count, 0, count)
    assert stage.stats.abandoned == 0
    assert stage.limiter.gate.slots <= 2
    # The first burst's (and in any order, the same burst again: see
    # test_a_server_that_serves_its_queue_in_any_order_...); none since.
    assert sim.stats.max_queued <= 3
    assert "waves of 1" in (stage.stats.concurrency_reason or "")


@pytest.mark.looptime
@pytest.mark.parametrize("count", [15, 30])
@pytest.mark.parametrize("timings", [None, "llama.cpp"])
async def test_four_slots_settle_within_one_from_the_burst_that_queued(
    timings: Literal["llama.cpp"] | None, count: int
) -> None:
    # The first burst fits 4 slots; the next (16) comes back in 4 waves of
    # 4. Little's law over a burst, whose requests in flight fall as it is
    # answered, read 5.5 slots (cap 6 or 7 after 30 rows); the waves say 4.
    # With 15 rows the second burst is 11, its round never full: the run
    # ended "starting", settled at 16, until the end judged what it had.
    config = SimulatorConfig(slots=4, timings=timings, **SLOW)
    async with Simulator(config) as sim:
        stage, results, _ = await run(sim, count)
    assert {result.status for result in results.values()} == {"ok"}
    assert (sim.stats.computed, sim.stats.abandoned, sim.stats.answered) == (count, 0, count)
    assert stage.limiter.gate.slots <= 5
    assert "waves of 4" in (stage.stats.concurrency_reason or "")


async def varied_rows(count: int, seed: int) -> AsyncIterator[ChatRequest]:
    """Prompts of 8 to 30 random words: the simulator's answers echo them,
    so their lengths vary as much."""
    rng = random.Random(seed)
    for row in range(count):
        words = " ".join(f"word{rng.randrange(1000)}" for _ in range(rng.randrange(8, 30)))
        yield ChatRequest(row, [{"role": "user", "content": words}])


@pytest.mark.looptime
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("order", ["fifo", "any"])
@pytest.mark.parametrize("slots", [1, 4, 16])
async def test_slots_without_server_times_settle_within_one_for_answers_of_varying_length(
    slots: int, order: Literal["fifo", "any"], seed: int
) -> None:
    # Ollama, or vLLM without its metrics: no server times, and answers of
    # 0.5 to 1.5 s. Whole latencies mixed each answer's length with its
    # wait, and 4 slots settled anywhere from 3 to 10. A stream shows both:
    # the wait is before its first token, the length after.
    count = 30 * slots
    config = SimulatorConfig(
        slots=slots, slot_order=order, timings=None, latency_ms=200.0, token_ms=20.0, seed=seed
    )
    async with Simulator(config) as sim:
        model = ModelConfig(name=MODEL, base_url=sim.base_url)
        transport = make_transport(model, "key", "h11")
        stage = CallStage(model, LimitsConfig(), transport)
        try:
            results = [result async for result in stage.results(varied_rows(count, seed))]
        finally:
            await transport.aclose()
    assert [result.status for result in results] == ["ok"] * count
    assert (sim.stats.computed, sim.stats.abandoned, stage.stats.abandoned) == (count, 0, 0)
    assert abs(stage.limiter.gate.slots - slots) <= 1
    assert stage.limiter.latency is not None and stage.limiter.latency.undone == 0


def test_an_answers_own_generation_is_no_queue() -> None:
    # The first burst's answers short (0.2 s), the rest of 1 to 2 s, each
    # 0.5 s to its first token: flat, whatever their lengths (on whole
    # latencies, x2.6: cut). An answer that came whole is taken at the
    # token rate the streams showed (0.1 s a token).
    gate = ConcurrencyGate(ceiling=64, start=64)
    limit = LatencyLimit(gate)
    rng = random.Random(0)
    for n in range(200):
        tokens = 3 if n < 4 else rng.randrange(11, 21)
        generation = 0.1 * (tokens - 1)
        streamed = n % 3 != 1
        limit.observe(
            gate.sent(),
            Sample(
                0.5 + generation,
                gate.slots,
                generation_s=generation if streamed else None,
                completion_tokens=tokens,
                alone=n == 0,
            ),
        )
    assert (gate.slots, limit.cuts, limit.undone, limit.capacity) == (64, 0, 0, None)


@pytest.mark.slow
@pytest.mark.looptime
@pytest.mark.parametrize("jitter_ms", [400.0, 1000.0])
async def test_a_hosted_apis_jittery_answers_are_no_queue_and_the_cap_climbs(
    jitter_ms: float,
) -> None:
    # No slots (a hosted API), answers 1-3 s apart at random: a burst's
    # answers come in any order, never in waves a service time apart.
    async with Simulator(SimulatorConfig(jitter_ms=jitter_ms, **SLOW)) as sim:
        stage, results, _ = await run(sim, 400)
    assert {result.status for result in results.values()} == {"ok"}
    assert stage.limiter.gate.slots == 32
    assert stage.limiter.latency is not None
    assert stage.limiter.latency.cuts == 0


@pytest.mark.slow
@pytest.mark.looptime
async def test_a_jittery_servers_lucky_answer_sent_alone_does_not_cap_it_under_its_slots() -> None:
    # llama-cpp-python's server (no timings), 16 slots, answers 400 ms apart
    # at random. A drain's request, sent alone, re-bases the latency without
    # a queue when it is below it beyond the noise; one answer varies about
    # sqrt(n) times more than a round's mean of n, and a lucky one judged by
    # the mean's noise (a tenth under) made the queue of the next rounds
    # look larger than it was: capped at 14, two slots idle.
    slots, count = 16, 480
    config = SimulatorConfig(slots=slots, timings=None, jitter_ms=400.0, **SLOW)
    async with Simulator(config) as sim:
        stage, results, _ = await run(sim, count)
    assert {result.status for result in results.values()} == {"ok"}
    assert (sim.stats.computed, sim.stats.abandoned) == (count, 0)
    assert stage.limiter.gate.slots >= slots


def answer_burst(
    limit: LatencyLimit,
    *latencies: float,
    alone: bool = True,
    generations: tuple[float, ...] | None = None,
    tokens: tuple[int, ...] | None = None,
) -> LatencyLimit:
    """A burst sent at once (its first with nothing of the run's in flight,
    if ``alone``), answered with these latencies, in the order sent; streamed
    if ``generations`` (each answer's first token to its last); of these
    completion ``tokens``, if given."""
    sequences = [limit.gate.sent() for _ in latencies]
    for n, sequence in enumerate(sequences):
        limit.sent(sequence, alone=alone and n == 0)
    streams = generations or (None,) * len(latencies)
    counts = tokens or (None,) * len(latencies)
    for n, (sequence, latency, generation, count) in enumerate(
        zip(sequences, latencies, streams, counts, strict=True)
    ):
        sample = Sample(
            latency, 4.0, alone=alone and n == 0, generation_s=generation, completion_tokens=count
        )
        limit.observe(sequence, sample)
    return limit


def first_burst(*latencies: float, alone: bool = True) -> LatencyLimit:
    """A run's first burst (none: a limit yet to send one)."""
    return answer_burst(
        LatencyLimit(ConcurrencyGate(ceiling=32, start=32)), *latencies, alone=alone
    )


def twice(*latencies: float) -> LatencyLimit:
    """The first burst, then the same again (see _burst_waves)."""
    return answer_burst(first_burst(*latencies), *latencies)


def test_a_burst_is_read_as_queued_only_in_waves_a_service_time_apart() -> None:
    one_slot = twice(2.0, 4.0, 6.0, 8.0)
    assert one_slot.gate.slots == 2
    assert one_slot.service_s() == 2.0
    assert twice(2.0, 2.0, 4.0, 4.1).gate.slots == 3  # two slots
    # No waves, so slow start goes on (4 times more):
    # each wave the same size but the last: not one slot, then two;
    assert first_burst(2.0, 4.0, 4.0, 6.0).gate.slots == 16
    # rising less than half a service time a wave: jitter;
    assert first_burst(1.0, 1.2, 1.35, 1.45).gate.slots == 16
    # rising in steps, but not of a service time each: jitter.
    assert first_burst(1.0, 1.55, 2.1, 2.65).gate.slots == 16
    # The first went out behind a request of the run's (of another burst).
    assert first_burst(2.0, 4.0, 6.0, 8.0, alone=False).gate.slots == 16


def test_a_streamed_burst_of_answers_of_varying_length_shows_its_slots_by_when_each_began() -> None:
    def burst_twice(answers: list[tuple[float, float]]) -> LatencyLimit:
        """(latency, generation) answers, the same burst twice."""
        latencies, generations = (tuple(column) for column in zip(*answers, strict=True))
        limit = answer_burst(first_burst(), *latencies, generations=generations)
        return answer_burst(limit, *latencies, generations=generations)

    # One slot, 0.22 s to each first token: each answer began as the one
    # before it ended (0.78, 1.86, 2.58 s), though no two took as long.
    one_slot = burst_twice([(0.78, 0.56), (1.86, 0.86), (2.58, 0.5), (4.02, 1.22)])
    assert (one_slot.gate.slots, one_slot.capacity) == (2, 1.0)
    # Two slots: the third began as the first ended, the fourth as the second.
    two_slots = burst_twice([(0.7, 0.5), (1.2, 1.0), (1.5, 0.6), (1.6, 0.2)])
    assert (two_slots.gate.slots, two_slots.capacity) == (3, 2.0)
    # A hosted API's first tokens vary (0.3 to 1.2 s), and no answer began
    # as another ended: slow start goes on (4 times more).
    hosted = burst_twice([(1.3, 1.0), (1.3, 0.8), (2.4, 1.5), (1.8, 0.6)])
    assert (hosted.gate.slots, hosted.capacity) == (16, None)


def test_whole_answers_of_varying_length_served_one_at_a_time_show_one_slot() -> None:
    def burst_twice(latencies: tuple[float, ...], tokens: tuple[int, ...]) -> LatencyLimit:
        limit = answer_burst(first_burst(), *latencies, tokens=tokens)
        return answer_burst(limit, *latencies, tokens=tokens)

    # llama-cpp-python's server: one slot, no streams, 0.2 s + 0.05 s a
    # token. Answers of 5, 20, 10 and 15 tokens each came their own time
    # after the one before (0.45, 1.2, 0.7, 0.95 s), in whatever order sent.
    one_slot = burst_twice((1.65, 0.45, 3.3, 2.35), (20, 5, 15, 10))
    assert (one_slot.gate.slots, one_slot.capacity) == (2, 1.0)
    # A hosted API's answers come about at once, their times after the one
    # before no answer's own: slow start goes on.
    hosted = burst_twice((1.3, 1.5, 1.9, 2.2), (10, 12, 20, 15))
    assert (hosted.gate.slots, hosted.capacity) == (16, None)


@pytest.mark.looptime
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("order", ["fifo", "any"])
async def test_one_slot_that_streams_nothing_settles_at_two_for_answers_of_varying_length(
    order: Literal["fifo", "any"], seed: int
) -> None:
    # llama-cpp-python's server without --max-tokens: no server times, no
    # streams (it cuts them short), answers of 0.5 to 1.5 s. The first burst
    # was no waves, and a queue of 3 its reference: settled at 7.
    config = SimulatorConfig(
        slots=1, slot_order=order, timings=None, latency_ms=200.0, token_ms=20.0, seed=seed
    )
    async with Simulator(config) as sim:
        model = ModelConfig(name=MODEL, base_url=sim.base_url, stream=False)
        transport = make_transport(model, "key", "h11")
        stage = CallStage(model, LimitsConfig(), transport)
        try:
            results = [result async for result in stage.results(varied_rows(30, seed))]
        finally:
            await transport.aclose()
    assert [result.status for result in results] == ["ok"] * 30
    assert (sim.stats.computed, sim.stats.abandoned) == (30, 0)
    assert stage.limiter.gate.slots == 2


def test_the_round_after_a_cut_that_ends_slow_start_is_not_judged() -> None:
    # Slow start judges a burst once it is all answered: the next round
    # begins on an empty server, its first answers wait for nothing, and it
    # reads less queue than the new cap keeps. It only confirms the cut; the
    # round after it is judged.
    limit = first_burst(1.0, 1.0, 1.0, 1.0)
    sequences = [limit.gate.sent() for _ in range(16)]
    for sequence in sequences:
        limit.sent(sequence, alone=sequence == sequences[0])
    for k, sequence in enumerate(sequences):  # no waves: x2.1 at 16, about 7.5 at once
        limit.observe(sequence, Sample(1.0 + 0.15 * k, 16.0, alone=k == 0))
    caps = [limit.cap]
    for _ in range(2):
        for _ in range(9):
            limit.observe(limit.gate.sent(), Sample(1.5, 9.0))
        caps.append(limit.cap)
    assert caps == [9.0, 9.0, 7.0]


def test_a_server_that_serves_its_queue_in_any_order_shows_its_waves_in_the_order_answered() -> (
    None
):
    # llama-cpp-python's server hands its one slot to any request waiting:
    # a burst of 4 comes back 2 s, 6 s, 4 s, 8 s. Read in the order sent,
    # that was a hosted API's jitter: the cap went to 16, then settled at 4
    # to 6 on one slot, every answer queued behind 3 to 5 others.
    once = first_burst(2.0, 6.0, 4.0, 8.0)
    # Over 4 answers, jitter now and then falls into such waves: the burst
    # goes again, at the same cap, and is read as a queue only if it shows
    # the same waves.
    assert once.gate.slots == 4
    assert once.slow_start
    assert answer_burst(once, 2.0, 8.0, 4.0, 6.0).gate.slots == 2
    assert once.service_s() == 2.0
    assert "waves of 1" in once.reason
    # No waves the second time: jitter, and slow start goes on.
    twice = answer_burst(first_burst(2.0, 6.0, 4.0, 8.0), 2.0, 3.1, 2.6, 2.3)
    assert twice.gate.slots == 16
    # Waves not a service time apart: jitter, read as no queue at once.
    assert first_burst(2.0, 5.8, 3.0, 7.5).gate.slots == 16
    # Over 16 answers in 4 waves of 4, jitter does not: read at once.
    sixteen = [2.0 * (1 + n % 4) for n in range(16)]
    limit = first_burst(2.0, 2.0, 2.0, 2.0)
    assert limit.gate.slots == 16
    assert answer_burst(limit, *sixteen).gate.slots == 5


def test_a_request_sent_after_a_burst_was_answered_is_no_part_of_its_waves() -> None:
    # llama-cpp-python cuts the stream trial (the burst's first request)
    # short once others wait, and it goes again when they are answered,
    # alone: 2 s, after 2, 4 and 6 s. Read with the burst, no waves: the
    # cap went on to 16, and settled at 3 to 7 on one slot.
    limit = LatencyLimit(ConcurrencyGate(ceiling=32, start=32))
    sequences = [limit.gate.sent() for _ in range(4)]
    for n, sequence in enumerate(sequences):
        limit.sent(sequence, alone=n == 0)
    for sequence, latency in zip(sequences[1:], (2.0, 4.0, 6.0), strict=True):
        limit.observe(sequence, Sample(latency, 3.0))
    retry = limit.gate.sent()
    limit.sent(retry, alone=True)
    limit.observe(retry, Sample(2.0, 1.0, alone=True))
    # Three answers in waves of 1, read without the retry: the same burst
    # again, to be sure (see _burst_waves).
    assert (limit.gate.slots, limit.slow_start) == (4, True)
    answer_burst(limit, 2.0, 4.0, 6.0, 8.0)
    assert limit.gate.slots == 2
    assert "waves of 1" in limit.reason


def test_a_first_answer_that_waited_for_work_ahead_is_not_the_latency_without_a_queue() -> None:
    # llama-cpp-python computed the stream trial it cut short before the
    # burst's first answer: 1.75 s, the next a service time (1.3 s) apart
    # each. Against 1.75 s, 3 in flight on one slot (3.9 s) read as 1.5
    # slots, and the cap stayed at 3.
    limit = twice(1.75, 3.05, 4.35, 5.65)
    assert limit.gate.slots == 2
    assert limit.service_s() == pytest.approx(1.3 * 1.05)
    # The same waves with the first answer a service time: that is it.
    assert twice(1.3, 2.6, 3.9, 5.2).service_s() == pytest.approx(1.3)


def test_the_end_of_the_rows_judges_no_queue_on_a_few_answers() -> None:
    # A hosted API, its first burst flat (on to 16), then 2 rows left:
    # their answers 1 s and 2 s read as waves of 1, and the end of the run
    # cut the cap to 2 ("the server computes 1 at once") on two answers of
    # jitter; under Ray, at the end of a shard, for the shards after it.
    limit = first_burst(1.0, 1.0, 1.0, 1.0)
    assert limit.gate.slots == 16
    answer_burst(limit, 1.0, 2.0)
    limit.finish()
    assert (limit.gate.slots, limit.cuts) == (16, 0)
    # Waves over 8 answers or more are sure: 11 rows left, 4 slots.
    limit = first_burst(1.0, 1.0, 1.0, 1.0)
    answer_burst(limit, *[1.0 * (1 + n // 4) for n in range(11)])
    limit.finish()
    assert limit.gate.slots == 5
    assert "waves of 4" in limit.reason


def test_a_hosted_apis_burst_with_one_slow_answer_keeps_a_reference_of_its_mean() -> None:
    # Four answers from a hosted API, in the order sent, the last slow:
    # waves of 3 and 1, a queue of one, no more than the one kept, so
    # nothing to cut. Its first answer, low by luck, was the latency
    # without a queue all the same: every round after it read as a queue,
    # and the cap went down to 2 (110 s for 200 rows, not 14).
    limit = first_burst(0.81, 1.0, 1.12, 1.96)
    assert limit.gate.slots == 16
    assert limit.cuts == 0
    assert (limit.service_s() or 0.0) > 1.2


async def test_a_cut_that_ends_slow_start_grants_no_more_than_the_new_cap() -> None:
    # Ending slow start ends the bursts, which frees the places the burst
    # held back: were the cap still the old one then, a whole burst more
    # would go into a queue the cut was there to empty.
    gate = ConcurrencyGate(ceiling=32, start=32)
    limit = LatencyLimit(gate)

    async def burst(*latencies: float, waiters: int = 0) -> list[asyncio.Task[None]]:
        for _ in latencies:
            await gate.acquire()
        sequences = [gate.sent() for _ in latencies]
        for n, sequence in enumerate(sequences):
            limit.sent(sequence, alone=n == 0)
        waiting = [asyncio.create_task(gate.acquire()) for _ in range(waiters)]
        await asyncio.sleep(0)
        for n, (sequence, latency) in enumerate(zip(sequences, latencies, strict=True)):
            limit.observe(sequence, Sample(latency, len(latencies), alone=n == 0))
            gate.release()
        await asyncio.sleep(0)
        return waiting

    await burst(2.0, 2.0, 2.0, 2.0)  # 4 slots at least: on to 16
    assert gate.slots == 16
    waiting = await burst(*[2.0 * (1 + n // 4) for n in range(16)], waiters=20)
    assert gate.slots == 5
    assert gate.in_flight == 5
    for task in waiting:
        task.cancel()


async def test_a_drain_grants_nothing_until_nothing_is_in_flight_then_one_sent_alone() -> None:
    gate = ConcurrencyGate(ceiling=8, start=4)
    for _ in range(4):
        await gate.acquire()
    gate.drain()
    gate.release()  # a place free, but three of the run's own still in flight
    waiting = [asyncio.create_task(gate.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in waiting)
    for _ in range(3):
        gate.release()
    await asyncio.sleep(0)
    # The first goes alone (nothing in flight when granted); the drain is
    # over and the others follow it at once, up to the cap.
    assert all(task.done() for task in waiting)
    assert (gate.in_flight, gate.draining) == (3, False)


def drain_rounds(server_s: float | None, *, waited: Literal["alike", "some"]) -> list[int]:
    """The rounds at which a run at 9 in flight on 8 slots drains. Each
    round's answers are 1/9 over the reference on the whole (the one queued
    kept): all ``alike``, or ``some`` of them at the reference and one a
    service time later (it waited for a slot)."""
    gate = ConcurrencyGate(ceiling=64, start=64)
    limit = LatencyLimit(gate)
    for _ in range(4):  # the first burst: the reference
        limit.observe(gate.sent(), Sample(1.0, 4.0, server_s))
    limit.observe(gate.sent(), Sample(1.0, 16.0, server_s, alone=True))
    for _ in range(15):  # at 16 a queue: cut to 9 (8 slots, one kept)
        limit.observe(gate.sent(), Sample(2.0, 16.0, server_s))
    assert gate.slots == 9
    at = []
    for answer in range(9 * 40):
        alone = gate.draining
        if alone:
            at.append(answer // 9)
            gate.draining = False
        latency = 1.0 + 1.0 / 9
        if alone or waited == "some":
            latency = 2.0 if answer % 9 == 4 and not alone else 1.0
        limit.observe(gate.sent(), Sample(latency, 9.0, server_s, alone=alone))
    return at


def test_drains_come_ever_more_seldom_and_never_where_the_server_says_its_time() -> None:
    # A many-slot server idles while a drain empties it: each drain that
    # finds the reference right doubles the rounds before the next.
    assert drain_rounds(None, waited="alike") == [4, 13, 30]
    assert drain_rounds(1.0, waited="alike") == []


def test_no_drain_while_answers_at_the_reference_come_beside_one_that_waited() -> None:
    # Those at the reference waited for nothing: it holds no queue, and the
    # slots are not idled to test it.
    assert drain_rounds(None, waited="some") == []


@pytest.mark.looptime
async def test_defaults_against_one_slot_are_no_slower_than_a_plain_loop() -> None:
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        loop_s = await plain_loop(sim, 20)
        _, results, enrich_s = await run(sim, 20)
    assert {result.status for result in results.values()} == {"ok"}
    assert enrich_s <= loop_s * 1.01


@pytest.mark.looptime
async def test_flat_latency_doubles_up_to_the_ceiling() -> None:
    # No slots (a hosted API without limits): one request, then two, four...
    async with Simulator(SimulatorConfig(**SLOW)) as sim:
        stage, results, _ = await run(sim, 400)
    assert {result.status for result in results.values()} == {"ok"}
    assert stage.limiter.gate.slots == 32
    assert stage.stats.concurrency_reason == "the configured concurrency (32), latency flat"


@pytest.mark.looptime
async def test_a_concurrency_given_is_where_the_run_starts() -> None:
    async with Simulator(SimulatorConfig(**SLOW)) as sim:
        _, results, elapsed = await run(sim, 40, concurrency=20)
    one = 0.5 + 0.1 * max(result.completion_tokens or 0 for result in results.values())
    assert sim.stats.max_in_flight == 20
    assert elapsed <= 2 * one + 0.1  # two waves, no ramp


@pytest.mark.looptime
async def test_a_request_queued_behind_the_runs_own_is_not_cut_as_stuck() -> None:
    # Four at once into one slot, with a 3 s stall timeout (the slot model
    # sends nothing until an answer is computed, about 2 s): the last waits
    # 8 s for its first byte, queued, not stuck.
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        stage, results, _ = await run(sim, 8, {"stall_timeout_s": 3.0}, concurrency=4)
    assert {result.status for result in results.values()} == {"ok"}
    assert (stage.stats.stalled, stage.stats.abandoned, sim.stats.abandoned) == (0, 0, 0)
    assert sim.stats.computed == 8


@pytest.mark.looptime
async def test_time_queued_behind_the_runs_own_requests_counts_against_no_timeout() -> None:
    # Six at once into one slot with a 5 s timeout: the last is answered
    # about 10 s after it was sent. One attempt a row: a timeout would fail it.
    async with Simulator(SimulatorConfig(slots=1, **SLOW)) as sim:
        stage, results, _ = await run(sim, 24, {"timeout_s": 5.0}, concurrency=6, max_attempts=1)
    assert {result.status for result in results.values()} == {"ok"}
    assert (stage.stats.abandoned, sim.stats.abandoned, sim.stats.computed) == (0, 0, 24)
    assert stage.limiter.gate.slots <= 2


@pytest.mark.looptime
async def test_a_timeout_while_queued_lowers_the_cap_and_keeps_a_place_for_the_ghost() -> None:
    # The server's pace: an answer a second, each taking 1 s of its time (one slot).
    limiter = RateLimiter(concurrency=8, latency=True, start_at_ceiling=True)
    loop = asyncio.get_running_loop()
    for _ in range(4):
        async with limiter.request(1) as permit:
            await asyncio.sleep(1.0)
            limiter.succeeded(permit, None, {}, server_s=1.0)
    async with contextlib.AsyncExitStack() as stack:
        first_request = limiter.request(1)
        first = await first_request.__aenter__()
        queued = await stack.enter_async_context(limiter.request(1))
        await asyncio.sleep(1.5)
        limiter.succeeded(first, None, {}, server_s=1.0)
        await first_request.__aexit__(None, None, None)
        limiter.saturated(queued)
    assert limiter.gate.cap == 1.0
    assert limiter.stats.saturated == 1
    # The abandoned request is computed for about one more second: its place
    # stays taken meanwhile.
    assert limiter.gate.in_flight == 1
    start = loop.time()
    async with limiter.request(1):
        assert loop.time() - start == pytest.approx(1.0, abs=0.05)


# -- the rules ------------------------------------------------------------------


def test_the_queue_clock_counts_the_time_spent_behind_earlier_requests() -> None:
    clock = QueueClock()
    clock.sent(1, 0.0)
    clock.sent(2, 1.0)
    clock.sent(3, 2.0)
    assert clock.behind_s(1, 5.0) == 0.0
    assert clock.behind_s(3, 5.0) == 3.0  # 1 and 2 still in flight
    clock.done(2, 6.0)  # not the oldest: 3 is still behind 1
    assert clock.behind_s(3, 7.0) == 5.0
    clock.done(1, 8.0)  # 3 is at the head from now on
    assert clock.behind_s(3, 20.0) == 6.0


def test_the_head_of_the_runs_queue_is_computed_while_none_behind_it_is_answered() -> None:
    clock = QueueClock()
    clock.sent(1, 0.0)
    assert clock.head_s(1, 5.0) == 0.0  # alone: slow or stuck, who can tell
    clock.sent(2, 1.0)
    clock.sent(3, 2.0)
    assert clock.head_s(1, 30.0) == 29.0  # since one waits behind it, unanswered
    assert clock.head_s(2, 30.0) == 0.0  # not the head: queued (behind_s)
    clock.done(1, 31.0)
    assert clock.head_s(2, 40.0) == 9.0  # the head since 1 was answered
    clock.done(3, 42.0)  # the server answered one sent after it: passed it by
    assert clock.head_s(2, 60.0) == 11.0


def test_nothing_waited_behind_a_request_cut_as_stuck() -> None:
    # A hung request is not being computed: those sent after it were not
    # queued behind it, and their stall timeout counts from their sending.
    clock = QueueClock()
    clock.sent(1, 0.0)
    clock.sent(2, 1.0)
    assert clock.behind_s(2, 4.0) == 3.0
    clock.done(1, 5.0, stuck=True)
    assert clock.behind_s(2, 6.0) == 0.0


def test_a_request_the_server_passed_by_waits_in_no_queue_of_ours() -> None:
    # A hosted API answering around two hung requests: the second one's
    # silence is not queueing behind the first, nor computing once the
    # first is cut, so its stall timeout counts from its own sending.
    clock = QueueClock()
    clock.sent(1, 0.0)  # hangs
    clock.sent(2, 0.5)  # hangs
    clock.sent(3, 0.6)  # answered
    clock.sent(4, 1.0)  # in flight
    clock.done(3, 0.8)
    assert clock.behind_s(2, 4.0) == pytest.approx(0.3)  # until 3 passed it by
    assert clock.head_s(1, 4.0) == pytest.approx(0.3)  # computing until 3 passed it by
    clock.done(1, 4.0, stuck=True)
    assert clock.behind_s(2, 6.0) == 0.0
    assert clock.head_s(2, 6.0) == pytest.approx(0.3)


def test_a_latency_rise_that_does_not_fall_with_fewer_in_flight_is_taken_back() -> None:
    gate = ConcurrencyGate(ceiling=8, start=8)
    limit = LatencyLimit(gate, start_at_ceiling=True)
    sequence = 0

    def round_of(latency: float) -> None:
        nonlocal sequence
        for _ in range(8):
            sequence += 1
            gate.sent()
            limit.observe(sequence, Sample(latency, gate.slots))

    round_of(1.0)  # the reference
    round_of(2.0)  # twice as slow at 8 in flight: a queue?
    assert gate.slots == 5  # about 4 computed at once, and one kept queued
    round_of(2.0)  # at 4 just as slow: the server slowed down, not our queue
    assert gate.slots == 8
    assert (limit.cuts, limit.undone) == (0, 1)
    assert "did not fall" in limit.reason


def test_an_answer_sent_alone_far_faster_than_all_before_it_rebases_the_reference() -> None:
    gate = ConcurrencyGate(ceiling=32, start=32)
    limit = LatencyLimit(gate)
    sequence = 0

    def round_of(*latencies: float, alone: float | None = None) -> None:
        nonlocal sequence
        if alone is not None:
            sequence = gate.sent()
            limit.observe(sequence, Sample(alone, gate.slots, alone=True))
        for latency in latencies:
            sequence = gate.sent()
            limit.observe(sequence, Sample(latency, gate.slots))

    # The first burst, all slow (queued behind a slow first answer on one
    # slot): flat against itself, it becomes the reference.
    round_of(16.0, 17.0, 18.0, alone=15.0)
    assert gate.slots == 16
    # The next: its first, sent alone, takes 1 s; the rest queue behind it.
    # Against the old reference they look flat; against 1 s, a queue.
    round_of(*[1.0 + n for n in range(1, 16)], alone=1.0)
    assert gate.slots <= 3
    assert limit.service_s() == 1.0
    # A jittery server's answer alone, a little under the fastest before it,
    # re-bases nothing.
    jittery = LatencyLimit(ConcurrencyGate(ceiling=32, start=32))
    for latency in (0.25, 0.2, 0.3, 0.22):
        jittery.observe(jittery.gate.sent(), Sample(latency, 4.0))
    jittery.observe(jittery.gate.sent(), Sample(0.12, 16.0, alone=True))
    for _ in range(15):
        jittery.observe(jittery.gate.sent(), Sample(0.24, 16.0))
    assert jittery.gate.slots == 32
    assert (jittery.service_s() or 0.0) > 0.2


def test_a_lucky_round_of_a_jittery_server_does_not_lower_the_reference() -> None:
    # Answers that vary (0.6 to 1.1 s) without any queue: the lowest round
    # mean of many is low by luck, and against it every later round would
    # read as a queue (cut after cut, a cluster worker's cap never regained).
    # A round lowers the latency without a queue only by what it shows
    # beyond its own standard error.
    gate = ConcurrencyGate(ceiling=8, start=8)
    limit = LatencyLimit(gate, start_at_ceiling=True)
    sequence = 0

    def round_of(*latencies: float) -> None:
        nonlocal sequence
        for latency in latencies:
            sequence = gate.sent()
            limit.observe(sequence, Sample(latency, gate.slots))

    round_of(*[1.0] * 8)  # the reference, without noise
    round_of(*[0.6, 1.1] * 4)  # mean 0.85, give or take 0.09
    assert limit.service_s() == 1.0
    round_of(*[0.8] * 8)  # steadily faster: that is no luck
    assert limit.service_s() == 0.8


@pytest.mark.looptime
async def test_a_slow_answer_at_the_head_of_the_runs_queue_is_not_cut_while_computed() -> None:
    # llama-cpp-python's server: one slot, no timings, answers not streamed
    # (the stall timeout is then a timeout on the whole answer: 20 s until
    # answers have taught it). Row 6's long prompt makes a 30 s answer; the
    # rows sent after it wait behind it, unanswered: the server is computing
    # it, not stuck on it, and cutting it would throw that work away.
    async def requests() -> AsyncIterator[ChatRequest]:
        for row in range(16):
            text = f"question number {row}" + " and so on" * (120 if row == 6 else 0)
            yield ChatRequest(row, [{"role": "user", "content": text}])

    config = SimulatorConfig(slots=1, timings=None, **SLOW)
    async with Simulator(config) as sim:
        model = ModelConfig(name=MODEL, base_url=sim.base_url, stream=False)
        transport = make_transport(model, "key", "aiohttp")
        stage = CallStage(model, LimitsConfig(), transport)
        try:
            results = {result.row_id: result async for result in stage.results(requests())}
        finally:
            await transport.aclose()
    assert {result.status for result in results.values()} == {"ok"}
    assert (results[6].latency_ms or 0.0) > 1000.0 * 25.0
    assert (sim.stats.computed, sim.stats.abandoned) == (16, 0)
    assert (stage.stats.abandoned, stage.stats.stalled) == (0, 0)


@pytest.mark.looptime
@pytest.mark.parametrize("kind", ["h11", "aiohttp", "openai"])
@pytest.mark.parametrize("fault", ["cut", "interrupt"])
async def test_a_stream_cut_short_without_its_finish_reason_is_retried_not_kept(
    kind: str, fault: str
) -> None:
    # llama-cpp-python's server ends a stream with [DONE] and no finish
    # reason when another request comes (its interrupt_requests): such an
    # answer is a part of one. The row is asked again, without streaming.
    # Under uvicorn the connection is then dropped without the end of the
    # body ("interrupt"): after [DONE] that is no connection error either.
    cut = f" [[fault:{fault}:1]]"

    async def requests() -> AsyncIterator[ChatRequest]:
        for row in range(6):
            yield ChatRequest(
                row, [{"role": "user", "content": f"question {row}{cut * (row % 2)}"}]
            )

    async with Simulator(SimulatorConfig(slots=2, **SLOW)) as sim:
        model = ModelConfig(name=MODEL, base_url=sim.base_url)
        transport = make_transport(model, "key", kind)
        stage = CallStage(model, LimitsConfig(), transport)
        try:
            results = {result.row_id: result async for result in stage.results(requests())}
        finally:
            await transport.aclose()
        assert sim.stats.faults >= 1
    for row, result in results.items():
        assert result.status == "ok"
        messages = [{"role": "user", "content": f"question {row}{cut * (row % 2)}"}]
        assert result.response == expected_answer(messages, MODEL)
        assert result.finish_reason == "stop"
    assert stage.stats.retries >= 1
    assert "interrupt_requests" in (getattr(transport, "stream_fallback", None) or "")


@pytest.mark.looptime
@pytest.mark.parametrize("kind", ["h11", "aiohttp", "openai"])
async def test_one_request_tries_streaming_before_a_burst_streams(kind: str) -> None:
    # Until a streamed answer has come whole with its usage, the others sent
    # meanwhile go whole: a server that cuts a stream short when another
    # request comes (llama-cpp-python) would cut a whole burst of streams.
    async with Simulator(SimulatorConfig(slots=4, **SLOW)) as sim:
        model = ModelConfig(name=MODEL, base_url=sim.base_url)
        transport = make_transport(model, "key", kind)
        try:
            first = await asyncio.gather(
                *(transport.complete([{"role": "user", "content": f"q{n}"}]) for n in range(4))
            )
            streamed_at_first = sim.stats.streamed
            then = await asyncio.gather(
                *(transport.complete([{"role": "user", "content": f"r{n}"}]) for n in range(4))
            )
        finally:
            await transport.aclose()
    assert [c.streamed for c in first] == [True, False, False, False]
    assert streamed_at_first == 1
    assert all(c.streamed for c in then)
    assert sim.stats.streamed == 5
