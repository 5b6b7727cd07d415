"""The resume point: what is already done, and whether anything is to do.

An output that is already the complete answer for this input and these
settings is left alone (``up_to_date``); otherwise the checkpoint is opened
(or made) and read once: which rows are final, what they hold and what they
cost. A fresh run reads nothing (and so imports no polars).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.checkpoint import Checkpoint
from pipeline.costs import Price, PriceTable, checkpoint_spend, unknown_price_message
from pipeline.events import EventSink
from pipeline.plan import Plan
from pipeline.report import Freshness, check_up_to_date, read_report
from pipeline.results import ROW_ID, TRANSIENT
from pipeline.tally import Tally
from pipeline.timeline import previous_segments

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

    from pipeline.wiring import RunOptions


def up_to_date(plan: Plan, options: RunOptions) -> Freshness | None:
    """The last report, when this run has nothing to do; else None."""
    if options.force or options.restart:
        return None
    config = plan.config
    fresh = check_up_to_date(
        plan.report_path,
        output=config.output.path,
        input_path=config.input.path,
        fingerprint=plan.fingerprint,
        output_settings={"column_prefix": config.output.column_prefix},
    )
    if not fresh.up_to_date or fresh.report is None:
        return None
    if options.retry_failed and fresh.report.get("counts", {}).get("error"):
        return None
    return fresh


def job_price(plan: Plan, events: EventSink) -> Price | None:
    """The model's price; required with --max-cost, else a warning when unknown."""
    config = plan.config
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


def open_checkpoint(plan: Plan, options: RunOptions, events: EventSink) -> Checkpoint:
    config = plan.config
    checkpoint = Checkpoint.open(
        plan.run_dir,
        config.input.path,
        plan.settings,
        input_rows=plan.total_rows,
        restart=options.restart or options.force,
        on_input_change=config.checkpoint.on_input_change,
    )
    emit_warnings(events, checkpoint)
    return checkpoint


def earlier_segments(plan: Plan, checkpoint: Checkpoint) -> list[dict[str, Any]]:
    """The timeline segments of the runs this one resumes, from the last
    report (none for a fresh start, or when that report is another job's)."""
    if not checkpoint.has_results():
        return []
    return previous_segments(
        read_report(plan.report_path),
        fingerprint=plan.fingerprint,
        input_sha256=checkpoint.manifest.input.sha256,
    )


def emit_warnings(events: EventSink, checkpoint: Checkpoint) -> None:
    for message in checkpoint.warnings:
        events.emit("warning", level="warning", kind="checkpoint", message=message)
    checkpoint.warnings.clear()


@dataclass(frozen=True)
class ResumePoint:
    done: bytearray
    """A byte per input row, 1 when its result is final (a bytearray: a
    million rows cost a megabyte, where a set of ints would cost ~50). A row
    that failed for a transient reason is pending, never final; a permanent
    failure is final unless ``--retry-failed``."""
    final: Tally
    """What the final rows hold."""
    unsettled: pa.Table | None
    """The results of the rows that are to be sent again (row id, status,
    tokens): until a new result replaces one, it is what the checkpoint holds
    for that row."""
    spent_usd: float
    """What the checkpoint's results cost (0 without a price)."""

    @property
    def first_todo(self) -> int:
        first = self.done.find(0)
        return first if first >= 0 else len(self.done)

    def held(self, answered: bytearray, collected: Tally) -> Tally:
        """What the checkpoint holds once ``collected`` (the results of the
        rows marked in ``answered``) is added: a stopped run's counts, from
        what the run has in hand rather than read back from disk."""
        held = self.final + collected
        if self.unsettled is None or self.unsettled.num_rows == 0:
            return held
        import pyarrow as pa
        import pyarrow.compute as pc

        marks = pa.Array.from_buffers(pa.uint8(), len(answered), [None, pa.py_buffer(answered)])
        kept = pc.equal(pc.take(marks, self.unsettled.column(ROW_ID)), 0)
        return held + Tally.of_table(self.unsettled.filter(kept))


_COLUMNS = ["status", TRANSIENT, "prompt_tokens", "completion_tokens", "cached", "route"]


def resume_point(
    checkpoint: Checkpoint, total: int, options: RunOptions, price: Price | None
) -> ResumePoint:
    """What is done, what it holds and what it cost, in one read of the checkpoint."""
    if not checkpoint.has_results():
        return ResumePoint(bytearray(total), Tally(), None, 0.0)
    import polars as pl

    latest = checkpoint.latest_results(_COLUMNS)
    final_mask = _final(latest, total, options.retry_failed)
    final = latest.filter(final_mask)
    # Vectorised: a Python loop over a million ids costs seconds before the
    # first request of a resumed run.
    done = pl.zeros(total, dtype=pl.UInt8, eager=True).scatter(final[ROW_ID], 1)
    # Rows answered from the cache or by dedup were not paid for by this job.
    spent = 0.0 if price is None else checkpoint_spend(latest, price)
    return ResumePoint(
        done=bytearray(done.to_list()),
        final=Tally.of_table(final.to_arrow()),
        unsettled=latest.filter(~final_mask & (pl.col(ROW_ID) < total)).to_arrow(),
        spent_usd=spent,
    )


def _final(latest: pl.DataFrame, total: int, retry_failed: bool) -> pl.Series:
    import polars as pl

    status = pl.col("status")
    final = status.is_in(["ok", "skipped"])
    if not retry_failed:
        final = final | ((status == "error") & ~pl.col(TRANSIENT).fill_null(False))
    return latest.select(final & (pl.col(ROW_ID) < total)).to_series()
