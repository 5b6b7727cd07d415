"""Orchestration: read -> skip what is done -> call -> checkpoint -> write.

Data flows one way. Memory is bounded by the chunk size, the number of
requests in flight and the flush buffer, never by the size of the input.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from array import array
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import prompt, structured, write
from pipeline.cache import (
    DEFAULT_ENDPOINT,
    Admission,
    CachedAnswer,
    InRunDedup,
    ResponseCache,
    default_cache_path,
    key_function,
    resolve_enabled,
)
from pipeline.call import DEFAULT_COMPLETION_ESTIMATE, CallStage, ChatRequest
from pipeline.checkpoint import Checkpoint, PartSweep
from pipeline.config import RunConfig
from pipeline.costs import (
    CostMeter,
    Price,
    PriceTable,
    SpendCap,
    cost,
    prompt_token_estimate,
    unknown_price_message,
)
from pipeline.durable import remove_stale_temps
from pipeline.errors import APIUnreachable, ConfigError, EnrichError, FatalAPIError, RunInterrupted
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
from pipeline.results import ROW_ID, RowResult
from pipeline.status import checkpoint_status
from pipeline.transport import Completion, Messages, Transport, make_transport

# Rows per row group of the final file: big enough for fast scans downstream,
# small enough that assembling (input chunk, results, enriched chunk and the
# compressor's buffers at once) is not the run's peak: 65,536 was, by 40 MB at
# 1M rows.
ASSEMBLY_ROWS: Final = 32_768


@dataclass
class RunSummary:
    output: Path
    run_dir: Path
    rows: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    resumed_rows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    wall_s: float = 0.0
    bad_answers: int = 0
    """Answers that failed the structured-output schema and were asked again."""
    cache_hits: int = 0
    """Rows answered from the response cache (no request)."""
    deduplicated: int = 0
    """Rows that shared an identical request's answer in this run (no request)."""
    cost_usd: float | None = None
    """Estimated spend of this run (None when the model has no known price)."""
    up_to_date: bool = False
    """True when nothing was done because the output was already complete."""
    latencies_ms: array[float] = field(default_factory=lambda: array("d"), repr=False)

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
    source = open_input(config.input.path)
    spec = prompt_spec(config)
    prompt.validate(spec, source.columns(), source=str(source.path))
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


class ResultSink:
    """Buffers results and hands them to the checkpoint (and successful answers
    to the response cache) in a worker thread, so disk IO never stalls the
    event loop. One write in flight at a time keeps parts ordered and memory
    bounded."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        flush_every: int,
        flush_interval_s: float,
        cache: ResponseCache | None = None,
    ) -> None:
        self._checkpoint = checkpoint
        self._cache = cache
        self._flush_every = flush_every
        self._flush_interval_s = flush_interval_s
        self._buffer: list[RowResult] = []
        self._answers: list[tuple[bytes, CachedAnswer]] = []
        self._last_flush = time.monotonic()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrich-flush")
        self._pending: asyncio.Future[None] | None = None

    async def add(self, result: RowResult, cache_key: bytes | None = None) -> None:
        self._buffer.append(result)
        if self._cache is not None and cache_key is not None and result.status == "ok":
            self._answers.append((cache_key, _cached_answer(result)))
        if len(self._buffer) >= self._flush_every or self._interval_elapsed():
            await self.flush()

    def _interval_elapsed(self) -> bool:
        return time.monotonic() - self._last_flush >= self._flush_interval_s

    async def flush(self) -> None:
        """Start writing the buffer; waits only for the previous write."""
        self._last_flush = time.monotonic()
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        answers, self._answers = self._answers, []
        if self._pending is not None:
            await self._pending
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(self._executor, self._write, batch, answers)

    def _write(self, batch: list[RowResult], answers: list[tuple[bytes, CachedAnswer]]) -> None:
        # The checkpoint first: it is what resume trusts; the cache is a bonus.
        self._checkpoint.write_part(batch)
        if self._cache is not None and answers:
            self._cache.put_many(answers)

    async def tick(self) -> None:
        """Flushes on time even when no result arrives (e.g. during a long 429 pause)."""
        while True:
            await asyncio.sleep(self._flush_interval_s / 2)
            if self._interval_elapsed():
                await self.flush()

    async def close(self) -> None:
        await self.flush()
        if self._pending is not None:
            await self._pending
        self._executor.shutdown(wait=True)


def _cached_answer(result: RowResult) -> CachedAnswer:
    return CachedAnswer(
        response=result.response,
        finish_reason=result.finish_reason,
        model=result.model,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )


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
    """Rows still to do, chunk by chunk, with their rendered prompt (None: skip)."""
    chunk_size = prepared.config.input.chunk_size
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
    rows cost a megabyte, where a set of ints would cost ~50)."""
    final = ["ok", "skipped"] if retry_failed else ["ok", "skipped", "error"]
    row_ids = statuses.filter(pl.col("status").is_in(final) & (pl.col(ROW_ID) < total))[ROW_ID]
    # Vectorised: a Python loop over a million ids costs seconds before the
    # first request of a resumed run.
    mask = pl.zeros(total, dtype=pl.UInt8, eager=True).scatter(row_ids, 1)
    return bytearray(mask.to_list())


