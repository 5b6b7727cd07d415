"""The send stage of the Ray engine's pass (the engine itself is
pipeline.engine_ray): which shards still have rows to do, and each one's
results gathered into the checkpoint once its worker is done with it.

Gathering goes through the collect stage like the single engine's results
(counted, settled against the spend, cached, committed in groups); the
shard's directory is removed only once the checkpoint holds them. A kill
in between leaves it to the next open, which adopts it again: the same
results, and the newest result of a row wins.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pipeline.costs import SpendCap
from pipeline.durable import remove_tree
from pipeline.prompt import needed_columns
from pipeline.result_table import results_from_table
from pipeline.shard_work import ShardedStage, WorkerSpec, stop_error
from pipeline.shards import SHARDS, STAGED, ShardTask, plan_input, read_results

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.checkpoint import Checkpoint
    from pipeline.feed import Feed

__all__ = ["ShardedStage", "collect_shards", "forget"]

# How often the progress takes the workers' rows from the board's last counts.
ROWS_AHEAD_EVERY_S: Final = 1.0


async def collect_shards(
    feed: Feed, stage: ShardedStage, checkpoint: Checkpoint, gathered: list[Path]
) -> None:
    """The Ray engine's pass: the shards with rows still to do go to the
    workers; each one's journal, once its worker is done with it, is
    gathered into the checkpoint through the collect stage (counted,
    settled against the spend, cached) like the single engine's results."""
    plan = feed.plan
    config = plan.config
    tasks = await _tasks_to_do(feed, stage, checkpoint)
    (plan.run_dir / SHARDS).mkdir(exist_ok=True)
    spec = WorkerSpec(
        config,
        plan.prepared.spec,
        plan.response_format,
        plan.prepared.schema,
        config.api_key(),
        str(plan.run_dir.resolve()),
        feed.spend.price,
    )
    stopped = None
    names: set[str] = set()
    shower = asyncio.create_task(_keep_showing_rows_ahead(feed, stage, names))
    try:
        async for summary in stage.run_shards(tasks, spec, feed.spend.spent):
            directory = plan.run_dir / SHARDS / summary.name
            table = await asyncio.to_thread(read_results, directory)
            names.add(summary.name)
            feed.collected.ahead(_rows_ahead(stage, names))
            for result in results_from_table(table) if table is not None else []:
                feed.spend.settle(result.row_id, result.prompt_tokens, result.completion_tokens)
                await feed.collected.add(result, result.request_key)
            feed.collected.deduplicated += summary.deduplicated
            gathered.append(directory)
            if summary.error_kind is not None and stopped is None:
                stopped = summary
    finally:
        shower.cancel()
        feed.collected.ahead(0)
    if stopped is None or stopped.error_kind == "drain":
        return
    assert stopped.error_kind is not None
    if stopped.error_kind == "SpendCapReached" and isinstance(feed.spend, SpendCap):
        raise feed.spend.error(checkpoint.run_dir)
    raise stop_error(stopped.error_kind, stopped.error_message or "")


async def _tasks_to_do(feed: Feed, stage: ShardedStage, checkpoint: Checkpoint) -> list[ShardTask]:
    """The input's shards that hold rows the checkpoint lacks (a ``shards``
    event says how many, of how many)."""
    plan = feed.plan
    config = plan.config
    shards = await asyncio.to_thread(
        plan_input,
        plan.prepared.source,
        plan.run_dir,
        config.ray.shard_rows,
        checkpoint.manifest.input.sha256,
        needed_columns(plan.prepared.spec),
    )
    tasks = []
    for shard in shards:
        done = feed.done[shard.first_row : shard.stop_row]
        if done.count(0):
            tasks.append(ShardTask(shard, bytes(done) if done.count(1) else None))
    staged = any(Path(shard.path).parent == plan.run_dir / STAGED for shard in shards)
    stage.events.emit(
        "shards",
        message=f"{len(tasks):,} of {len(shards):,} shards to do, for {config.ray.workers} "
        "workers" + (" (the prompt columns staged in the run directory)" if staged else ""),
        shards=len(shards),
        to_do=len(tasks),
        staged=staged,
    )
    return tasks


def _rows_ahead(stage: ShardedStage, gathered: set[str]) -> int:
    """Rows the workers have finished in shards not gathered yet."""
    return sum(rows for name, rows in stage.rows_in_shards.items() if name not in gathered)


async def _keep_showing_rows_ahead(feed: Feed, stage: ShardedStage, gathered: set[str]) -> None:
    """The progress moves as the workers finish rows, not only as whole
    shards are gathered (the board has their counts every second)."""
    while True:
        feed.collected.ahead(_rows_ahead(stage, gathered))
        await asyncio.sleep(ROWS_AHEAD_EVERY_S)


def forget(gathered: Sequence[Path]) -> None:
    """Remove the gathered shards' directories (the checkpoint holds them)."""
    for directory in gathered:
        remove_tree(directory)
