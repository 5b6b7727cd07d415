"""Live metrics: `enrich run --metrics-port` serves the run's counters in the
Prometheus text format while it goes; scraped during a real run against the
local server, they only grow, never pass the final report's numbers, and
the JSON log's last progress event carries those numbers exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.errors import ExitCode
from pipeline.metrics import serving
from pipeline.report import read_report, report_path_for
from pipeline.timeline import Timeline

from conftest import MODEL, StartServer, report_value, write_questions

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Scrape, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


# Counter name in the endpoint (with labels) -> key in the report and the progress event.
COUNTERS: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, str]] = {
    ("enrich_requests_total", ()): ("requests.sent", "sent"),
    ("enrich_retries_total", ()): ("requests.retries", "retries"),
    ("enrich_rate_limited_total", ()): ("requests.rate_limited_429", "rate_limited"),
    ("enrich_rows_total", (("status", "ok"),)): ("counts.ok", "ok"),
    ("enrich_rows_total", (("status", "error"),)): ("counts.error", "error"),
    ("enrich_tokens_total", (("kind", "prompt"),)): ("tokens.prompt", "prompt_tokens"),
    ("enrich_tokens_total", (("kind", "completion"),)): ("tokens.completion", "completion_tokens"),
}


@pytest.mark.slow
def test_metrics_scraped_during_a_run_agree_with_the_final_report(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(latency_ms=40, jitter_ms=20, fail_rate_429=0.05, fail_rate_5xx=0.05)
    source = write_questions(tmp_path / "in.csv", [f"metrics question {i}" for i in range(300)])
    output = tmp_path / "out.parquet"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "pipeline", "run", "--input", str(source)),
            *("--column", "question", "--output", str(output), "--model", MODEL),
            *("--base-url", server.base_url, "--concurrency", "4", "--max-attempts", "6"),
            *("--no-page", "--log-format", "json", "--metrics-port", "0"),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "OPENAI_API_KEY": "sk-metrics-test"},
    )
    assert process.stderr is not None
    lines: list[dict[str, Any]] = []
    port_known = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(json.loads(line))
            if lines[-1]["event"] == "metrics":
                port_known.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    scrapes: list[Scrape] = []
    try:
        assert port_known.wait(30), lines
        port = next(line["port"] for line in lines if line["event"] == "metrics")
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            try:
                scrapes.append(scrape(port))
            except OSError:
                break  # the run ended (its endpoint with it) since poll()
            time.sleep(0.2)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=10)
    assert process.returncode == ExitCode.OK, (lines[-3:], len(scrapes))
    report = read_report(report_path_for(output))
    assert report is not None
    assert len(scrapes) >= 3
    assert any(value(s, "enrich_requests_total") > 0 for s in scrapes)
    for key, (report_key, _) in COUNTERS.items():
        seen = [s[key] for s in scrapes]
        assert seen == sorted(seen), key
        assert seen[-1] <= report_value(report, report_key), key
    assert value(scrapes[-1], "enrich_requests_in_flight") <= 4
    assert 1 <= value(scrapes[-1], "enrich_concurrency_limit") <= 4
    # The last progress event (at the end of the run) has the final numbers.
    progress = [line for line in lines if line["event"] == "progress"]
    assert progress
    for report_key, field in COUNTERS.values():
        assert progress[-1][field] == report_value(report, report_key), field


def test_a_busy_metrics_port_is_a_usage_error_naming_the_flag() -> None:
    timeline = Timeline()
    with serving(timeline, 0) as port, pytest.raises(Exception) as busy:
        serving(timeline, port).__enter__()
    assert getattr(busy.value, "exit_code", None) == ExitCode.USAGE
    assert "--metrics-port" in str(busy.value)


def test_metrics_read_the_timeline_at_each_scrape() -> None:
    from pipeline.results import RowResult

    timeline = Timeline()
    with serving(timeline, 0) as port:
        before = scrape(port)
        timeline.observe(
            RowResult(row_id=0, status="error", error="request rejected (400): no", attempts=1)
        )
        after = scrape(port)
    assert value(before, "enrich_rows_total", status="error") == 0
    assert value(after, "enrich_rows_total", status="error") == 1
    assert value(after, "enrich_row_errors_total", reason="request rejected (400)") == 1
