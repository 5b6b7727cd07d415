"""Never pay twice: the response cache across runs and in-run dedup, counted
at the server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline import enrich
from pipeline.cache import cache_stats
from pipeline.runner import RunOptions

from conftest import StartServer, answer_for, make_config, write_questions


def test_second_identical_run_sends_zero_requests(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"cache question {i}" for i in range(60)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    enrich(make_config(source, tmp_path / "first.parquet", server.base_url))
    server.reset_stats()

    summary = enrich(make_config(source, tmp_path / "second.parquet", server.base_url))

    assert server.stats.requests == 0
    assert summary.cache_hits == 60
    out = pl.read_parquet(tmp_path / "second.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert out["cached"].to_list() == [True] * 60
    assert out["attempts"].to_list() == [0] * 60
    first = pl.read_parquet(tmp_path / "first.parquet")
    assert first["cached"].to_list() == [False] * 60


def test_changing_one_rows_text_sends_exactly_one_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"stable question {i}" for i in range(40)]
    source = write_questions(tmp_path / "in.csv", prompts)
    enrich(make_config(source, tmp_path / "out.parquet", server.base_url))
    prompts[17] = "an edited question"
    write_questions(source, prompts)
    server.reset_stats()

    enrich(make_config(source, tmp_path / "out.parquet", server.base_url))

    assert server.stats.requests == 1
    assert dict(server.stats.answered_by_content) == {"an edited question": 1}
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]


def test_k_distinct_prompts_among_n_rows_send_k_requests(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(latency_ms=20)
    distinct = [f"popular question {i}" for i in range(7)]
    prompts = [distinct[i % 7] for i in range(300)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = make_config(
        source, tmp_path / "out.parquet", server.base_url, **{"cache.enabled": False}
    )

    summary = enrich(config)

    assert server.stats.requests == 7
    assert summary.deduplicated == 293
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert out["status"].unique().to_list() == ["ok"]
    assert sum(out["cached"].to_list()) == 293


def test_no_cache_and_no_dedup_send_every_row(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", ["same"] * 20)
    config = make_config(
        source,
        tmp_path / "out.parquet",
        server.base_url,
        **{"cache.enabled": False, "cache.dedup": False},
    )

    enrich(config)
    enrich(config, options=RunOptions(force=True))

    assert server.stats.requests == 40


def test_sampled_requests_are_neither_cached_nor_deduplicated_by_default(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", ["same"] * 10)
    config = make_config(
        source, tmp_path / "out.parquet", server.base_url, **{"model.temperature": 0.8}
    )

    enrich(config)

    assert server.stats.requests == 10


def test_failed_answers_are_not_cached(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server()
    prompts = ["fine", "too long [[fault:400]]"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    enrich(make_config(source, tmp_path / "a.parquet", server.base_url))
    server.reset_stats()

    enrich(make_config(source, tmp_path / "b.parquet", server.base_url))

    assert dict(server.stats.answered_by_content) == {}
    assert server.stats.requests == 1  # the failed row asks again; the ok one is cached


@pytest.mark.slow
def test_cache_stats_and_clear_from_the_cli(
    tmp_path: Path, start_server: StartServer, isolated_cache: Path
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", ["a", "b", "c"])
    enrich(make_config(source, tmp_path / "out.parquet", server.base_url))
    assert cache_stats(isolated_cache / "cache.sqlite3").entries == 3

    stats = subprocess.run(
        [sys.executable, "-m", "pipeline", "cache", "stats"],
        capture_output=True,
        text=True,
        check=True,
    )
    cleared = subprocess.run(
        [sys.executable, "-m", "pipeline", "cache", "clear"],
        capture_output=True,
        text=True,
        check=True,
    )

    assert "3 answers" in stats.stdout
    assert "removed 3" in cleared.stdout
    assert cache_stats(isolated_cache / "cache.sqlite3").entries == 0


@pytest.mark.slow
def test_two_runs_sharing_one_cache_concurrently_stay_consistent(
    tmp_path: Path, start_server: StartServer, isolated_cache: Path
) -> None:
    runs = 2
    server = start_server(latency_ms=5)
    prompts = [f"shared question {i}" for i in range(400)]
    processes = []
    for index in range(runs):
        source = write_questions(tmp_path / f"in{index}.parquet", prompts)
        processes.append(
            subprocess.Popen(
                [
                    sys.executable, "-m", "pipeline", "run", "--quiet",
                    "--input", str(source), "--column", "question",
                    "--output", str(tmp_path / f"out{index}.parquet"),
                    "--base-url", server.base_url, "--model", "sim-1",
                    "--concurrency", "16", "--flush-every", "25",
                ],
                stderr=subprocess.PIPE,
                text=True,
            )
        )  # fmt: skip
    for process in processes:
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr

    for index in range(runs):
        out = pl.read_parquet(tmp_path / f"out{index}.parquet")
        assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert cache_stats(isolated_cache / "cache.sqlite3").entries == 400
