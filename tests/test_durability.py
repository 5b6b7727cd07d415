"""What a failure costs: transient and permanent row failures, damaged
checkpoint files, changed input, and a full disk. Requests are counted at the
local server, so "costs only its own rows" is measured, not assumed."""

from __future__ import annotations

import os
import random
import shutil
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from pipeline import enrich
from pipeline.assemble import GROUP_BYTES, rows_per_group
from pipeline.cache import CachedAnswer, ResponseCache
from pipeline.checkpoint import DAMAGED, JOURNAL, PARTS, read_part
from pipeline.config import RunConfig
from pipeline.errors import CheckpointMismatch
from pipeline.events import RecordingEventSink
from pipeline.journal import JournalWriter
from pipeline.read import open_input
from pipeline.report import read_report, report_path_for
from pipeline.runner import RunOptions
from pipeline.status import checkpoint_status

from conftest import StartServer, answer_for, make_config, write_questions


def config_for(tmp_path: Path, source: Path, base_url: str, **overrides: Any) -> RunConfig:
    """No response cache: what is not paid twice here is the checkpoint's doing."""
    return make_config(
        source,
        tmp_path / "out.parquet",
        base_url,
        **{"cache.enabled": False, "limits.max_attempts": 2, **overrides},
    )


def keep(config: RunConfig) -> RunConfig:
    return config.replace(output=config.output.replace(keep_checkpoint=True))


def warnings_of(sink: RecordingEventSink) -> list[str]:
    return [event.message for event in sink.named("warning")]


# -- transient and permanent failures ------------------------------------------


def test_a_plain_rerun_retries_transient_failures_and_not_permanent_ones(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = ["a", "b [[fault:500:2]]", "c [[fault:400]]", "d"]
    config = config_for(tmp_path, write_questions(tmp_path / "in.csv", prompts), server.base_url)

    first = enrich(config)
    assert (first.ok, first.error, first.pending) == (2, 2, 1)
    report = read_report(report_path_for(config.output.local_path))
    assert report is not None and report["counts"]["pending"] == 1
    server.reset_stats()

    second = enrich(config)  # no flag: the pending row is sent again, the 400 is not

    assert dict(server.stats.answered_by_content) == {prompts[1]: 1}
    assert not second.up_to_date
    assert (second.ok, second.error, second.pending) == (3, 1, 0)
    out = pl.read_parquet(config.output.path)
    assert out["status"].to_list() == ["ok", "ok", "error", "ok"]
    server.reset_stats()

    third = enrich(config)
    assert third.up_to_date and server.stats.requests == 0


def test_retry_failed_after_a_finished_run_without_cache_sends_exactly_the_failed_rows(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"q{i}" for i in range(20)]
    prompts[7] = "q7 [[fault:400:1]]"
    prompts[13] = "q13 [[fault:400:1]]"
    config = config_for(tmp_path, write_questions(tmp_path / "in.csv", prompts), server.base_url)
    assert enrich(config).error == 2
    assert config.output.resolved_run_dir.exists()  # kept: it knows which rows failed
    server.reset_stats()

    summary = enrich(config, options=RunOptions(retry_failed=True))

    assert sorted(server.stats.answered_by_content) == sorted([prompts[7], prompts[13]])
    assert server.stats.requests == 2
    assert summary.error == 0
    out = pl.read_parquet(config.output.path)
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    assert not config.output.resolved_run_dir.exists()  # nothing failed any more


def test_retry_failed_when_no_row_failed_sends_nothing(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    config = config_for(tmp_path, write_questions(tmp_path / "in.csv", ["a", "b"]), server.base_url)
    enrich(config)
    server.reset_stats()

    summary = enrich(config, options=RunOptions(retry_failed=True))

    assert summary.up_to_date
    assert server.stats.requests == 0


# -- damaged checkpoint files ---------------------------------------------------

ROWS = 100
PART_ROWS = 20


@pytest.fixture
def checkpointed(tmp_path: Path, start_server: StartServer) -> Iterator[tuple[RunConfig, Any]]:
    """A run whose checkpoint (five parts of 20 rows) is kept and whose output
    is gone, as if it was killed just before writing the output."""
    server = start_server()
    prompts = [f"damage question {i}" for i in range(ROWS)]
    source = write_questions(tmp_path / "in.parquet", prompts)
    config = keep(config_for(tmp_path, source, server.base_url, **{"checkpoint.flush_every": 20}))
    enrich(config)
    config.output.local_path.unlink()
    report_path_for(config.output.local_path).unlink()
    server.reset_stats()
    yield config, server


def part(config: RunConfig, index: int) -> Path:
    return sorted((config.output.resolved_run_dir / PARTS).glob("part-*.parquet"))[index]


def finishes_sending_only(config: RunConfig, server: Any, rows: list[int]) -> list[str]:
    """Reruns; checks that exactly ``rows`` were sent and the output is whole.
    Returns the run's warnings."""
    sink = RecordingEventSink()
    enrich(config, events=sink)
    prompts = [f"damage question {i}" for i in range(ROWS)]
    assert sorted(server.stats.answered_by_content) == sorted(prompts[i] for i in rows)
    out = pl.read_parquet(config.output.path)
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    return warnings_of(sink)


def garble_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xA5 for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b""), id="empty"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), id="cut"),
        pytest.param(garble_middle, id="garbled"),
    ],
)
def test_a_damaged_part_costs_only_its_own_rows(
    checkpointed: tuple[RunConfig, Any], damage: Any
) -> None:
    config, server = checkpointed
    damaged = part(config, 2)
    lost = read_part(damaged).column("_row_id").to_pylist()
    damage(damaged)

    warnings = finishes_sending_only(config, server, lost)

    assert any(damaged.name in w and "damaged" in w for w in warnings), warnings
    assert any(
        p.name.startswith(damaged.name)
        for p in (config.output.resolved_run_dir / DAMAGED).iterdir()
    )


