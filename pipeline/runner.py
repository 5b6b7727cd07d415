"""Orchestration: one run, read as its stages.

    up to date? -> plan (price, checkpoint) -> resume point (what is done)
      -> feed (render, carried answers, cache, dedup, spend cap) -> send (call stage)
      -> collect (journal + cache, durable within --flush-interval)
      -> assemble (input order, atomic) -> finish (report, checkpoint removal)

Data flows one way. Memory is bounded by the chunk size, the number of
requests in flight and the commit buffer, never by the size of the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline import prompt, structured, write
from pipeline.assemble import Tally, assemble_output
from pipeline.cache import (
    DEFAULT_ENDPOINT,
    Admission,
    BestEffortCache,
    CachedAnswer,
    InRunDedup,
    ResponseCache,
    default_cache_path,
    key_function,
    resolve_enabled,
)
from pipeline.call import DEFAULT_COMPLETION_ESTIMATE, CallStage, ChatRequest
from pipeline.checkpoint import Checkpoint, DamagedPart
from pipeline.collect import ResultSink
from pipeline.config import RunConfig
from pipeline.costs import (
    CostMeter,
    Price,
    PriceTable,
    PromptBound,
    SpendCap,
    checkpoint_spend,
    prompt_token_estimate,
    unknown_price_message,
)
from pipeline.crashpoints import crash_point
from pipeline.durable import disk_full_error, remove_trash, remove_tree
from pipeline.errors import (
    ConfigError,
    EnrichError,
    ExitCode,
    RunInterrupted,
    WriteFailed,
)
from pipeline.events import EventSink, NullEventSink
from pipeline.lock import RunLock, lock_path_for, takeover_message
from pipeline.progress import NoProgress, Progress
from pipeline.read import InputSource, open_input
from pipeline.report import (
    build_report,
    check_up_to_date,
    fingerprint,
    report_path_for,
    write_report,
)
from pipeline.results import ROW_ID, TRANSIENT, RowResult
from pipeline.transport import Completion, Messages, Transport, make_transport

# Input bytes per chunk at most, whatever --chunk-size says.
FEED_BYTES: Final = 16 << 20

if TYPE_CHECKING:
    # polars is imported where a checkpoint's results are read (a resumed
    # run); a fresh run sends its first request without it.
    import polars as pl


@dataclass
class RunSummary:
    output: Path
    run_dir: Path
    rows: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    pending: int = 0
    """Errors whose last failure was transient: the next run sends them again."""
    resumed_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    wall_s: float = 0.0
    bad_answers: int = 0
    """Answers that failed the structured-output schema and were asked again."""
    outages: int = 0
    """Times the API stopped answering and the run waited, probing."""
    outage_s: float = 0.0
    stalled: int = 0
    """Requests cut because no byte came for the stall timeout (then retried)."""
    stall_timeout_s: float | None = None
    """The stall timeout the run ended with (learned unless --stall-timeout)."""
    streamed: bool | None = None
    """Whether answers were streamed (None: no request was answered)."""
    cache_hits: int = 0
    """Rows answered from the response cache (no request)."""
    deduplicated: int = 0
    """Rows that shared an identical request's answer in this run (no request)."""
    cost_usd: float | None = None
    """Estimated spend of this run (None when the model has no known price)."""
    up_to_date: bool = False
    """True when nothing was done because the output was already complete."""
    latencies_ms: array[float] = field(default_factory=lambda: array("d"), repr=False)
    server: dict[str, Any] = field(default_factory=dict)
    """What the server did (see ``CallStats.server_report``)."""

    @property
    def processed_rows(self) -> int:
        """Rows finished by this run (not carried over from a checkpoint)."""
        return self.rows - self.resumed_rows

    @property
    def rows_per_s(self) -> float:
        return self.processed_rows / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        attempted = self.ok + self.error
        return self.error / attempted if attempted else 0.0

    def latency_percentile(self, percent: int) -> float | None:
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else None
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[percent - 1]


