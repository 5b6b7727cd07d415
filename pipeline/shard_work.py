"""One worker's job on one shard (plain Python: the Ray engine runs it in a
Ray Data actor, tests run it without a cluster).

The worker reads only its shard's row groups, renders the prompts with the
prompt stage, skips the rows the checkpoint or an earlier attempt's journal
already holds, sends the rest through the single-machine ``CallStage``
(transport, retries, structured output, classification, adaptive
concurrency) and journals each result as it finishes, a group commit every
``checkpoint.flush_interval_s``, in a journal of its own (see
pipeline.shards). When every row of the shard has its result it writes the
shard's done marker. A worker killed mid-shard is restarted by Ray, which
runs the shard again: that attempt pays only for what was in flight.

Identical requests within a shard are sent once (in-run dedup, per shard);
the response cache is not read by workers (see the README, "Running on Ray").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from pipeline import errors, prompt
from pipeline.cache import key_function, resolve_enabled
from pipeline.call import CallStage, CallStats, ChatRequest
from pipeline.costs import Price, PromptBound, cost
from pipeline.errors import EnrichError
from pipeline.journal import JournalWriter
from pipeline.result_table import ROW_ID, TRANSIENT, RowResult, results_to_table, reused
from pipeline.shards import (
    ShardSummary,
    ShardTask,
    new_journal_path,
    read_done,
    read_results,
    read_shard,
    shard_dir,
    write_done,
)

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.config import RunConfig
    from pipeline.events import EventSink, Level

# How often a worker reports and looks for a stop: what the spend cap can be
# passed by, and how long a fatal error takes to reach every worker.
REPORT_EVERY_S: Final = 0.25
# Warnings the board keeps for the driver at most (the oldest go first).
MAX_EVENTS: Final = 1_000


@dataclass(frozen=True)
class Stop:
    """Why every worker stops: the ``pipeline.errors`` class the driver
    raises (``drain``: the driver's own graceful stop) and its message."""

    kind: str
    message: str


@dataclass(frozen=True)
class Notice:
    """A worker's event, as ``EventSink.emit`` was given it."""

    event: str
    level: str
    message: str
    fields: dict[str, Any]


@dataclass
class Board:
    max_cost: float | None = None
    spent: float = 0.0
    """Dollars spent, the checkpoint's included (the cap covers the job)."""
    stop: Stop | None = None
    counts: dict[str, CallStats] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    """Rows finished so far in each shard being enriched, by shard name: what
    the driver's progress shows before it gathers the shard."""
    notices: list[Notice] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    """Each worker's process id, by worker: for the crash tests to aim at."""

    def post_stop(self, stop: Stop) -> None:
        # The first reason stands: what came after was its consequence.
        if self.stop is None:
            self.stop = stop

    def report(
        self,
        worker: str,
        stats: CallStats,
        notices: Sequence[Notice],
        spent_usd: float,
        stop: Stop | None = None,
        finished: tuple[str, int] | None = None,
    ) -> Stop | None:
        """A worker says how it is doing (``stats``: its totals so far;
        ``spent_usd``: what it spent since its last report; ``stop``: the
        run-level error it met; ``finished``: its shard's name and the rows
        finished there so far); the answer says whether to stop."""
        if stop is not None:
            self.post_stop(stop)
        if finished is not None:
            name, rows = finished
            self.rows[name] = rows
        self.counts[worker] = stats
        self.notices.extend(notices)
        del self.notices[:-MAX_EVENTS]
        self.spent += spent_usd
        if self.max_cost is not None and self.spent >= self.max_cost:
            # The driver words it (it knows the checkpoint's share).
            self.post_stop(Stop("SpendCapReached", ""))
        return self.stop

    def take_notices(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices


# The worker's side of the board: (worker, its counts, its new warnings,
# what it spent since the last report, the stop it posts, its shard's name
# and rows finished there) -> the stop posted, if any.
Report = Callable[
    [str, CallStats, list[Notice], float, Stop | None, tuple[str, int] | None],
    Awaitable[Stop | None],
]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs for any shard. ``api_key`` travels as an actor
    argument (never logged, never in the runtime env Ray shows)."""

    config: RunConfig
    spec: prompt.PromptSpec
    response_format: dict[str, Any] | None
    schema: dict[str, Any] | None
    api_key: str
    run_dir: str
    price: Price | None

    def __repr__(self) -> str:
        return f"WorkerSpec(model={self.config.model.name!r}, api_key=<redacted>)"


@dataclass
class NoticeSink:
    """The worker's event sink: warnings wait here for the next report."""

    notices: list[Notice] = field(default_factory=list)

    def emit(self, event: str, *, level: Level = "info", message: str = "", **fields: Any) -> None:
        if level != "info":
            self.notices.append(Notice(event, level, message, fields))

    def take(self) -> list[Notice]:
        notices, self.notices = self.notices, []
        return notices


class ShardJob:
    """One attempt at one shard with the worker's ``stage``."""

    def __init__(
        self, spec: WorkerSpec, stage: CallStage, sink: NoticeSink, report: Report
    ) -> None:
        self.spec = spec
        self.stage = stage
        self._sink = sink
        self._report = report
        config = spec.config
        params = config.model.request_params()
        self._dedup = resolve_enabled(config.cache.dedup, params)
        self._make_key = key_function(
            endpoint=config.model.endpoint(),
            model=config.model.name,
            params=params,
            response_format=spec.response_format,
        )
        self._bound = PromptBound(config.input.max_prompt_tokens, sink)
        self._spent = 0.0
        self._finished: tuple[str, int] | None = None
        """The shard in hand and its rows finished so far (earlier attempts'
        journals included), for the driver's progress."""
        self._buffer: list[RowResult] = []
        # The commit being written. Never cancelled: a job cancelled while
        # still queued in the thread pool would silently drop its answers.
        self._pending: asyncio.Future[None] | None = None
        self.stop: Stop | None = None

    async def run(self, task: ShardTask, worker: str) -> ShardSummary:
        """Enrich the shard; a run-level error comes back in the summary."""
        directory = shard_dir(Path(self.spec.run_dir), task.shard)
        directory.mkdir(parents=True, exist_ok=True)
        finished = read_done(directory)
        if finished is not None:
            return finished
        summary = ShardSummary(task.shard.name, rows=task.shard.rows)
        self.stop = await self._post(worker)
        if self.stop is not None:
            return self._stopped(summary)
        held = self._held(task, directory, summary)
        self._finished = (task.shard.name, summary.journaled)
        failed: Stop | None = None
        writer = JournalWriter(new_journal_path(directory))
        reporter = asyncio.create_task(self._keep_reporting(worker))
        try:
            await self._send(task, held, summary, writer)
            await self._commit(writer)
        except EnrichError as exc:  # a run-level error: every worker must stop
            failed = Stop(type(exc).__name__, str(exc))
            summary.error_kind, summary.error_message = failed.kind, failed.message
        finally:
            reporter.cancel()
            with contextlib.suppress(EnrichError):
                await self._commit(writer)  # what is paid for is kept, if it can be
            writer.close()
            self.stop = await self._post(worker, failed)
        if summary.error_kind is None and self.stop is not None:
            return self._stopped(summary)
        summary.done = summary.error_kind is None and not self.stage.draining
        if summary.done:
            await asyncio.to_thread(write_done, directory, summary)
        return summary

    def _stopped(self, summary: ShardSummary) -> ShardSummary:
        assert self.stop is not None
        summary.error_kind, summary.error_message = self.stop.kind, self.stop.message
        return summary

    def _held(self, task: ShardTask, directory: Path, summary: ShardSummary) -> bytearray:
        """A byte per row of the shard, 1 when its result is final in the
        checkpoint or in an earlier attempt's journal."""
        held = bytearray(task.done) if task.done is not None else bytearray(task.shard.rows)
        earlier = read_results(directory)
        if earlier is not None:
            first = task.shard.first_row
            for row in earlier.select([ROW_ID, "status", TRANSIENT]).to_pylist():
                # Only this run's attempts leave journals here (a checkpoint
                # opened adopts older ones): a permanent error is final even
                # with --retry-failed, which retried it once already.
                final = row["status"] in ("ok", "skipped") or (
                    row["status"] == "error" and not row[TRANSIENT]
                )
                if final and 0 <= row[ROW_ID] - first < len(held):
                    held[row[ROW_ID] - first] = 1
                    summary.journaled += 1
        return held

    async def _send(
        self, task: ShardTask, held: bytearray, summary: ShardSummary, writer: JournalWriter
    ) -> None:
        table = await asyncio.to_thread(
            read_shard, task.shard, prompt.needed_columns(self.spec.spec)
        )
        followers: dict[bytes, list[int]] = {}
        keys: dict[int, bytes] = {}
        requests = self._requests(task, table, held, followers, keys)
        committer = asyncio.create_task(self._keep_committing(writer))
        try:
            async with contextlib.aclosing(self.stage.results(requests)) as results:
                async for result in results:
                    summary.sent += 1
                    key = keys.pop(result.row_id)
                    self._add(result, key)
                    for follower in followers.pop(key, [])[1:]:
                        summary.deduplicated += 1
                        self._add(reused(follower, result), key)
        finally:
            committer.cancel()

    async def _requests(
        self,
        task: ShardTask,
        table: pa.Table,
        held: bytearray,
        followers: dict[bytes, list[int]],
        keys: dict[int, bytes],
    ) -> AsyncIterator[ChatRequest]:
        spec = self.spec.spec
        prompts = prompt.render(spec, table)
        for index, text in enumerate(prompts):
            if held[index]:
                continue
            row_id = task.shard.first_row + index
            if text is None:
                self._add(RowResult.skipped(row_id), None)
                continue
            messages = prompt.messages(spec, text)
            if (refused := self._bound.refused(row_id, messages)) is not None:
                self._add(refused, None)
                continue
            key = self._make_key(messages)
            if self._dedup:
                waiting = followers.setdefault(key, [])
                waiting.append(row_id)
                if len(waiting) > 1:
                    continue  # answered with the first identical row's answer
            keys[row_id] = key
            yield ChatRequest(row_id, messages)

    def _add(self, result: RowResult, key: bytes | None) -> None:
        result.request_key = key
        if result.route is None and result.status != "skipped":
            result.route = "online"
        if self._finished is not None:
            name, rows = self._finished
            self._finished = (name, rows + 1)
        if self.spec.price is not None and not result.cached:
            self._spent += cost(
                result.prompt_tokens or 0, result.completion_tokens or 0, self.spec.price
            )
        self._buffer.append(result)

    async def _commit(self, writer: JournalWriter) -> None:
        """Write what was gathered, after the commit in progress (one at a
        time, in order). Raises ``WriteFailed`` (its batch is kept for the
        next commit)."""
        await self._finish_pending()
        # Taken on the loop, where results are added: none slips between.
        batch, self._buffer = self._buffer, []
        if batch:
            self._pending = asyncio.ensure_future(asyncio.to_thread(self._append, writer, batch))
            await self._finish_pending()

    async def _finish_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            await asyncio.shield(pending)
        finally:
            # Cancelled while it runs: the next commit waits for it.
            if pending.done():
                self._pending = None

    def _append(self, writer: JournalWriter, batch: list[RowResult]) -> None:
        try:
            writer.append(results_to_table(batch))
        except OSError as exc:
            # Answers that cannot be kept must not be bought: the error
            # stops every worker, as a failed commit stops one machine.
            self._buffer[:0] = batch
            raise errors.WriteFailed(
                f"cannot write the shard journal {writer.path} ({exc.strerror or exc}); "
                "what was journaled before is kept: fix the disk of the run directory "
                "(--run-dir), then rerun the same command"
            ) from None

    async def _keep_committing(self, writer: JournalWriter) -> None:
        interval = self.spec.config.checkpoint.flush_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self._commit(writer)
            except EnrichError:
                self.stage.drain()  # the last commit, in ``run``, raises it
                return

    async def _post(self, worker: str, stop: Stop | None = None) -> Stop | None:
        """Report to the board (counts, new warnings, spend since the last
        report, the shard's rows finished, ``stop``); its answer: the stop
        posted, if any."""
        return await self._report(
            worker, self.stage.stats, self._sink.take(), self._take_spent(), stop, self._finished
        )

    def _take_spent(self) -> float:
        spent, self._spent = self._spent, 0.0
        return spent

    async def _keep_reporting(self, worker: str) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            self.stop = await self._post(worker)
            if self.stop is not None:
                self.stage.drain()


@runtime_checkable
class ShardedStage(Protocol):
    """A call stage whose workers enrich whole shards (the Ray engine's)."""

    draining: bool
    events: EventSink
    rows_in_shards: dict[str, int]
    """Rows finished in each shard being enriched, as the board last had them."""

    def run_shards(
        self, tasks: Sequence[ShardTask], spec: WorkerSpec, spent_usd: float
    ) -> AsyncIterator[ShardSummary]: ...


def stop_error(kind: str, message: str) -> EnrichError:
    """The error a stop posted by a worker stands for, as on one machine."""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, EnrichError)):
        cls = errors.ClusterLost
    return cls(message)
