"""Checkpoint and resume, in process: what a rerun sends, refuses and keeps."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from click.testing import CliRunner

from pipeline import CheckpointMismatch, FatalAPIError, RunConfig, RunInterrupted, enrich
from pipeline.checkpoint import PARTS
from pipeline.cli import cli
from pipeline.report import read_report, report_path_for
from pipeline.results import RowResult
from pipeline.runner import RunOptions, enrich_async
from pipeline.status import run_status

from conftest import StartServer, answer_for, make_config, write_questions


def keep(config: RunConfig) -> RunConfig:
    return config.replace(output=config.output.replace(keep_checkpoint=True))


def with_changes(config: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    update = {name: getattr(config, name).replace(**values) for name, values in sections.items()}
    return config.replace(**update)


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
        config.replace(output=config.output.replace(keep_checkpoint=False)),
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


def test_a_stopped_rerun_reports_what_its_checkpoint_holds_as_status_does(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    # ok, skipped, a transient failure (pending), a permanent one.
    prompts = ["a", None, "down [[fault:500:50]]", "rejected [[fault:400]]", "e"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    config = keep(make_config(source, output, server.base_url, **{"limits.max_attempts": 2}))
    first = enrich(config)
    assert (first.ok, first.error, first.pending, first.skipped) == (2, 2, 1, 1)
    output.unlink()  # the next run must go back to the checkpoint

    # The rerun re-sends both failed rows and stops at once: this server
    # refuses the key (401, a fatal error), so no row gets a new result.
    refusing = start_server(api_key="sk-another-key-0123456789")
    stopped_config = with_changes(config, model={"base_url": refusing.base_url})
    with pytest.raises(FatalAPIError):
        enrich(stopped_config, options=RunOptions(retry_failed=True))

    report = read_report(report_path_for(output))
    assert report is not None and report["exit_code"] == 3
    assert report["counts"]["resumed_rows"] == 3  # ok and skipped rows were final
    held = run_status(output, config.output.resolved_run_dir)
    assert held.source == "checkpoint"
    counts = report["counts"]
    assert (counts["ok"], counts["error"], counts["pending"], counts["skipped"]) == (2, 2, 1, 1)
    assert (held.ok, held.error, held.pending, held.skipped) == (2, 2, 1, 1)
    assert counts["rows"] == held.done == len(prompts)


def test_a_duplicate_of_a_row_that_failed_transiently_is_sent_again_by_the_next_run(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    # Three identical prompts share one request; it fails with a 500 on every attempt.
    prompts = ["same [[fault:500:100]]"] * 3 + ["b"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    config = make_config(source, output, server.base_url, **{"limits.max_attempts": 2})

    first = enrich(config)

    assert (first.ok, first.error, first.pending) == (1, 3, 3)
    status = run_status(output, config.output.resolved_run_dir)
    assert status.pending == 3


def test_status_tells_how_many_failed_rows_the_next_run_sends_again(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = ["a", "down [[fault:500:50]]", "rejected [[fault:400]]"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    enrich(make_config(source, output, server.base_url, **{"limits.max_attempts": 2}))

    as_json = CliRunner().invoke(cli, ["status", str(output), "--json"])
    as_text = CliRunner().invoke(cli, ["status", str(output)])

    assert as_json.exit_code == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert (body["ok"], body["error"], body["pending"]) == (1, 2, 1)
    assert as_text.exit_code == 0, as_text.stderr
    said = "error 2 (pending 1: transient failures, the next run sends them again)"
    assert said in as_text.stdout


def test_status_counts_a_finished_output_written_with_a_column_prefix(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", ["a", None, "c [[fault:400]]", "d"])
    output = tmp_path / "out.parquet"
    config = make_config(source, output, server.base_url, **{"output.column_prefix": "llm_"})
    enrich(config)

    status = run_status(output, config.output.resolved_run_dir, "llm_")

    assert status.source == "output"
    assert (status.ok, status.error, status.skipped, status.pending) == (2, 1, 1, 0)
    assert status.done == status.total_rows == 4
    assert status.prompt_tokens > 0 and status.completion_tokens > 0


class StopAfterFirstResult:
    """A progress display that asks the run to stop once a result arrives."""

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop

    def start(self, total: int, already_done: int) -> None:
        pass

    def advance(self, result: RowResult) -> None:
        self.stop.set()

    def close(self) -> None:
        pass


def test_a_stopped_rerun_counts_a_resent_row_once_with_its_new_result(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    # The flaky row fails both attempts of the first run (pending), then answers.
    prompts = ["a", "b", "flaky [[fault:500:2]]", "d"]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    config = keep(make_config(source, output, server.base_url, **{"limits.max_attempts": 2}))
    first = enrich(config)
    assert (first.ok, first.pending) == (3, 1)
    output.unlink()

    async def rerun() -> None:
        stop = asyncio.Event()
        await enrich_async(config, progress=StopAfterFirstResult(stop), stop=stop)

    with pytest.raises(RunInterrupted):
        asyncio.run(rerun())

    report = read_report(report_path_for(output))
    assert report is not None and report["exit_code"] == 130
    counts = report["counts"]
    assert (counts["rows"], counts["ok"], counts["error"], counts["pending"]) == (4, 4, 0, 0)
    held = run_status(output, config.output.resolved_run_dir)
    assert (held.done, held.ok, held.error) == (4, 4, 0)


TIMING_COLUMNS = ("first_token_ms", "generation_ms", "server_ms")


def _as_previous_format(table: Any) -> Any:
    """A checkpoint table as format 2 wrote it: without the timing columns."""
    return table.drop_columns(list(TIMING_COLUMNS))


@pytest.mark.slow
def test_a_checkpoint_of_the_previous_format_resumes_with_its_timings_unknown(
    tmp_path: Path, start_server: StartServer, prompts: list[str]
) -> None:
    import json

    import pyarrow.parquet as pq

    from pipeline.checkpoint import JOURNAL, MANIFEST
    from pipeline.journal import JournalWriter

    # Slots: the server reports its own time (llama.cpp's timings).
    server = start_server(slots=4)
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = keep(
        make_config(
            source,
            tmp_path / "out.parquet",
            server.base_url,
            **{"checkpoint.flush_every": 50, "cache.enabled": False},
        )
    )
    enrich(config)
    run_dir = config.output.resolved_run_dir
    parts = part_files(config)
    # Format 2: parts without the timing columns, the last one still a
    # journal segment (an older enrich killed before sealing it), and one
    # part never written (its rows are sent again).
    for part in parts:
        pq.write_table(_as_previous_format(pq.read_table(part)), part)
    last = parts[-1]
    segment = run_dir / JOURNAL / last.name.replace("part-", "seg-").replace(".parquet", ".log")
    writer = JournalWriter(segment)
    writer.append(pq.read_table(last).replace_schema_metadata(None))
    writer.close()
    last.unlink()
    lost = pl.read_parquet(parts[1])["_row_id"].to_list()
    parts[1].unlink()
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest["format_version"] = 2
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / "out.parquet").unlink()
    server.reset_stats()

    enrich(config)

    assert server.stats.requests == len(lost)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    known = out.with_row_index("row").filter(pl.col("server_ms").is_not_null())["row"].to_list()
    assert sorted(known) == sorted(lost)
    assert json.loads((run_dir / MANIFEST).read_text())["format_version"] == 3
