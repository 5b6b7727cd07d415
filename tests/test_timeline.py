"""The run timeline: per-interval counts, bounded by coarsening, merged
across the resumed runs of one job. Driven by hand-made rows and a fake
clock; the end-to-end page tests cover it on real runs."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from pipeline.costs import Price
from pipeline.events import JsonEventSink, ProgressEvents
from pipeline.results import RowResult
from pipeline.timeline import (
    MAX_JOB_BUCKETS,
    SERIES,
    Timeline,
    error_kind,
    histogram_percentiles,
    job_timeline,
    previous_segments,
)

PRICE = Price(model="m", input_per_million=1.0, output_per_million=2.0, source="test")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ok(row_id: int, latency_ms: float = 100.0, *, cached: bool = False) -> RowResult:
    return RowResult(
        row_id=row_id,
        status="ok",
        response="a",
        latency_ms=None if cached else latency_ms,
        attempts=0 if cached else 1,
        prompt_tokens=10,
        completion_tokens=5,
        cached=cached,
    )


def failed(row_id: int, error: str, *, transient: bool = True) -> RowResult:
    return RowResult(row_id=row_id, status="error", error=error, attempts=3, transient=transient)


def test_each_tick_closes_one_interval_of_counts() -> None:
    clock = Clock()
    timeline = Timeline(price=PRICE, clock=clock)
    timeline.observe(ok(0, 50.0))
    timeline.observe(ok(1, 150.0))
    timeline.tick()
    timeline.observe(failed(2, "server error (503): busy (gave up after 3 attempts)"))
    timeline.observe(RowResult.skipped(3))
    timeline.tick()
    clock.now = 2.0
    segment = timeline.segment(exit_code=0)
    series = segment["series"]
    assert series["ok"] == [2, 0, 0]
    assert series["error"] == [0, 1, 0]
    assert series["skipped"] == [0, 1, 0]
    assert series["latency_count"] == [2, 0, 0]
    assert series["latency_sum_ms"] == [200, 0, 0]
    assert series["latency_max_ms"] == [150, 0, 0]
    assert segment["errors_by_kind"] == {"server error (503)": [0, 1, 0]}
    assert segment["exit_code"] == 0
    assert segment["wall_s"] == 2.0
    assert set(series) == set(SERIES)


def test_cost_and_tokens_count_paid_requests_only() -> None:
    timeline = Timeline(price=PRICE, clock=Clock())
    timeline.observe(ok(0))
    timeline.observe(ok(1, cached=True))
    totals = timeline.totals()
    assert (totals.prompt_tokens, totals.completion_tokens) == (10, 5)
    assert totals.cost_usd == pytest.approx((10 * 1.0 + 5 * 2.0) / 1e6)
    assert totals.ok == 2
    assert sum(timeline.latency_histogram) == 1


def test_without_a_price_the_cost_is_unknown_not_zero() -> None:
    timeline = Timeline(clock=Clock())
    timeline.observe(ok(0))
    assert timeline.totals().cost_usd is None


def test_error_kinds_drop_the_servers_free_text_and_keep_example_rows() -> None:
    assert error_kind("server error (502): Bad Gateway (gave up after 8 attempts)") == (
        "server error (502)"
    )
    assert error_kind("request timed out (gave up after 8 attempts; raise --max-attempts)") == (
        "request timed out"
    )
    assert error_kind("request rejected (400): context too long") == "request rejected (400)"
    assert error_kind(None) == "unknown"
    timeline = Timeline(clock=Clock())
    for row in range(8):
        timeline.observe(failed(row, f"request rejected (400): row {row}", transient=False))
    entry = timeline.errors["request rejected (400)"]
    assert entry["count"] == 8
    assert entry["rows"] == [0, 1, 2, 3, 4]
    assert entry["transient"] is False
    assert entry["example"] == "request rejected (400): row 0"


def test_a_long_run_stays_bounded_by_coarsening_and_keeps_every_count() -> None:
    timeline = Timeline(clock=Clock(), max_buckets=10)
    for tick in range(1000):
        timeline.observe(ok(tick))
        timeline.tick()
    segment = timeline.segment()
    assert len(segment["series"]["ok"]) <= 10
    assert sum(segment["series"]["ok"]) == 1000
    assert segment["interval_s"] == 128.0
    # Every interval but the last one is full.
    assert set(segment["series"]["ok"][:-1]) == {128}


def test_coarsening_keeps_peaks_of_gauges() -> None:
    timeline = Timeline(clock=Clock(), max_buckets=4)
    for tick in range(8):
        timeline.observe(ok(tick, latency_ms=1000.0 if tick == 5 else 10.0))
        timeline.tick()
    segment = timeline.segment()
    assert max(segment["series"]["latency_max_ms"]) == 1000.0
    assert sum(segment["series"]["latency_count"]) == 8


def test_resumed_runs_merge_into_one_bounded_job_timeline() -> None:
    segments = []
    for run in range(3):
        timeline = Timeline(clock=Clock(), max_buckets=300)
        for tick in range(300):
            timeline.observe(ok(tick))
            if tick % 100 == 0:
                timeline.observe(failed(tick, "connection error (gave up after 2 attempts)"))
            timeline.tick()
        segments.append(timeline.segment(outcome="interrupted" if run < 2 else "done"))
    job = job_timeline(segments)
    assert len(job["segments"]) == 3
    assert sum(len(s["series"]["ok"]) for s in job["segments"]) <= MAX_JOB_BUCKETS
    assert sum(sum(s["series"]["ok"]) for s in job["segments"]) == 900
    assert job["totals"]["ok"] == 900
    assert job["errors"]["connection error"]["count"] == 9
    assert sum(job["latency"]["counts"]) == 900
    assert [s["outcome"] for s in job["segments"]] == ["interrupted", "interrupted", "done"]


def test_only_the_same_jobs_report_contributes_segments() -> None:
    timeline = Timeline(clock=Clock())
    timeline.tick()
    report = {
        "fingerprint": "f1",
        "input": {"sha256": "s1"},
        "timeline": job_timeline([timeline.segment()]),
    }
    assert len(previous_segments(report, fingerprint="f1", input_sha256="s1")) == 1
    assert previous_segments(report, fingerprint="f2", input_sha256="s1") == []
    assert previous_segments(report, fingerprint="f1", input_sha256="other") == []
    assert previous_segments(None, fingerprint="f1", input_sha256="s1") == []


def test_histogram_percentiles_are_close_to_the_exact_ones() -> None:
    timeline = Timeline(clock=Clock())
    values = [10.0 + i for i in range(1000)]
    for row, value in enumerate(values):
        timeline.observe(ok(row, value))
    cuts = histogram_percentiles(timeline.latency_histogram)
    for name, exact in (("p50", 509.5), ("p90", 909.1), ("p99", 999.0)):
        assert cuts[name] == pytest.approx(exact, rel=0.13)
    assert histogram_percentiles([0, 0]) == {"p50": None, "p90": None, "p99": None}


def test_progress_events_carry_the_timelines_live_totals() -> None:
    stream = io.StringIO()
    clock = Clock()
    timeline = Timeline(price=PRICE, clock=clock)
    progress = timeline.watching(
        ProgressEvents(
            JsonEventSink(stream),
            interval_s=30.0,
            clock=clock,
            live=lambda: timeline.totals().to_dict(),
        )
    )
    progress.start(10, 0)
    progress.advance(ok(0))
    clock.now = 31.0
    progress.advance(failed(1, "request timed out"))
    progress.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["progress", "progress"]
    last = lines[-1]
    live = timeline.totals().to_dict()
    for name in ("ok", "error", "prompt_tokens", "completion_tokens", "cost_usd", "retries"):
        assert last[name] == live[name], name
    assert last["error"] == 1 and last["done"] == 2


@pytest.mark.looptime
async def test_progress_events_come_at_a_fixed_interval_while_no_row_finishes() -> None:
    stream = io.StringIO()
    loop = asyncio.get_running_loop()
    timeline = Timeline(clock=loop.time)
    progress = timeline.watching(
        ProgressEvents(
            JsonEventSink(stream),
            interval_s=30.0,
            clock=loop.time,
            live=lambda: timeline.totals().to_dict(),
        )
    )
    progress.start(10, 0)
    sampler = asyncio.create_task(timeline.run())
    await asyncio.sleep(95)  # a long pause: no row finishes
    sampler.cancel()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["progress"] * 3
    assert [line["done"] for line in lines] == [0, 0, 0]
    # One interval a second, all empty.
    segment = timeline.segment()
    assert len(segment["series"]["ok"]) >= 90 and sum(segment["series"]["ok"]) == 0
