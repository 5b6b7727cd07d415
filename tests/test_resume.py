"""Checkpoint and resume, in process: what a rerun sends, refuses and keeps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline import CheckpointMismatch, RunConfig, enrich
from pipeline.checkpoint import PARTS
from pipeline.cli import cli
from pipeline.runner import RunOptions

from conftest import StartServer, answer_for, make_config, write_questions


def keep(config: RunConfig) -> RunConfig:
    return config.model_copy(
        update={"output": config.output.model_copy(update={"keep_checkpoint": True})}
    )


def with_changes(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    update = {
        name: getattr(config, name).model_copy(update=values) for name, values in sections.items()
    }
    return config.model_copy(update=update)


def part_files(config: RunConfig) -> list[Path]:
    return sorted((config.output.resolved_run_dir / PARTS).glob("part-*.parquet"))


@pytest.fixture
def prompts() -> list[str]:
    return [f"resume question {i}" for i in range(200)]


@pytest.mark.slow
def test_rerun_sends_only_rows_missing_from_the_checkpoint(
    tmp_path: Path, start_server: StartServer, prompts: list[str]
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = keep(
        make_config(
            source,
            tmp_path / "out.parquet",
            server.base_url,
            # The cache would answer the lost rows: this test is about the checkpoint.
            **{"checkpoint.flush_every": 20, "cache.enabled": False},
        )
    )
    enrich(config)
    parts = part_files(config)
    assert len(parts) >= 5
    lost = (
        pl.read_parquet(parts[-1])["_row_id"].to_list()
        + pl.read_parquet(parts[2])["_row_id"].to_list()
    )
    parts[-1].unlink()
    parts[2].unlink()
    (tmp_path / "out.parquet").unlink()
    server.reset_stats()

    summary = enrich(config)

    assert server.stats.requests == len(lost)
    assert sorted(server.stats.answered_by_content) == sorted(prompts[i] for i in lost)
    assert summary.resumed_rows == len(prompts) - len(lost)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]


@pytest.mark.slow
def test_complete_checkpoint_rerun_sends_nothing(
    tmp_path: Path, start_server: StartServer, prompts: list[str]
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", prompts)
    config = keep(make_config(source, tmp_path / "out.parquet", server.base_url))
    enrich(config)
    server.reset_stats()

    enrich(config)

    assert server.stats.requests == 0
    assert pl.read_parquet(tmp_path / "out.parquet").height == len(prompts)


@pytest.mark.slow
def test_handmade_crashed_run_directory_resumes_correctly(
    tmp_path: Path, start_server: StartServer, prompts: list[str]
) -> None:
    """Some parts, a stray temp part and a torn manifest write from a crash."""
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = keep(
        make_config(
            source,
            tmp_path / "out.parquet",
            server.base_url,
            # The cache would answer the lost rows: this test is about the checkpoint.
            **{"checkpoint.flush_every": 50, "cache.enabled": False},
        )
    )
    enrich(config)
    run_dir = config.output.resolved_run_dir
    parts = part_files(config)
    parts[-1].unlink()
    stray = run_dir / PARTS / f".{parts[-1].name}.tmp-99999"
    stray.write_bytes(b"PAR1 half a part")
    torn = run_dir / ".manifest.json.tmp-99999"
    torn.write_bytes(b'{"format_version": 1, "inp')
    (tmp_path / "out.parquet").unlink()
    server.reset_stats()

    enrich(config)

    assert server.stats.requests == 50
    assert not stray.exists()
    assert not torn.exists()
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"input": {"template": "Q: {question}", "column": None}}, "template"),
        ({"input": {"system_prompt": "Be terse."}}, "system_prompt"),
        ({"model": {"name": "sim-2"}}, "model"),
        ({"model": {"temperature": 0.7}}, "params"),
        ({"model": {"max_tokens": 5}}, "params"),
    ],
)
def test_resume_refused_when_settings_change(
    tmp_path: Path,
    start_server: StartServer,
    change: dict[str, dict[str, Any]],
    named: str,
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", ["a", "b"])
    config = keep(make_config(source, tmp_path / "out.parquet", server.base_url))
    enrich(config)
    server.reset_stats()

    with pytest.raises(CheckpointMismatch) as caught:
        enrich(with_changes(config, **change))

    assert named in str(caught.value)
    assert "--restart" in str(caught.value)
    assert server.stats.requests == 0


def test_resume_refused_when_input_content_changes_with_on_input_change_refuse(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b", "c"])
    config = keep(
        make_config(
            source,
            tmp_path / "out.parquet",
            server.base_url,
            **{"checkpoint.on_input_change": "refuse"},
        )
    )
    enrich(config)
    write_questions(source, ["a", "B", "c"])  # same size, other content

    with pytest.raises(CheckpointMismatch, match="input changed"):
        enrich(config)


def test_restart_discards_the_checkpoint_and_sends_everything_again(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b", "c"])
    config = keep(make_config(source, tmp_path / "out.parquet", server.base_url))
    enrich(config)
    server.reset_stats()

    enrich(with_changes(config, model={"name": "sim-2"}), options=RunOptions(restart=True))

    assert server.stats.requests == 3
    assert pl.read_parquet(tmp_path / "out.parquet")["model"].to_list() == ["sim-2"] * 3


def test_mismatched_checkpoint_exits_2_naming_restart_from_cli(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b"])
    args = [
        "run",
        "--input",
        str(source),
        "--column",
        "question",
        "--keep-checkpoint",
        "--output",
        str(tmp_path / "out.parquet"),
        "--base-url",
        server.base_url,
        "--model",
        "sim-1",
    ]
    assert CliRunner().invoke(cli, args).exit_code == 0

    result = CliRunner().invoke(cli, [*args[:-1], "sim-2"])

    assert result.exit_code == 2
    assert "--restart" in result.stderr
    assert "Traceback" not in result.stderr


def test_retry_failed_resends_only_error_rows(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server()
    # A 400 the first time: a permanent failure, which only --retry-failed re-sends.
    prompts = ["good 1", "rejected once [[fault:400:1]]", "good 2", "good 3"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = keep(
        make_config(source, tmp_path / "out.parquet", server.base_url, **{"limits.max_attempts": 2})
    )
    enrich(config)
    first = pl.read_parquet(tmp_path / "out.parquet")
    assert first["status"].to_list() == ["ok", "error", "ok", "ok"]
    server.reset_stats()

    enrich(config)  # a plain rerun does not retry permanent failures
    assert server.stats.requests == 0

    summary = enrich(config, options=RunOptions(retry_failed=True))

    assert server.stats.requests == 1
    assert dict(server.stats.answered_by_content) == {prompts[1]: 1}
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["status"].to_list() == ["ok"] * 4
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    # ok rows are untouched: same latency as the first run wrote
    assert out["latency_ms"][0] == first["latency_ms"][0]
    assert summary.error == 0


def test_status_reports_a_checkpoint_and_a_finished_output(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = ["a", None, "c [[fault:400]]", "d"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = keep(make_config(source, tmp_path / "out.parquet", server.base_url))
    enrich(config)
    run_dir = config.output.resolved_run_dir
    (tmp_path / "out.parquet").unlink()  # as if killed before the output was written
    before = sorted(p.name for p in run_dir.rglob("*"))

    from_checkpoint = CliRunner().invoke(cli, ["status", str(tmp_path / "out.parquet"), "--json"])
    assert from_checkpoint.exit_code == 0, from_checkpoint.stderr
    assert '"source": "checkpoint"' in from_checkpoint.output
    assert '"ok": 2, "error": 1, "skipped": 1' in from_checkpoint.output
    assert '"remaining": 0' in from_checkpoint.output
    assert sorted(p.name for p in run_dir.rglob("*")) == before  # read only

    enrich(
        config.model_copy(
            update={"output": config.output.model_copy(update={"keep_checkpoint": False})}
        ),
        options=RunOptions(force=True),
    )
    finished = CliRunner().invoke(cli, ["status", str(tmp_path / "out.parquet")])
    assert finished.exit_code == 0
    assert "finished" in finished.output
    assert "done 4 of 4" in finished.output


def test_status_without_a_run_says_how_to_start_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["status", str(tmp_path / "nothing.parquet")])
    assert result.exit_code == 2
    assert "enrich run" in result.stderr
