"""The finish stage: the run's summary, built once from what the stages
returned; the report beside the output; the checkpoint removed when nothing
is left to resend; the ``finish`` event. A run that stopped gets its report
too, with what its checkpoint holds, and its error raised again.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.crashpoints import crash_point
from pipeline.durable import remove_trash, remove_tree
from pipeline.errors import EnrichError, ExitCode, RunInterrupted
from pipeline.report import (
    Freshness,
    JobFacts,
    RunRecord,
    build_report,
    page_path_for,
    read_report,
    write_report,
)
from pipeline.summary import RunSummary
from pipeline.tally import Tally

if TYPE_CHECKING:
    from collections.abc import Callable

    from pipeline.call import CallStats
    from pipeline.events import EventSink
    from pipeline.plan import Plan
    from pipeline.timeline import Timeline


@dataclass(frozen=True)
class Outcome:
    """What sending and assembling came to."""

    tally: Tally = field(default_factory=Tally)
    """What the output holds; for a stopped run, what the checkpoint holds
    (nothing, when it stopped before its first pass)."""
    resumed_rows: int = 0
    latencies_ms: array[float] = field(default_factory=lambda: array("d"))
    cache_hits: int = 0
    deduplicated: int = 0
    cost_usd: float | None = None
    batch_requests: int = 0
    """Requests that batches ran for this run (``--route batch``)."""
    error: BaseException | None = None
    """What stopped the run (an ``EnrichError`` or a cancellation), if anything."""


def summarize(plan: Plan, outcome: Outcome, stats: CallStats) -> RunSummary:
    config = plan.config
    tally = outcome.tally
    return RunSummary(
        output=config.output.path,
        run_dir=plan.run_dir,
        rows=tally.rows,
        ok=tally.ok,
        error=tally.error,
        skipped=tally.skipped,
        pending=tally.pending,
        resumed_rows=outcome.resumed_rows,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        requests=stats.requests + outcome.batch_requests,
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        wall_s=time.perf_counter() - plan.started_s,
        bad_answers=stats.bad_answers,
        outages=stats.outages,
        outage_s=stats.outage_s,
        stalled=stats.stalled,
        stall_timeout_s=stats.stall_timeout_s,
        streamed=stats.streamed,
        concurrency_limit=stats.concurrency_limit,
        learned_rpm=stats.learned_rpm,
        learned_tpm=stats.learned_tpm,
        estimated_rpm=stats.estimated_rpm,
        paused_s=stats.paused_s,
        server=stats.server_report(),
        cache_hits=outcome.cache_hits,
        deduplicated=outcome.deduplicated,
        cost_usd=outcome.cost_usd,
        latencies_ms=outcome.latencies_ms,
    )


def skip(plan: Plan, fresh: Freshness, events: EventSink) -> RunSummary:
    """Nothing to do: the output is up to date. The summary is the last
    report's (the only record of that run)."""
    events.emit("skip", message=f"{fresh.reason}; nothing sent (--force redoes it)")
    report = fresh.report or {}
    tally = Tally.of_report(report)
    if not (tally.error or plan.config.output.keep_checkpoint):
        # Left by a kill after the report, before or during the checkpoint's removal.
        remove_tree(plan.run_dir)
        remove_trash(plan.run_dir)
    return RunSummary(
        output=plan.config.output.path,
        run_dir=plan.run_dir,
        rows=tally.rows,
        ok=tally.ok,
        error=tally.error,
        skipped=tally.skipped,
        resumed_rows=tally.rows,
        prompt_tokens=tally.prompt_tokens,
        completion_tokens=tally.completion_tokens,
        cost_usd=0.0,
        up_to_date=True,
    )


def stopped(
    plan: Plan,
    job: JobFacts,
    summary: RunSummary,
    error: BaseException,
    events: EventSink,
    timeline: Timeline | None = None,
) -> NoReturn:
    """Report a run that stopped, then raise what stopped it."""
    message: str | None
    if isinstance(error, EnrichError):
        exit_code, message = error.exit_code, error.message
    else:
        exit_code, message = RunInterrupted.exit_code, str(error) or None
    record = RunRecord(job, summary, exit_code, message, plan.started_at, timeline=timeline)
    _report(plan, record, events)
    raise error


def finished(
    plan: Plan,
    job: JobFacts,
    summary: RunSummary,
    remove_checkpoint: Callable[[], None],
    events: EventSink,
    timeline: Timeline | None = None,
) -> RunSummary:
    config = plan.config
    if summary.error:
        from pipeline.status import error_reasons  # polars: only when rows failed

        reasons = error_reasons(config.output.path, config.output.column_prefix)
        summary = replace(summary, error_reasons=tuple(reasons))
    too_many = summary.error_rate > config.max_error_rate
    exit_code = ExitCode.TOO_MANY_FAILED_ROWS if too_many else ExitCode.OK
    record = RunRecord(job, summary, exit_code, None, plan.started_at, timeline=timeline)
    _report(plan, record, events)
    crash_point("after-report")
    # Failed rows keep the checkpoint: it is what re-sends exactly those rows
    # (pending ones on the next plain run, all with --retry-failed).
    if not (config.output.keep_checkpoint or summary.error):
        remove_checkpoint()
    _emit_finish(plan, summary, events)
    return summary


def _report(plan: Plan, record: RunRecord, events: EventSink) -> None:
    try:
        write_report(plan.report_path, build_report(record), secrets=plan.secrets)
    except OSError as exc:
        # A report is worth having, not worth losing the run's outcome over.
        events.emit(
            "warning",
            level="warning",
            kind="report_not_written",
            message=f"the run report {plan.report_path} could not be written ({exc})",
        )
        return
    if plan.config.output.page and (written := read_report(plan.report_path)) is not None:
        # Drawn from the file as written (secrets scrubbed, numbers as
        # stored), as `enrich report` would draw it.
        _write_page(plan, written, events)


def _write_page(plan: Plan, report: dict[str, Any], events: EventSink) -> None:
    from pipeline.page import PageUnavailable, write_page  # matplotlib: only when drawn

    path = page_path_for(plan.report_path)
    try:
        write_page(path, report)
    except PageUnavailable as exc:
        events.emit("warning", level="warning", kind="page_not_written", message=exc.message)
    except OSError as exc:
        events.emit(
            "warning",
            level="warning",
            kind="page_not_written",
            message=f"the report page {path} could not be written ({exc}); "
            "`enrich report OUTPUT` draws it again from the report",
        )


def _emit_finish(plan: Plan, summary: RunSummary, events: EventSink) -> None:
    pending = (
        f"; {summary.pending:,} failed for transient reasons: the next run sends them again"
        if summary.pending
        else ""
    )
    events.emit(
        "finish",
        message=f"{summary.rows:,} rows -> {summary.output}{pending}",
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
        report=str(plan.report_path),
    )
