"""The first hour, continued (issue 13): what a run shows, input a newcomer
has, and the Python API as a notebook or an Airflow task calls it. Real runs
against the simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import fcntl
import gzip
import json
import os
import threading
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline import TooManyFailedRows, enrich, enrich_async, load_config
from pipeline.cli import cli
from pipeline.costs import Price, SpendCapReached, checkpoint_spend
from pipeline.errors import InputError
from pipeline.events import RecordingEventSink
from pipeline.lock import RunLock, lock_path_for
from pipeline.read import open_input
from pipeline.runner import prepare

from conftest import MODEL, StartServer, make_config, write_questions

# -- what a run shows ------------------------------------------------------------


def test_summary_of_a_run_where_every_row_failed_says_failed_and_why(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a [[fault:400]]", "b [[fault:400]]"])
    result = CliRunner().invoke(
        cli,
        [
            "run", "--input", str(source), "--column", "question",
            "--output", str(tmp_path / "o.parquet"),
            "--base-url", server.base_url, "--model", MODEL, "--quiet",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("failed: every row sent failed (2 of 2 rows)")
    assert "why rows failed" in result.stdout
    assert "2 × " in result.stdout and "400" in result.stdout
    report = json.loads((tmp_path / "o.parquet.report.json").read_text())
    (reason,) = report["counts"]["error_reasons"]
    assert reason["rows"] == 2 and "400" in reason["reason"]


def test_a_429_pause_and_retries_are_logged_with_what_the_run_waits_for(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(
        tmp_path / "in.csv", ["paused [[fault:429:1]]", "flaky [[fault:500:2]]"]
    )
    events = RecordingEventSink()
    enrich(make_config(source, tmp_path / "o.parquet", server.base_url), events=events)
    kinds = {event.fields.get("kind"): event for event in events.named("warning")}
    paused = kinds["rate_limit_pause"]
    assert "paused until" in paused.message and "429" in paused.message
    assert paused.fields["paused_until"] and "429" in paused.fields["waiting"]
    retrying = kinds["retrying"]
    assert retrying.message.startswith("retrying 1 row after transient failures")
    assert "500" in retrying.fields["last_error"]


def test_status_tells_a_running_job_from_an_interrupted_one(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b [[fault:400]]"])
    output = tmp_path / "o.parquet"
    enrich(make_config(source, output, server.base_url))  # the failed row keeps the checkpoint
    output.unlink()  # as if killed before the output was written

    interrupted = CliRunner().invoke(cli, ["status", str(output), "--json"])
    assert '"state": "interrupted"' in interrupted.output, interrupted.output
    with RunLock(lock_path_for(output)):
        running = CliRunner().invoke(cli, ["status", str(output)])
    assert running.output.startswith("running (pid "), running.output
    assert "interrupted" in CliRunner().invoke(cli, ["status", str(output)]).output


def test_a_run_starting_while_status_looks_at_its_lock_waits_instead_of_exiting_4(
    tmp_path: Path,
) -> None:
    lock_path = lock_path_for(tmp_path / "o.parquet")
    lock_path.touch()
    looking = os.open(lock_path, os.O_RDONLY)
    fcntl.flock(looking, fcntl.LOCK_SH | fcntl.LOCK_NB)  # what `enrich status` does
    done_looking = threading.Timer(0.005, os.close, [looking])
    done_looking.start()
    try:
        with RunLock(lock_path) as lock:
            assert lock.locked
    finally:
        done_looking.join()


@pytest.mark.slow
def test_demo_says_what_the_faults_are_and_what_to_try_next(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["demo", "--output", str(tmp_path / "demo.parquet"), "--latency-ms", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.stderr
    assert "5xx" in result.stderr and "429" in result.stderr and "--fail-rate 0" in result.stderr
    assert "skipped" in result.stderr
    assert "next:" in result.stderr and "enrich run --help" in result.stderr


def test_a_prompt_above_max_prompt_tokens_is_an_error_without_a_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["short", "long " * 2000])
    events = RecordingEventSink()
    config = make_config(
        source, tmp_path / "o.parquet", server.base_url, **{"input.max_prompt_tokens": 500}
    )
    summary = enrich(config, events=events)
    out = pl.read_parquet(tmp_path / "o.parquet")
    assert out["status"].to_list() == ["ok", "error"]
    assert "--max-prompt-tokens 500" in out["error"][1]
    assert server.stats.requests == 1
    assert summary.error == 1
    assert [e.fields["kind"] for e in events.named("warning")] == ["prompt_too_long"]


def test_a_prompt_no_model_would_take_is_not_sent_by_default(
    tmp_path: Path, start_server: StartServer
) -> None:
    # 9 MB of text: about 2.4M tokens, above the 2M default bound.
    server = start_server()
    source = write_questions(tmp_path / "in.parquet", ["short", "x" * 9_000_000])
    config = make_config(source, tmp_path / "o.parquet", server.base_url)
    summary = enrich(config)
    out = pl.read_parquet(tmp_path / "o.parquet")
    assert out["status"].to_list() == ["ok", "error"]
    assert "above --max-prompt-tokens 2,000,000" in out["error"][1]
    assert server.stats.requests == 1
    assert summary.error == 1


# -- input -------------------------------------------------------------------------


def test_a_gzip_file_named_csv_says_to_name_it_gz(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(gzip.compress(b"question\nhello\n"))
    with pytest.raises(InputError, match=r"gzip-compressed.*in\.csv\.gz"):
        open_input(path)
    renamed = tmp_path / "in.csv.gz"
    path.rename(renamed)
    assert open_input(renamed).count_rows() == 1


def test_a_utf16_file_gets_a_utf16_reencoding_hint(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes("question\nhéllo\n".encode("utf-16"))
    with pytest.raises(InputError, match="iconv -f utf-16"):
        open_input(path)


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        (pa.array([["a"], []]), "nested"),
        (pa.array([{"x": 1}, {"x": 2}]), "nested"),
        (pa.array([b"\xff", b"ok"]), "binary"),
    ],
)
def test_a_nested_or_binary_prompt_column_is_refused_before_any_request(
    tmp_path: Path, values: pa.Array, kind: str
) -> None:
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"question": values}), path)
    config = load_config(input=path, column="question", output=tmp_path / "o.parquet")
    with pytest.raises(InputError, match=f"{kind} values.*convert it to a text column"):
        prepare(config)


def test_numbers_in_a_prompt_column_are_sent_as_text(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"question": pa.array([1, 2.5])}), path)
    enrich(make_config(path, tmp_path / "o.parquet", server.base_url))
    assert dict(server.stats.answered_by_content) == {"1": 1, "2.5": 1}


# -- the Python API ------------------------------------------------------------------


def test_enrich_works_from_inside_a_running_event_loop(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b"])
    config = make_config(source, tmp_path / "o.parquet", server.base_url)

    async def notebook_cell() -> int:
        return enrich(config).ok  # synchronous call, as a notebook user writes it

    assert asyncio.run(notebook_cell()) == 2


def test_enrich_async_is_awaited_in_the_callers_loop(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a"])
    config = make_config(source, tmp_path / "o.parquet", server.base_url)
    assert asyncio.run(enrich_async(config)).ok == 1


def test_enrich_takes_keyword_settings_named_like_the_flags(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b"])
    summary = enrich(
        input=source,
        column="question",
        output=tmp_path / "o.parquet",
        model=MODEL,
        base_url=server.base_url,
        concurrency=2,
    )
    assert summary.ok == 2


def test_enrich_raises_when_failed_rows_pass_max_error_rate(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b [[fault:400]]"])
    config = make_config(source, tmp_path / "o.parquet", server.base_url, max_error_rate=0.1)
    with pytest.raises(TooManyFailedRows, match="max_error_rate") as caught:
        enrich(config)
    assert caught.value.exit_code == 1
    assert caught.value.summary is not None and caught.value.summary.error == 1
    assert (tmp_path / "o.parquet").exists()  # the output is written, as with the CLI
    summary = enrich(config, raise_on_failed_rows=False)
    assert summary.up_to_date and summary.error == 1


# -- the spend cap -------------------------------------------------------------------


def test_the_spend_cap_lets_a_run_spend_close_to_it(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", [f"question {i}" for i in range(80)])
    prices = tmp_path / "prices.toml"
    # $0.001 a token: a request's worst case (256 completion tokens) is about
    # $0.26, what it really costs a few cents.
    prices.write_text(f'[models."{MODEL}"]\ninput = 1000.0\noutput = 1000.0\n')
    config = make_config(
        source, tmp_path / "o.parquet", server.base_url, max_cost=1.0, price_file=prices
    )
    with pytest.raises(SpendCapReached) as caught:
        enrich(config)
    # Held-back worst cases used to stop it after 3 requests (about $0.1).
    assert 0.7 < caught.value.spent <= 1.0
    assert server.stats.requests < 80


def test_rows_answered_from_the_cache_are_not_counted_as_spent() -> None:
    price = Price("m", 1_000_000.0, 1_000_000.0)  # $1 a token
    results = pl.DataFrame(
        {
            "prompt_tokens": [10, 10, None],
            "completion_tokens": [5, 5, None],
            "cached": [False, True, None],
        }
    )
    assert checkpoint_spend(results, price) == 15.0
