"""--engine ray on a local Ray cluster (one per module, 2 CPUs) against the
simulator enforcing 6,000 requests/min over a 10 s window: Ray Data workers
enrich the shards enrich plans, sharing one limit; a worker or the driver
killed with SIGKILL costs at most the requests in flight; a bad key and the
spend cap stop every worker. Throughput against the single-process engine
and against per-worker limiters is the benchmark's
(benchmarks/sections/ray.py), not a wall-clock assert here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.costs import SpendCapReached
from pipeline.errors import ExitCode, FatalAPIError
from pipeline.events import ProgressEvents, RecordingEventSink
from pipeline.runner import enrich
from pipeline.shards import ShardSummary
from pipeline.simulate import Simulator
from pipeline.summary import RunSummary

from conftest import MODEL, StartServer, answer_for, make_config, write_questions

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.slow

WORKERS = 2
CONCURRENCY = 16
LIMIT = {"rpm": 6000, "window_s": 10.0, "latency_ms": 50.0}
# Row groups of 100 rows, shards of 200: several shards per worker.
ROW_GROUP = 100
SHARD_ROWS = 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray for the module; the address a driver in a subprocess joins."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


def questions_file(path: Path, rows: int, row_group: int = ROW_GROUP) -> Path:
    if path.suffix != ".parquet":
        return write_questions(path, [f"question {i}" for i in range(rows)])
    table = pa.table({"id": range(rows), "question": [f"question {i}" for i in range(rows)]})
    pq.write_table(table, path, row_group_size=row_group)
    return path


def ray_config(
    tmp_path: Path,
    sim: Simulator,
    rows: int,
    *,
    name: str = "in.parquet",
    row_group: int = ROW_GROUP,
    **overrides: Any,
) -> Any:
    source = questions_file(tmp_path / name, rows, row_group)
    return make_config(
        source,
        tmp_path / "out.parquet",
        f"http://127.0.0.1:{sim.port}/v1",
        **{
            "run.engine": "ray",
            "ray.workers": WORKERS,
            "ray.shard_rows": SHARD_ROWS,
            "limits.concurrency": CONCURRENCY,
            "limits.max_attempts": 20,
            "cache.enabled": False,
            **overrides,
        },
    )


def assert_every_row_once_in_order(output: Path, rows: int) -> None:
    frame = pl.read_parquet(output)
    assert frame["id"].to_list() == list(range(rows))
    assert frame["status"].to_list() == ["ok"] * rows
    assert frame["response"].to_list() == [answer_for(f"question {i}") for i in range(rows)]


def paid_twice(sim: Simulator) -> int:
    return sum(count - 1 for count in sim.stats.answered_by_content.values() if count > 1)


@pytest.mark.parametrize("mode", ["configured", "auto"])
def test_ray_workers_share_one_limit_with_under_1_percent_429s(
    cluster: str, start_server: StartServer, tmp_path: Path, mode: str
) -> None:
    sim = start_server(**LIMIT)
    rows = 1200  # 12 s at the limit: more than one window
    overrides: dict[str, Any] = {"limits.rpm": 6000} if mode == "configured" else {}
    summary = enrich(ray_config(tmp_path, sim, rows, **overrides))

    assert_every_row_once_in_order(tmp_path / "out.parquet", rows)
    assert sim.stats.rate_limited < 0.01 * sim.stats.requests
    # Every worker's counts reach the summary; the limit is the ledger's.
    assert summary.requests == sim.stats.requests
    assert summary.rate_limited == sim.stats.rate_limited
    assert summary.learned_rpm == 6000  # from the x-ratelimit headers, in both modes


def run_in_thread(config: Any) -> tuple[threading.Thread, list[RunSummary]]:
    done: list[RunSummary] = []
    thread = threading.Thread(target=lambda: done.append(enrich(config)), daemon=True)
    thread.start()
    return thread, done


def wait_for_answers(sim: Simulator, count: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while sim.stats.answered < count:
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.02)


def test_a_worker_killed_mid_run_costs_only_its_requests_in_flight(
    cluster: str, start_server: StartServer, tmp_path: Path
) -> None:
    sim = start_server(**LIMIT)
    rows = 800
    configured: dict[str, Any] = {"limits.rpm": 6000}
    thread, done = run_in_thread(ray_config(tmp_path, sim, rows, **configured))
    wait_for_answers(sim, 250)
    ledger = next(
        ray.get_actor(actor["name"], namespace=actor["namespace"])
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("enrich-ledger-")
    )
    os.kill(ray.get(ledger.pids.remote())[0], signal.SIGKILL)
    thread.join(timeout=120)

    assert done, "the run did not finish after losing a worker"
    assert_every_row_once_in_order(tmp_path / "out.parquet", rows)
    # Ray restarts the actor and runs its shard again, skipping what the
    # shard's journal holds: only that worker's requests in flight, and the
    # answers of its last group commit (0.1 s), are paid twice.
    assert paid_twice(sim) <= CONCURRENCY + 10
    # The killed worker's counts reached the board before it died.
    assert done[0].requests >= sim.stats.requests - 2 * CONCURRENCY - 20


def enrich_command(config: Any, address: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(config.input.path),
        "--column",
        "question",
        "--output",
        str(config.output.path),
        "--model",
        MODEL,
        "--base-url",
        str(config.model.base_url),
        "--concurrency",
        str(CONCURRENCY),
        "--rpm",
        "6000",
        "--no-cache",
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--workers",
        str(WORKERS),
        "--shard-rows",
        str(SHARD_ROWS),
    ]


def test_a_driver_killed_mid_run_resumes_paying_only_for_what_was_in_flight(
    cluster: str, start_server: StartServer, tmp_path: Path
) -> None:
    sim = start_server(**LIMIT)
    rows = 800
    command = enrich_command(ray_config(tmp_path, sim, rows), cluster)
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_answers(sim, 250)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.wait(timeout=30)
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert_every_row_once_in_order(tmp_path / "out.parquet", rows)
    # In flight on every worker, plus the answers of the last group commit
    # (0.1 s at 100 rows/s) that the kill cut.
    assert paid_twice(sim) <= WORKERS * CONCURRENCY + 10


def test_a_bad_key_stops_every_worker_with_the_fatal_exit_code(
    cluster: str, start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sim = start_server(api_key="sk-right", **LIMIT)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret-value")
    # CSV: staged into Parquet shards by the driver first.
    config = ray_config(tmp_path, sim, 2000, name="in.csv")

    with pytest.raises(FatalAPIError) as caught:
        enrich(config)

    assert caught.value.exit_code == ExitCode.FATAL_API
    assert "401" in str(caught.value)
    assert "sk-wrong-secret-value" not in str(caught.value)
    # Every worker stopped at once: at most what each had in flight, not
    # one refusal per row of its shards.
    assert sim.stats.requests <= WORKERS * CONCURRENCY
    assert not (tmp_path / "out.parquet").exists()
    assert config.output.resolved_run_dir.exists()


def test_max_cost_stops_every_worker_and_a_higher_cap_finishes_the_job(
    cluster: str, start_server: StartServer, tmp_path: Path
) -> None:
    sim = start_server(**LIMIT)
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."sim-1"]\ninput = 1000.0\noutput = 1000.0\n')
    rows = 1000
    capped = ray_config(tmp_path, sim, rows, price_file=prices, max_cost=3.0)

    with pytest.raises(SpendCapReached) as caught:
        enrich(capped)

    assert caught.value.exit_code == ExitCode.SPEND_CAP
    stopped_at = sim.stats.answered
    assert 0 < stopped_at < rows
    # Workers look at the board every 0.25 s: what the cluster answers in
    # that time, at most, passes the cap (100 rows/s at this limit).
    assert caught.value.spent < 3.0 + 2 * WORKERS * CONCURRENCY * 0.03
    enrich(ray_config(tmp_path, sim, rows, price_file=prices, max_cost=1000.0))
    assert_every_row_once_in_order(tmp_path / "out.parquet", rows)
    assert paid_twice(sim) <= WORKERS * CONCURRENCY


def test_a_parquet_file_written_as_one_row_group_is_enriched_in_shards(
    cluster: str, start_server: StartServer, tmp_path: Path
) -> None:
    sim = start_server(**LIMIT)
    events = RecordingEventSink()
    progress = ProgressEvents(events, interval_s=0.0)
    # What pandas and pyarrow write for a file of under a million rows.
    config = ray_config(tmp_path, sim, 600, row_group=600)

    summary = enrich(config, events=events, progress=progress)

    assert_every_row_once_in_order(tmp_path / "out.parquet", 600)
    assert summary.requests == sim.stats.requests == 600
    (planned,) = events.named("shards")
    assert planned.fields == {"shards": 3, "to_do": 3, "staged": True}
    # The progress moved with the workers' rows, before their shards were
    # gathered, and never past the input.
    done = [event.fields["done"] for event in events.named("progress")]
    assert any(event.fields.get("ahead", 0) > 0 for event in events.named("progress"))
    assert max(done) == done[-1] == 600


def test_every_workers_counts_and_warnings_reach_the_driver(
    cluster: str, start_server: StartServer, tmp_path: Path
) -> None:
    sim = start_server(fail_rate_5xx=0.1, **LIMIT)
    events = RecordingEventSink()

    summary = enrich(ray_config(tmp_path, sim, 600), events=events)

    assert_every_row_once_in_order(tmp_path / "out.parquet", 600)
    assert summary.requests == sim.stats.requests
    assert summary.retries == sim.stats.faults > 0
    # A worker's "retrying" warning, in the driver's events.
    assert any(event.fields.get("kind") == "retrying" for event in events.named("warning"))


async def test_a_worker_that_cannot_see_the_run_directory_says_to_share_it(
    tmp_path: Path,
) -> None:
    from pipeline.engine_ray import ShardWorker
    from pipeline.plan import prompt_spec
    from pipeline.shard_work import WorkerSpec, stop_error
    from pipeline.shards import ShardTask, plan_parquet

    source = questions_file(tmp_path / "in.parquet", 300)
    config = make_config(source, tmp_path / "out.parquet", "http://127.0.0.1:9/v1")
    elsewhere = str(tmp_path / "on-the-driver-only")
    spec = WorkerSpec(config, prompt_spec(config), None, None, "sk-x", elsewhere, None)
    worker = ShardWorker(spec, "no-ledger-needed")

    table = await worker(pa.table({"task": [ShardTask(plan_parquet([source], 100)[0]).to_json()]}))

    summary = ShardSummary.from_json(table.column("summary")[0].as_py())
    assert summary.error_kind is not None and summary.error_message is not None
    error = stop_error(summary.error_kind, summary.error_message)
    assert error.exit_code == ExitCode.USAGE
    assert elsewhere in str(error) and "--run-dir" in str(error)
