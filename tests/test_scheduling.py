"""Scheduled runs through the real CLI, as cron and Airflow drive it: an exit
code per outcome, one run per output (the lock), reruns that send nothing,
JSON log lines, the run report, `enrich estimate`, the spend cap, and an API
key that never reaches a log line or a file.

Requests are counted at the server (``server.stats.requests``): "nothing
sent" means the local simulator saw nothing. Exit code 130 (interrupted) is
covered by tests/test_crash.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline import lock as lock_module
from pipeline.checkpoint import MANIFEST, PARTS
from pipeline.cli import cli
from pipeline.lock import lock_path_for, read_holder
from pipeline.report import report_path_for

from conftest import MODEL, StartServer, answer_for, write_questions

REPO = Path(__file__).resolve().parent.parent
NIGHTLY = REPO / "configs" / "nightly.toml"
SHIPPED_PRICES = REPO / "configs" / "prices.toml"

# Long and distinctive, so a leak cannot hide behind a short common string.
KEY = "sk-test-SECRET-0123456789abcdef"
WRONG_KEY = "sk-test-WRONG-KEY-fedcba9876543210"

# Prices that make a few simulator rows cost real money: USD per 1M tokens.
EXPENSIVE = 1000.0

LEVELS = {"debug", "info", "warning", "error"}


@pytest.fixture(autouse=True)
def own_response_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The response cache of these runs lives under tmp_path (subprocesses
    inherit it), so the secret scan covers it and no test sees another's answers."""
    directory = tmp_path / "response-cache"
    monkeypatch.setenv("ENRICH_CACHE_DIR", str(directory))
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return directory


def enrich_cli(*args: str | Path, key: str = KEY) -> Result:
    """``enrich ARGS`` in process, with ``key`` as $OPENAI_API_KEY."""
    return CliRunner().invoke(cli, [str(arg) for arg in args], env={"OPENAI_API_KEY": key})


def run_args(source: Path, output: Path, base_url: str, *extra: str | Path) -> list[str | Path]:
    return [
        "run", "--input", source, "--column", "question", "--output", output,
        "--model", MODEL, "--base-url", base_url, "--timeout", "5", *extra,
    ]  # fmt: skip


