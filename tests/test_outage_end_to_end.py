"""Outages with real processes over real loopback HTTP: the simulator runs
as its own process on a fixed port, so it can be SIGKILLed mid-run and
started again on the same port, as a server that crashes and restarts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from pipeline.checkpoint import MANIFEST, PARTS
from pipeline.report import report_path_for

from conftest import MODEL, answer_for, write_questions

ROWS = 1500


class SimulatorProcess:
    """``python -m pipeline simulate`` in a process of its own, on one port
    for the whole test: ``kill`` is a crash, ``start`` a restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "pipeline", "simulate",
                "--host", "127.0.0.1", "--port", str(self.port), "--latency-ms", "20",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.process.stderr is not None
        # The CLI says "serving URL" once it listens.
        line = self.process.stderr.readline()
        assert line.startswith("serving "), line

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL: no goodbye, connections reset
            self.process.wait(timeout=10)
            assert self.process.returncode == -signal.SIGKILL


@pytest.fixture
def simulator() -> Iterator[SimulatorProcess]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = SimulatorProcess(port)
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            server.kill()


def start_run(source: Path, output: Path, base_url: str, *extra: str) -> subprocess.Popen[str]:
    """``enrich run`` as cron would start it, with the default --max-attempts."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-outage-0123456789"}
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "run",
            "--input", str(source), "--column", "question", "--output", str(output),
            "--base-url", base_url, "--model", MODEL, "--quiet",
            "--concurrency", "16", "--flush-every", "50", "--flush-interval", "0.3",
            "--timeout", "2", *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for_parts(run_dir: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any((run_dir / PARTS).glob("part-*.parquet")):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint part appeared in {run_dir}")


def checkpointed_statuses(run_dir: Path) -> list[str]:
    parts = sorted((run_dir / PARTS).glob("part-*.parquet"))
    return [status for part in parts for status in pl.read_parquet(part)["status"].to_list()]


@pytest.mark.slow
def test_a_server_gone_for_good_ends_the_run_with_exit_75_and_the_rerun_finishes_once_it_is_back(
    tmp_path: Path, simulator: SimulatorProcess
) -> None:
    prompts = [f"outage question {i}" for i in range(ROWS)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"
    simulator.start()

    run = start_run(source, output, simulator.base_url, "--max-outage", "3")
    wait_for_parts(run_dir)
    simulator.kill()
    killed_at = time.monotonic()
    _, stderr = run.communicate(timeout=60)
    ended_after = time.monotonic() - killed_at

    assert run.returncode == 75, stderr
    # The bound, plus the time it takes a process to write its report and exit.
    assert 3.0 <= ended_after < 10.0, ended_after
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("enrich: error:")]
    assert len(errors) == 1, stderr
    assert "connection error" in errors[0]
    assert "--max-outage 3 s" in errors[0]
    assert "rerun the same command once the API is back" in errors[0]
    assert stderr.splitlines()[-1] == errors[0]
    assert "sk-test-outage" not in stderr
    # Nothing written under the output name; what was answered is kept, and
    # no row was marked error for the outage.
    assert not output.exists()
    assert (run_dir / MANIFEST).exists()
    statuses = checkpointed_statuses(run_dir)
    assert 0 < len(statuses) < ROWS
    assert set(statuses) == {"ok"}
    report = json.loads(report_path_for(output).read_text())
    assert (report["exit_code"], report["outcome"]) == (75, "api_unreachable")

    # The API is back on the same address: the same command finishes the job.
    simulator.start()
    rerun = start_run(source, output, simulator.base_url, "--max-outage", "3")
    _, stderr = rerun.communicate(timeout=120)

    assert rerun.returncode == 0, stderr
    out = pl.read_parquet(output)
    assert out["id"].to_list() == list(range(ROWS))
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].to_list() == [answer_for(p) for p in prompts]


@pytest.mark.slow
def test_a_server_back_within_max_outage_costs_a_pause_and_no_failed_row(
    tmp_path: Path, simulator: SimulatorProcess
) -> None:
    prompts = [f"short outage question {i}" for i in range(ROWS)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"
    simulator.start()

    # Three attempts span about a second of backoff: without the outage rule,
    # rows in flight or sent while it is down would end in error.
    run = start_run(source, output, simulator.base_url, "--max-outage", "30", "--max-attempts", "3")
    wait_for_parts(run_dir)
    simulator.kill()
    time.sleep(1.0)
    simulator.start()
    _, stderr = run.communicate(timeout=120)

    assert run.returncode == 0, stderr
    out = pl.read_parquet(output)
    assert out["id"].to_list() == list(range(ROWS))
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    # The log says what happened: one line when it went, one when it came back.
    assert "WARNING warning: the API is not answering" in stderr
    assert "INFO recovered: the API answers again" in stderr
    assert "Traceback" not in stderr
