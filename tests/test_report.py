"""The run report: its contents from a real run, redaction, atomic writing,
and the up-to-date check that makes reruns idempotent."""

from __future__ import annotations

import io
import json
import os
import re
from array import array
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pipeline import enrich
from pipeline.checkpoint import InputIdentity, settings_hash
from pipeline.costs import Price, PriceTable, cost, estimate
from pipeline.errors import ExitCode
from pipeline.events import REDACTED, JsonEventSink
from pipeline.plan import answer_settings
from pipeline.report import (
    JobFacts,
    RunRecord,
    build_report,
    check_up_to_date,
    fingerprint,
    latency_percentiles,
    read_report,
    redact_settings,
    report_path_for,
    write_report,
)
from pipeline.summary import RunSummary
from pipeline.timeline import Timeline

from conftest import StartServer, make_config, write_questions

KEY = "sk-proj-report-test-key-0123456789abcdef"
PRICE = Price("sim-1", 2.0, 8.0, "test")


def summary_for(output: Path, **values: Any) -> RunSummary:
    return RunSummary(output=output, run_dir=output.with_name(output.name + ".enrich"), **values)


def report_of(
    summary: RunSummary,
    *,
    exit_code: int,
    message: str | None = None,
    started_at: datetime | None = None,
    cost_this_run: float | None = None,
    secrets: Sequence[str | None] = (),
    **job: Any,
) -> dict[str, Any]:
    if cost_this_run is not None:
        summary = replace(summary, cost_usd=cost_this_run)
    facts = JobFacts(secrets=tuple(secrets), **job)
    return build_report(RunRecord(facts, summary, exit_code, message, started_at))


@pytest.fixture
def finished(tmp_path: Path) -> dict[str, Any]:
    """A finished run's files and report (no server needed: the report only
    reads the summary and stats the files)."""
    source = write_questions(tmp_path / "in.csv", [f"q{i}" for i in range(4)])
    output = tmp_path / "out.parquet"
    output.write_bytes(b"PAR1 pretend output")
    summary = summary_for(output, rows=4, ok=4, wall_s=1.0, latencies_ms=array("d", [5.0]))
    fp = fingerprint({"model": "sim-1"})
    report = report_of(
        summary,
        output=output,
        settings={},
        fingerprint=fp,
        exit_code=0,
        input_identity=InputIdentity.of(source),
        input_rows=4,
        output_settings={"column_prefix": ""},
    )
    path = report_path_for(output)
    write_report(path, report)
    return {"source": source, "output": output, "report": path, "fingerprint": fp}