def last_part_as_journal(config: RunConfig, *records: int) -> tuple[Path, pa.Table, list[int]]:
    """What a killed run leaves: the last part's results back in a journal
    segment, as records of ``records`` rows. Returns the segment, the results
    and the segment's size after each record."""
    last = part(config, 4)
    table = read_part(last)
    last.unlink()
    segment = config.output.resolved_run_dir / JOURNAL / "seg-00000099.log"
    writer = JournalWriter(segment)
    ends, offset = [], 0
    for rows in records:
        writer.append(table.slice(offset, rows))
        offset += rows
        ends.append(writer.size)
    writer.close()
    return segment, table, ends


def test_a_damaged_journal_segment_keeps_its_records_before_the_damage(
    checkpointed: tuple[RunConfig, Any],
) -> None:
    config, server = checkpointed
    segment, table, (end_of_first, _) = last_part_as_journal(config, 10, 10)
    data = bytearray(segment.read_bytes())
    data[end_of_first + 40] ^= 0xFF
    segment.write_bytes(bytes(data))

    warnings = finishes_sending_only(config, server, table.column("_row_id").to_pylist()[10:])

    assert any(segment.name in w for w in warnings), warnings


def test_a_segment_cut_short_by_a_kill_is_sealed_without_a_warning(
    checkpointed: tuple[RunConfig, Any],
) -> None:
    config, server = checkpointed
    segment, table, _ = last_part_as_journal(config, 15, 5)
    segment.write_bytes(segment.read_bytes()[:-7])  # the last append, torn

    warnings = finishes_sending_only(config, server, table.column("_row_id").to_pylist()[15:])

    assert warnings == []


def test_a_damaged_manifest_is_rebuilt_and_costs_nothing(
    checkpointed: tuple[RunConfig, Any],
) -> None:
    config, server = checkpointed
    manifest = config.output.resolved_run_dir / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])

    warnings = finishes_sending_only(config, server, [])

    assert any("manifest" in w for w in warnings), warnings


def test_a_damaged_manifest_keeps_no_part_made_for_other_settings(
    checkpointed: tuple[RunConfig, Any],
) -> None:
    config, server = checkpointed
    manifest = config.output.resolved_run_dir / "manifest.json"
    manifest.write_text("{")
    other = config.replace(model=config.model.replace(name="sim-other"))
    enrich(other)
    assert server.stats.requests == ROWS  # nothing made for sim-1 was reused for sim-other


# -- changed input ----------------------------------------------------------------


