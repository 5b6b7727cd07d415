"""Real processes killed mid-run: the resumed output holds every row exactly
once, in order, with the right answer, and little is paid twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from pipeline.checkpoint import PARTS

from conftest import StartServer, answer_for, write_questions

CONCURRENCY = 16
FLUSH_EVERY = 50


def start_run(source: Path, output: Path, base_url: str, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "run",
            "--input", str(source), "--column", "question", "--output", str(output),
            "--base-url", base_url, "--model", "sim-1", "--quiet",
            "--concurrency", str(CONCURRENCY), "--flush-every", str(FLUSH_EVERY),
            "--flush-interval", "0.3", "--timeout", "2", "--max-attempts", "30",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def wait_for_parts(run_dir: Path, at_least: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(list((run_dir / PARTS).glob("part-*.parquet"))) >= at_least:
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint parts appeared in {run_dir}")


def test_sigkill_at_random_moments_then_resume_holds_every_row_once(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(latency_ms=8, jitter_ms=6, fail_rate_429=0.03, fail_rate_5xx=0.03, seed=5)
    rows = 3000
    prompts = [f"crash question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"
    rng = random.Random(2024)
    kills = 0
    for _ in range(4):
        process = start_run(source, output, server.base_url)
        try:
            wait_for_parts(run_dir, at_least=1 + kills)
            time.sleep(rng.uniform(0.0, 0.6))
        finally:
            process.kill()  # SIGKILL: no handler, no flush
            process.wait(timeout=10)
        if process.returncode == 0:
            break  # finished before the kill landed; nothing more to resume
        assert process.returncode == -signal.SIGKILL
        kills += 1
        assert not output.exists()

    final = start_run(source, output, server.base_url)
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr

    out = pl.read_parquet(output)
    assert out.height == rows
    assert out["id"].to_list() == list(range(rows))
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert kills >= 2
    # Each kill may lose the requests in flight, the buffer being filled and the
    # one part being written; everything else was never paid for twice.
    overpaid = server.stats.answered - rows
    assert 0 <= overpaid <= kills * (CONCURRENCY + 2 * FLUSH_EVERY), overpaid
    assert not run_dir.exists()


def test_sigterm_flushes_exits_130_and_the_rerun_finishes(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(latency_ms=20, jitter_ms=10)
    rows = 2000
    prompts = [f"term question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"

    process = start_run(source, output, server.base_url)
    wait_for_parts(run_dir, at_least=2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130, stderr
    assert "resume" in stderr
    assert "Traceback" not in stderr
    assert not output.exists()
    answered_before = server.stats.answered
    saved = sum(pl.read_parquet(part).height for part in (run_dir / PARTS).glob("part-*.parquet"))
    # A graceful stop flushes everything that was answered.
    assert saved == answered_before

    final = start_run(source, output, server.base_url)
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr
    assert server.stats.answered == rows  # nothing paid twice
    out = pl.read_parquet(output)
    assert out["response"].to_list() == [answer_for(p) for p in prompts]


def test_ctrl_c_exits_130_with_checkpoint_kept(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(latency_ms=20)
    source = write_questions(tmp_path / "in.parquet", [f"q{i}" for i in range(2000)])
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"

    process = start_run(source, output, server.base_url)
    wait_for_parts(run_dir, at_least=1)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert (run_dir / "manifest.json").exists()