def test_report_of_a_real_run(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(api_key=KEY, latency_ms=5, fail_rate_5xx=0.2, seed=3)
    source = write_questions(tmp_path / "in.parquet", [f"question {i}" for i in range(30)] + [None])
    output = tmp_path / "out.parquet"
    config = make_config(
        source,
        output,
        server.base_url,
        **{"model.api_key_env": "REPORT_TEST_KEY", "model.max_tokens": 64},
    )
    os.environ["REPORT_TEST_KEY"] = KEY
    try:
        started = datetime.now(UTC)
        summary = enrich(config)
    finally:
        del os.environ["REPORT_TEST_KEY"]
    assert summary.ok == 30 and summary.skipped == 1

    fp = fingerprint(answer_settings(config))
    report = report_of(
        summary,
        output=output,
        settings=config.to_dict(),
        fingerprint=fp,
        exit_code=0,
        input_identity=InputIdentity.of(source),
        input_rows=31,
        output_settings={"column_prefix": config.output.column_prefix},
        price=PRICE,
        model=config.model.name,
        cost_this_run=1.5,
        max_cost=25.0,
        started_at=started,
        secrets=[KEY],
    )
    path = report_path_for(output)
    write_report(path, report, secrets=[KEY])
    body = json.loads(path.read_text())

    assert body["outcome"] == "done" and body["exit_code"] == 0
    assert body["counts"] == {
        "rows": 31, "ok": 30, "error": 0, "skipped": 1, "pending": 0,
        "resumed_rows": 0, "processed_rows": 31, "error_rate": 0.0, "error_reasons": [],
    }  # fmt: skip
    tokens = body["tokens"]
    assert tokens["prompt"] == summary.prompt_tokens > 0
    assert tokens["completion"] == summary.completion_tokens > 0
    assert body["cost"]["estimated_total"] == pytest.approx(
        cost(summary.prompt_tokens, summary.completion_tokens, PRICE), abs=1e-6
    )
    assert body["cost"]["this_run"] == 1.5 and body["cost"]["max_cost"] == 25.0
    assert body["cost"]["price"]["input_per_million_usd"] == 2.0
    timing = body["timing"]
    assert timing["wall_s"] == pytest.approx(summary.wall_s, abs=1e-3)
    assert timing["rows_per_s"] == pytest.approx(summary.rows_per_s, rel=1e-3)
    latency = timing["latency_ms"]
    assert latency["count"] == 30
    assert latency["p50"] == pytest.approx(summary.latency_percentile(50), abs=1e-3)
    assert latency["p95"] == pytest.approx(summary.latency_percentile(95), abs=1e-3)
    assert latency["p50"] <= latency["p95"] <= latency["p99"]
    assert body["requests"] == {
        "sent": summary.requests,
        "retries": summary.retries,
        "rate_limited_429": summary.rate_limited,
        "bad_structured_answers": 0,
        "outages": summary.outages,
        "outage_s": round(summary.outage_s, 3),
        "stalled": summary.stalled,
        "stall_timeout_s": round(summary.stall_timeout_s or 0, 3),
        "streamed": summary.streamed,
    }
    # What the limiter settled on, for tuning the next run.
    assert body["limits"] == {
        "concurrency": round(summary.concurrency_limit, 3),
        "learned_rpm": summary.learned_rpm,
        "learned_tpm": summary.learned_tpm,
        "estimated_rpm": summary.estimated_rpm,
        "paused_s": round(summary.paused_s, 3),
    }
    assert 1 <= body["limits"]["concurrency"] <= config.limits.concurrency
    assert summary.retries > 0  # 20% of requests got a 500
    assert body["fingerprint"] == fp == settings_hash(answer_settings(config))
    assert body["input"]["rows"] == 31 and body["input"]["sha256"]
    assert body["output"]["size"] == output.stat().st_size
    settings = body["settings"]
    assert settings["model"]["name"] == "sim-1" and settings["model"]["max_tokens"] == 64
    assert settings["model"]["api_key_env"] == "REPORT_TEST_KEY"  # names a variable: kept
    assert settings["limits"]["tpm"] is None and settings["limits"]["concurrency"] == 16
    assert body["started_at"] and body["finished_at"]

    # The up-to-date check agrees with what was just written.
    fresh = check_up_to_date(
        path,
        output=output,
        input_path=source,
        fingerprint=fp,
        output_settings={"column_prefix": ""},
    )
    assert fresh.up_to_date, fresh.reason


@pytest.mark.slow
def test_the_key_never_reaches_logs_report_checkpoint_or_output(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(api_key=KEY, fail_rate_429=0.2, seed=5)
    source = write_questions(tmp_path / "in.csv", [f"q {i}" for i in range(20)])
    output = tmp_path / "out.parquet"
    config = make_config(
        source,
        output,
        f"{server.base_url}",
        **{"model.api_key_env": "REPORT_TEST_KEY", "output.keep_checkpoint": True},
    )
    log = io.StringIO()
    events = JsonEventSink(log, secrets=[KEY])
    os.environ["REPORT_TEST_KEY"] = KEY
    try:
        events.emit("start", message=f"using key {config.api_key()}", settings=config.to_dict())
        summary = enrich(config)
    finally:
        del os.environ["REPORT_TEST_KEY"]
    settings = config.to_dict()
    # Even if a caller smuggled the key into the settings, the report drops it.
    settings["model"]["extra_params"] = {"api_key": KEY, "note": f"key={KEY}"}
    report = report_of(
        summary,
        output=output,
        settings=settings,
        fingerprint="x",
        exit_code=0,
        message=f"failed with {KEY}",
        secrets=[KEY],
    )
    events.emit("finish", report=report)
    write_report(report_path_for(output), report, secrets=[KEY])

    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != source]
    assert output in files and report_path_for(output) in files
    assert any(p.suffix == ".parquet" and "parts" in p.parts for p in files)  # the checkpoint
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in log.getvalue()
    assert REDACTED in log.getvalue()


def test_redact_settings_removes_secret_values_but_keeps_counts() -> None:
    settings = {
        "model": {
            "name": "gpt-4o-mini",
            "api_key_env": "OPENAI_API_KEY",
            "max_tokens": 256,
            "base_url": f"https://user:pw@llm.example/v1?api-key={KEY}&api-version=2024",
            "extra_params": {
                "extra_headers": {"Authorization": f"Bearer {KEY}", "X-Trace": "1"},
                "api_key": "something-else-entirely",
                "client_secret": "shh-shh-shh",
                "password": "hunter2-hunter2",
                "note": f"prefix {KEY} suffix",
            },
        },
        "limits": {"tpm": 200_000, "rpm": None},
        "prompt_tokens": 12,
    }
    clean = redact_settings(settings, [KEY])
    text = json.dumps(clean)
    assert KEY not in text
    for leaked in ("something-else-entirely", "shh-shh-shh", "hunter2-hunter2", ":pw@"):
        assert leaked not in text
    model = clean["model"]
    assert model["api_key_env"] == "OPENAI_API_KEY"
    assert model["max_tokens"] == 256
    assert model["base_url"].startswith("https://user:[redacted]@llm.example/v1?")
    assert "api-version=2024" in model["base_url"]
    assert model["extra_params"]["extra_headers"]["X-Trace"] == "1"
    assert model["extra_params"]["note"] == f"prefix {REDACTED} suffix"
    assert clean["limits"] == {"tpm": 200_000, "rpm": None}
    assert clean["prompt_tokens"] == 12


def test_latency_percentiles() -> None:
    assert latency_percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None}
    assert latency_percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p95": 7.0, "p99": 7.0}
    values = [float(v) for v in range(1, 101)]
    cuts = latency_percentiles(values)
    assert cuts["p50"] == pytest.approx(50.5)
    assert cuts["p95"] == pytest.approx(95.05)
    assert cuts["p99"] == pytest.approx(99.01)


