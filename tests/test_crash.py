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
import pytest

from pipeline.checkpoint import JOURNAL, PARTS
from pipeline.crashpoints import ENV as CRASH_ENV
from pipeline.simulate import Simulator
from pipeline.status import checkpoint_status

from conftest import StartServer, answer_for, write_questions

# Real processes started, killed and rerun: seconds each.
pytestmark = pytest.mark.slow

CONCURRENCY = 32


def start_run(
    source: Path, output: Path, base_url: str, *extra: str, crash_at: str | None = None
) -> subprocess.Popen[str]:
    """The CLI in its own process, with the default checkpoint settings."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}
    env.pop("OPENAI_BASE_URL", None)
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.Popen(
        [
            sys.executable, "-m", "pipeline", "run",
            "--input", str(source), "--column", "question", "--output", str(output),
            "--base-url", base_url, "--model", "sim-1", "--quiet",
            "--concurrency", str(CONCURRENCY), "--timeout", "2", "--max-attempts", "30",
            *extra,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def checkpointed_files(run_dir: Path) -> list[Path]:
    return [*(run_dir / PARTS).glob("part-*.parquet"), *(run_dir / JOURNAL).glob("seg-*.log")]


def wait_for_checkpoint(run_dir: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if checkpointed_files(run_dir):
            return
        time.sleep(0.01)
    raise AssertionError(f"nothing was checkpointed in {run_dir}")


def answered_rate(server: Simulator, window_s: float = 0.25) -> float:
    before = server.stats.answered
    time.sleep(window_s)
    return (server.stats.answered - before) / window_s


def test_sigkill_at_random_moments_pays_again_only_for_the_last_quarter_second(
    tmp_path: Path, start_server: StartServer
) -> None:
    """Each kill may cost the requests in flight and the answers of the last
    0.25 s (the durability bound); everything else is never paid twice, and
    the resumed output holds every row exactly once, in order."""
    server = start_server(
        latency_ms=40, jitter_ms=20, fail_rate_429=0.02, fail_rate_5xx=0.02, seed=5
    )
    rows = 3000
    prompts = [f"crash question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"
    rng = random.Random(2024)
    allowed = 0.0
    kills = 0
    for _ in range(4):
        process = start_run(source, output, server.base_url, "--no-cache")
        try:
            wait_for_checkpoint(run_dir)
            time.sleep(rng.uniform(0.0, 0.5))
            rate = answered_rate(server)
        finally:
            process.kill()  # SIGKILL: no handler, no flush
            process.wait(timeout=10)
        if process.returncode == 0:
            break  # finished before the kill landed; nothing more to resume
        assert process.returncode == -signal.SIGKILL
        kills += 1
        allowed += CONCURRENCY + 0.25 * rate
        assert not output.exists()

    final = start_run(source, output, server.base_url, "--no-cache")
    _, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr

    out = pl.read_parquet(output)
    assert out.height == rows
    assert out["id"].to_list() == list(range(rows))
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert kills >= 2
    paid_twice = server.stats.answered - rows
    assert 0 <= paid_twice <= allowed, (paid_twice, allowed)
    assert not run_dir.exists()


# Every instant of a run's end, in order: a kill at any of them leaves a state
# that the same command finishes with exit 0.
CLEANUP_STEPS = [
    "after-commit",
    "after-part-seal",
    "before-output-rename",
    "after-output-rename",
    "after-report",
    "after-checkpoint-trashed",
]
# Kills before the output exists may lose the requests in flight; after, nothing.
FINAL_STEPS = CLEANUP_STEPS[2:]


@pytest.mark.parametrize("step", CLEANUP_STEPS)
def test_a_kill_at_each_step_of_the_end_leaves_a_state_the_same_command_finishes(
    tmp_path: Path, start_server: StartServer, step: str
) -> None:
    server = start_server(latency_ms=5)
    rows = 300
    prompts = [f"cleanup question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"

    crashed = start_run(source, output, server.base_url, "--flush-every", "100", crash_at=step)
    crashed.communicate(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    answered_before = server.stats.answered
    saved = checkpoint_status(run_dir)
    durable_rows = rows if saved is None else saved.done  # None: the output was complete

    rerun = start_run(source, output, server.base_url, "--no-cache")
    _, stderr = rerun.communicate(timeout=60)

    assert rerun.returncode == 0, stderr
    out = pl.read_parquet(output)
    assert out["id"].to_list() == list(range(rows))
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    # The rerun pays again exactly for what had not reached the disk.
    assert server.stats.answered - answered_before == rows - durable_rows
    if step in FINAL_STEPS:
        assert server.stats.answered == rows  # nothing paid twice
    assert not run_dir.exists()
    assert not list(tmp_path.glob(".out.parquet*"))  # no temp output, no trash

    again = start_run(source, output, server.base_url)
    _, stderr = again.communicate(timeout=60)
    assert again.returncode == 0, stderr
    assert "up to date" in stderr or server.stats.answered == rows


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
    wait_for_checkpoint(run_dir)
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
    wait_for_checkpoint(run_dir)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)

    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert (run_dir / "manifest.json").exists()
