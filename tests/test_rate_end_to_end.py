"""Rate limits end to end: the real openai client over 127.0.0.1 against a
simulator that enforces them (20-30 requests, or 1,000 tokens, per 1 s
sliding window), in configured mode and in auto mode with and without
x-ratelimit-* headers.

Each run is a few hundred rows, about 8 s: long enough that a limiter which
bursts, or which does not learn, collects far more 429s than allowed here."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline import enrich
from pipeline.checkpoint import MANIFEST
from pipeline.simulate import Simulator

from conftest import MODEL, StartServer, answer_for, make_config, write_questions

SERVER_RPM = 1800  # 30 requests per 1 s window
ROWS = 240  # 8 s at the limit


def run_against(
    tmp_path: Path,
    start_server: StartServer,
    *,
    rate_headers: bool,
    server_limit: dict[str, int] | None = None,
    **limits: Any,
) -> tuple[pl.DataFrame, int, int]:
    """Every row through enrich against a server enforcing ``server_limit``
    (SERVER_RPM by default); (output, requests, 429s). How close to the limit
    a run gets is measured on a fake clock (tests/test_ratelimit.py) and by
    the benchmark's rate section, not with a wall clock here."""
    server = start_server(
        **(server_limit or {"rpm": SERVER_RPM}),
        window_s=1.0,
        latency_ms=100,
        jitter_ms=50,
        rate_headers=rate_headers,
    )
    prompts = [f"row {i}: what is {i} times {i}?" for i in range(ROWS)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    overrides: dict[str, Any] = {f"limits.{key}": value for key, value in limits.items()}
    # The official SDK client, whose retries are off: the limiter is all there is.
    overrides["model.transport"] = "openai"
    # Plain answers: the limiter is under test, and the server shares this
    # process; streaming its chunks would make the CPU, not the limiter, the
    # bound on a loaded machine (tests/test_stall*.py cover streaming).
    overrides["model.stream"] = False
    config = make_config(source, tmp_path / "out.parquet", server.base_url, **overrides)

    enrich(config)

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]  # nothing lost
    stats = server.stats
    return out, stats.requests, stats.rate_limited


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_configured_limits_are_sustained_with_almost_no_429s(
    tmp_path: Path, start_server: StartServer
) -> None:
    out, requests, rate_limited = run_against(
        tmp_path, start_server, rate_headers=True, rpm=SERVER_RPM, concurrency=16
    )

    assert out["status"].to_list() == ["ok"] * ROWS
    # Under 1% is the target over thousands of rows; here the server shares a
    # process (and its scheduling jitter) with the client, so allow a few.
    assert rate_limited <= max(3, 0.01 * requests)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_auto_mode_learns_the_limit_from_the_servers_headers(
    tmp_path: Path, start_server: StartServer
) -> None:
    out, requests, rate_limited = run_against(
        tmp_path, start_server, rate_headers=True, concurrency=16
    )

    assert out["status"].to_list() == ["ok"] * ROWS
    assert rate_limited <= max(3, 0.02 * requests)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_auto_mode_finds_the_limit_of_a_server_that_sends_no_headers(
    tmp_path: Path, start_server: StartServer
) -> None:
    out, requests, rate_limited = run_against(
        tmp_path, start_server, rate_headers=False, concurrency=16
    )

    assert out["status"].to_list() == ["ok"] * ROWS
    # The first seconds find the limit by running into it; a run this short
    # pays for that more than a long one does (the measured share over a few
    # thousand rows is under 2%).
    assert rate_limited <= 0.08 * requests


# -- tokens per minute -------------------------------------------------------------

SERVER_TPM = 60_000  # 1,000 tokens per 1 s window: about 25 of these requests


@pytest.mark.parametrize(
    ("limits", "rate_headers"),
    [({"tpm": SERVER_TPM}, True), ({}, True), ({}, False)],
    ids=["configured", "auto-headers", "auto-no-headers"],
)
@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_tokens_limit_is_run_close_to_without_losing_rows(
    tmp_path: Path, start_server: StartServer, limits: dict[str, Any], rate_headers: bool
) -> None:
    out, requests, rate_limited = run_against(
        tmp_path,
        start_server,
        rate_headers=rate_headers,
        server_limit={"tpm": SERVER_TPM},
        concurrency=16,
        **limits,
    )

    assert out["status"].to_list() == ["ok"] * ROWS
    # Bounds as loose as the requests tests' (few rows, a server sharing the
    # client's process); a limiter that paces tokens by a request rate, or
    # bursts its refunds, fails them.
    assert rate_limited <= max(3, (0.02 if rate_headers else 0.06) * requests)


# -- limits the server does not report: long windows, storms, refusal --------------


