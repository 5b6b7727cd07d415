"""A head start: a fresh local run's first requests go out before the input
is read in full, and before pyarrow (and polars, and numpy) are imported.

Taken (``plan_head``) for ``--engine local`` on the online route with a
local CSV or JSONL input (``.gz`` too), a prompt column or template, no
``--json-schema`` and no ``--max-cost``, when the run directory holds no
checkpoint and the last run's report (if any) does not say the output is up
to date (``--restart``/``--force`` skip that check, as the full path does): a
nightly job rewriting the same output over a new input takes it. In order:
the config is checked and the first rows read with the standard library
(``pipeline.head_read``: only rows whose prompt is provably the full path's);
a prompt column the CSV header lacks stops the run here, before anything is
sent. The caller then takes the output's lock and checks the run is still
fresh (``HeadPlan.fresh``); ``open_head`` looks the rows up in the response
cache and in-run dedup as the feed does and hands the rest to the call stage
(the run's one stage, limiter and transport), while the preparation that needs
pyarrow (the full scan, the checkpoint, the estimate) runs in a thread.

The head's results wait in memory until the checkpoint is open; the first
pass then collects them like any other (``hand_over``), and its feed goes on
from the rows the head did not take. If preparation fails (a bad row further
down), the head's requests were all that was sent: their answers go into the
response cache (``abandon``), so the fixed rerun does not pay for them again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Final

from pipeline import prompt
from pipeline.call import CallStage, ChatRequest
from pipeline.events import HeldEvents
from pipeline.head_plan import HeadPlan as HeadPlan
from pipeline.head_plan import plan_head as plan_head
from pipeline.results import RowResult, reused
from pipeline.reuse import Admission, Messages, Reuse, cached_answer, open_reuse
from pipeline.stage import open_stage

if TYPE_CHECKING:
    from pipeline.cache import CachedAnswer
    from pipeline.feed import Feed
    from pipeline.wiring import Wiring

__all__ = ["Head", "HeadPlan", "open_head", "plan_head"]

# Event-loop turns the head's requests may take to reach the transport before
# the preparation starts anyway (a turn is microseconds when nothing waits).
_SETTLE_TURNS: Final = 100


class Head:
    """The head's rows on their way through the call stage, their results
    held until the first pass takes them (``hand_over``, ``results``)."""

    def __init__(self, plan: HeadPlan, stage: CallStage, reuse: Reuse, events: HeldEvents) -> None:
        self.plan = plan
        self.stage = stage
        self.reuse = reuse
        self.events = events
        """The stage's events, held until the run says ``start``."""
        spec = prompt.prompt_spec(plan.config)
        self.rows = [row_id for row_id, _ in plan.rows.prompts]
        self._asks = [(row_id, prompt.messages(spec, text)) for row_id, text in plan.rows.prompts]
        self._sent: list[tuple[int, Messages, bytes]] = []
        self._hits: list[tuple[int, CachedAnswer, bytes]] = []
        self._feed: asyncio.Future[Feed | None] = asyncio.get_running_loop().create_future()
        self._results: asyncio.Queue[RowResult | Exception | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Look the rows up as the feed does (the cache, then in-run dedup)
        and send the rest."""
        keyed = [(row_id, ask, self.reuse.make_key(ask)) for row_id, ask in self._asks]
        hits = await self.reuse.answers_for([key for _, _, key in keyed])
        dedup = self.reuse.dedup
        for row_id, ask, key in keyed:
            if key in hits:
                self._hits.append((row_id, hits[key], key))
            elif dedup is not None and dedup.admit(key, row_id) is Admission.PARKED:
                continue  # an identical head row's result answers it when settled
            else:
                self._sent.append((row_id, ask, key))
        self._pump = asyncio.create_task(self._pump_results())

    async def underway(self) -> None:
        """Return once the stage has handed the head's requests to the
        transport, as many as it lets go at once (its limits may hold some
        back): what needs pyarrow starts after that, so that the first
        requests go out before it. Bounded: a stage held back entirely (an
        outage, a pause) does not hold the preparation."""
        if not self._sent:
            return
        seen, steady = 0, 0
        for _ in range(_SETTLE_TURNS):
            await asyncio.sleep(0)  # one turn of the event loop
            started = self.stage.stats.requests
            steady = steady + 1 if started == seen and started > 0 else 0
            seen = started
            if steady >= 2 or started >= len(self._sent):
                return

    async def _requests(self) -> AsyncGenerator[ChatRequest, None]:
        for row_id, ask, _ in self._sent:
            yield ChatRequest(row_id, ask)
        # Shielded: the stage cancels its feeder when it stops sending, and
        # that must not cancel the hand-over that the run still makes.
        feed = await asyncio.shield(self._feed)
        if feed is not None:
            async for request in feed.requests():
                yield request

    async def _pump_results(self) -> None:
        try:
            async with contextlib.aclosing(self.stage.results(self._requests())) as results:
                async for result in results:
                    self._results.put_nowait(result)
        except Exception as exc:
            self._results.put_nowait(exc)
        finally:
            self._results.put_nowait(None)

    async def hand_over(self, feed: Feed) -> None:
        """The first pass takes the head: its cache hits are collected, its
        requests are the feed's in flight, and the feed goes on from the rows
        the head did not take (its requests follow the head's in the stage)."""
        # A copy: the resume point's own marks count the rows done before this run.
        feed.done = bytearray(feed.done)
        for row_id in self.rows:
            feed.done[row_id] = 1
        for row_id, _, key in self._sent:
            feed.in_flight[row_id] = key
        for row_id, answer, key in self._hits:
            feed.collected.cache_hits += 1
            await feed.collected.add(reused(row_id, answer), key)
        self._feed.set_result(feed)

    async def results(self) -> AsyncGenerator[RowResult, None]:
        """The pass's results from the call stage, the head's first: what
        ``CallStage.results`` would give for the head's requests and the feed's."""
        try:
            while (item := await self._results.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            await self._stop_pump()

    async def _stop_pump(self) -> None:
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    async def abandon(self, *, wait: bool) -> None:
        """The run failed before the first pass took the head (after, this
        does nothing): nothing more is sent. With ``wait``, the head's
        requests in flight finish (they are paid for). Its answers go into
        the response cache (when the run uses one) for the fixed rerun."""
        if self._feed.done():
            return
        self._feed.set_result(None)
        if wait and self._pump is not None:
            await asyncio.wait([self._pump])
        await self._stop_pump()
        keys = {row_id: key for row_id, _, key in self._sent}
        answers = []
        while not self._results.empty():
            item = self._results.get_nowait()
            if isinstance(item, RowResult) and item.status == "ok" and item.row_id in keys:
                answers.append((keys[item.row_id], cached_answer(item)))
        if self.reuse.cache is not None and answers:
            self.reuse.cache.put_many(answers)


@contextlib.asynccontextmanager
async def open_head(plan: HeadPlan, wiring: Wiring) -> AsyncIterator[Head]:
    """The head under way: the response cache and dedup opened (closed on the
    way out), the run's call stage made and the head's requests sent."""
    events = wiring.events

    def warn(message: str) -> None:
        events.emit("warning", level="warning", kind="cache", message=message)

    reuse = open_reuse(plan.config, None, None, warn)
    held = HeldEvents(events)
    try:
        async with open_stage(plan, wiring.transport, held, wiring.stop) as stage:
            head = Head(plan, stage, reuse, held)
            await head.start()
            yield head
    finally:
        held.release()
        reuse.close()
