"""Sweeps of the latency limit (issue 17) on a fake clock, one line a run.

    python -m pytest benchmarks/latency_limit_sweep.py -s -q -p no:cacheprovider

Not part of the test suite (``testpaths`` is ``tests``): it asserts nothing and
prints, for each run, the in-flight limit the run settled at, the latency
limit's cuts (and those taken back) and the wall time on the fake clock
(``looptime``: the simulator serves in the same loop, so minutes of service
pass in seconds). Against another checkout (``git archive REV pipeline | tar
-x -C DIR``; a tree without ``slot_order`` skips those runs), from DIR:
``python -m`` puts the working directory first on the path, so from this
checkout it would run this checkout's code whatever PYTHONPATH says:

    cd DIR && python -m pytest /path/to/benchmarks/latency_limit_sweep.py -s -q -p no:cacheprovider

* ``test_hosted_jitter``: a hosted API (no slots), 200 rows of about 2 s answers
  +/- 300, 700 or 1000 ms, 60 seeds each: where a limit meant for self-hosted
  servers must stay out of the way (the ceiling, 32, and no cut).
* ``test_hosted_jitter_varied_answers``: the same hosted API, prompts of
  8-30 words, answers streamed or whole, +/- 700 ms, 30 seeds each.
* ``test_slots_varied_answers``: 1, 4 and 16 slots, no server times, prompts
  of 8-30 words (answers of varying length), both serving orders, 6 seeds,
  the answers streamed (the wait shows before the first token, the length
  after) or whole (``stream=False``: nothing tells the two apart).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pipeline.call import CallStage, ChatRequest
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.simulate import Simulator, SimulatorConfig
from pipeline.transport import make_transport

MODEL = "sim-1"


async def questions(count: int, seed: int | None) -> AsyncIterator[ChatRequest]:
    """``count`` prompts: alike (seed None), or of 8-30 random words."""
    rng = random.Random(seed)
    for row in range(count):
        if seed is None:
            text = f"question number {row}"
        else:
            text = " ".join(f"word{rng.randrange(1000)}" for _ in range(rng.randrange(8, 30)))
        yield ChatRequest(row, [{"role": "user", "content": text}])


async def settle(
    config: dict[str, Any], count: int, prompt_seed: int | None, *, stream: bool = True
) -> str:
    try:
        sim_config = SimulatorConfig(**config)
    except TypeError:
        pytest.skip("this checkout's simulator has no such setting")
    async with Simulator(sim_config) as sim:
        model = ModelConfig(name=MODEL, base_url=sim.base_url, stream=stream)
        transport = make_transport(model, "key", "h11")
        stage = CallStage(model, LimitsConfig(), transport)
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            results = [result async for result in stage.results(questions(count, prompt_seed))]
        finally:
            await transport.aclose()
        wall = loop.time() - start
    limit = stage.limiter.latency
    cuts = (limit.cuts, limit.undone) if limit is not None else (0, 0)
    ok = sum(result.status == "ok" for result in results)
    return (
        f"settled {stage.limiter.gate.slots} cuts {cuts[0]} undone {cuts[1]} "
        f"wall {wall:.1f} s ok {ok}/{count} | {stage.stats.concurrency_reason}"
    )


@pytest.mark.looptime
@pytest.mark.parametrize("seed", range(60))
@pytest.mark.parametrize("jitter_ms", [300.0, 700.0, 1000.0])
async def test_hosted_jitter(jitter_ms: float, seed: int) -> None:
    config = {"latency_ms": 500.0, "token_ms": 100.0, "jitter_ms": jitter_ms, "seed": seed}
    print(f"\nhosted jitter {jitter_ms:.0f} ms seed {seed}: {await settle(config, 200, None)}")


@pytest.mark.looptime
@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("stream", [True, False])
async def test_hosted_jitter_varied_answers(stream: bool, seed: int) -> None:
    config = {"latency_ms": 500.0, "token_ms": 100.0, "jitter_ms": 700.0, "seed": seed}
    result = await settle(config, 200, seed, stream=stream)
    how = "streamed" if stream else "whole"
    print(f"\nhosted varied, {how}, seed {seed}: {result}")


@pytest.mark.looptime
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("order", ["fifo", "any"])
@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("slots", [1, 4, 16])
async def test_slots_varied_answers(slots: int, stream: bool, order: str, seed: int) -> None:
    config: dict[str, Any] = {"slots": slots, "timings": None, "latency_ms": 200.0}
    config |= {"token_ms": 20.0, "seed": seed}
    if order != "fifo":
        config["slot_order"] = order
    result = await settle(config, 30 * slots, seed, stream=stream)
    how = "streamed" if stream else "whole"
    print(f"\n{slots} slots, {how}, {order} order, seed {seed}: {result}")