def answer_settings(
    config: RunConfig, response_format: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that changes an answer: a checkpoint made under other values
    must not be mixed into this run's output."""
    spec = prompt_spec(config)
    settings = {
        **prompt.fingerprint_fields(spec),
        "model": config.model.name,
        "params": config.model.request_params(),
    }
    if response_format is not None:
        settings["response_format"] = response_format
    return settings


def prompt_spec(config: RunConfig) -> prompt.PromptSpec:
    return prompt.PromptSpec(
        column=config.input.column,
        template=config.input.template,
        system_prompt=config.input.system_prompt,
    )


@dataclass
class PreparedRun:
    """Everything validated before the first request."""

    config: RunConfig
    source: InputSource
    spec: prompt.PromptSpec
    total_rows: int
    schema: dict[str, Any] | None = None
    """The JSON Schema answers must follow (structured output), if any."""

    @property
    def response_format(self) -> dict[str, Any] | None:
        if self.schema is None:
            return None
        return structured.response_format(self.schema, self.config.structured.name)

    @property
    def settings(self) -> dict[str, Any]:
        return answer_settings(self.config, self.response_format)


def prepare(config: RunConfig, *, check_output: bool = True) -> PreparedRun:
    """Validate input, prompt and output; raises typed errors, sends nothing.
    ``check_output=False`` for commands that write nothing (estimate)."""
    config.model.resolved_base_url()  # a bad $OPENAI_BASE_URL stops here, before any write
    source = open_input(config.input.path)
    spec = prompt_spec(config)
    prompt.validate(spec, source.columns(), source=str(source.path))
    prompt.check_types(spec, source.schema, source=str(source.path))
    if check_output:
        write.check_output_path(config.output.path, config.input.path)
    taken = [
        *source.columns(),
        *write.output_column_names(source.columns(), config.output.column_prefix),
    ]
    schema = None
    if config.structured.json_schema is not None:
        schema = structured.load_schema(config.structured.json_schema)
        fields = structured.columns_schema(schema, config.output.column_prefix).names
        clashes = sorted(set(fields) & set(taken))
        if clashes:
            raise ConfigError(
                f"the schema's fields {', '.join(clashes)} clash with input or result columns; "
                "rename them in the schema or set --column-prefix"
            )
    return PreparedRun(config, source, spec, source.count_rows(), schema)


def _reused(row_id: int, answer: RowResult | CachedAnswer) -> RowResult:
    """A row answered without a request of its own: tokens are the original
    request's (what the answer took), attempts 0 and no latency (nothing paid)."""
    return RowResult(
        row_id=row_id,
        status=answer.status if isinstance(answer, RowResult) else "ok",
        response=answer.response,
        error=answer.error if isinstance(answer, RowResult) else None,
        attempts=0,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        finish_reason=answer.finish_reason,
        model=answer.model,
        cached=True,
    )


def _prompt_chunks(
    prepared: PreparedRun, done: bytearray, start_row: int
) -> Iterator[list[tuple[int, str | None]]]:
    """Rows still to do, chunk by chunk, with their rendered prompt (None: skip).
    Chunks hold ``--chunk-size`` rows, fewer when rows are large: the chunk,
    its rendered prompts and their messages are in memory at once."""
    chunk_size = prepared.source.rows_within(FEED_BYTES, prepared.config.input.chunk_size)
    for chunk in prepared.source.chunks(chunk_size, start_row=start_row):
        prompts = prompt.render(prepared.spec, chunk.table)
        todo = [
            (row_id, text)
            for row_id, text in enumerate(prompts, start=chunk.offset)
            if not done[row_id]
        ]
        if todo:
            yield todo


def _done_rows(statuses: pl.DataFrame, total: int, retry_failed: bool) -> bytearray:
    """A byte per input row, 1 when its result is final (a bytearray: a million
    rows cost a megabyte, where a set of ints would cost ~50). A row that
    failed for a transient reason is pending, never final; a permanent
    failure is final unless ``retry_failed``."""
    import polars as pl

    status = pl.col("status")
    final = status.is_in(["ok", "skipped"])
    if not retry_failed:
        final = final | ((status == "error") & ~pl.col(TRANSIENT).fill_null(False))
    row_ids = statuses.filter(final & (pl.col(ROW_ID) < total))[ROW_ID]
    # Vectorised: a Python loop over a million ids costs seconds before the
    # first request of a resumed run.
    mask = pl.zeros(total, dtype=pl.UInt8, eager=True).scatter(row_ids, 1)
    return bytearray(mask.to_list())


@dataclass
class Reuse:
    """The run's ways of not paying twice, all keyed on the full request: the
    answers carried over from a run over an earlier version of the input, the
    response cache across runs, and in-run dedup of identical requests."""

    make_key: Callable[[Messages], bytes]
    cache: BestEffortCache | None = None
    dedup: InRunDedup[RowResult] | None = None
    carried: ResponseCache | None = None

    @property
    def lookups(self) -> list[ResponseCache | BestEffortCache]:
        return [store for store in (self.carried, self.cache) if store is not None]

    def close(self) -> None:
        for store in self.lookups:
            store.close()


async def _answers_for(reuse: Reuse, keys: list[bytes]) -> dict[bytes, CachedAnswer]:
    hits: dict[bytes, CachedAnswer] = {}
    for store in reuse.lookups:
        missing = [key for key in keys if key not in hits]
        if missing:
            hits.update(await asyncio.to_thread(store.get_many, missing))
    return hits


async def _run_calls(
    prepared: PreparedRun,
    checkpoint: Checkpoint,
    stage: CallStage,
    done: bytearray,
    progress: Progress,
    summary: RunSummary,
    spend: SpendCap | CostMeter,
    reuse: Reuse,
) -> None:
    config = prepared.config
    sink = ResultSink(
        checkpoint.writer(config.checkpoint.flush_every),
        config.checkpoint.flush_interval_s,
        reuse.cache,
        # A commit that fails (full disk) stops the sending: answers that
        # cannot be kept must not be bought.
        on_failure=lambda _exc: stage.drain(),
    )
    first_todo = done.find(0)
    start_row = first_todo if first_todo >= 0 else prepared.total_rows
    completion_budget = config.model.max_tokens or DEFAULT_COMPLETION_ESTIMATE
    keys_in_flight: dict[int, bytes] = {}
    bound = PromptBound(config.input.max_prompt_tokens, stage.events)

    async def finish_row(result: RowResult, key: bytes | None = None) -> None:
        result.request_key = key
        await sink.add(result)
        progress.advance(result)

    async def requests() -> AsyncIterator[ChatRequest]:
        chunks = _prompt_chunks(prepared, done, start_row)
        while (todo := await asyncio.to_thread(next, chunks, None)) is not None:
            asks: list[tuple[int, Messages, bytes]] = []
            for row_id, text in todo:
                if text is None:
                    await finish_row(RowResult.skipped(row_id))
                    continue
                messages = prompt.messages(prepared.spec, text)
                if (refused := bound.refused(row_id, messages)) is not None:
                    await finish_row(refused)
                    continue
                asks.append((row_id, messages, reuse.make_key(messages)))
            hits = await _answers_for(reuse, [key for _, _, key in asks])
            for row_id, ask, key in asks:
                if key in hits:
                    summary.cache_hits += 1
                    await finish_row(_reused(row_id, hits[key]), key)
                    continue
                if reuse.dedup is not None:
                    admitted = reuse.dedup.admit(key, row_id)
                    if admitted is Admission.PARKED:
                        continue
                    if isinstance(admitted, RowResult):
                        summary.deduplicated += 1
                        await finish_row(_reused(row_id, admitted), key)
                        continue
                if isinstance(spend, SpendCap) and not await spend.admit(
                    row_id, prompt_token_estimate(ask), completion_budget
                ):
                    return  # the cap: send nothing more; requests in flight finish
                keys_in_flight[row_id] = key
                yield ChatRequest(row_id, ask)

    committer = asyncio.create_task(sink.run())
    try:
        # aclosing: leaving the loop early (fatal error, Ctrl-C) stops the workers now.
        async with contextlib.aclosing(stage.results(requests())) as results:
            async for result in results:
                spend.settle(result.row_id, result.prompt_tokens, result.completion_tokens)
                if result.latency_ms is not None:
                    summary.latencies_ms.append(result.latency_ms)
                key = keys_in_flight.pop(result.row_id, None)
                await finish_row(result, key)
                if key is not None and reuse.dedup is not None:
                    followers = reuse.dedup.settle(key, result, ok=result.status == "ok")
                    summary.deduplicated += len(followers)
                    for follower in followers:
                        await finish_row(_reused(follower, result), key)
    finally:
        committer.cancel()
        summary.requests = stage.stats.requests
        summary.retries = stage.stats.retries
        summary.rate_limited = stage.stats.rate_limited
        summary.bad_answers = stage.stats.bad_answers
        summary.outages = stage.stats.outages
        summary.outage_s = stage.stats.outage_s
        summary.stalled = stage.stats.stalled
        summary.stall_timeout_s = stage.stats.stall_timeout_s
        summary.streamed = stage.stats.streamed
        summary.server = stage.stats.server_report()
        summary.cost_usd = spend.spent_this_run
        # Runs on success, fatal errors and cancellation alike: what was paid
        # for reaches the checkpoint.
        await asyncio.shield(_close_sink(sink, checkpoint.run_dir))
    if sink.failure is not None:
        raise _write_failed(sink.failure, checkpoint.run_dir)


async def _close_sink(sink: ResultSink, run_dir: Path) -> None:
    try:
        await sink.close()
    except Exception as exc:
        raise _write_failed(exc, run_dir) from None


def _write_failed(exc: BaseException, run_dir: Path) -> EnrichError:
    if isinstance(exc, EnrichError):
        return exc
    return disk_full_error(exc, run_dir) or WriteFailed(
        f"cannot write the checkpoint in {run_dir} ({exc}); what was finished before is "
        "kept: fix the disk or choose another --run-dir, then rerun the same command"
    )


@dataclass(frozen=True)
class RunOptions:
    """How this invocation treats existing state (not part of the job's config)."""

    restart: bool = False
    """Discard the checkpoint and start over."""
    retry_failed: bool = False
    """Send the rows whose status is error again."""
    force: bool = False
    """Redo the job even if the output is up to date (implies restart)."""


async def enrich_async(
    config: RunConfig,
    *,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
    events: EventSink | None = None,
    transport: Transport | None = None,
    stop: asyncio.Event | None = None,
) -> RunSummary:
    """Run (or resume) one enrichment job. Raises typed errors; never prints.

    One run per output at a time (a lock beside it); an output that is already
    complete for this input and these settings is left alone. Setting ``stop``
    ends the run gracefully: no new request is sent, those in flight get up to
    ``DRAIN_GRACE_S`` to finish, everything finished is flushed, and
    ``RunInterrupted`` is raised.
    """
    events = events or NullEventSink()
    prepared = prepare(config)
    secrets = [config.api_key()]
    with RunLock(lock_path_for(config.output.path), secrets=secrets) as lock:
        if lock.stale_holder is not None:
            events.emit(
                "warning",
                level="warning",
                kind="stale_lock",
                message=takeover_message(lock.path, lock.stale_holder),
            )
        return await _locked_run(prepared, options, progress, events, transport, stop)


async def _locked_run(
    prepared: PreparedRun,
    options: RunOptions,
    progress: Progress | None,
    events: EventSink,
    transport: Transport | None,
    stop: asyncio.Event | None,
) -> RunSummary:
    config = prepared.config
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    run_dir = config.output.resolved_run_dir
    report_path = config.output.report or report_path_for(config.output.path)
    settings = prepared.settings
    summary = RunSummary(output=config.output.path, run_dir=run_dir)

    fresh = _up_to_date(prepared, options, report_path)
    if fresh is not None:
        events.emit("skip", message=f"{fresh.reason}; nothing sent (--force redoes it)")
        failed_rows = fresh.report.get("counts", {}).get("error")
        if not (failed_rows or config.output.keep_checkpoint):
            # Left by a kill after the report, before or during the checkpoint's removal.
            remove_tree(run_dir)
            remove_trash(run_dir)
        return _summary_from_report(summary, fresh.report)

    price = _price(config, events)
    checkpoint = Checkpoint.open(
        run_dir,
        config.input.path,
        settings,
        input_rows=prepared.total_rows,
        restart=options.restart or options.force,
        on_input_change=config.checkpoint.on_input_change,
    )
    _emit_warnings(events, checkpoint)

    def report(exit_code: int, message: str | None) -> None:
        summary.wall_s = time.perf_counter() - started
        body = build_report(
            summary,
            output=config.output.path,
            settings=config.model_dump(mode="json"),
            fingerprint=fingerprint(settings),
            exit_code=exit_code,
            message=message,
            input_identity=checkpoint.manifest.input,
            input_rows=prepared.total_rows,
            output_settings={"column_prefix": config.output.column_prefix},
            price=price,
            model=config.model.name,
            cost_this_run=summary.cost_usd,
            max_cost=config.max_cost,
            started_at=started_at,
            secrets=[config.api_key()],
        )
        body["requests"]["bad_structured_answers"] = summary.bad_answers
        body["requests"]["outages"] = summary.outages
        body["requests"]["outage_s"] = round(summary.outage_s, 3)
        body["requests"]["stalled"] = summary.stalled
        body["requests"]["stall_timeout_s"] = (
            None if summary.stall_timeout_s is None else round(summary.stall_timeout_s, 3)
        )
        body["requests"]["streamed"] = summary.streamed
        body["server"] = summary.server
        body["reuse"] = {
            "cache_hits": summary.cache_hits,
            "deduplicated": summary.deduplicated,
            "requests_saved": summary.cache_hits + summary.deduplicated,
        }
        try:
            write_report(report_path, body, secrets=[config.api_key()])
        except OSError as exc:
            # A report is worth having, not worth losing the run's outcome over.
            events.emit(
                "warning",
                level="warning",
                kind="report_not_written",
                message=f"the run report {report_path} could not be written ({exc})",
            )

    reuse = _open_reuse(prepared, checkpoint, events)
    own_transport = transport is None
    transport = transport or make_transport(
        config.model,
        config.api_key(),
        config.model.transport,
        extra_params=(
            {"response_format": prepared.response_format} if prepared.response_format else None
        ),
    )
    stage = CallStage(
        config.model,
        config.limits,
        transport,
        check_answer=_answer_check(prepared.schema),
        answer_attempts=config.structured.max_attempts,
        events=events,
    )
    watcher = None
    if stop is not None:
        this_task = asyncio.current_task()
        assert this_task is not None
        watcher = asyncio.create_task(_drain_on(stop, stage, this_task))
    progress = progress or NoProgress()
    try:
        tally = await _send_and_assemble(
            prepared, options, checkpoint, stage, progress, summary, price, reuse, events
        )
    except (EnrichError, asyncio.CancelledError) as exc:
        _count_checkpoint(summary, run_dir)
        if isinstance(exc, EnrichError):
            report(exc.exit_code, exc.message)
        else:
            report(RunInterrupted.exit_code, str(exc) or None)
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        progress.close()
        reuse.close()
        if own_transport:
            await transport.aclose()

    _apply_tally(summary, tally)
    too_many = summary.error_rate > config.max_error_rate
    report(ExitCode.TOO_MANY_FAILED_ROWS if too_many else ExitCode.OK, None)
    crash_point("after-report")
    # Failed rows keep the checkpoint: it is what re-sends exactly those rows
    # (pending ones on the next plain run, all with --retry-failed).
    if not (config.output.keep_checkpoint or summary.error):
        checkpoint.remove()
    events.emit(
        "finish",
        message=f"{summary.rows:,} rows -> {summary.output}"
        + (
            f"; {summary.pending:,} failed for transient reasons: the next run sends them again"
            if summary.pending
            else ""
        ),
        rows=summary.rows,
        ok=summary.ok,
        error=summary.error,
        pending=summary.pending,
        skipped=summary.skipped,
        resumed=summary.resumed_rows,
        prompt_tokens=summary.prompt_tokens,
        completion_tokens=summary.completion_tokens,
        cost_usd=summary.cost_usd,
        cache_hits=summary.cache_hits,
        deduplicated=summary.deduplicated,
        wall_s=round(summary.wall_s, 3),
        rows_per_s=round(summary.rows_per_s, 2),
        report=str(report_path),
    )
    return summary


# A part found damaged while assembling sends its rows again; a disk that
# keeps damaging what is written gets this many tries.
MAX_ASSEMBLY_PASSES: Final = 3


async def _send_and_assemble(
    prepared: PreparedRun,
    options: RunOptions,
    checkpoint: Checkpoint,
    stage: CallStage,
    progress: Progress,
    summary: RunSummary,
    price: Price | None,
    reuse: Reuse,
    events: EventSink,
) -> Tally:
    """Send what the checkpoint lacks, then write the output from it."""
    config = prepared.config
    for attempt in range(1, MAX_ASSEMBLY_PASSES + 1):
        done, already = _resume_point(checkpoint, prepared.total_rows, options, price)
        _emit_warnings(events, checkpoint)
        spend: SpendCap | CostMeter = (
            SpendCap(config.max_cost, price, already_spent=already)
            if config.max_cost is not None and price is not None
            else CostMeter(price, already_spent=already)
        )
        if attempt == 1:
            summary.resumed_rows = done.count(1)
            _emit_start(events, prepared, summary)
            progress.start(prepared.total_rows, summary.resumed_rows)
        await _run_calls(prepared, checkpoint, stage, done, progress, summary, spend, reuse)
        if stage.draining:
            raise _interrupted(config)
        if isinstance(spend, SpendCap) and spend.reached:
            raise spend.error(checkpoint.run_dir)
        try:
            return await asyncio.to_thread(
                assemble_output,
                prepared.source,
                checkpoint,
                config.output.path,
                prefix=config.output.column_prefix,
                schema=prepared.schema,
            )
        except DamagedPart:
            _emit_warnings(events, checkpoint)
    raise WriteFailed(
        f"checkpoint parts in {checkpoint.run_dir} were found damaged {MAX_ASSEMBLY_PASSES} "
        "times in a row; check the disk, then rerun the same command"
    )


def _resume_point(
    checkpoint: Checkpoint, total: int, options: RunOptions, price: Price | None
) -> tuple[bytearray, float]:
    """What is done (see ``_done_rows``) and what it cost, in one read of the
    checkpoint; a fresh run reads nothing (and so imports no polars)."""
    if not checkpoint.has_results():
        return bytearray(total), 0.0
    spent = checkpoint.latest_results(
        ["status", TRANSIENT, "prompt_tokens", "completion_tokens", "cached"]
    )
    done = _done_rows(spent, total, options.retry_failed)
    return done, 0.0 if price is None else checkpoint_spend(spent, price)


@dataclass(frozen=True)
class UpToDate:
    reason: str
    report: dict[str, Any]


def _up_to_date(prepared: PreparedRun, options: RunOptions, report_path: Path) -> UpToDate | None:
    """The last report, when this run has nothing to do; else None."""
    if options.force or options.restart:
        return None
    config = prepared.config
    fresh = check_up_to_date(
        report_path,
        output=config.output.path,
        input_path=config.input.path,
        fingerprint=fingerprint(prepared.settings),
        output_settings={"column_prefix": config.output.column_prefix},
    )
    if not fresh.up_to_date or fresh.report is None:
        return None
    if options.retry_failed and fresh.report.get("counts", {}).get("error"):
        return None
    return UpToDate(fresh.reason, fresh.report)


def _price(config: RunConfig, events: EventSink) -> Price | None:
    prices = PriceTable.load(config.price_file)
    if config.max_cost is not None:
        return prices.require(config.model.name, "--max-cost")
    price = prices.price_for(config.model.name)
    if price is None:
        events.emit(
            "warning",
            level="warning",
            kind="unknown_price",
            message=unknown_price_message(config.model.name),
        )
    return price


def _emit_warnings(events: EventSink, checkpoint: Checkpoint) -> None:
    for message in checkpoint.warnings:
        events.emit("warning", level="warning", kind="checkpoint", message=message)
    checkpoint.warnings.clear()


def _emit_start(events: EventSink, prepared: PreparedRun, summary: RunSummary) -> None:
    config = prepared.config
    events.emit(
        "start",
        message=f"enriching {prepared.total_rows:,} rows of {config.input.path} "
        f"({summary.resumed_rows:,} already done) with {config.model.name}",
        rows=prepared.total_rows,
        resumed=summary.resumed_rows,
        model=config.model.name,
        output=str(config.output.path),
        max_cost=config.max_cost,
    )


def _apply_tally(summary: RunSummary, tally: Tally) -> None:
    summary.rows, summary.ok, summary.error = tally.rows, tally.ok, tally.error
    summary.skipped, summary.pending = tally.skipped, tally.pending
    summary.prompt_tokens = tally.prompt_tokens
    summary.completion_tokens = tally.completion_tokens


def _answer_check(schema: dict[str, Any] | None) -> Callable[[Completion], str | None] | None:
    """With a schema, what is wrong with an answer (None when it validates)."""
    if schema is None:
        return None

    def problem(completion: Completion) -> str | None:
        try:
            structured.parse_answer(completion.text, schema, finish_reason=completion.finish_reason)
        except structured.StructuredAnswerError as exc:
            return exc.reason
        return None

    return problem


def _open_reuse(prepared: PreparedRun, checkpoint: Checkpoint, events: EventSink) -> Reuse:
    config = prepared.config
    params = config.model.request_params()
    use_cache = resolve_enabled(config.cache.enabled, params)
    use_dedup = resolve_enabled(config.cache.dedup, params)
    # Keys are made even with cache and dedup off: the checkpoint keeps them,
    # so a run over a changed input can reuse what did not change.
    make_key = key_function(
        endpoint=config.model.resolved_base_url() or DEFAULT_ENDPOINT,
        model=config.model.name,
        params=params,
        response_format=prepared.response_format,
    )
    return Reuse(
        make_key=make_key,
        cache=(
            BestEffortCache.open(
                config.cache.path or default_cache_path(),
                on_warning=lambda message: events.emit(
                    "warning", level="warning", kind="cache", message=message
                ),
            )
            if use_cache
            else None
        ),
        # With the cache on, it finds answers dedup has forgotten: remember few.
        dedup=(
            InRunDedup(10_000 if use_cache else 100_000, weigh=_answer_bytes) if use_dedup else None
        ),
        carried=checkpoint.carried(),
    )


def _answer_bytes(result: RowResult) -> int:
    return len(result.response or "")


def _count_checkpoint(summary: RunSummary, run_dir: Path) -> None:
    """Counts for a stopped run's report: what the checkpoint holds."""
    from pipeline.status import checkpoint_status  # polars: only a stopped run's report

    try:
        status = checkpoint_status(run_dir)
    except EnrichError:
        return  # a report without counts beats no report
    if status is None:
        return
    summary.rows = status.done
    summary.ok, summary.error, summary.skipped = status.ok, status.error, status.skipped
    summary.pending = status.pending
    summary.prompt_tokens = status.prompt_tokens
    summary.completion_tokens = status.completion_tokens


def _summary_from_report(summary: RunSummary, report: dict[str, Any]) -> RunSummary:
    counts = report.get("counts", {})
    tokens = report.get("tokens", {})
    summary.up_to_date = True
    summary.rows = int(counts.get("rows", 0))
    summary.ok = int(counts.get("ok", 0))
    summary.error = int(counts.get("error", 0))
    summary.skipped = int(counts.get("skipped", 0))
    summary.resumed_rows = summary.rows
    summary.prompt_tokens = int(tokens.get("prompt", 0))
    summary.completion_tokens = int(tokens.get("completion", 0))
    summary.cost_usd = 0.0
    return summary


# How long a graceful stop waits for requests in flight: they are paid for,
# but schedulers (Airflow, Kubernetes) send SIGKILL some 30 s after SIGTERM.
DRAIN_GRACE_S: Final = 10.0


async def _drain_on(stop: asyncio.Event, stage: CallStage, run: asyncio.Task[Any]) -> None:
    await stop.wait()
    stage.drain()
    await asyncio.sleep(DRAIN_GRACE_S)
    # Still waiting (a long retry-after, a hung request): stop now; what is
    # finished is flushed on the way out.
    run.cancel()


def _interrupted(config: RunConfig) -> RunInterrupted:
    return RunInterrupted(
        f"interrupted; finished rows are saved in {config.output.resolved_run_dir}; "
        "run the same command again to resume"
    )


def enrich(
    config: RunConfig,
    *,
    options: RunOptions = RunOptions(),
    progress: Progress | None = None,
    events: EventSink | None = None,
    handle_signals: bool = False,
) -> RunSummary:
    """Synchronous entry point (what a cron job's CLI or an Airflow task calls).

    With ``handle_signals`` (the CLI), the first Ctrl-C or SIGTERM stops
    gracefully (see ``enrich_async``) and a second one stops at once; either
    way finished rows are flushed and ``RunInterrupted`` is raised. Without it,
    Ctrl-C still flushes and raises ``RunInterrupted``.
    """

    async def main() -> RunSummary:
        stop = asyncio.Event()
        if handle_signals:
            task = asyncio.current_task()
            assert task is not None

            def on_signal() -> None:
                if stop.is_set():
                    task.cancel()
                stop.set()

            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal)
        try:
            return await enrich_async(
                config, options=options, progress=progress, events=events, stop=stop
            )
        except asyncio.CancelledError:
            if stop.is_set():
                raise _interrupted(config) from None
            raise

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise _interrupted(config) from None
