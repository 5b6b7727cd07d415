"""The head start (pipeline.head): a fresh run's first rows are sent before
the input is read in full. Their prompts must be exactly the full path's, the
run must come out the same, and a bad row found later must cost at most the
head's requests (whose answers the cache keeps for the fixed rerun)."""

from __future__ import annotations

import csv
import io
import json
import random
import signal
from pathlib import Path
from typing import Any, Final

import polars as pl
import pytest
from test_crash import CONCURRENCY, start_run

from pipeline import InputError, enrich, prompt
from pipeline.config import RunConfig
from pipeline.head import plan_head
from pipeline.head_read import HEAD_BYTES, read_head
from pipeline.read import open_input
from pipeline.report import report_path_for
from pipeline.wiring import RunOptions

from conftest import StartServer, answer_for, make_config, write_questions

# Values that stress both readers: quoting, separators and newlines inside
# values, numbers, booleans, blanks, padding, unicode whitespace and text.
VALUES: Final = (
    "hello",
    "what is 2+2?",
    "a,b",
    'say "hi"',
    "line\nbreak",
    "crlf\r\ninside",
    "héllo ✓ 世界",
    "5",
    "-12",
    "007",
    "1.50",
    "1e5",
    "3.0",
    "true",
    "FALSE",
    "",
    " padded ",
    "\tx",
    "x\u00a0",
    "\u2003em",
    "NA",
    "null",
    "2024-01-01",
    "'quoted'",
    '"',
    "trailing\n",
    "zero\u200bwidth",
)
RUNS: Final = 150


def full_prompts(path: Path, spec: prompt.PromptSpec) -> list[str | None]:
    source = open_input(path)
    out: list[str | None] = []
    for chunk in source.chunks(1000):
        out += prompt.render(spec, chunk.table)
    return out


def random_value(rng: random.Random) -> str:
    value = rng.choice(VALUES)
    return value if rng.random() < 0.8 else value + rng.choice(VALUES)


def random_csv(rng: random.Random, path: Path) -> None:
    columns = ["q", "r", "n"][: rng.randint(1, 3)]
    buffer = io.StringIO(newline="")
    ending = rng.choice(["\n", "\r\n"])
    if rng.random() < 0.5:
        writer = csv.writer(buffer, lineterminator=ending, quoting=csv.QUOTE_ALL)
    else:
        writer = csv.writer(buffer, lineterminator=ending)
    writer.writerow(columns)
    for _ in range(rng.randint(1, 30)):
        if rng.random() < 0.1:
            buffer.write(ending)  # an empty line: not a row
        writer.writerow([random_value(rng) for _ in columns])
    data = buffer.getvalue().encode()
    path.write_bytes((b"\xef\xbb\xbf" if rng.random() < 0.3 else b"") + data)


def random_jsonl(rng: random.Random, path: Path) -> None:
    lines = []
    for _ in range(rng.randint(1, 30)):
        record: dict[str, Any] = {}
        for key in ("q", "r"):
            roll = rng.random()
            if roll < 0.7:
                record[key] = random_value(rng)
            elif roll < 0.8:
                record[key] = rng.choice([1, 2.5, True, None, [1, 2], {"a": "b"}])
        lines.append(json.dumps(record, ensure_ascii=rng.random() < 0.5))
        if rng.random() < 0.1:
            lines.append("   ")  # a blank line: not a row
    if not any("q" in line for line in lines):
        lines.append(json.dumps({"q": "hello", "r": "there"}))
    text = "\n".join(lines) + ("\n" if rng.random() < 0.5 else "")
    path.write_bytes((b"\xef\xbb\xbf" if rng.random() < 0.3 else b"") + text.encode())


SPECS: Final = (
    prompt.PromptSpec(column="q"),
    prompt.PromptSpec(template="Q: {q} / {r}!", system_prompt="be brief"),
)


def check_head_matches_full_path(path: Path, fmt: str, spec: prompt.PromptSpec) -> int:
    try:
        full = full_prompts(path, spec)
    except InputError:
        return 0  # the full path refuses the file: what the head sends does not matter
    head = read_head(path, fmt, spec, limit=10_000)  # type: ignore[arg-type]
    if head is None:
        return 0
    for row_id, text in head.prompts:
        assert full[row_id] == text, (path.read_bytes(), row_id)
    return len(head.prompts)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=["column", "template"])