def test_write_report_is_atomic_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "out.parquet.report.json"
    write_report(path, {"a": float("inf"), "b": Path("x")})
    assert read_report(path) == {"a": None, "b": "x"}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    path.write_text("{not json")
    assert read_report(path) is None
    assert read_report(tmp_path / "missing.json") is None


def test_readme_exit_code_table_lists_exactly_the_exit_codes() -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("### Exit codes") :]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, flags=re.MULTILINE)}
    assert documented == {int(code) for code in ExitCode}
    assert all(code.outcome for code in ExitCode)


def test_stopped_runs_do_not_describe_the_output_file(tmp_path: Path) -> None:
    output = tmp_path / "out.parquet"
    output.write_bytes(b"an older output")
    report = report_of(
        summary_for(output), output=output, settings={}, fingerprint="f", exit_code=5
    )
    assert report["outcome"] == "stopped_by_spend_cap"
    assert report["output"]["size"] is None
    assert report["cost"]["estimated_total"] is None
    assert "--price-file" in report["cost"]["note"]


# -- idempotent reruns ----------------------------------------------------------


def test_an_untouched_output_is_up_to_date(finished: dict[str, Any]) -> None:
    fresh = check_up_to_date(
        finished["report"],
        output=finished["output"],
        input_path=finished["source"],
        fingerprint=finished["fingerprint"],
        output_settings={"column_prefix": ""},
    )
    assert fresh.up_to_date
    assert "up to date" in fresh.reason and fresh.report is not None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("no_report", "no readable run report"),
        ("output_deleted", "does not exist"),
        ("output_touched", "changed since the last run"),
        ("input_changed", "the input"),
        ("settings_changed", "settings changed"),
        ("prefix_changed", "column prefix"),
        ("stopped", "did not finish"),
        ("incomplete", "does not cover every input row"),
    ],
)
def test_anything_different_means_run_again(
    finished: dict[str, Any], change: str, reason: str
) -> None:
    fp, prefix = finished["fingerprint"], {"column_prefix": ""}
    report_path: Path = finished["report"]
    body = json.loads(report_path.read_text())
    if change == "no_report":
        report_path.unlink()
    elif change == "output_deleted":
        finished["output"].unlink()
    elif change == "output_touched":
        finished["output"].write_bytes(b"PAR1 something else, longer")
    elif change == "input_changed":
        write_questions(finished["source"], ["other", "rows"])
    elif change == "settings_changed":
        fp = fingerprint({"model": "gpt-4o"})
    elif change == "prefix_changed":
        prefix = {"column_prefix": "llm_"}
    elif change == "stopped":
        body["exit_code"], body["outcome"] = 5, "stopped_by_spend_cap"
        report_path.write_text(json.dumps(body))
    elif change == "incomplete":
        body["output"]["rows"] = 3
        report_path.write_text(json.dumps(body))
    fresh = check_up_to_date(
        report_path,
        output=finished["output"],
        input_path=finished["source"],
        fingerprint=fp,
        output_settings=prefix,
    )
    assert not fresh.up_to_date
    assert reason in fresh.reason


