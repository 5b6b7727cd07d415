"""Hung requests over real loopback HTTP (in real time, and on a fake clock
with the simulator in the test's loop): a run where 1% of requests hang is a
run with 1% more requests, not one that waits out each hang."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import enrich
from pipeline.call import CallStage, CallStats, ChatRequest
from pipeline.cli import format_summary
from pipeline.config import LimitsConfig, ModelConfig
from pipeline.report import report_path_for
from pipeline.simulate import Simulator, SimulatorConfig
from pipeline.transport import make_transport

from conftest import MODEL, StartServer, answer_for, make_config, write_questions

ROWS = 600


def run(tmp_path: Path, name: str, server: Simulator, **overrides: Any) -> dict[str, Any]:
    prompts = [f"{name} question {i}: what is {i} cubed?" for i in range(ROWS)]
    source = write_questions(tmp_path / f"{name}.parquet", prompts)
    output = tmp_path / f"{name}-out.parquet"
    # The default --timeout (60 s) and a learned stall timeout: what users get.
    settings: dict[str, Any] = {"model.timeout_s": 60.0, "limits.max_attempts": 6}
    settings.update(overrides)
    summary = enrich(make_config(source, output, server.base_url, **settings))

    out = pl.read_parquet(output)
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert summary.ok == ROWS
    report: dict[str, Any] = json.loads(report_path_for(output).read_text())
    assert f"stalled {summary.stalled:,})" in format_summary(summary)
    return report


@pytest.mark.slow
def test_one_percent_of_requests_hanging_costs_a_cut_request_each_not_the_hang(
    tmp_path: Path, start_server: StartServer
) -> None:
    # Stuck connections that would answer after two minutes, far beyond the
    # learned stall timeout (a few seconds), and beyond the test's patience.
    latency = {"latency_ms": 20, "jitter_ms": 10, "seed": 5}
    hanging = start_server(hang_rate=0.01, hang_s=120, hang_answers=True, **latency)
    calm = start_server(**latency)

    with_hangs = run(tmp_path, "hangs", hanging)
    without = run(tmp_path, "calm", calm)

    cut = with_hangs["requests"]["stalled"]
    assert cut == hanging.stats.hangs > 0  # every hang was cut, once
    # One more request per cut, and nothing else: the hangs cost requests, and
    # never the 60 s total timeout (a timed-out request would be a retry too).
    assert with_hangs["requests"]["sent"] == ROWS + cut == without["requests"]["sent"] + cut
    assert with_hangs["requests"]["retries"] == cut
    assert without["requests"]["stalled"] == 0
    assert hanging.stats.answered == calm.stats.answered == ROWS
    for report in (with_hangs, without):
        assert report["requests"]["streamed"] is True
        # Learned from fast answers: the floor, well under the total timeout.
        assert report["requests"]["stall_timeout_s"] < 10


async def _rows(count: int) -> AsyncIterator[ChatRequest]:
    for row in range(count):
        yield ChatRequest(row, [{"role": "user", "content": f"question number {row}"}])


async def run_on_fake_clock(sim: Simulator, count: int) -> tuple[CallStats, float]:
    """The call stage alone against ``sim`` (in this loop): its counts and
    how long it took, all its rows ok."""
    config = ModelConfig(name=MODEL, base_url=sim.base_url)
    transport = make_transport(config, "key")
    stage = CallStage(config, LimitsConfig(concurrency=64, rpm=6000, adaptive=False), transport)
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        results = [result async for result in stage.results(_rows(count))]
    finally:
        await transport.aclose()
    assert [result.status for result in results] == ["ok"] * count
    return stage.stats, loop.time() - start


@pytest.mark.slow
@pytest.mark.looptime
async def test_hung_requests_in_flight_together_are_each_cut_on_their_own_clock() -> None:
    # The benchmark's tail section on a fake clock (2,000 rows at 6,000 rpm,
    # 64 in flight, 1% hanging for a minute). A hosted API answers around
    # its hung requests, so a hang sent while another is in flight waits in
    # no queue of ours: it is cut once its own stall timeout passes, not one
    # hang after the other (that took 3.3x the run without hangs).
    latency = SimulatorConfig(latency_ms=200.0, jitter_ms=100.0, seed=3)
    async with Simulator(latency) as calm:
        _, without = await run_on_fake_clock(calm, 2000)
    hangs = replace(latency, hang_rate=0.01, hang_s=60.0, hang_answers=True)
    async with Simulator(hangs) as hanging:
        stats, with_hangs = await run_on_fake_clock(hanging, 2000)

    assert stats.stalled == hanging.stats.hangs >= 10  # every hang cut, once
    assert with_hangs <= 1.3 * without, (with_hangs, without)