class AdmittedSampler:
    """Samples the server's counters from the test's thread while a run goes
    on: (server clock, admitted, 429s, requests). The simulator's clock is
    time.monotonic() too, so its first/last admitted times line up."""

    def __init__(self, sim: Simulator, every_s: float = 0.1) -> None:
        self.sim = sim
        self.every_s = every_s
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            stats = self.sim.stats
            self.samples.append(
                (time.monotonic(), stats.admitted, stats.rate_limited, stats.requests)
            )

    def __enter__(self) -> AdmittedSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def since(self, offset_s: float) -> tuple[float, float]:
        """From ``offset_s`` after the server's first admitted request to its
        last: (admitted per minute, share of requests answered 429)."""
        stats = self.sim.stats
        assert stats.first_admitted_at is not None and stats.last_admitted_at is not None
        start = next(s for s in self.samples if s[0] >= stats.first_admitted_at + offset_s)
        span = stats.last_admitted_at - start[0]
        admitted = stats.admitted - start[1]
        refused = stats.rate_limited - start[2]
        return admitted / span * 60.0, refused / max(1, stats.requests - start[3])


def run_enrich(
    tmp_path: Path, server: Simulator, rows: int, name: str, **overrides: Any
) -> tuple[pl.DataFrame, list[str]]:
    prompts = [f"{name} row {i}: what is {i} plus {i}?" for i in range(rows)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = make_config(source, tmp_path / "out.parquet", server.base_url, **overrides)
    enrich(config)
    return pl.read_parquet(tmp_path / "out.parquet"), prompts


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_auto_mode_runs_at_a_6_second_window_limit_it_learns_without_headers(
    tmp_path: Path, start_server: StartServer
) -> None:
    # 30 requests a second, counted over 6 s (180 a window), no x-ratelimit-*
    # headers, retry-after sent: four windows of rows.
    rpm, window_s, rows = 1800, 6.0, 720
    server = start_server(
        rpm=rpm, window_s=window_s, latency_ms=100, jitter_ms=50, rate_headers=False
    )

    with AdmittedSampler(server) as sampler:
        out, prompts = run_enrich(
            tmp_path, server, rows, "long window", **{"limits.concurrency": 32}
        )

    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert out["status"].to_list() == ["ok"] * rows
    # Once the first window has passed (a burst, then the pause its
    # retry-after asks for), the run keeps to the limit. (Today's fake-clock
    # measure is 97%; a server sharing the client's process and a busy
    # machine get generous margins.)
    rate, share_429 = sampler.since(window_s)
    assert rate >= 0.85 * rpm, rate
    assert share_429 < 0.05, share_429


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_after_a_storm_the_run_climbs_back_to_the_servers_recovered_limit(
    tmp_path: Path, start_server: StartServer
) -> None:
    # 50 requests a second over a 1 s window, a tenth of that from 3 s to 8 s
    # after the first request, then 50 again; no headers.
    rpm, storm, recovered = 3000, 3.0, 8.0
    server = start_server(
        rpm=rpm,
        window_s=1.0,
        rpm_schedule=((storm, rpm // 10), (recovered, rpm)),
        latency_ms=100,
        jitter_ms=50,
        rate_headers=False,
    )
    rows = 150 + 25 + 600  # 3 s at the limit, 5 s at a tenth, 12 s at the limit

    with AdmittedSampler(server) as sampler:
        out, prompts = run_enrich(tmp_path, server, rows, "storm", **{"limits.concurrency": 32})

    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert out["status"].to_list() == ["ok"] * rows
    # Within a few windows of the recovery the run is back near the limit
    # (today the fake-clock tests measure 93% and more from 5 windows on).
    rate, _ = sampler.since(recovered + 5.0)
    assert rate >= 0.80 * rpm, rate


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_server_refusing_everything_ends_the_run_with_exit_3_and_the_checkpoint_kept(
    tmp_path: Path, start_server: StartServer
) -> None:
    # 20 requests a second for 2 s, then every request refused with 429 (and
    # a retry-after of one window): a quota used up without saying so.
    rows = 400
    refusing = start_server(
        rpm=1200, window_s=1.0, rpm_schedule=((2.0, 0),), latency_ms=50, rate_headers=False
    )
    prompts = [f"refused row {i}: what is {i} minus one?" for i in range(rows)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    run_dir = tmp_path / "out.parquet.enrich"

    done = run_cli(source, output, refusing.base_url, "--max-refusal", "3")

    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr
    error = done.stderr.splitlines()[-1]
    assert "every request with 429" in error
    assert "--max-refusal 3 s" in error
    assert "checkpoint is kept" in error
    assert "rerun later" in error and "quota" in error
    assert not output.exists()
    answered = refusing.stats.answered
    assert 0 < answered < rows
    assert (run_dir / MANIFEST).exists()

    # The quota is back: the same command finishes from the checkpoint,
    # sending only the rows not answered before.
    healthy = start_server(latency_ms=20)
    rerun = run_cli(source, output, healthy.base_url, "--max-refusal", "3")

    assert rerun.returncode == 0, rerun.stderr
    out = pl.read_parquet(output)
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert healthy.stats.answered == rows - answered


def run_cli(
    source: Path, output: Path, base_url: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    """``enrich run`` in a process of its own, as cron would start it."""
    env = {**os.environ, "OPENAI_API_KEY": "sk-test-refusal"}
    env.pop("OPENAI_BASE_URL", None)
    return subprocess.run(
        [
            sys.executable, "-m", "pipeline", "run",
            "--input", str(source), "--column", "question", "--output", str(output),
            "--base-url", base_url, "--model", MODEL, "--quiet", "--concurrency", "16",
            "--timeout", "5", *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )  # fmt: skip