def log_events(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON event; fails on any line that is not one."""
    events: list[dict[str, Any]] = []
    for line in stderr.splitlines():
        event = json.loads(line)
        assert isinstance(event, dict), line
        assert {"ts", "level", "event"} <= event.keys(), line
        assert event["level"] in LEVELS, line
        assert isinstance(event["event"], str) and event["event"], line
        datetime.fromisoformat(event["ts"])
        events.append(event)
    return events


def named(events: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [event for event in events if event["event"] == name]


def read_report(output: Path) -> dict[str, Any]:
    body = json.loads(report_path_for(output).read_text())
    assert isinstance(body, dict)
    return body


def price_file(path: Path, input_price: float, output_price: float, model: str = MODEL) -> Path:
    path.write_text(f'[models."{model}"]\ninput = {input_price}\noutput = {output_price}\n')
    return path


def usd(
    prompt_tokens: int, completion_tokens: int, input_price: float, output_price: float
) -> float:
    return (prompt_tokens * input_price + completion_tokens * output_price) / 1_000_000


def token_rule(*contents: str) -> int:
    """The documented offline estimate of one request's prompt tokens: a
    quarter of each message's UTF-8 bytes, 4 per message, 3 per request."""
    return sum(len(content.encode()) // 4 + 4 for content in contents) + 3


# -- exit 0 and reruns ---------------------------------------------------------


def test_a_rerun_after_success_is_up_to_date_and_sends_nothing_until_forced(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"nightly question {i}" for i in range(20)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(source, output, server.base_url)

    first = enrich_cli(*args)
    assert first.exit_code == 0, first.stderr
    assert server.stats.requests == 20
    assert pl.read_parquet(output)["response"].to_list() == [answer_for(p) for p in prompts]
    written = output.stat().st_mtime_ns

    again = enrich_cli(*args)
    assert again.exit_code == 0, again.stderr
    assert server.stats.requests == 20  # not one request
    assert again.stdout.startswith(f"up to date: {output} (20 rows)")
    assert "--force" in again.stderr
    assert output.stat().st_mtime_ns == written  # the output is left alone

    # A nightly export that rewrites the same bytes only touches the mtime.
    os.utime(source, ns=(time.time_ns(), time.time_ns()))
    touched = enrich_cli(*args)
    assert touched.exit_code == 0, touched.stderr
    assert "up to date" in touched.stdout
    assert server.stats.requests == 20

    # --force redoes the job; answers to deterministic requests come from the
    # response cache unless --no-cache.
    forced = enrich_cli(*args, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert "up to date" not in forced.stdout
    assert server.stats.requests == 20
    assert pl.read_parquet(output)["cached"].to_list() == [True] * 20

    resent = enrich_cli(*args, "--force", "--no-cache")
    assert resent.exit_code == 0, resent.stderr
    assert server.stats.requests == 40
    out = pl.read_parquet(output)
    assert out["cached"].to_list() == [False] * 20
    assert out["response"].to_list() == [answer_for(p) for p in prompts]


# -- exit 1 ----------------------------------------------------------------------


def test_failed_rows_above_max_error_rate_exit_1_and_the_rerun_exits_1_again(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"fine {i}" for i in range(8)] + ["too long [[fault:400]]", "long [[fault:400]]"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(source, output, server.base_url, "--max-error-rate", "0.1")

    result = enrich_cli(*args)

    assert result.exit_code == 1, result.stderr
    error_line = result.stderr.strip().splitlines()[-1]
    assert error_line.startswith("enrich: error: 2 rows failed (20.0%)"), error_line
    assert "--max-error-rate" in error_line and "--retry-failed" in error_line
    # The output is written all the same: the scheduler decides what to do with it.
    assert pl.read_parquet(output)["status"].to_list() == ["ok"] * 8 + ["error"] * 2
    report = read_report(output)
    assert (report["exit_code"], report["outcome"]) == (1, "too_many_failed_rows")
    sent = server.stats.requests

    # Up to date, but still a failed job: cron must keep seeing it.
    again = enrich_cli(*args)
    assert again.exit_code == 1, again.stderr
    assert "up to date" in again.stdout
    assert server.stats.requests == sent


def test_retry_failed_after_exit_1_resends_only_the_failed_rows(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    # (A 429 costs a quarter attempt, so with --max-attempts 1 it would be retried.)
    prompts = [f"fine {i}" for i in range(8)] + ["flaky [[fault:500:1]]", "shaky [[fault:500:1]]"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    # Without the response cache, which would hide a re-send of the ok rows.
    args = run_args(
        source, output, server.base_url,
        "--no-cache", "--max-attempts", "1", "--max-error-rate", "0.1",
    )  # fmt: skip
    first = enrich_cli(*args)
    assert first.exit_code == 1, first.stderr
    assert "--retry-failed" in first.stderr
    sent = server.stats.requests

    retried = enrich_cli(*args, "--retry-failed")

    assert retried.exit_code == 0, retried.stderr
    assert pl.read_parquet(output)["status"].to_list() == ["ok"] * 10
    assert server.stats.requests - sent == 2  # the two failed rows, nothing else


# -- exit 2 ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model", "my-local-llama", "--max-cost", "5"], "--price-file"),
        (["--price-file", "missing-prices.toml"], "--price-file"),
        (["--max-cost", "-1"], "--max-cost"),
        (["--log-format", "yaml"], "--log-format"),
    ],
)
def test_bad_scheduling_settings_exit_2_before_any_request(
    tmp_path: Path, start_server: StartServer, extra: list[str], needle: str
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a?", "b?"])
    output = tmp_path / "out.parquet"

    # A flag given twice takes the last value: the --model in extra wins.
    result = enrich_cli(*run_args(source, output, server.base_url, *extra))

    assert result.exit_code == 2, result.stdout + result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert server.stats.requests == 0
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "response-cache")
    assert leftovers == ["in.csv"]  # no output, checkpoint, report or lock


# -- exit 3 ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_retry_after_beyond_max_pause_exits_3_and_a_later_run_resumes(
    tmp_path: Path, start_server: StartServer
) -> None:
    # 2 requests per minute over a one-minute window, and no headers to pace
    # by: the third is told to come back in about a minute (think of a daily
    # limit). The cron job waits 10 s at most.
    limited = start_server(rpm=2, window_s=60.0, rate_headers=False)
    prompts = [f"daily question {i}" for i in range(5)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    extra = ("--concurrency", "1", "--max-pause", "10", "--flush-every", "1")

    stopped = enrich_cli(*run_args(source, output, limited.base_url, *extra))

    assert stopped.exit_code == 3, stopped.stderr
    error_line = stopped.stderr.strip().splitlines()[-1]
    assert error_line.startswith("enrich: error: ") and "--max-pause 10 s" in error_line
    assert limited.stats.requests == 3  # it did not retry into the same wall
    assert not output.exists()

    later = start_server()
    finished = enrich_cli(*run_args(source, output, later.base_url, *extra))

    assert finished.exit_code == 0, finished.stderr
    out = pl.read_parquet(output)
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert later.stats.requests == 3  # the two answered before were not paid again


def test_a_rejected_key_exits_3_and_the_run_with_the_right_key_finishes(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(api_key=KEY)
    prompts = [f"key question {i}" for i in range(30)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(source, output, server.base_url, "--concurrency", "4")

    rejected = enrich_cli(*args, key=WRONG_KEY)

    assert rejected.exit_code == 3, rejected.stderr
    error_line = rejected.stderr.strip().splitlines()[-1]
    assert error_line.startswith("enrich: error: ") and "401" in error_line
    assert "OPENAI_API_KEY" in error_line
    assert server.stats.requests < 30  # stopped early, not one 401 per row
    assert not output.exists()
    report = read_report(output)
    assert (report["exit_code"], report["outcome"]) == (3, "fatal_api_error")

    json_rejected = enrich_cli(*args, "--log-format", "json", key=WRONG_KEY)
    assert json_rejected.exit_code == 3
    assert json_rejected.stdout == ""
    (error,) = named(log_events(json_rejected.stderr), "error")
    assert error["level"] == "error" and error["exit_code"] == 3 and "401" in error["message"]

    fixed = enrich_cli(*args)
    assert fixed.exit_code == 0, fixed.stderr
    assert pl.read_parquet(output)["response"].to_list() == [answer_for(p) for p in prompts]


# -- exit 4: the lock --------------------------------------------------------------

# Takes the lock like a run would, says so, then waits to be killed (or for
# stdin to close, so a failed test never leaves it behind). It loads only
# pipeline.lock: the package's __init__ imports the whole stack, which a lock
# holder does not need and which takes seconds to import.
HOLDER = textwrap.dedent(
    """
    import sys, types
    from pathlib import Path

    package = types.ModuleType("pipeline")
    package.__path__ = [sys.argv[2]]
    sys.modules["pipeline"] = package
    from pipeline.lock import RunLock

    RunLock(Path(sys.argv[1]), command="enrich run configs/nightly.toml").acquire()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another live process holding the lock of tmp_path/out.parquet."""
    process = subprocess.Popen(
        [
            sys.executable, "-c", HOLDER,
            str(lock_path_for(tmp_path / "out.parquet")), str(Path(lock_module.__file__).parent),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "locked"
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()


def test_second_run_on_a_locked_output_exits_4_naming_the_holder(
    tmp_path: Path, start_server: StartServer, lock_holder: subprocess.Popen[str]
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a?", "b?", "c?"])
    output = tmp_path / "out.parquet"
    lock = lock_path_for(output)
    args = run_args(source, output, server.base_url)

    result = enrich_cli(*args)

    assert result.exit_code == 4, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("enrich: error: another enrich run is writing this output")
    assert f"pid {lock_holder.pid} on {socket.gethostname()}" in line
    assert "enrich run configs/nightly.toml" in line  # the holder's command
    assert str(lock) in line  # what to delete if the holder is surely gone
    assert server.stats.requests == 0
    assert not output.exists()
    assert not report_path_for(output).exists()
    assert not output.with_name(output.name + ".enrich").exists()
    # The refused run leaves the holder's lock exactly as it was.
    holder = read_holder(lock)
    assert holder is not None and holder.pid == lock_holder.pid

    as_json = enrich_cli(*args, "--log-format", "json")
    assert as_json.exit_code == 4
    (error,) = named(log_events(as_json.stderr), "error")
    assert error["exit_code"] == 4 and f"pid {lock_holder.pid}" in error["message"]

    lock_holder.kill()  # the holder goes away: the next run gets in
    lock_holder.wait(timeout=10)
    after = enrich_cli(*args)
    assert after.exit_code == 0, after.stderr
    assert server.stats.requests == 3
    assert not lock.exists()


@pytest.mark.slow
def test_a_lock_left_by_a_sigkilled_run_is_taken_over_with_a_warning(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(latency_ms=150)
    rows = 30
    prompts = [f"killed question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    lock = lock_path_for(output)
    run_dir = output.with_name(output.name + ".enrich")
    args = [str(arg) for arg in run_args(source, output, server.base_url)]

    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--quiet", "--concurrency", "2",
         "--flush-every", "2"],
        env={**os.environ, "OPENAI_API_KEY": KEY},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # Normally ~2 s (mostly imports); the bound is generous for a loaded CI box.
        deadline = time.monotonic() + 30
        while len(list((run_dir / PARTS).glob("part-*.parquet"))) < 2:
            assert time.monotonic() < deadline, "the run wrote no checkpoint part"
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        process.kill()  # SIGKILL: no handler runs, the lock file stays behind
        process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    holder = read_holder(lock)
    assert holder is not None and holder.pid == process.pid

    result = enrich_cli(*args, "--concurrency", "16", "--log-format", "json")

    assert result.exit_code == 0, result.stderr
    events = log_events(result.stderr)
    (warning,) = [e for e in named(events, "warning") if e.get("kind") == "stale_lock"]
    assert warning["level"] == "warning"
    assert "took over the lock" in warning["message"]
    assert f"pid {process.pid}" in warning["message"]
    (start,) = named(events, "start")
    assert start["resumed"] >= 4  # the dead run's finished rows are kept
    assert pl.read_parquet(output)["response"].to_list() == [answer_for(p) for p in prompts]
    # Paid twice at most: the 2 requests in flight at the kill, the result
    # waiting in the buffer and the part being written (2 rows each).
    assert rows <= server.stats.requests <= rows + 2 + 2 * 2
    assert not lock.exists()


# -- exit 5: the spend cap ---------------------------------------------------------


def test_the_spend_cap_stops_with_the_checkpoint_kept_and_a_higher_cap_resumes_the_rest(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    rows = 20
    prompts = [f"spend question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    run_dir = output.with_name(output.name + ".enrich")
    prices = price_file(tmp_path / "prices.toml", EXPENSIVE, EXPENSIVE)
    args = run_args(
        source, output, server.base_url,
        "--price-file", prices, "--max-tokens", "64", "--concurrency", "4",
    )  # fmt: skip

    def spent_so_far() -> float:
        tokens = read_report(output)["tokens"]
        return usd(tokens["prompt"], tokens["completion"], EXPENSIVE, EXPENSIVE)

    stopped = enrich_cli(*args, "--max-cost", "0.2")

    assert stopped.exit_code == 5, stopped.stderr
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("enrich: error: stopped by the spend cap"), line
    assert "rerun with a higher --max-cost to continue" in line and str(run_dir) in line
    assert not output.exists()
    assert (run_dir / MANIFEST).exists()
    sent = server.stats.requests
    assert 0 < sent < rows
    report = read_report(output)
    assert (report["exit_code"], report["outcome"]) == (5, "stopped_by_spend_cap")
    assert report["counts"]["ok"] == sent  # every answer paid for is in the checkpoint
    assert report["cost"]["max_cost"] == 0.2
    assert spent_so_far() <= 0.2

    status = enrich_cli("status", output, "--json")
    assert status.exit_code == 0, status.stderr
    assert json.loads(status.stdout)["done"] == sent

    # The cap is for the whole job: the same cap again adds at most what is left of it.
    same_cap = enrich_cli(*args, "--max-cost", "0.2")
    assert same_cap.exit_code == 5, same_cap.stderr
    assert spent_so_far() <= 0.2
    done = read_report(output)["counts"]["ok"]
    assert done == server.stats.requests

    # Someone edited the job in between: the checkpoint is refused, nothing is sent.
    changed = enrich_cli(*args, "--max-cost", "10", "--system-prompt", "Be brief.")
    assert changed.exit_code == 2, changed.stderr
    assert "--restart" in changed.stderr
    assert server.stats.requests == done

    resumed = enrich_cli(*args, "--max-cost", "10")

    assert resumed.exit_code == 0, resumed.stderr
    assert server.stats.requests == rows  # exactly the remaining rows were sent
    assert f"from checkpoint {done}" in resumed.stdout
    out = pl.read_parquet(output)
    assert out["id"].to_list() == list(range(rows))
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert not run_dir.exists()
    final = read_report(output)
    assert final["exit_code"] == 0
    total = usd(
        int(out["prompt_tokens"].sum()), int(out["completion_tokens"].sum()), EXPENSIVE, EXPENSIVE
    )
    assert final["cost"]["estimated_total"] == pytest.approx(total, abs=1e-6)


# -- logs --------------------------------------------------------------------------


def test_json_log_lines_all_parse_with_start_and_finish_and_stdout_stays_empty(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts: list[str | None] = [f"log question {i}" for i in range(24)]
    prompts += [None, "paused once [[fault:429:1]]"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    args = run_args(source, output, server.base_url, "--log-format", "json")

    result = enrich_cli(*args)

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    events = log_events(result.stderr)
    assert events[0]["event"] == "start" and events[-1]["event"] == "finish"
    (start,) = named(events, "start")
    assert start["rows"] == 26 and start["resumed"] == 0 and start["model"] == MODEL
    (finish,) = named(events, "finish")
    assert (finish["rows"], finish["ok"], finish["error"], finish["skipped"]) == (26, 25, 0, 1)
    assert finish["report"] == str(report_path_for(output))
    assert named(events, "progress")  # a log shipper sees progress without a terminal

    quiet_rerun = enrich_cli(*args, "--quiet")
    assert quiet_rerun.exit_code == 0, quiet_rerun.stderr
    assert quiet_rerun.stdout == ""
    (skip,) = log_events(quiet_rerun.stderr)
    assert skip["event"] == "skip" and "up to date" in skip["message"]


# -- the report ----------------------------------------------------------------------


def test_the_report_has_counts_tokens_cost_latency_requests_fingerprint_and_no_secret(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(api_key=KEY, latency_ms=5, jitter_ms=5)
    prompts: list[str | None] = [f"report question {i}" for i in range(20)]
    prompts += [
        None,
        "retried once [[fault:500:1]]",
        "rate limited once [[fault:429:1]]",
        "too long [[fault:400]]",
    ]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    prices = price_file(tmp_path / "prices.toml", 2.0, 8.0)
    args = run_args(
        source, output, server.base_url,
        "--price-file", prices, "--max-cost", "100", "--max-tokens", "64", "--keep-checkpoint",
    )  # fmt: skip

    result = enrich_cli(*args)

    assert result.exit_code == 0, result.stderr
    report_file = report_path_for(output)
    assert KEY not in report_file.read_text()
    report = read_report(output)
    out = pl.read_parquet(output)
    assert (report["exit_code"], report["outcome"], report["message"]) == (0, "done", None)
    assert report["counts"] == {
        "rows": 24, "ok": 22, "error": 1, "skipped": 1, "pending": 0,
        "resumed_rows": 0, "processed_rows": 24, "error_rate": round(1 / 23, 6),
        "error_reasons": [{"reason": out["error"].drop_nulls()[0], "rows": 1}],
    }  # fmt: skip
    prompt_tokens = int(out["prompt_tokens"].sum())
    completion_tokens = int(out["completion_tokens"].sum())
    assert prompt_tokens > 0 and completion_tokens > 0
    assert report["tokens"] == {
        "prompt": prompt_tokens,
        "completion": completion_tokens,
        "total": prompt_tokens + completion_tokens,
    }
    spent = usd(prompt_tokens, completion_tokens, 2.0, 8.0)
    cost = report["cost"]
    assert cost["currency"] == "USD" and cost["max_cost"] == 100.0
    assert cost["estimated_total"] == pytest.approx(spent, abs=1e-6)
    assert cost["this_run"] == pytest.approx(spent, abs=1e-6)
    assert cost["price"]["input_per_million_usd"] == 2.0 and cost["price"]["source"] == str(prices)
    latency = report["timing"]["latency_ms"]
    assert latency["count"] == 22  # one per ok row
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert latency["p99"] <= out["latency_ms"].max()
    assert report["timing"]["wall_s"] > 0
    # One request per row that was sent, plus one retry each for the 500 and the 429.
    assert report["requests"] == {
        "sent": 25,
        "retries": 2,
        "rate_limited_429": 1,
        "bad_structured_answers": 0,
        "outages": 0,
        "outage_s": 0.0,
        "stalled": 0,
        "stall_timeout_s": 5.0,  # too few answers to learn: the default, capped by --timeout
        "streamed": True,
    }
    assert server.stats.requests == 25 and server.stats.rate_limited == 1
    manifest = json.loads((output.with_name(output.name + ".enrich") / MANIFEST).read_text())
    assert report["fingerprint"] == manifest["settings_sha256"]
    assert len(report["fingerprint"]) == 64
    assert report["input"]["rows"] == 24
    assert report["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert report["output"]["size"] == output.stat().st_size
    assert report["output"]["rows"] == 24
    datetime.fromisoformat(report["started_at"])
    datetime.fromisoformat(report["finished_at"])
    settings = report["settings"]
    assert settings["model"]["name"] == MODEL and settings["model"]["max_tokens"] == 64
    assert settings["model"]["base_url"] == server.base_url
    assert settings["model"]["api_key_env"] == "OPENAI_API_KEY"  # names a variable: kept
    assert settings["max_cost"] == 100.0


def test_the_report_flag_moves_the_report_and_reruns_find_it_there(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a?", "b?", "c?"])
    output = tmp_path / "out.parquet"
    (tmp_path / "reports").mkdir()
    elsewhere = tmp_path / "reports" / "nightly.json"
    args = run_args(source, output, server.base_url, "--report", elsewhere)

    assert enrich_cli(*args).exit_code == 0
    assert json.loads(elsewhere.read_text())["counts"]["ok"] == 3
    assert not report_path_for(output).exists()

    again = enrich_cli(*args)
    assert again.exit_code == 0 and "up to date" in again.stdout
    assert server.stats.requests == 3


# -- the key is never written --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_api_key_never_reaches_logs_report_checkpoint_cache_or_output(
    tmp_path: Path, start_server: StartServer, log_format: str
) -> None:
    server = start_server(api_key=KEY, fail_rate_429=0.1, seed=11)
    source = write_questions(tmp_path / "in.csv", [f"secret question {i}" for i in range(30)])
    # Other prompts for the rejected run: answers already in the response
    # cache would need no request, and so no key.
    other = write_questions(tmp_path / "other.csv", [f"other question {i}" for i in range(30)])
    accepted = tmp_path / "accepted.parquet"
    rejected = tmp_path / "rejected.parquet"
    common = ["--log-format", log_format, "--keep-checkpoint", "--max-attempts", "20"]

    ok = enrich_cli(*run_args(source, accepted, server.base_url, *common))
    refused = enrich_cli(*run_args(other, rejected, server.base_url, *common), key=WRONG_KEY)

    assert ok.exit_code == 0, ok.stderr
    assert refused.exit_code == 3, refused.stderr
    logs = ok.stdout + ok.stderr + refused.stdout + refused.stderr
    assert "401" in logs
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    names = {path.name for path in files}
    assert {"accepted.parquet", "accepted.parquet.report.json"} <= names
    assert "rejected.parquet.report.json" in names
    assert any(PARTS in path.parts for path in files)  # a checkpoint was scanned
    assert sum(path.name == MANIFEST for path in files) == 2  # both run directories
    for secret in (KEY, WRONG_KEY):
        assert secret not in logs
        for path in files:
            assert secret.encode() not in path.read_bytes(), path


# -- enrich estimate ----------------------------------------------------------------


def test_estimate_counts_tokens_by_the_documented_rule_and_prices_them(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    system = "You are terse."  # 14 bytes
    prompts = ["abc", "abcd", "x" * 41, "Why is the sky blue?", None, "   "]
    source = write_questions(tmp_path / "in.csv", prompts)
    prices = price_file(tmp_path / "prices.toml", 3.0, 15.0)
    args: list[str | Path] = [
        "estimate", "--input", source, "--column", "question", "--output", tmp_path / "o.parquet",
        "--model", MODEL, "--base-url", server.base_url, "--system-prompt", system,
        "--max-tokens", "100", "--rpm", "60", "--price-file", prices,
    ]  # fmt: skip
    sent = [p for p in prompts if p is not None and p.strip()]
    prompt_tokens = sum(token_rule(system, p) for p in sent)
    assert [token_rule(system, p) for p in sent] == [14, 15, 24, 19]

    result = enrich_cli(*args, "--json")

    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["rows"] == 4 and body["skipped"] == 2
    assert body["prompt_tokens"] == prompt_tokens == 72
    assert body["completion_tokens"] == 4 * 100 and body["completion_tokens_per_row"] == 100
    assert body["cost_usd"] == pytest.approx(usd(72, 400, 3.0, 15.0), abs=1e-6)
    assert body["price"]["model"] == MODEL and body["price"]["source"] == str(prices)
    assert (body["bound_by"], body["seconds"]) == ("rpm", 4.0)  # 4 rows at 60/min
    assert body["message"] is None

    text = enrich_cli(*args)
    assert text.exit_code == 0, text.stderr
    assert "rows: 4 to send, 2 skipped" in text.stdout
    assert "~72 in / 400 out" in text.stdout and "bound by rpm" in text.stdout

    assert server.stats.requests == 0  # an estimate sends nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "prices.toml"]


def test_estimate_counts_utf8_bytes_of_non_ascii_prompts(tmp_path: Path) -> None:
    prompts = ["おはようございます", "photosynthèse à l'école", "🌌🌌🌌🌌"]
    source = write_questions(tmp_path / "in.csv", prompts)
    result = enrich_cli(
        "estimate", "--input", source, "--column", "question",
        "--output", tmp_path / "o.parquet", "--model", MODEL, "--json",
    )  # fmt: skip

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["prompt_tokens"] == sum(token_rule(p) for p in prompts)


# -- the README's cron line and the nightly config -----------------------------------


@pytest.fixture
def nightly_job(tmp_path: Path) -> Path:
    """The job folder of the cron line (`cd /data`): configs/nightly.toml as
    shipped and its relative paths (data/questions.csv in, data/out/ out),
    with the first rows of the sample data, so every output lands in tmp."""
    job = tmp_path / "job"
    (job / "configs").mkdir(parents=True)
    (job / "data" / "out").mkdir(parents=True)
    shutil.copy(NIGHTLY, job / "configs" / "nightly.toml")
    config = tomllib.loads(NIGHTLY.read_text())
    assert config["input"]["path"] == "data/questions.csv"
    assert config["output"]["path"] == "data/out/questions.nightly.parquet"
    pl.read_csv(REPO / "data" / "questions.csv").head(12).write_csv(job / "data" / "questions.csv")
    return job


@pytest.mark.slow
def test_the_readme_cron_line_runs_the_nightly_config_and_the_next_night_sends_nothing(
    nightly_job: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(api_key=KEY)
    readme = (REPO / "README.md").read_text()
    cron_command = "enrich run configs/nightly.toml --quiet --log-format json"
    assert f"{cron_command} >> enrich.log 2>&1" in readme
    line = (
        f"cd {shlex.quote(str(nightly_job))} && {cron_command} "
        f"--base-url {server.base_url} >> enrich.log 2>&1"
    )
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "OPENAI_API_KEY": KEY,
    }

    night = subprocess.run(["bash", "-c", line], env=env, timeout=30, check=False)

    log = (nightly_job / "enrich.log").read_text()
    assert night.returncode == 0, log
    events = log_events(log)
    assert events[0]["event"] == "start" and events[-1]["event"] == "finish"
    output = nightly_job / "data" / "out" / "questions.nightly.parquet"
    out = pl.read_parquet(output)
    assert out.height == 12 == events[-1]["rows"]
    assert set(out["status"].to_list()) <= {"ok", "skipped"}
    assert server.stats.requests == out["status"].to_list().count("ok")
    assert report_path_for(output).exists()
    assert not lock_path_for(output).exists()
    assert not output.with_name(output.name + ".enrich").exists()
    assert KEY not in log

    # The next night (in process, to keep the test fast): nothing to do.
    monkeypatch.chdir(nightly_job)
    again = enrich_cli(
        "run", "configs/nightly.toml", "--quiet", "--log-format", "json",
        "--base-url", server.base_url,
    )  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert [event["event"] for event in log_events(again.stderr)] == ["skip"]
    assert server.stats.requests == out["status"].to_list().count("ok")


def test_estimate_of_the_nightly_config_prices_its_model_and_is_bound_by_its_rpm(
    nightly_job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(nightly_job)
    config = tomllib.loads(NIGHTLY.read_text())
    price = tomllib.loads(SHIPPED_PRICES.read_text())["models"][config["model"]["name"]]
    questions = pl.read_csv(nightly_job / "data" / "questions.csv")["question"].to_list()
    rows = sum(1 for q in questions if q is not None and q.strip())

    result = enrich_cli("estimate", "configs/nightly.toml", "--json")

    assert result.exit_code == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["rows"] == rows and body["skipped"] == len(questions) - rows
    per_row = config["model"]["max_tokens"]
    assert body["completion_tokens_per_row"] == per_row
    assert body["completion_tokens"] == rows * per_row
    assert body["prompt_tokens"] > rows * token_rule(config["input"]["system_prompt"], "")
    assert body["cost_usd"] == pytest.approx(
        usd(body["prompt_tokens"], body["completion_tokens"], price["input"], price["output"]),
        abs=1e-6,
    )
    assert body["price"]["model"] == config["model"]["name"]
    assert body["bound_by"] == "rpm"
    assert body["seconds"] == pytest.approx(rows / config["limits"]["rpm"] * 60, abs=0.05)

    text = enrich_cli("estimate", "configs/nightly.toml")
    assert text.exit_code == 0, text.stderr
    assert f"rows: {rows} to send" in text.stdout and "bound by rpm" in text.stdout
    assert not any((nightly_job / "data" / "out").iterdir())  # sends and writes nothing
