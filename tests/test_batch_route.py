"""The batch route end to end: real HTTP on 127.0.0.1 against the simulator's
Files and Batches endpoints, the run's own process (and, for crashes, real
processes SIGKILLed at each step), results in the same output contract."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline.batch_ledger import read_ledger
from pipeline.batch_route import cancel_run
from pipeline.cli import cli
from pipeline.costs import SpendCapReached
from pipeline.crashpoints import ENV as CRASH_ENV
from pipeline.errors import BatchesPending, BatchFailed, CheckpointMismatch, ExitCode
from pipeline.runner import RunOptions, enrich
from pipeline.simulate import Simulator
from pipeline.simulate_batch import BatchConfig

from conftest import StartServer, answer_for, make_config, write_questions

# Batches take a turnaround of their own: seconds per test.
pytestmark = pytest.mark.slow

FAST = BatchConfig(turnaround_s=0.4)


def batch_config(source: Path, output: Path, server: Simulator, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "route": "batch",
        "batch.max_requests": 10,
        "batch.poll_interval_s": 0.1,
        **overrides,
    }
    return make_config(source, output, server.base_url, **settings)


def questions(count: int) -> list[str]:
    return [f"question {i}" for i in range(count)]


def assert_every_row_once(output: Path, prompts: list[str | None]) -> pl.DataFrame:
    frame = pl.read_parquet(output)
    assert frame["question"].to_list() == prompts
    for prompt, response, status in zip(prompts, frame["response"], frame["status"], strict=True):
        if prompt is None:
            assert status == "skipped"
        elif status == "ok":
            assert response == answer_for(prompt)
    return frame


def left_running(
    tmp_path: Path, server: Simulator, prompts: list[str | None]
) -> tuple[Path, Path, BatchesPending]:
    """A --no-wait run over ``prompts`` that submitted its batches and left
    them running: its input, its output and what it raised."""
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    with pytest.raises(BatchesPending) as pending:
        enrich(batch_config(source, output, server, **{"batch.wait": False}))
    return source, output, pending.value


def computed_once(server: Simulator) -> None:
    counts = server.batches.stats.computed_by_custom_id
    assert counts and set(counts.values()) == {1}, counts


def test_a_batch_run_splits_into_files_and_answers_every_row_once(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=FAST)
    prompts: list[str | None] = [*questions(45), None, "question 3"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    summary = enrich(batch_config(source, output, server))
    frame = assert_every_row_once(output, prompts)
    assert summary.ok == 46 and summary.skipped == 1
    assert frame["status"].to_list() == ["ok"] * 45 + ["skipped", "ok"]
    assert frame["route"].to_list() == ["batch"] * 45 + [None, "batch"]
    assert frame["attempts"].to_list()[:45] == [1] * 45
    stats = server.batches.stats
    # 46 requests in files of 10 at most: five batches, every row computed once.
    assert stats.batches_created == 5 and stats.files_uploaded == 5
    computed_once(server)
    assert summary.requests == stats.computed == 46
    assert not (tmp_path / "out.parquet.enrich").exists()


def test_identical_requests_in_one_file_are_asked_once(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=FAST)
    prompts: list[str | None] = ["same", "other", "same", "same"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    enrich(batch_config(source, output, server))
    frame = assert_every_row_once(output, prompts)
    assert frame["cached"].to_list() == [False, False, True, True]
    assert server.batches.stats.computed == 2


CRASH_POINTS = (
    "batch-after-write",
    "batch-after-upload",
    "batch-after-create",
    "batch-while-polling",
    "batch-while-downloading",
)


def run_cli(
    source: Path, output: Path, base_url: str, *extra: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    env.pop("OPENAI_BASE_URL", None)
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [
            sys.executable, "-m", "pipeline", "run",
            "--input", str(source), "--column", "question", "--output", str(output),
            "--base-url", base_url, "--model", "sim-1", "--quiet", "--no-page",
            "--route", "batch", "--batch-max-requests", "10", "--batch-poll-interval", "0.1",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_a_sigkill_at_each_step_then_a_rerun_submits_nothing_twice(
    tmp_path: Path, start_server: StartServer, crash_at: str
) -> None:
    server = start_server(batch=FAST)
    prompts: list[str | None] = list(questions(25))
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    killed = run_cli(source, output, server.base_url, crash_at=crash_at)
    assert killed.returncode == -9, killed.stderr
    assert not output.exists()
    rerun = run_cli(source, output, server.base_url)
    assert rerun.returncode == 0, rerun.stderr
    frame = assert_every_row_once(output, prompts)
    assert frame["status"].to_list() == ["ok"] * 25
    stats = server.batches.stats
    # Three files: each made into one batch, each request computed once.
    assert stats.batches_created == 3, crash_at
    computed_once(server)
    downloads = sorted(stats.downloads_by_file.values())
    if crash_at == "batch-while-downloading":
        # Killed before its results were committed: that one file again.
        assert downloads == [1, 1, 2]
    else:
        assert downloads == [1, 1, 1]


def test_an_expired_batch_keeps_what_it_completed_and_resubmits_the_rest(
    tmp_path: Path, start_server: StartServer
) -> None:
    # Each batch runs 62% of its requests before it expires (a batch of one
    # never finishes): resubmitted rounds bring it down to a row or two.
    server = start_server(batch=BatchConfig(turnaround_s=2.0, expire_after_s=1.2))
    prompts: list[str | None] = list(questions(30))
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    config = batch_config(source, output, server, **{"batch.max_requests": 100})
    summary = enrich(config)
    frame = assert_every_row_once(output, prompts)
    stats = server.batches.stats
    assert stats.unfinished > 0 and stats.batches_created == config.limits.max_attempts
    assert 0 < summary.pending <= 2 and summary.ok == 30 - summary.pending
    assert set(frame.filter(pl.col("status") == "error")["error"]) == {
        "no batch ran this request (the last one expired); the next run sends it again"
    }
    computed_once(server)
    # The next run (a provider that keeps its window) finishes them.
    patient = start_server(batch=FAST)
    enrich(batch_config(source, output, patient, **{"batch.max_requests": 100}))
    assert pl.read_parquet(output)["status"].to_list() == ["ok"] * 30
    assert patient.batches.stats.computed == summary.pending


def test_an_error_file_retries_transient_rows_and_keeps_permanent_errors(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=FAST)
    prompts: list[str | None] = ["fine", "flaky [[fault:500:1]]", "too long [[fault:400]]"]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    enrich(batch_config(source, output, server))
    frame = assert_every_row_once(output, prompts)
    assert frame["status"].to_list() == ["ok", "ok", "error"]
    assert "request rejected (400)" in frame["error"][2]
    counts = server.batches.stats.computed_by_custom_id
    # The transient failure went into a second batch; the permanent one did not.
    assert (counts["row-0"], counts["row-1"], counts["row-2"]) == (1, 2, 1)


def test_the_enqueued_token_limit_queues_files_instead_of_failing(
    tmp_path: Path, start_server: StartServer
) -> None:
    prompts: list[str | None] = [f"question {i:02d} " + "x" * 40 for i in range(30)]
    # About 20 prompt tokens a request: one file of 10 fits the queue, two do not.
    server = start_server(batch=BatchConfig(turnaround_s=0.6, enqueued_tokens=300))
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    enrich(batch_config(source, output, server))
    frame = assert_every_row_once(output, prompts)
    assert frame["status"].to_list() == ["ok"] * 30
    stats = server.batches.stats
    # Some batches were refused for the queue, and their files went later.
    assert stats.batches_created > 3
    computed_once(server)


def test_finish_online_after_cancels_what_is_out_and_sends_the_rest_online(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=BatchConfig(turnaround_s=5.0))
    prompts: list[str | None] = list(questions(40))
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    config = batch_config(
        source, output, server, **{"batch.max_requests": 100, "batch.finish_online_after": "2s"}
    )
    enrich(config)
    frame = assert_every_row_once(output, prompts)
    assert frame["status"].to_list() == ["ok"] * 40
    assert server.batches.stats.batches_cancelled == 1
    routes = frame["route"].to_list()
    assert "online" in routes
    by_batch = {f"row-{i}" for i, route in enumerate(routes) if route == "batch"}
    answered = server.batches.stats.computed_by_custom_id
    # What the batch finished is kept, and only the rest was sent online.
    assert by_batch == set(answered)
    assert server.stats.answered == routes.count("online")


def test_no_wait_exits_6_and_cancel_keeps_what_finished(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=BatchConfig(turnaround_s=3.0))
    prompts: list[str | None] = list(questions(20))
    source, output, pending = left_running(tmp_path, server, prompts)
    assert pending.exit_code == ExitCode.BATCHES_PENDING
    assert int(ExitCode.BATCHES_PENDING) == 6
    status = CliRunner().invoke(cli, ["status", str(output)])
    assert status.output.startswith("waiting on its batches")
    assert "batches (as last polled): submitted 2 (20 rows)" in status.output
    result = CliRunner().invoke(cli, ["cancel", str(output)])
    assert result.exit_code == 0, result.output
    assert "cancelled 2 batch(es)" in result.output
    enrich(batch_config(source, output, server))
    frame = assert_every_row_once(output, prompts)
    assert frame["status"].to_list() == ["ok"] * 20
    assert server.batches.stats.batches_cancelled == 2
    computed_once(server)


def test_restart_cancels_the_batches_of_the_run_it_discards(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=BatchConfig(turnaround_s=3.0))
    prompts: list[str | None] = list(questions(20))
    source, output, _ = left_running(tmp_path, server, prompts)

    enrich(batch_config(source, output, server), options=RunOptions(restart=True))

    assert server.batches.stats.batches_cancelled == 2
    frame = assert_every_row_once(output, prompts)
    assert frame["status"].to_list() == ["ok"] * 20


def test_restart_that_cannot_cancel_its_batches_discards_nothing(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = "sk-batch-owner-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    server = start_server(api_key=key, batch=BatchConfig(turnaround_s=3.0))
    source, output, _ = left_running(tmp_path, server, list(questions(20)))
    config = batch_config(source, output, server)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a-key-it-refuses-000")

    with pytest.raises(CheckpointMismatch) as refused:
        enrich(config, options=RunOptions(restart=True))

    assert "enrich cancel" in str(refused.value) and "sk-a-key" not in str(refused.value)
    assert server.batches.stats.batches_cancelled == 0
    ledger = read_ledger(config.output.resolved_run_dir)
    assert ledger is not None and len(ledger.live()) == 2


def test_cancel_without_batches_says_what_to_give(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["cancel", str(tmp_path / "out.parquet")])
    assert result.exit_code == 2
    assert "no batches to cancel" in result.output
    assert cancel_run(tmp_path / "nothing") is None


def test_max_cost_refuses_to_submit_a_batch_past_the_cap(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(batch=FAST)
    prices = tmp_path / "prices.toml"
    # $1 per 1,000 tokens online, so $0.50 in a batch.
    prices.write_text('[models."sim-1"]\ninput = 1000.0\noutput = 1000.0\n')
    prompts: list[str | None] = list(questions(20))
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    capped = batch_config(
        source, output, server, price_file=prices, max_cost=0.4, **{"model.max_tokens": 50}
    )
    with pytest.raises(SpendCapReached) as stopped:
        enrich(capped)
    assert stopped.value.exit_code == 5
    # The first file (10 rows, at most ~$0.28) went; the second would have passed the cap.
    assert server.batches.stats.batches_created == 1
    rest = batch_config(
        source, output, server, price_file=prices, max_cost=5.0, **{"model.max_tokens": 50}
    )
    enrich(rest)
    assert_every_row_once(output, prompts)
    assert server.batches.stats.batches_created == 2
    computed_once(server)


def test_a_batch_that_fails_validation_says_why(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(batch=FAST, models=("sim-1",))
    source = write_questions(tmp_path / "in.csv", questions(3))
    output = tmp_path / "out.parquet"
    with pytest.raises(BatchFailed, match="model_not_found") as failed:
        enrich(batch_config(source, output, server, **{"model.name": "sim-2"}))
    assert failed.value.exit_code == 3
    ledger = read_ledger(tmp_path / "out.parquet.enrich")
    assert ledger is not None and [e.state for e in ledger.files] == ["failed"]


@pytest.mark.slow
def test_the_batch_route_on_the_ray_engine_runs_on_the_driver_without_starting_ray(
    tmp_path: Path, start_server: StartServer
) -> None:
    ray = pytest.importorskip("ray")
    server = start_server(batch=FAST)
    prompts: list[str | None] = list(questions(20))
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"

    enrich(batch_config(source, output, server, **{"run.engine": "ray"}))

    frame = assert_every_row_once(output, prompts)
    assert frame["route"].to_list() == ["batch"] * 20
    # The batches answered everything: no cluster was needed, none started.
    assert not ray.is_initialized()
    computed_once(server)