def test_every_head_prompt_of_a_generated_csv_is_the_full_paths(
    tmp_path: Path, spec: prompt.PromptSpec
) -> None:
    rng = random.Random(20261130)
    checked = 0
    for run in range(RUNS):
        path = tmp_path / f"in{run}.csv"
        random_csv(rng, path)
        if spec.template is not None and b"r" not in path.read_bytes().splitlines()[0]:
            continue
        checked += check_head_matches_full_path(path, "csv", spec)
    assert checked > RUNS  # most files give head rows: the property was exercised


@pytest.mark.slow
@pytest.mark.parametrize("spec", SPECS, ids=["column", "template"])
def test_every_head_prompt_of_a_generated_jsonl_is_the_full_paths(
    tmp_path: Path, spec: prompt.PromptSpec
) -> None:
    rng = random.Random(11)
    checked = 0
    for run in range(RUNS):
        path = tmp_path / f"in{run}.jsonl"
        random_jsonl(rng, path)
        checked += check_head_matches_full_path(path, "jsonl", spec)
    assert checked > RUNS


def test_numeric_blank_and_padded_values_wait_for_the_full_path(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('q\nfirst\n5\n""\n" padded"\nTRUE\n1.50\nlast one\n')
    head = read_head(path, "csv", prompt.PromptSpec(column="q"), limit=100)
    assert head is not None
    assert head.prompts == [(0, "first"), (6, "last one")]


def test_a_malformed_start_of_file_gives_no_head(tmp_path: Path) -> None:
    spec = prompt.PromptSpec(column="q")
    wrong_fields = tmp_path / "fields.csv"
    wrong_fields.write_text("q,r\na,b\nc\n")
    not_utf8 = tmp_path / "latin1.csv"
    not_utf8.write_bytes("q\ncafé\n".encode("latin-1"))
    not_json = tmp_path / "bad.jsonl"
    not_json.write_text('{"q": "a"}\n{"q": \n')
    assert read_head(wrong_fields, "csv", spec, 10) is None
    assert read_head(not_utf8, "csv", spec, 10) is None
    assert read_head(not_json, "jsonl", spec, 10) is None


def config_for(tmp_path: Path, source: Path, **overrides: Any) -> RunConfig:
    return make_config(source, tmp_path / "out.parquet", "http://127.0.0.1:9/v1", **overrides)


def test_the_head_start_is_taken_only_by_a_fresh_local_online_run(tmp_path: Path) -> None:
    csv_in = write_questions(tmp_path / "in.csv", [f"question {i}" for i in range(5)])
    parquet_in = write_questions(tmp_path / "in.parquet", [f"question {i}" for i in range(5)])
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"a": {"type": "string"}}}')
    fresh = RunOptions()
    plan = plan_head(config_for(tmp_path, csv_in), fresh)
    assert plan is not None and plan.fresh()
    assert plan.rows.prompts[:2] == [(0, "question 0"), (1, "question 1")]
    assert plan_head(config_for(tmp_path, parquet_in), fresh) is None
    assert plan_head(config_for(tmp_path, csv_in, route="batch"), fresh) is None
    assert plan_head(config_for(tmp_path, csv_in, max_cost=1.0), fresh) is None
    assert (
        plan_head(config_for(tmp_path, csv_in, **{"structured.schema": str(schema)}), fresh) is None
    )
    assert plan_head(config_for(tmp_path, csv_in, **{"run.engine": "ray"}), fresh) is None


def test_a_checkpoint_sends_the_run_the_full_way(tmp_path: Path) -> None:
    source = write_questions(tmp_path / "in.csv", ["a question"])
    config = config_for(tmp_path, source)
    assert config.output.resolved_report == report_path_for(config.output.local_path)
    restarted = plan_head(config, RunOptions(restart=True))
    assert restarted is not None and restarted.fresh()
    config.output.resolved_run_dir.mkdir()
    (config.output.resolved_run_dir / "manifest.json").write_text("{}")
    assert not restarted.fresh()  # a checkpoint: resumed or restarted the full way


