"""One run, read as its stages::

    plan -> up to date? -> resume point -> feed -> send -> collect
         -> assemble (input order, atomic) -> finish (report, cleanup)

Each stage is a module named after it and passes typed values to the next;
data flows one way. Memory is bounded by the chunk size, the number of
requests in flight and the commit buffer, never by the size of the input.
"""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Final

from pipeline.assemble import assemble
from pipeline.errors import EnrichError, WriteFailed
from pipeline.feed import Feed, Reuse, open_feed, open_reuse
from pipeline.finish import Outcome, finished, skip, stopped, summarize
from pipeline.plan import Plan, PreparedRun, make_plan
from pipeline.resume import (
    earlier_segments,
    emit_warnings,
    job_price,
    open_checkpoint,
    resume_point,
    up_to_date,
)
from pipeline.send import DRAIN_GRACE_S as DRAIN_GRACE_S
from pipeline.send import cancel_before_restart, open_batch_feed, open_stage, send, send_batches
from pipeline.timeline import Timeline

if TYPE_CHECKING:
    from pipeline.call import CallStage
    from pipeline.checkpoint import Checkpoint
    from pipeline.costs import Price
    from pipeline.events import EventSink
    from pipeline.head import Head
    from pipeline.resume import ResumePoint
    from pipeline.summary import RunSummary
    from pipeline.tally import Tally
    from pipeline.wiring import RunOptions, Wiring

# A part found damaged while assembling sends its rows again; a disk that
# keeps damaging what is written gets this many tries.
MAX_ASSEMBLY_PASSES: Final = 3


async def run(
    prepared: PreparedRun, options: RunOptions, wiring: Wiring, head: Head | None = None
) -> RunSummary:
    """Run (or resume) one job, the output's lock held. Raises typed errors.
    With a ``head`` (a fresh run's first rows, already sent through its call
    stage), the first pass takes its results and its stage."""
    plan = make_plan(prepared)
    events = wiring.events
    if head is None:
        fresh = up_to_date(plan, options)
        if fresh is not None:
            return skip(plan, fresh, events)
    else:  # the run started when the head did
        plan = replace(plan, started_at=head.plan.started_at, started_s=head.plan.started_s)
    timeline = wiring.timeline or Timeline()
    price = timeline.price = job_price(plan, events)
    if head is None and (options.restart or options.force):
        await cancel_before_restart(plan.run_dir, events)
    checkpoint = open_checkpoint(plan, options, events)
    job = plan.job(
        checkpoint.manifest.input,
        price,
        estimate=await asyncio.to_thread(plan.estimate, price),
        earlier_segments=earlier_segments(plan, checkpoint),
    )
    reuse = _reuse(plan, checkpoint, head, events)
    # Every finished row reaches the timeline on its way to the progress.
    wiring = replace(wiring, progress=timeline.watching(wiring.progress))
    try:
        async with _stage(plan, wiring, head) as stage:
            passes = _Passes(plan, options, checkpoint, stage, reuse, price, wiring, head)
            timeline.bind(stage, passes.reused)
            sampler = asyncio.create_task(timeline.run())
            try:
                outcome = await passes.send_and_assemble()
            finally:
                sampler.cancel()
    finally:
        wiring.progress.close()
        if head is None:
            reuse.close()  # the head's is closed by its opener
    summary = summarize(plan, outcome, stage.stats)
    if outcome.error is not None:
        stopped(plan, job, summary, outcome.error, events, timeline)
    return finished(plan, job, summary, checkpoint.remove, events, timeline)


def _reuse(plan: Plan, checkpoint: Checkpoint, head: Head | None, events: EventSink) -> Reuse:
    if head is None:
        return open_reuse(
            plan.config, plan.response_format, checkpoint.carried(), _cache_warning(events)
        )
    head.reuse.carried = checkpoint.carried()
    return head.reuse


def _stage(
    plan: Plan, wiring: Wiring, head: Head | None
) -> contextlib.AbstractAsyncContextManager[CallStage]:
    if head is not None:
        return contextlib.nullcontext(head.stage)
    return open_stage(plan, wiring.transport, wiring.events, wiring.stop)


def _cache_warning(events: EventSink) -> Callable[[str], None]:
    def warn(message: str) -> None:
        events.emit("warning", level="warning", kind="cache", message=message)

    return warn