@dataclass
class Reuse:
    """The run's ways of not paying twice: the response cache across runs and
    in-run dedup of identical requests. Both key on the full request."""

    make_key: Callable[[Messages], bytes] | None = None
    cache: ResponseCache | None = None
    dedup: InRunDedup[RowResult] | None = None


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
        checkpoint, config.checkpoint.flush_every, config.checkpoint.flush_interval_s, reuse.cache
    )
    first_todo = done.find(0)
    start_row = first_todo if first_todo >= 0 else prepared.total_rows
    completion_budget = config.model.max_tokens or DEFAULT_COMPLETION_ESTIMATE
    keys_in_flight: dict[int, bytes] = {}

    async def finish_row(result: RowResult, cache_key: bytes | None = None) -> None:
        await sink.add(result, cache_key)
        progress.advance(result)

    async def requests() -> AsyncIterator[ChatRequest]:
        chunks = _prompt_chunks(prepared, done, start_row)
        while (todo := await asyncio.to_thread(next, chunks, None)) is not None:
            asks: list[tuple[int, Messages, bytes | None]] = []
            for row_id, text in todo:
                if text is None:
                    await finish_row(RowResult.skipped(row_id))
                    continue
                messages = prompt.messages(prepared.spec, text)
                key = reuse.make_key(messages) if reuse.make_key is not None else None
                asks.append((row_id, messages, key))
            hits: dict[bytes, CachedAnswer] = {}
            if reuse.cache is not None:
                keys = [key for _, _, key in asks if key is not None]
                hits = await asyncio.to_thread(reuse.cache.get_many, keys)
            for row_id, ask, key in asks:
                if key is not None and key in hits:
                    summary.cache_hits += 1
                    await finish_row(_reused(row_id, hits[key]))
                    continue
                if key is not None and reuse.dedup is not None:
                    admitted = reuse.dedup.admit(key, row_id)
                    if admitted is Admission.PARKED:
                        continue
                    if isinstance(admitted, RowResult):
                        summary.deduplicated += 1
                        await finish_row(_reused(row_id, admitted))
                        continue
                if isinstance(spend, SpendCap) and not spend.reserve(
                    row_id, prompt_token_estimate(ask), completion_budget
                ):
                    return  # the cap: send nothing more; requests in flight finish
                if key is not None:
                    keys_in_flight[row_id] = key
                yield ChatRequest(row_id, ask)

    ticker = asyncio.create_task(sink.tick())
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
                        await finish_row(_reused(follower, result))
    finally:
        ticker.cancel()
        # Runs on success, fatal errors and cancellation alike: what was paid
        # for reaches the checkpoint.
        await asyncio.shield(sink.close())
        summary.requests = stage.stats.requests
        summary.retries = stage.stats.retries
        summary.rate_limited = stage.stats.rate_limited
        summary.bad_answers = stage.stats.bad_answers
        summary.cost_usd = spend.spent_this_run


def assemble_output(prepared: PreparedRun, checkpoint: Checkpoint, summary: RunSummary) -> None:
    """Write the final file in input order from the input and the parts:
    exactly one row per input row, atomically. With a schema, the answer's
    fields follow as typed columns (parts keep only the text)."""
    config = prepared.config
    prefix = config.output.column_prefix
    base_schema = write.output_schema(prepared.source.schema, prefix)
    schema = base_schema
    fields = None
    if prepared.schema is not None:
        fields = structured.columns_schema(prepared.schema, prefix)
        schema = pa.schema([*base_schema, *fields])
    sweep = PartSweep(checkpoint.parts())
    remove_stale_temps(config.output.path)
    with write.AtomicParquetWriter(config.output.path, schema) as writer:
        for chunk in prepared.source.chunks(ASSEMBLY_ROWS):
            rows = chunk.table.num_rows
            results = sweep.results(chunk.offset, chunk.offset + rows)
            if results.num_rows != rows:
                raise EnrichError(
                    f"{rows - results.num_rows} rows between {chunk.offset} and "
                    f"{chunk.offset + rows} have no result in {checkpoint.run_dir}; "
                    "run the same command again to finish them"
                )
            enriched = write.enriched_chunk(chunk.table, results, base_schema)
            if fields is not None:
                answers = [
                    structured.load_answer(text) if status == "ok" else None
                    for text, status in zip(
                        results.column("response").to_pylist(),
                        results.column("status").to_pylist(),
                        strict=True,
                    )
                ]
                typed = structured.to_columns(answers, fields)
                for index, field in enumerate(fields):
                    enriched = enriched.append_column(field, typed.column(index))
            writer.write(enriched)
            _tally(summary, results)