def test_a_moved_input_with_the_same_content_is_still_up_to_date(
    finished: dict[str, Any], tmp_path: Path
) -> None:
    moved = tmp_path / "moved.csv"
    moved.write_bytes(finished["source"].read_bytes())
    fresh = check_up_to_date(
        finished["report"],
        output=finished["output"],
        input_path=moved,
        fingerprint=finished["fingerprint"],
        output_settings={"column_prefix": ""},
    )
    assert fresh.up_to_date


def test_price_table_and_report_agree_on_the_model(finished: dict[str, Any]) -> None:
    price = PriceTable.load().price_for("gpt-4o-mini-2024-07-18")
    assert price is not None
    output: Path = finished["output"]
    report = report_of(
        summary_for(output, prompt_tokens=1_000_000, completion_tokens=1_000_000, rows=1),
        output=output,
        settings={},
        fingerprint="f",
        exit_code=0,
        price=replace(price),
    )
    assert report["cost"]["estimated_total"] == pytest.approx(0.75)
    assert report["cost"]["price"]["model"] == "gpt-4o-mini"


def test_the_run_summary_is_frozen(tmp_path: Path) -> None:
    summary = summary_for(tmp_path / "out.parquet", rows=3, ok=3)
    with pytest.raises(FrozenInstanceError):
        summary.ok = 2  # type: ignore[misc]
    assert replace(summary, ok=2).ok == 2 and summary.ok == 3


def test_the_report_says_what_the_rate_limiter_learned(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(rpm=60_000, tpm=5_000_000, rate_headers=True)
    source = write_questions(tmp_path / "in.csv", [f"limits {i}" for i in range(8)])
    output = tmp_path / "out.parquet"
    summary = enrich(make_config(source, output, server.base_url, **{"limits.concurrency": 4}))

    report = read_report(report_path_for(output))
    assert report is not None
    # The limits the server reported in x-ratelimit-* headers, for the next
    # run's --rpm and --tpm; nothing paused, no 429 to learn a rate from.
    assert report["limits"] == {
        "concurrency": round(summary.concurrency_limit, 3),
        "learned_rpm": 60_000,
        "learned_tpm": 5_000_000,
        "estimated_rpm": None,
        "paused_s": 0.0,
    }
    assert 1 <= summary.concurrency_limit <= 4


def test_a_report_holds_the_jobs_timeline_and_the_estimate_made_before_the_run(
    tmp_path: Path,
) -> None:
    # The earlier run's segment comes from its report; this run's segment is
    # closed by build_report, in the report's own words (outcome, rows).
    output = tmp_path / "out.parquet"
    now = [0.0]
    earlier_run = Timeline(clock=lambda: now[0])
    now[0] = 2.0
    first = build_report(
        RunRecord(
            JobFacts(output=output, settings={}, fingerprint="f"),
            summary_for(output, rows=3, ok=3),
            ExitCode.SPEND_CAP,
            timeline=earlier_run,
        )
    )
    planned = estimate([10, 20, None], model="m", price=None, max_tokens=5, concurrency=2)
    job = JobFacts(
        output=output,
        settings={},
        fingerprint="f",
        estimate_before_run=planned,
        earlier_segments=tuple(first["timeline"]["segments"]),
    )
    report = build_report(
        RunRecord(job, summary_for(output, rows=6, ok=6, resumed_rows=3), 0, timeline=Timeline())
    )
    segments = report["timeline"]["segments"]
    assert [s["outcome"] for s in segments] == ["stopped_by_spend_cap", "done"]
    assert segments[0]["wall_s"] == 2.0
    assert segments[1]["resumed_rows"] == 3
    assert segments[1]["processed_rows"] == 3
    assert report["cost"]["estimate_before_run"] == planned.to_dict()
    assert report["cost"]["estimate_before_run"]["rows"] == 2
    without = build_report(
        RunRecord(JobFacts(output=output, settings={}, fingerprint="f"), summary_for(output), 0)
    )
    assert "timeline" not in without
    assert without["cost"]["estimate_before_run"] is None
