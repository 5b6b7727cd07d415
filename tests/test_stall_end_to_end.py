"""Hung requests over real loopback HTTP: a run where 1% of requests hang is
a run with 1% more requests, not one that waits out each hang."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import enrich
from pipeline.cli import format_summary
from pipeline.report import report_path_for
from pipeline.simulate import Simulator

from conftest import StartServer, answer_for, make_config, write_questions

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