def _tally(summary: RunSummary, results: Any) -> None:
    summary.rows += results.num_rows
    counts = results.column("status").value_counts().to_pylist()
    for entry in counts:
        status, count = entry["values"], entry["counts"]
        if status in ("ok", "error", "skipped"):
            setattr(summary, status, getattr(summary, status) + count)
    summary.prompt_tokens += pc.sum(results.column("prompt_tokens")).as_py() or 0
    summary.completion_tokens += pc.sum(results.column("completion_tokens")).as_py() or 0


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

    if not (options.force or options.restart or options.retry_failed):
        fresh = check_up_to_date(
            report_path,
            output=config.output.path,
            input_path=config.input.path,
            fingerprint=fingerprint(settings),
            output_settings={"column_prefix": config.output.column_prefix},
        )
        if fresh.up_to_date and fresh.report is not None:
            events.emit("skip", message=f"{fresh.reason}; nothing sent (--force redoes it)")
            return _summary_from_report(summary, fresh.report)

    prices = PriceTable.load(config.price_file)
    if config.max_cost is not None:
        price: Price | None = prices.require(config.model.name, "--max-cost")
    else:
        price = prices.price_for(config.model.name)
        if price is None:
            events.emit(
                "warning",
                level="warning",
                kind="unknown_price",
                message=unknown_price_message(config.model.name),
            )

    checkpoint = Checkpoint.open(
        run_dir,
        config.input.path,
        settings,
        input_rows=prepared.total_rows,
        restart=options.restart or options.force,
    )
    # One read of the checkpoint serves both what is done and what it cost.
    spent = checkpoint.latest_results(["status", "prompt_tokens", "completion_tokens"])
    done = _done_rows(spent, prepared.total_rows, options.retry_failed)
    summary.resumed_rows = done.count(1)
    already = (
        cost(
            int(spent["prompt_tokens"].sum() or 0),
            int(spent["completion_tokens"].sum() or 0),
            price,
        )
        if price is not None
        else 0.0
    )
    del spent  # a frame of every row done so far: not worth holding for the whole run
    spend: SpendCap | CostMeter = (
        SpendCap(config.max_cost, price, already_spent=already)
        if config.max_cost is not None and price is not None
        else CostMeter(price, already_spent=already)
    )
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
        body["reuse"] = {
            "cache_hits": summary.cache_hits,
            "deduplicated": summary.deduplicated,
            "requests_saved": summary.cache_hits + summary.deduplicated,
        }
        write_report(report_path, body, secrets=[config.api_key()])

    reuse = _open_reuse(prepared)
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
    progress.start(prepared.total_rows, summary.resumed_rows)
    try:
        await _run_calls(prepared, checkpoint, stage, done, progress, summary, spend, reuse)
    except (FatalAPIError, APIUnreachable, asyncio.CancelledError) as exc:
        _count_checkpoint(summary, run_dir)
        report(
            exc.exit_code if isinstance(exc, EnrichError) else RunInterrupted.exit_code,
            str(exc) or None,
        )
        raise
    finally:
        if watcher is not None:
            watcher.cancel()
        progress.close()
        if reuse.cache is not None:
            reuse.cache.close()
        if own_transport:
            await transport.aclose()

    stopped: EnrichError | None = None
    if stage.draining:
        stopped = _interrupted(config)
    elif isinstance(spend, SpendCap) and spend.reached:
        stopped = spend.error(run_dir)
    if stopped is not None:
        _count_checkpoint(summary, run_dir)
        report(stopped.exit_code, stopped.message)
        raise stopped

    await asyncio.to_thread(assemble_output, prepared, checkpoint, summary)
    too_many = summary.error_rate > config.max_error_rate
    # Too many failures: keep the checkpoint so --retry-failed re-sends only those.
    if not (config.output.keep_checkpoint or too_many):
        checkpoint.remove()
    report(1 if too_many else 0, None)
    events.emit(
        "finish",
        message=f"{summary.rows:,} rows -> {summary.output}",
        rows=summary.rows,
        ok=summary.ok,
        error=summary.error,
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


def _open_reuse(prepared: PreparedRun) -> Reuse:
    config = prepared.config
    params = config.model.request_params()
    use_cache = resolve_enabled(config.cache.enabled, params)
    use_dedup = resolve_enabled(config.cache.dedup, params)
    if not (use_cache or use_dedup):
        return Reuse()
    make_key = key_function(
        endpoint=config.model.resolved_base_url() or DEFAULT_ENDPOINT,
        model=config.model.name,
        params=params,
        response_format=prepared.response_format,
    )
    return Reuse(
        make_key=make_key,
        cache=ResponseCache(config.cache.path or default_cache_path()) if use_cache else None,
        # With the cache on, it finds answers dedup has forgotten: remember few.
        dedup=(InRunDedup(10_000 if use_cache else 100_000) if use_dedup else None),
    )


def _count_checkpoint(summary: RunSummary, run_dir: Path) -> None:
    """Counts for a stopped run's report: what the checkpoint holds."""
    status = checkpoint_status(run_dir)
    if status is None:
        return
    summary.rows = status.done
    summary.ok, summary.error, summary.skipped = status.ok, status.error, status.skipped
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