def test_changed_input_after_an_unfinished_run_starts_over_reusing_unchanged_answers(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    prompts = [f"nightly {i}" for i in range(50)]
    source = write_questions(tmp_path / "in.csv", prompts)
    config = keep(config_for(tmp_path, source, server.base_url))
    enrich(config)
    config.output.local_path.unlink()  # unfinished: killed before the output was written
    tomorrow = [*prompts[:10], "nightly 10, edited", *prompts[11:], "nightly 50"]
    write_questions(source, tomorrow)
    server.reset_stats()
    sink = RecordingEventSink()

    summary = enrich(config, events=sink)

    assert sorted(server.stats.answered_by_content) == ["nightly 10, edited", "nightly 50"]
    assert any("input changed" in w for w in warnings_of(sink))
    assert summary.rows == 51 and summary.error == 0
    out = pl.read_parquet(config.output.path)
    assert out["response"].to_list() == [answer_for(p) for p in tomorrow]
    assert out["cached"].sum() == 49


def test_changed_input_is_refused_with_on_input_change_refuse(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b"])
    config = keep(
        config_for(tmp_path, source, server.base_url, **{"checkpoint.on_input_change": "refuse"})
    )
    enrich(config)
    write_questions(source, ["a", "c"])
    with pytest.raises(CheckpointMismatch, match="--restart"):
        enrich(config)


def test_an_edit_that_keeps_size_and_mtime_is_noticed(
    tmp_path: Path, start_server: StartServer
) -> None:
    """cp -p, rsync -t and tar x restore the mtime; the content still changed."""
    server = start_server()
    prompts = ["alpha", "bravo", "delta"]
    source = write_questions(tmp_path / "in.csv", prompts)
    config = keep(config_for(tmp_path, source, server.base_url))
    enrich(config)
    before = source.stat()
    edited = ["alpha", "bravx", "delta"]
    write_questions(source, edited)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (
        before.st_size,
        before.st_mtime_ns,
    )
    server.reset_stats()

    summary = enrich(config)

    assert not summary.up_to_date
    assert dict(server.stats.answered_by_content) == {"bravx": 1}
    out = pl.read_parquet(config.output.path)
    assert out["response"].to_list() == [answer_for(p) for p in edited]


# -- memory of the assembly ---------------------------------------------------------


def test_row_groups_of_the_output_are_sized_by_bytes_not_rows(tmp_path: Path) -> None:
    big = write_questions(tmp_path / "big.parquet", ["x" * 100_000] * 300)
    small = write_questions(tmp_path / "small.parquet", ["short"] * 300)
    rows_big = rows_per_group(open_input(big), result_bytes_per_row=100_000)
    assert rows_big * 200_000 <= GROUP_BYTES
    assert rows_per_group(open_input(small), result_bytes_per_row=100) > 100 * rows_big


# -- a full disk -------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs, mounted for the test (skipped where mounting is not allowed)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_stops_with_exit_74_keeps_the_checkpoint_and_a_rerun_finishes(
    tmp_path: Path, start_server: StartServer, small_disk: Path
) -> None:
    server = start_server(latency_ms=2)
    rng = random.Random(7)  # text that does not compress away
    prompts = [
        f"full disk question {i} " + "".join(rng.choices(string.ascii_letters, k=900))
        for i in range(3000)
    ]
    source = write_questions(tmp_path / "in.parquet", prompts)
    output = tmp_path / "out.parquet"
    run_dir = small_disk / "run"
    argv = [
        sys.executable, "-m", "pipeline", "run", "--input", str(source), "--column", "question",
        "--output", str(output), "--run-dir", str(run_dir), "--base-url", server.base_url,
        "--model", "sim-1", "--quiet", "--no-cache", "--flush-every", "500",
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": "sk-test"}

    full = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)

    assert full.returncode == 74, full.stderr
    assert "no space left on" in full.stderr and str(small_disk) in full.stderr
    assert "Traceback" not in full.stderr
    assert not output.exists()
    report = read_report(report_path_for(output))
    assert report is not None and report["outcome"] == "write_failed"
    saved = server.stats.answered
    assert saved < len(prompts)

    # Free space: move the checkpoint to a disk with room, as a user would.
    roomy = tmp_path / "run"
    shutil.copytree(run_dir, roomy)
    durable = checkpoint_status(roomy)
    assert durable is not None and durable.done > 0
    argv[argv.index("--run-dir") + 1] = str(roomy)
    rerun = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)

    assert rerun.returncode == 0, rerun.stderr
    out = pl.read_parquet(output)
    assert out["response"].to_list() == [answer_for(p) for p in prompts]
    # The rerun paid again only for what had not reached the small disk.
    assert server.stats.answered - saved == len(prompts) - durable.done


# -- a damaged response cache ----------------------------------------------------------


def test_a_damaged_response_cache_is_bypassed_with_a_warning_and_the_run_finishes(
    tmp_path: Path, start_server: StartServer, isolated_cache: Path
) -> None:
    server = start_server()
    path = isolated_cache / "cache.sqlite3"
    with ResponseCache(path) as cache:
        answer = CachedAnswer("old", "stop", "sim-1", 1, 1)
        cache.put_many([(bytes([i]) * 32, answer) for i in range(200)])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    prompts = [f"cache damage {i}" for i in range(30)]
    config = config_for(
        tmp_path,
        write_questions(tmp_path / "in.csv", prompts),
        server.base_url,
        **{"cache.enabled": True},
    )
    sink = RecordingEventSink()

    summary = enrich(config, events=sink)

    assert (summary.ok, summary.error) == (30, 0)
    assert server.stats.requests == 30
    assert any("damaged" in w and "enrich cache clear" in w for w in warnings_of(sink))
