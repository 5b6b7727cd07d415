"""The feed stage: the rows still to do, as requests, read chunk by chunk.

Each row is rendered into its messages; a row without a prompt is skipped;
a row whose request was answered before (carried over from a run over an
earlier version of the input, or in the response cache) or is being asked
right now by an identical row (in-run dedup) is answered without a request;
the spend cap decides whether the rest may go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pipeline import prompt
from pipeline.cache import Admission
from pipeline.call import ChatRequest
from pipeline.collect import Collected
from pipeline.costs import CostMeter, PromptBound, SpendCap, SpendCapReached
from pipeline.plan import Plan
from pipeline.results import RowResult
from pipeline.results import reused as reused
from pipeline.reuse import Messages
from pipeline.reuse import Reuse as Reuse
from pipeline.reuse import open_reuse as open_reuse

if TYPE_CHECKING:
    from pipeline.costs import Price
    from pipeline.events import EventSink
    from pipeline.progress import Progress
    from pipeline.resume import ResumePoint

# Input bytes per chunk at most, whatever --chunk-size says.
FEED_BYTES: Final = 16 << 20


@dataclass
class Feed:
    """One pass's requests: the rows from ``start_row`` on that ``done``
    does not mark. ``in_flight`` maps each request sent to its key, for the
    result's way back (dedup followers, the cache)."""

    plan: Plan
    done: bytearray
    start_row: int
    reuse: Reuse
    spend: SpendCap | CostMeter
    collected: Collected
    bound: PromptBound
    in_flight: dict[int, bytes] = field(default_factory=dict)
    sent_all: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once ``requests`` has given its last request (the input's end,
    or the spend cap)."""

    async def requests(self) -> AsyncIterator[ChatRequest]:
        chunks = self._prompt_chunks()
        while (todo := await asyncio.to_thread(next, chunks, None)) is not None:
            asks: list[tuple[int, Messages, bytes]] = []
            for row_id, text in todo:
                if text is None:
                    await self.collected.add(RowResult.skipped(row_id))
                    continue
                messages = prompt.messages(self.plan.prepared.spec, text)
                if (refused := self.bound.refused(row_id, messages)) is not None:
                    await self.collected.add(refused)
                    continue
                asks.append((row_id, messages, self.reuse.make_key(messages)))
            hits = await self.reuse.answers_for([key for _, _, key in asks])
            for row_id, ask, key in asks:
                if key in hits:
                    self.collected.cache_hits += 1
                    await self.collected.add(reused(row_id, hits[key]), key)
                elif await self._shared(row_id, key):
                    continue
                elif not await self._affordable(row_id, ask):
                    self.sent_all.set()
                    return  # the cap: send nothing more; requests in flight finish
                else:
                    self.in_flight[row_id] = key
                    yield ChatRequest(row_id, ask)
        self.sent_all.set()

    async def _shared(self, row_id: int, key: bytes) -> bool:
        """Whether an identical request of this run answers the row (now, or
        when it comes back: the row is parked until then)."""
        if self.reuse.dedup is None:
            return False
        admitted = self.reuse.dedup.admit(key, row_id)
        if isinstance(admitted, RowResult):
            self.collected.deduplicated += 1
            await self.collected.add(reused(row_id, admitted), key)
            return True
        return admitted is Admission.PARKED

    @property
    def spend_cap_reached(self) -> bool:
        return isinstance(self.spend, SpendCap) and self.spend.reached

    def spend_cap_error(self, run_dir: Path) -> SpendCapReached:
        assert isinstance(self.spend, SpendCap)
        return self.spend.error(run_dir)

    async def _affordable(self, row_id: int, ask: Messages) -> bool:
        """Whether the cap lets the row go, once requests in flight have
        settled if its worst case does not fit yet."""
        if not isinstance(self.spend, SpendCap):
            return True
        completion_budget = self.plan.config.model.max_tokens or prompt.DEFAULT_COMPLETION_ESTIMATE
        return await self.spend.admit(row_id, prompt.estimate_prompt_tokens(ask), completion_budget)

    def _prompt_chunks(self) -> Iterator[list[tuple[int, str | None]]]:
        """Rows still to do, chunk by chunk, with their rendered prompt (None:
        skip). Chunks hold ``--chunk-size`` rows, fewer when rows are large:
        the chunk, its rendered prompts and their messages are in memory at once."""
        prepared = self.plan.prepared
        chunk_size = prepared.source.rows_within(FEED_BYTES, prepared.config.input.chunk_size)
        for chunk in prepared.source.chunks(chunk_size, start_row=self.start_row):
            prompts = prompt.render(prepared.spec, chunk.table)
            todo = [
                (row_id, text)
                for row_id, text in enumerate(prompts, start=chunk.offset)
                if not self.done[row_id]
            ]
            if todo:
                yield todo


def open_feed(
    plan: Plan,
    point: ResumePoint,
    reuse: Reuse,
    price: Price | None,
    progress: Progress,
    events: EventSink,
) -> Feed:
    """One pass's feed from its resume point: the spend cap covers the whole
    job, so what the checkpoint's rows cost counts against it."""
    config = plan.config
    spend: SpendCap | CostMeter = (
        SpendCap(config.max_cost, price, already_spent=point.spent_usd)
        if config.max_cost is not None and price is not None
        else CostMeter(price, already_spent=point.spent_usd)
    )
    collected = Collected(progress, plan.total_rows)
    bound = PromptBound(config.input.max_prompt_tokens, events)
    return Feed(plan, point.done, point.first_todo, reuse, spend, collected, bound)
