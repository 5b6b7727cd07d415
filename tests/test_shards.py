"""Shards the Ray engine's workers enrich, planned by enrich from the input's
metadata, and one worker's job on a shard: all plain Python, no cluster
(the engine on a cluster is tests/test_engine_ray.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.call import CallStage, CallStats
from pipeline.checkpoint import Checkpoint
from pipeline.journal import JournalWriter
from pipeline.plan import prompt_spec
from pipeline.read import open_input
from pipeline.result_table import results_to_table
from pipeline.results import RowResult
from pipeline.shard_work import Board, Notice, NoticeSink, ShardJob, Stop, WorkerSpec
from pipeline.shards import (
    SHARDS,
    STAGED,
    Shard,
    ShardTask,
    new_journal_path,
    plan_input,
    plan_parquet,
    read_done,
    read_results,
    read_shard,
    shard_dir,
)
from pipeline.transport import make_transport

from conftest import StartServer, answer_for, make_config, write_questions


def parquet(path: Path, first: int, rows: int, row_group: int) -> Path:
    ids = list(range(first, first + rows))
    table = pa.table({"id": ids, "question": [f"question {i}" for i in ids]})
    pq.write_table(table, path, row_group_size=row_group)
    return path


def test_parquet_shards_are_whole_row_groups_of_about_shard_rows(tmp_path: Path) -> None:
    source = parquet(tmp_path / "in.parquet", 0, 1050, 100)  # 10 groups of 100, one of 50

    shards = plan_parquet([source], 250)

    assert [(s.first_row, s.rows) for s in shards] == [
        (0, 200),
        (200, 200),
        (400, 200),
        (600, 200),
        (800, 250),
    ]
    assert shards[1].row_groups == (2, 3)
    assert shards[1].name == "000000000200-000000000400"


def test_a_row_group_larger_than_a_shard_is_a_shard_of_its_own(tmp_path: Path) -> None:
    source = parquet(tmp_path / "in.parquet", 0, 1000, 1000)

    assert [(s.row_groups, s.rows) for s in plan_parquet([source], 100)] == [((0,), 1000)]


def test_a_parquet_file_of_one_large_row_group_is_staged_into_shards_of_its_prompt_column(
    tmp_path: Path,
) -> None:
    # pandas and pyarrow write a file of under a million rows as one row group.
    source = open_input(parquet(tmp_path / "in.parquet", 0, 1000, 1000))
    run_dir = tmp_path / "run"

    shards = plan_input(source, run_dir, 300, "sha-1", ["question"])

    assert [(s.first_row, s.rows) for s in shards] == [(0, 300), (300, 300), (600, 300), (900, 100)]
    assert all(Path(s.path).parent == run_dir / STAGED for s in shards)
    last = read_shard(shards[3], ["question"])
    assert last.column_names == ["question"]  # the other columns are not copied
    assert last.column(0).to_pylist() == [f"question {i}" for i in range(900, 1000)]
    assert plan_input(source, run_dir, 300, "sha-1", ["question"]) == shards


def test_parquet_row_groups_near_the_shard_size_are_read_in_place(tmp_path: Path) -> None:
    source = open_input(parquet(tmp_path / "in.parquet", 0, 1000, 500))
    run_dir = tmp_path / "run"

    shards = plan_input(source, run_dir, 300, "sha-1", ["question"])

    assert [(s.row_groups, s.rows) for s in shards] == [((0,), 500), ((1,), 500)]
    assert {Path(s.path) for s in shards} == {(tmp_path / "in.parquet").resolve()}
    assert not (run_dir / STAGED).exists()


def test_several_files_number_their_rows_on_from_one_file_to_the_next(tmp_path: Path) -> None:
    files = [
        parquet(tmp_path / "a.parquet", 0, 300, 100),
        parquet(tmp_path / "b.parquet", 300, 250, 100),
    ]

    shards = plan_parquet(files, 200)

    assert [(Path(s.path).name, s.first_row, s.rows) for s in shards] == [
        ("a.parquet", 0, 200),
        ("a.parquet", 200, 100),
        ("b.parquet", 300, 200),
        ("b.parquet", 500, 50),
    ]
    # A shard's rows are the rows its ids say: the ids the single engine uses.
    last = read_shard(shards[3], ["id"])
    assert last.column("id").to_pylist() == list(range(500, 550))


def test_the_same_input_is_planned_the_same_on_every_run(tmp_path: Path) -> None:
    files = [parquet(tmp_path / f"{n}.parquet", n * 700, 700, 64) for n in range(3)]

    assert plan_parquet(files, 500) == plan_parquet(files, 500)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_csv_and_jsonl_are_staged_once_into_parquet_shards(tmp_path: Path, suffix: str) -> None:
    rows = [f"question {i}" for i in range(1234)]
    source = open_input(write_questions(tmp_path / f"in{suffix}", rows))
    run_dir = tmp_path / "run"

    shards = plan_input(source, run_dir, 500, "sha-1", ["question"])
    staged = sorted((run_dir / STAGED).glob("*.parquet"))
    made = [path.stat().st_mtime_ns for path in staged]
    again = plan_input(source, run_dir, 500, "sha-1", ["question"])

    assert again == shards
    assert [path.stat().st_mtime_ns for path in staged] == made  # not staged twice
    assert [(s.first_row, s.rows) for s in shards] == [(0, 500), (500, 500), (1000, 234)]
    questions = [q for s in shards for q in read_shard(s, ["question"]).column(0).to_pylist()]
    assert questions == rows


def test_staged_files_are_made_again_for_a_changed_input(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = open_input(write_questions(tmp_path / "in.csv", ["a", "b", "c"]))
    plan_input(first, run_dir, 2, "sha-1", ["question"])
    changed = open_input(write_questions(tmp_path / "in.csv", ["x", "y", "z", "w"]))

    shards = plan_input(changed, run_dir, 2, "sha-2", ["question"])

    questions = [q for s in shards for q in read_shard(s, ["question"]).column(0).to_pylist()]
    assert questions == ["x", "y", "z", "w"]


def test_staging_cut_short_by_a_kill_is_staged_again(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    source = open_input(write_questions(tmp_path / "in.csv", [f"q{i}" for i in range(10)]))
    plan_input(source, run_dir, 4, "sha-1", ["question"])
    (run_dir / STAGED / "manifest.json").unlink()  # killed before the manifest
    (run_dir / STAGED / "rows-00000001.parquet").write_bytes(b"torn")

    shards = plan_input(source, run_dir, 4, "sha-1", ["question"])

    assert sum(read_shard(s, ["question"]).num_rows for s in shards) == 10


def journal(directory: Path, results: list[RowResult]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    writer = JournalWriter(new_journal_path(directory))
    writer.append(results_to_table(results))
    writer.close()


def ok(row_id: int, text: str = "answer") -> RowResult:
    return RowResult(row_id=row_id, status="ok", response=text, attempts=1)


def test_a_checkpoint_opened_after_a_killed_driver_adopts_the_shard_journals(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    source = parquet(tmp_path / "in.parquet", 0, 10, 5)
    settings = {"model": "m"}
    Checkpoint.open(run_dir, source, settings, input_rows=10)
    shard = Shard(str(source), (0,), 0, 5)
    journal(shard_dir(run_dir, shard), [ok(0), ok(1, "first")])
    journal(shard_dir(run_dir, shard), [ok(1, "newer")])

    # Seen by a read-only view (enrich status) while the run goes.
    view = Checkpoint(run_dir, Checkpoint.read_manifest(run_dir) or pytest.fail("no manifest"))
    assert view.latest_results(["response"])["response"].to_list() == ["answer", "newer"]
    reopened = Checkpoint.open(run_dir, source, settings, input_rows=10)

    latest = reopened.latest_results(["response"])
    assert latest["_row_id"].to_list() == [0, 1]
    assert latest["response"].to_list() == ["answer", "newer"]
    assert not list((run_dir / SHARDS).iterdir())


def test_the_board_posts_the_spend_cap_and_keeps_the_first_stop() -> None:
    board = Board(max_cost=1.0, spent=0.25)
    assert board.report("w1", CallStats(requests=3), [], 0.5) is None
    assert board.report("w1", CallStats(requests=5), [], 0.0) is None
    assert board.report("w2", CallStats(requests=2), [], 0.3) == Stop("SpendCapReached", "")
    board.post_stop(Stop("FatalAPIError", "later"))

    assert board.stop == Stop("SpendCapReached", "")
    # A worker's newest totals replace its last ones.
    assert sum(stats.requests for stats in board.counts.values()) == 7


class Reports:
    """The board, as a worker reaches it (the ledger actor, without Ray)."""

    def __init__(self, board: Board) -> None:
        self.board = board

    async def __call__(
        self,
        worker: str,
        stats: CallStats,
        notices: list[Notice],
        spent: float,
        stop: Stop | None,
        finished: tuple[str, int] | None,
    ) -> Stop | None:
        return self.board.report(worker, stats, notices, spent, stop, finished)


@contextlib.asynccontextmanager
async def shard_job(
    tmp_path: Path, base_url: str, board: Board
) -> AsyncIterator[tuple[ShardJob, Shard, Path]]:
    source = parquet(tmp_path / "in.parquet", 0, 40, 10)
    config = make_config(source, tmp_path / "out.parquet", base_url)
    run_dir = tmp_path / "run"
    (run_dir / SHARDS).mkdir(parents=True)
    spec = WorkerSpec(config, prompt_spec(config), None, None, config.api_key(), str(run_dir), None)
    transport = make_transport(config.model, config.api_key(), config.model.transport)
    sink = NoticeSink()
    stage = CallStage(config.model, config.limits, transport, events=sink)
    shard = plan_parquet([source], 20)[1]
    try:
        yield ShardJob(spec, stage, sink, Reports(board)), shard, run_dir
    finally:
        await transport.aclose()


async def test_a_shard_run_again_sends_only_what_no_journal_holds(
    tmp_path: Path, start_server: StartServer
) -> None:
    sim = start_server()
    board = Board()
    async with shard_job(tmp_path, sim.base_url, board) as (job, shard, run_dir):
        directory = shard_dir(run_dir, shard)
        journal(directory, [ok(20), ok(21)])  # an attempt killed after two answers
        held = bytearray(20)
        held[5] = 1  # in the checkpoint already

        summary = await job.run(ShardTask(shard, bytes(held)), "w1")
        # A shard found done is not sent again.
        assert (await job.run(ShardTask(shard), "w2")).done

    assert summary.done and summary.sent == 17 and summary.journaled == 2
    assert sim.stats.requests == 17
    # What the driver's progress shows before gathering the shard: every
    # row finished but the one the checkpoint holds (counted as resumed).
    assert board.rows == {shard.name: 19}
    assert read_done(directory) == summary
    results = read_results(directory)
    assert results is not None
    frame = pl.from_arrow(results)
    assert isinstance(frame, pl.DataFrame)
    assert sorted(frame["_row_id"].to_list()) == [i for i in range(20, 40) if i != 25]
    fresh = frame.filter(pl.col("_row_id") == 30)
    assert fresh["response"].to_list() == [answer_for("question 30")]
    assert board.counts["w1"].requests == 17


async def test_a_stop_on_the_board_stops_a_shard_before_it_sends(
    tmp_path: Path, start_server: StartServer
) -> None:
    sim = start_server()
    board = Board()
    board.post_stop(Stop("FatalAPIError", "bad key"))
    async with shard_job(tmp_path, sim.base_url, board) as (job, shard, run_dir):
        summary = await job.run(ShardTask(shard), "w1")

    assert (summary.done, summary.error_kind, summary.error_message) == (
        False,
        "FatalAPIError",
        "bad key",
    )
    assert sim.stats.requests == 0
    assert read_done(shard_dir(run_dir, shard)) is None
    assert json.loads(ShardTask(shard).to_json())["done"] is None


async def test_answers_of_a_commit_cancelled_while_queued_are_still_journaled(
    tmp_path: Path,
) -> None:
    # The group commit runs in the loop's thread pool; under load its job
    # waits in the queue. Cancelling the committer then (the shard ends)
    # must not drop the job: its answers are paid for.
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    busy = threading.Event()
    blocker = loop.run_in_executor(pool, busy.wait)
    async with shard_job(tmp_path, "http://127.0.0.1:9/v1", Board()) as (job, shard, run_dir):
        directory = shard_dir(run_dir, shard)
        directory.mkdir(parents=True)
        writer = JournalWriter(new_journal_path(directory))
        job._add(ok(20), None)
        committer = asyncio.create_task(job._commit(writer))
        await asyncio.sleep(0.01)  # its job is queued behind the blocker
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        job._add(ok(21), None)
        busy.set()
        await blocker
        await job._commit(writer)  # the last commit, as a shard ends
        writer.close()

    results = read_results(directory)
    assert results is not None
    assert sorted(results.column("_row_id").to_pylist()) == [20, 21]
