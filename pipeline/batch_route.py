"""The batch route: the rows still to do, sent through a provider's Batch API
and collected into the same checkpoint and response cache as the online route.

One pass goes round until nothing is left or out::

    write files (the feed: cache, skipped rows, in-file dedup)
      -> upload -> create the batch (spend cap checked) -> poll
      -> download output and error files -> results committed -> collected

Every step is recorded in the ledger (``batch_ledger``) before the next one,
so a killed run resumes where it was and never submits a row twice. What
goes wrong has a way forward:

- a transient error line (5xx, 429) sends its row again in a later file, a
  permanent one (400, content filter) is the row's error, as online;
- an expired or cancelled batch keeps what it completed; the rest is sent
  again;
- a full enqueued-token queue (``token_limit_exceeded``) keeps the file
  queued until a running batch finishes;
- a batch that fails validation stops the run with the provider's reason;
- ``--finish-online-after``: past that age, batches still out are cancelled
  (their finished part kept) and the rest goes online;
- ``--no-wait``: submit and exit 6; the next run polls and collects.

How a batch is sent is the client's business (``batch_openai``); this module
is provider-neutral.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pipeline.batch_ledger import (
    BATCH_DIR,
    FileEntry,
    Ledger,
    batch_summary,
    in_flight,
    now_iso,
    read_ledger,
)
from pipeline.batch_openai import BatchClient, BatchInfo, OpenAIBatchClient, QueueFull
from pipeline.batch_prepare import FileWriter, check_cap, open_batch_feed
from pipeline.batch_results import LineResult, file_answers, not_run, read_lines
from pipeline.collect import ResultSink, commit_error
from pipeline.config import ModelConfig
from pipeline.crashpoints import crash_point
from pipeline.errors import (
    APIUnreachable,
    BatchesPending,
    BatchFailed,
    CheckpointMismatch,
    FatalAPIError,
    RunInterrupted,
)

if TYPE_CHECKING:
    from pipeline.checkpoint import Checkpoint
    from pipeline.events import EventSink
    from pipeline.feed import Feed
    from pipeline.results import RowResult

# Written by ``enrich cancel`` for a run that is waiting on its batches.
CANCEL_MARK: Final = "cancel-requested"

FIRST_POLL_S: Final = 1.0
POLL_GROWTH: Final = 1.5

RouteEnd = Literal["done", "online"]


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class BatchPass:
    """One run's batch pass over ``feed`` (its rows still to do)."""

    feed: Feed
    checkpoint: Checkpoint
    client: BatchClient
    ledger: Ledger
    stop: asyncio.Event | None = None
    events: EventSink | None = None
    clock: Callable[[], datetime] = _now
    _sink: ResultSink | None = field(default=None, init=False)
    _pending: bytearray = field(default_factory=bytearray, init=False)
    _unanswered: dict[int, str] = field(default_factory=dict, init=False)
    """Rows whose last batch ended before it ran them (expired, cancelled),
    and how it ended: they get a pending error if no later batch answers."""
    _queue_full: bool = field(default=False, init=False)
    _failure: BatchFailed | None = field(default=None, init=False)

    async def run(self) -> RouteEnd:
        """Send and collect until nothing is left (``done``) or the deadline
        of ``--finish-online-after`` sends the rest online (``online``).
        Raises ``BatchesPending`` (``--no-wait``), ``BatchFailed``,
        ``SpendCapReached``, ``RunInterrupted`` and the client's errors, after
        everything collected is committed."""
        plan = self.feed.plan
        config = plan.config
        sink = ResultSink(
            self.checkpoint.writer(config.checkpoint.flush_every),
            config.checkpoint.flush_interval_s,
            self.feed.reuse.cache,
        )
        self._sink = sink
        self.feed.collected.attach(sink)
        # A mark left by `enrich cancel` before this run began was for an earlier one.
        self._cancel_mark.unlink(missing_ok=True)
        committer = asyncio.create_task(sink.run())
        try:
            return await self._rounds()
        finally:
            committer.cancel()
            await asyncio.shield(sink.close())
            if sink.failure is not None:
                raise commit_error(sink.failure, self.checkpoint.run_dir)

    @property
    def _cancel_mark(self) -> Path:
        return self.ledger.directory / CANCEL_MARK

    async def _rounds(self) -> RouteEnd:
        config = self.feed.plan.config
        self._pending = self.feed.done.translate(_FLIP)
        for row in await asyncio.to_thread(lambda: list(self.ledger.live_rows())):
            self._pending[row] = 0
        rounds, delay = 0, FIRST_POLL_S
        while True:
            self._check_stop()
            cancelling = self._cancel_mark.exists()
            await self._advance(cancelling)
            if self._failure is not None:
                raise self._failure
            if cancelling and not self.ledger.live():
                self._cancel_mark.unlink(missing_ok=True)
                raise RunInterrupted(
                    "batches cancelled by `enrich cancel`; what they finished is saved; run "
                    "the same command again to send the rest"
                )
            if self._past_deadline():
                await self._cancel_and_collect()
                return "online"
            if not cancelling and rounds < config.limits.max_attempts and 1 in self._pending:
                rounds += 1
                if await self._write_round():
                    delay = FIRST_POLL_S
                    continue
            if not self.ledger.live():
                await self._give_up_unanswered()
                return "done"
            if not config.batch.wait:
                raise BatchesPending(self._pending_message())
            await self._sleep(delay)
            delay = min(delay * POLL_GROWTH, config.batch.poll_interval_s)

    def _say(self, entry: FileEntry, what: str, **fields: Any) -> None:
        if self.events is not None:
            self.events.emit(
                "batch",
                message=f"{entry.name} ({entry.rows:,} rows): {what}",
                file=entry.name,
                rows=entry.rows,
                batch_id=entry.batch_id,
                **fields,
            )

    def _check_stop(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise RunInterrupted(
                f"interrupted; submitted batches keep running and finished rows are saved in "
                f"{self.checkpoint.run_dir}; run the same command again to collect them"
            )

    async def _sleep(self, seconds: float) -> None:
        if self.stop is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def _pending_message(self) -> str:
        live = self.ledger.live()
        rows = sum(entry.rows for entry in live)
        return (
            f"{len(live)} batch file(s) with {rows:,} rows are submitted and not finished yet; "
            "rerun the same command later to collect them (`enrich status` shows them)"
        )

    async def _write_round(self) -> bool:
        """Files for the rows pending; False when none was needed."""
        feed = self.feed
        done = self._pending.translate(_FLIP)
        start = done.find(0)
        if start < 0:
            return False
        round_feed = replace(feed, done=done, start_row=start, in_flight={})
        written = await FileWriter(round_feed, self.ledger).write()
        # Every pending row is now in a file or answered (skipped, cached).
        self._pending = bytearray(len(self._pending))
        crash_point("batch-after-write")
        return bool(written)

    async def _advance(self, cancelling: bool = False) -> None:
        """Take each live file one step (or more) further; with ``cancelling``
        (``enrich cancel``), submit nothing more and cancel what is out."""
        self._queue_full = False  # one try per pass: other jobs may have freed the queue
        for entry in list(self.ledger.live()):
            self._check_stop()
            if entry.state == "written" and not cancelling:
                entry = await self._upload(entry)
            if entry.state == "creating":
                entry = await self._adopt(entry)
            if entry.state in ("written", "uploaded") and cancelling:
                self.ledger.update(entry.name, state="failed", reason="cancelled before submission")
                continue
            if entry.state == "uploaded":
                entry = await self._create(entry)
            if entry.state == "submitted" and cancelling and entry.status not in _WINDING_DOWN:
                assert entry.batch_id is not None
                await self.client.cancel(entry.batch_id)
            if entry.state == "submitted":
                await self._poll(entry)

    async def _upload(self, entry: FileEntry) -> FileEntry:
        data = await asyncio.to_thread(self.ledger.data_path(entry.name).read_bytes)
        file_id = await self.client.upload(entry.name, data)
        crash_point("batch-after-upload")
        return self.ledger.update(entry.name, state="uploaded", file_id=file_id)

    async def _adopt(self, entry: FileEntry) -> FileEntry:
        """A run killed while creating this file's batch: the batch it may
        have made is found by its input file, never made twice."""
        assert entry.file_id is not None
        found = await self.client.find(entry.file_id)
        if found is None:
            return self.ledger.update(entry.name, state="uploaded")
        return self._submitted(entry, found)

    async def _create(self, entry: FileEntry) -> FileEntry:
        if self._queue_full:
            return entry
        config = self.feed.plan.config
        check_cap(config.max_cost, self.feed.spend, self.ledger, entry, self.checkpoint.run_dir)
        entry = self.ledger.update(entry.name, state="creating")
        assert entry.file_id is not None
        try:
            info = await self.client.create(entry.file_id)
        except QueueFull as exc:
            return self._requeue(entry, str(exc))
        crash_point("batch-after-create")
        return self._submitted(entry, info)

    def _submitted(self, entry: FileEntry, info: BatchInfo) -> FileEntry:
        self._say(
            replace(entry, batch_id=info.id), f"submitted as batch {info.id}", state="submitted"
        )
        return self.ledger.update(
            entry.name,
            state="submitted",
            batch_id=info.id,
            status=info.status,
            submitted_at=entry.submitted_at or now_iso(),
            reason=None,
        )

    def _requeue(self, entry: FileEntry, reason: str) -> FileEntry:
        """The enqueued-token limit: the file waits for a running batch."""
        self._queue_full = True
        self._say(entry, f"queued: {reason}", state="queued")
        return self.ledger.update(
            entry.name, state="uploaded", batch_id=None, status="queued", reason=reason
        )

    async def _poll(self, entry: FileEntry) -> None:
        assert entry.batch_id is not None
        info = await self.client.get(entry.batch_id)
        crash_point("batch-while-polling")
        if (info.status, info.completed, info.failed) != (
            entry.status,
            entry.completed,
            entry.failed,
        ):
            entry = self.ledger.update(
                entry.name, status=info.status, completed=info.completed, failed=info.failed
            )
        if info.done:
            await self._collect(entry, info)

    async def _collect(self, entry: FileEntry, info: BatchInfo) -> None:
        if info.status == "failed":
            self._failed(entry, info)
            return
        plan = self.feed.plan
        lines: list[LineResult] = []
        for file_id in (info.output_file_id, info.error_file_id):
            if file_id:
                data = await self.client.download(file_id)
                crash_point("batch-while-downloading")
                lines.extend(
                    read_lines(
                        data,
                        model=plan.config.model.name,
                        latency_ms=info.turnaround_ms,
                        check_answer=plan.check_answer,
                    )
                )
        asked = await asyncio.to_thread(self.ledger.asked, entry.name)
        answers = file_answers(asked, lines)
        await self._commit(answers.results)
        for row in answers.unanswered:
            self._pending[row] = 1
            self._unanswered[row] = info.status
        for result, _ in answers.results:
            self._unanswered.pop(result.row_id, None)
            if result.transient:
                self._pending[result.row_id] = 1
        self.ledger.update(entry.name, state="collected")
        self.ledger.forget_data(entry.name)
        self._say(
            entry,
            f"batch {info.status}: {len(answers.results):,} rows answered, "
            f"{len(answers.unanswered):,} to send again",
            state="collected",
            status=info.status,
        )

    async def _give_up_unanswered(self) -> None:
        """Rows no batch of this run ran, ``--max-attempts`` files later:
        pending errors, sent again by the next run (as online rows whose
        attempts ran out)."""
        if not self._unanswered:
            return
        results: list[tuple[RowResult, bytes | None]] = [
            (not_run(row, status), None) for row, status in sorted(self._unanswered.items())
        ]
        self._unanswered.clear()
        await self._commit(results)

    async def _commit(self, results: list[tuple[RowResult, bytes | None]]) -> None:
        """Results into the checkpoint and cache, durable before the file is
        marked collected (so it is downloaded again only if this is cut)."""
        feed, sink = self.feed, self._sink
        assert sink is not None
        for result, key in results:
            if not result.cached:
                feed.spend.settle(result.row_id, result.prompt_tokens, result.completion_tokens)
                feed.collected.batch_requests += result.attempts
            await feed.collected.add(result, key)
        await sink.flush()
        await sink.flush()  # waits for the first: the results are durable
        if sink.failure is not None:
            raise commit_error(sink.failure, self.checkpoint.run_dir)

    def _failed(self, entry: FileEntry, info: BatchInfo) -> None:
        if info.queue_full:
            self._requeue(entry, info.reason())
            return
        self.ledger.update(entry.name, state="failed", reason=info.reason())
        self._failure = BatchFailed(
            f"batch {info.id} ({entry.name}, {entry.rows:,} rows) failed validation: "
            f"{info.reason()}; its rows were not answered: fix the cause, then rerun the "
            "same command (they go into a new batch)"
        )

    def _past_deadline(self) -> bool:
        after = self.feed.plan.config.batch.finish_online_after_s
        if after is None:
            return False
        times = [t for e in self.ledger.live() if (t := e.submitted_time()) is not None]
        return bool(times) and self.clock() - min(times) >= timedelta(seconds=after)

    async def _cancel_and_collect(self) -> None:
        """Past ``--finish-online-after``: cancel what is out, keep what it
        finished, and leave the rest to the online route."""
        for entry in self.ledger.live():
            self._say(entry, "past --finish-online-after: cancelled, the rest goes online")
            if entry.state == "creating":
                entry = await self._adopt(entry)
            if entry.state == "submitted":
                assert entry.batch_id is not None
                await self.client.cancel(entry.batch_id)
            else:
                self.ledger.update(entry.name, state="failed", reason="sent online instead")
        delay = FIRST_POLL_S
        while self.ledger.live():
            for entry in self.ledger.live():
                await self._poll(entry)
            if self.ledger.live():
                await self._sleep(delay)
                delay = min(delay * POLL_GROWTH, self.feed.plan.config.batch.poll_interval_s)


_FLIP: Final = bytes([1, 0]) + bytes(254)
# Batch statuses that a cancel would not change.
_WINDING_DOWN: Final = frozenset({"cancelling", "cancelled", "completed", "expired", "failed"})


async def cancel_batches(ledger: Ledger, client: BatchClient) -> list[FileEntry]:
    """``enrich cancel``: cancel every submitted batch (the next run collects
    what they finished) and tell a run that waits on them to stop."""
    cancelled = []
    for entry in ledger.live():
        if entry.state != "submitted" or entry.batch_id is None:
            continue
        try:
            await client.cancel(entry.batch_id)
        except FatalAPIError:
            # Refused because it finished meanwhile: nothing to cancel.
            if not (await client.get(entry.batch_id)).done:
                raise
            continue
        cancelled.append(entry)
    (ledger.directory / CANCEL_MARK).touch()
    return cancelled


def cancel_run(run_dir: Path) -> int | None:
    """``enrich cancel``: the batches of the run in ``run_dir`` cancelled
    through the endpoint the run used (its key from the variable it named);
    how many, or None when the run has no batches."""
    return asyncio.run(cancel_in(run_dir))


async def cancel_in(run_dir: Path) -> int | None:
    """``cancel_run`` inside a running loop."""
    ledger = read_ledger(run_dir)
    if ledger is None:
        return None
    model = ModelConfig(name="-", base_url=ledger.endpoint, api_key_env=ledger.api_key_env)
    client = OpenAIBatchClient(model, os.environ.get(ledger.api_key_env) or "sk-no-key-set")
    try:
        return len(await cancel_batches(ledger, client))
    finally:
        await client.aclose()


async def cancel_before_restart(run_dir: Path, events: EventSink) -> None:
    """``--restart`` discards the run directory, and with it the only record
    of its batches: cancel those still in flight first, or they would run on
    (and be billed) with nobody to collect them."""
    ledger = read_ledger(run_dir)
    if ledger is None or not ledger.live():
        return
    try:
        cancelled = await cancel_in(run_dir)
    except (FatalAPIError, APIUnreachable) as exc:
        raise CheckpointMismatch(
            f"--restart would discard {len(ledger.live())} batch file(s) still in flight, "
            f"and cancelling them failed ({exc}); cancel them with `enrich cancel` or on the "
            f"provider's console, or delete {run_dir} to leave them running, then rerun"
        ) from None
    events.emit(
        "warning",
        level="warning",
        kind="batches_cancelled",
        message=f"--restart cancelled {cancelled} batch(es) of the discarded run; "
        "what they finished is not collected",
    )


async def send_batches(
    feed: Feed,
    checkpoint: Checkpoint,
    stop: asyncio.Event | None = None,
    events: EventSink | None = None,
) -> RouteEnd:
    """The batch pass of a run over ``feed`` (``open_batch_feed``), through
    the provider at the run's base URL."""
    config = feed.plan.config
    ledger = await asyncio.to_thread(
        Ledger.open,
        feed.plan.run_dir,
        config.model.endpoint(),
        config.model.api_key_env,
        checkpoint.manifest.input.sha256,
    )
    client = OpenAIBatchClient(
        config.model,
        config.api_key(),
        attempts=config.limits.max_attempts,
        backoff_s=config.limits.backoff_base_s,
        backoff_max_s=config.limits.backoff_max_s,
    )
    try:
        return await BatchPass(feed, checkpoint, client, ledger, stop, events).run()
    finally:
        await client.aclose()


__all__ = [
    "BATCH_DIR",
    "BatchPass",
    "RouteEnd",
    "batch_summary",
    "cancel_batches",
    "cancel_before_restart",
    "cancel_in",
    "cancel_run",
    "in_flight",
    "open_batch_feed",
    "send_batches",
]