@dataclass
class _Passes:
    """Send what the checkpoint lacks, then write the output from it; again
    when assembly finds a damaged part (its rows are sent again)."""

    plan: Plan
    options: RunOptions
    checkpoint: Checkpoint
    stage: CallStage
    reuse: Reuse
    price: Price | None
    wiring: Wiring
    head: Head | None = None
    """A fresh run's first rows under way: the first online pass takes them."""
    feeds: list[tuple[ResumePoint, Feed]] = field(default_factory=list)
    """Each pass's resume point and feed, the last one current."""

    def reused(self) -> tuple[int, int]:
        """Rows answered so far from the cache and by in-run dedup."""
        collected = [feed.collected for _, feed in self.feeds]
        return sum(c.cache_hits for c in collected), sum(c.deduplicated for c in collected)

    async def send_and_assemble(self) -> Outcome:
        plan, checkpoint, feeds = self.plan, self.checkpoint, self.feeds
        try:
            for attempt in range(1, MAX_ASSEMBLY_PASSES + 1):
                point = resume_point(checkpoint, plan.total_rows, self.options, self.price)
                emit_warnings(self.wiring.events, checkpoint)
                if attempt == 1:
                    self._start(point.done.count(1))
                await self._send(point)
                tally = await asyncio.to_thread(assemble, plan, checkpoint)
                if tally is not None:
                    return _outcome(feeds, tally)
                emit_warnings(self.wiring.events, checkpoint)
            raise WriteFailed(
                f"checkpoint parts in {checkpoint.run_dir} were found damaged "
                f"{MAX_ASSEMBLY_PASSES} times in a row; check the disk, then rerun the same command"
            )
        except (EnrichError, asyncio.CancelledError) as exc:
            return _outcome(feeds, None, exc)

    async def _send(self, point: ResumePoint) -> None:
        """One pass by the job's route: the batch route first (``--route
        batch``), then online for what it leaves (``--finish-online-after``)."""
        plan, wiring = self.plan, self.wiring
        if plan.config.route == "batch":
            feed = open_batch_feed(
                plan, point, self.reuse, self.price, wiring.progress, wiring.events
            )
            self.feeds.append((point, feed))
            if await send_batches(feed, self.checkpoint, wiring.stop, wiring.events) == "done":
                return
            point = resume_point(self.checkpoint, plan.total_rows, self.options, self.price)
        feed = open_feed(plan, point, self.reuse, self.price, wiring.progress, wiring.events)
        self.feeds.append((point, feed))
        head, self.head = self.head, None
        await send(feed, self.stage, self.checkpoint, head)

    def _start(self, resumed: int) -> None:
        plan = self.plan
        config = plan.config
        self.wiring.events.emit(
            "start",
            message=f"enriching {plan.total_rows:,} rows of {config.input.path} "
            f"({resumed:,} already done) with {config.model.name}",
            rows=plan.total_rows,
            resumed=resumed,
            model=config.model.name,
            output=str(config.output.path),
            max_cost=config.max_cost,
        )
        self.wiring.progress.start(plan.total_rows, resumed)
        if self.head is not None:
            self.head.events.release()  # what its requests met, after `start`


def _outcome(
    feeds: list[tuple[ResumePoint, Feed]],
    output: Tally | None,
    error: BaseException | None = None,
) -> Outcome:
    """What the passes came to. Without an output, the counts are what the
    checkpoint holds: the last pass's resume point plus what it collected."""
    if not feeds:
        return Outcome(error=error)
    last_point, last_feed = feeds[-1]
    collected = last_feed.collected
    tally = output
    if tally is None:
        tally = last_point.held(collected.answered, collected.counter.tally())
    latencies = array("d")
    costs = []
    for _, feed in feeds:
        latencies.extend(feed.collected.latencies_ms)
        costs.append(feed.spend.spent_this_run)
    return Outcome(
        tally=tally,
        resumed_rows=feeds[0][0].done.count(1),
        latencies_ms=latencies,
        cache_hits=sum(feed.collected.cache_hits for _, feed in feeds),
        deduplicated=sum(feed.collected.deduplicated for _, feed in feeds),
        cost_usd=None if None in costs else sum(c or 0.0 for c in costs),
        batch_requests=sum(feed.collected.batch_requests for _, feed in feeds),
        error=error,
    )
