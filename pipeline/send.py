"""The send stage: the call stage over one pass's feed, each result on its
way to the collect stage.

Sending stops, without losing anything paid for, on a fatal API error, an
outage past its bound, the spend cap, a commit that fails (a full disk) and
a stop request (``pipeline.stage``: no new request, those in flight get
``DRAIN_GRACE_S``); whatever was finished is committed on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Final

from pipeline.collect import ResultSink, commit_error
from pipeline.crashpoints import crash_point
from pipeline.errors import RunInterrupted
from pipeline.feed import Feed, reused
from pipeline.prefetch import Prefetch, modules_for
from pipeline.send_shards import ShardedStage, collect_shards, forget
from pipeline.stage import DRAIN_GRACE_S as DRAIN_GRACE_S
from pipeline.stage import open_stage as open_stage

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.batch_route import RouteEnd
    from pipeline.call import CallStage
    from pipeline.checkpoint import Checkpoint
    from pipeline.costs import Price
    from pipeline.events import EventSink
    from pipeline.feed import Reuse
    from pipeline.head import Head
    from pipeline.plan import Plan
    from pipeline.progress import Progress
    from pipeline.resume import ResumePoint

__all__ = ["cancel_before_restart", "open_batch_feed", "send", "send_batches"]


# pipeline.batch_ledger.BATCH_DIR (tests/test_startup.py checks they agree),
# named here so that a run directory without it does not load the batch route.
BATCH_DIR: Final = "batch"


def open_batch_feed(
    plan: Plan,
    point: ResumePoint,
    reuse: Reuse,
    price: Price | None,
    progress: Progress,
    events: EventSink,
) -> Feed:
    """The batch route's feed (``pipeline.batch_prepare.open_batch_feed``).
    The batch route's modules are imported here, when a run takes it: an
    online run's first request does not wait for them."""
    from pipeline.batch_route import open_batch_feed as batch_feed

    return batch_feed(plan, point, reuse, price, progress, events)


async def cancel_before_restart(run_dir: Path, events: EventSink) -> None:
    """``pipeline.batch_route.cancel_before_restart``. Only a run directory
    that holds the batch route's directory can have batches in flight: for
    any other the batch route's modules are not loaded."""
    if not (run_dir / BATCH_DIR).exists():
        return
    from pipeline.batch_route import cancel_before_restart as cancel

    await cancel(run_dir, events)


async def send_batches(
    feed: Feed,
    checkpoint: Checkpoint,
    stop: asyncio.Event | None = None,
    events: EventSink | None = None,
) -> RouteEnd:
    """The batch pass of a run (``pipeline.batch_route.send_batches``)."""
    from pipeline.batch_route import send_batches as batches

    return await batches(feed, checkpoint, stop, events)


async def send(
    feed: Feed, stage: CallStage, checkpoint: Checkpoint, head: Head | None = None
) -> None:
    """Send the feed's requests and collect every result, the feed's own
    (skipped, reused) included, and a ``head``'s first (its requests went
    out before the checkpoint was open). Raises what stopped the sending,
    after everything finished is committed."""
    config = feed.plan.config
    sink = ResultSink(
        checkpoint.writer(config.checkpoint.flush_every),
        config.checkpoint.flush_interval_s,
        feed.reuse.cache,
        # A commit that fails (full disk) stops the sending: answers that
        # cannot be kept must not be bought.
        on_failure=lambda _exc: stage.drain(),
    )
    feed.collected.attach(sink)
    committer = asyncio.create_task(sink.run())
    ending = Prefetch(modules_for(config.output.page))
    gathered: list[Path] = []
    try:
        if isinstance(stage, ShardedStage):
            await collect_shards(feed, stage, checkpoint, gathered)
        else:
            if head is not None:
                crash_point("head-checkpoint-open")  # open and empty, the head's answers held
                await head.hand_over(feed)
            await _collect_results(feed, stage, head, ending)
    finally:
        committer.cancel()
        # Runs on success, fatal errors and cancellation alike: what was paid
        # for reaches the checkpoint.
        await asyncio.shield(_close(sink, ending))
    # In the checkpoint now: a kill before this adopts them again (the same
    # results; the newest of a row wins).
    await asyncio.to_thread(forget, gathered)
    if sink.failure is not None:
        raise commit_error(sink.failure, checkpoint.run_dir)
    if stage.draining:
        raise RunInterrupted.saved_in(feed.plan.run_dir)
    if feed.spend_cap_reached:
        raise feed.spend_cap_error(checkpoint.run_dir)


async def _close(sink: ResultSink, ending: Prefetch) -> None:
    # Sealing the last part imports what the prefetch may be importing:
    # one thread at a time.
    await ending.finished()
    await sink.close()


async def _collect_results(
    feed: Feed, stage: CallStage, head: Head | None, ending: Prefetch
) -> None:
    collected, dedup = feed.collected, feed.reuse.dedup
    stream = stage.results(feed.requests()) if head is None else head.results()
    gate = stage.limiter.gate
    watcher = asyncio.create_task(
        ending.start_when_all_sent(
            feed.sent_all, lambda: len(feed.in_flight), lambda: gate.in_flight
        )
    )
    try:
        # aclosing: leaving the loop early (fatal error, Ctrl-C) stops the workers now.
        async with contextlib.aclosing(stream) as results:
            async for result in results:
                feed.spend.settle(result.row_id, result.prompt_tokens, result.completion_tokens)
                key = feed.in_flight.pop(result.row_id, None)
                await collected.add(result, key)
                if key is not None and dedup is not None:
                    followers = dedup.settle(key, result, ok=result.status == "ok")
                    collected.deduplicated += len(followers)
                    for follower in followers:
                        await collected.add(reused(follower, result), key)
    finally:
        watcher.cancel()
