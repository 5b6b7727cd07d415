"""The whole job over real loopback HTTP with the real openai client."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline import FatalAPIError, enrich

from conftest import MODEL, StartServer, answer_for, make_config, write_questions


@pytest.mark.slow
def test_every_row_answered_correctly_in_input_order_under_faults(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(
        latency_ms=5,
        jitter_ms=5,
        fail_rate_5xx=0.08,
        fail_rate_429=0.08,
        drop_rate=0.04,
        malformed_rate=0.04,
        hang_rate=0.01,
        hang_s=5,
        seed=11,
    )
    prompts = [f"question number {i}: what is {i} squared?" for i in range(400)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = make_config(
        source,
        tmp_path / "out.parquet",
        server.base_url,
        **{"model.timeout_s": 0.5, "limits.max_attempts": 20, "checkpoint.flush_every": 50},
    )

    summary = enrich(config)

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == list(range(400))
    assert out["status"].unique().to_list() == ["ok"]
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert out["model"].unique().to_list() == [MODEL]
    attempts = out["attempts"].to_list()
    assert min(attempts) == 1
    assert max(attempts) > 1  # the faults really happened and were retried
    assert min(out["prompt_tokens"].to_list()) > 0
    assert summary.ok == 400
    assert summary.retries > 0
    assert server.stats.answered == 400
    assert not config.output.resolved_run_dir.exists()  # removed after success


def test_null_and_blank_prompts_are_skipped_without_a_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = ["a real question", None, "", "   ", "another question"]
    source = write_questions(tmp_path / "in.parquet", prompts)

    summary = enrich(make_config(source, tmp_path / "out.parquet", server.base_url))

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "skipped", "skipped", "skipped", "ok"]
    assert out["response"].null_count() == 3
    assert server.stats.requests == 2
    assert summary.skipped == 3


def test_row_level_400_marks_only_that_row_error_and_the_run_goes_on(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = ["fine one", "far too long [[fault:400]]", "fine two"]
    source = write_questions(tmp_path / "in.csv", prompts)

    summary = enrich(make_config(source, tmp_path / "out.parquet", server.base_url))

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "error", "ok"]
    assert "400" in out["error"][1]
    assert out["attempts"][1] == 1  # a 400 is not retried
    assert out["error"][0] is None
    assert summary.error == 1


def test_transient_failures_beyond_max_attempts_mark_the_row_error(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["ok row", "broken [[fault:500:50]]"])

    enrich(
        make_config(source, tmp_path / "out.parquet", server.base_url, **{"limits.max_attempts": 3})
    )

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok", "error"]
    assert out["attempts"][1] == 3
    assert "--max-attempts" in out["error"][1]


def test_template_with_system_prompt_fills_columns(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.jsonl", ["q0", "q1"], topic=["math", "art"])
    config = make_config(
        source,
        tmp_path / "out.parquet",
        server.base_url,
        **{"input.template": "About {topic}: {question}", "input.system_prompt": "Be brief."},
    )

    enrich(config)

    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [
        answer_for("About math: q0", "Be brief."),
        answer_for("About art: q1", "Be brief."),
    ]
    assert out.columns[:3] == ["id", "question", "topic"]


def test_bad_key_stops_the_run_early_with_fatal_error(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server(api_key="sk-right")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret-value")
    source = write_questions(tmp_path / "in.parquet", [f"q{i}" for i in range(500)])
    config = make_config(source, tmp_path / "out.parquet", server.base_url)

    with pytest.raises(FatalAPIError) as caught:
        enrich(config)

    assert "401" in str(caught.value)
    assert "sk-wrong-secret-value" not in str(caught.value)
    assert server.stats.requests <= config.limits.concurrency  # stopped, not 500 failures
    assert not (tmp_path / "out.parquet").exists()
    assert config.output.resolved_run_dir.exists()  # checkpoint kept for the rerun


def test_unknown_model_stops_the_run_with_fatal_error(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server(models=("other-model",))
    source = write_questions(tmp_path / "in.parquet", ["q"])

    with pytest.raises(FatalAPIError, match="--model"):
        enrich(make_config(source, tmp_path / "out.parquet", server.base_url))


def test_exhausted_quota_is_fatal_not_retried(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(insufficient_quota=True)
    source = write_questions(tmp_path / "in.parquet", ["q"] * 50)
    config = make_config(source, tmp_path / "out.parquet", server.base_url)

    with pytest.raises(FatalAPIError, match="quota"):
        enrich(config)

    assert server.stats.requests <= config.limits.concurrency