@pytest.mark.slow
def test_a_nightly_run_over_a_new_input_takes_the_head_start_and_an_up_to_date_one_does_not(
    tmp_path: Path, start_server: StartServer
) -> None:
    sim = start_server()
    source = write_questions(tmp_path / "in.csv", [f"night one {i}" for i in range(20)])
    config = make_config(source, tmp_path / "out.parquet", sim.base_url)
    enrich(config)  # last night's run: its report and output beside each other

    again = plan_head(config, RunOptions())
    assert again is not None and not again.fresh()  # up to date: the full path skips it
    write_questions(source, [f"night two {i}" for i in range(20)])
    tonight = plan_head(config, RunOptions())
    assert tonight is not None and tonight.fresh()
    assert tonight.rows.prompts[0] == (0, "night two 0")
    enrich(config)
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list() == [answer_for(f"night two {i}") for i in range(20)]


def test_a_prompt_column_the_header_lacks_stops_the_run_before_any_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a question"])
    config = make_config(
        source, tmp_path / "out.parquet", server.base_url, **{"input.column": "qestion"}
    )

    with pytest.raises(InputError, match="did you mean 'question'"):
        enrich(config)

    assert server.stats.requests == 0


@pytest.mark.slow
def test_a_bad_row_far_down_costs_at_most_the_head_and_the_rerun_reuses_its_answers(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    rows = (HEAD_BYTES // 40) + 100  # the head reads HEAD_BYTES: the bad row lies past it
    prompts = [f"question number {i:08d} of the long file" for i in range(rows)]
    good = write_questions(tmp_path / "good.csv", prompts)
    source = tmp_path / "in.csv"
    source.write_bytes(good.read_bytes() + b"1,two,three\n")  # a row with a field too many
    config = make_config(source, tmp_path / "out.parquet", server.base_url)

    with pytest.raises(InputError, match="wrong number of fields"):
        enrich(config)

    sent = server.stats.requests
    assert 0 < sent <= config.limits.concurrency
    source.write_bytes(good.read_bytes())
    summary = enrich(config)
    assert summary.cache_hits == sent  # the head's answers were kept
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["response"].to_list()[:3] == [answer_for(p) for p in prompts[:3]]
    assert server.stats.requests == rows


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_run_with_a_head_start_gives_the_same_output(
    tmp_path: Path, start_server: StartServer, suffix: str
) -> None:
    server = start_server()
    prompts: list[str | None] = [f"question {i}" for i in range(300)]
    prompts[3] = "42"  # numeric-looking: the full path renders it
    prompts[4] = None  # skipped
    prompts[5] = "question 0"  # answered by dedup or the cache, never sent twice
    source = write_questions(tmp_path / f"in{suffix}", prompts)
    config = make_config(source, tmp_path / "out.parquet", server.base_url)

    summary = enrich(config)

    out = pl.read_parquet(tmp_path / "out.parquet")
    expected = [None if p is None else answer_for(p) for p in prompts]
    assert out["response"].to_list() == expected
    assert summary.ok == 299 and summary.skipped == 1
    assert server.stats.requests == 298  # one per distinct prompt


@pytest.mark.slow
@pytest.mark.parametrize("step", ["head-in-flight", "head-prepared", "head-checkpoint-open"])
def test_a_kill_during_the_head_start_leaves_a_state_the_same_command_finishes(
    tmp_path: Path, start_server: StartServer, step: str
) -> None:
    server = start_server(latency_ms=20)
    rows = 200
    prompts = [f"head crash question {i}" for i in range(rows)]
    source = write_questions(tmp_path / "in.csv", prompts)
    output = tmp_path / "out.parquet"

    crashed = start_run(source, output, server.base_url, "--no-cache", crash_at=step)
    crashed.communicate(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    assert server.stats.requests <= CONCURRENCY  # the head at most

    rerun = start_run(source, output, server.base_url, "--no-cache")
    _, stderr = rerun.communicate(timeout=60)

    assert rerun.returncode == 0, stderr
    out = pl.read_parquet(output)
    assert out["id"].to_list() == list(range(rows))
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    # Nothing of the head was durable: at most its requests are paid again.
    assert rows <= server.stats.requests <= rows + CONCURRENCY
    assert not (tmp_path / "out.parquet.enrich").exists()
