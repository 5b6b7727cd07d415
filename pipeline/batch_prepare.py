"""Preparing batches: the feed's requests written as batch input files into
the ledger, and the spend cap checked before a file is submitted.

The same feed as the online route decides what is sent: skipped rows, rows
answered before (carried over, the response cache) never reach a file. In-run
dedup is done per file: identical requests in one file are asked once and the
rows that share it are answered from that line (``Asked.asked``); holding one
file's keys keeps memory bounded by a file.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.batch_files import FileContent, FileLimits, FileSplitter, request_line
from pipeline.batch_ledger import Asked, FileEntry, Ledger
from pipeline.collect import Collected
from pipeline.costs import CostMeter, Price, PromptBound, SpendCap, SpendCapReached, cost
from pipeline.feed import Feed, Reuse
from pipeline.prompt import DEFAULT_COMPLETION_ESTIMATE, estimate_prompt_tokens
from pipeline.transport import body_params

if TYPE_CHECKING:
    from pipeline.events import EventSink
    from pipeline.plan import Plan
    from pipeline.progress import Progress
    from pipeline.resume import ResumePoint


def open_batch_feed(
    plan: Plan,
    point: ResumePoint,
    reuse: Reuse,
    price: Price | None,
    progress: Progress,
    events: EventSink,
) -> Feed:
    """The batch route's feed: no run-wide dedup (a batch answers hours later;
    files dedup their own lines) and a meter at batch prices instead of the
    online cap, which waits for answers that come back within seconds (the
    batch cap is checked per file, at submission: ``check_cap``)."""
    meter = CostMeter(price.for_route("batch") if price else None, already_spent=point.spent_usd)
    collected = Collected(progress, plan.total_rows)
    collected.route = "batch"
    bound = PromptBound(plan.config.input.max_prompt_tokens, events)
    return Feed(
        plan, point.done, point.first_todo, replace(reuse, dedup=None), meter, collected, bound
    )


class FileWriter:
    """Writes one round of the feed's requests as files into the ledger."""

    def __init__(self, feed: Feed, ledger: Ledger) -> None:
        config = feed.plan.config
        self.feed = feed
        self.ledger = ledger
        self._splitter = FileSplitter(FileLimits(config.batch.max_requests, config.batch.max_bytes))
        self._model = config.model.name
        self._params = body_params(config.model, feed.plan.extra_params)
        self._completion = config.model.max_tokens or DEFAULT_COMPLETION_ESTIMATE
        price = feed.spend.price if isinstance(feed.spend, CostMeter) else None
        self._price = price
        self._asked: list[Asked] = []
        self._leaders: dict[bytes, int] = {}
        self._cost = 0.0
        self.written: list[FileEntry] = []

    async def write(self) -> list[FileEntry]:
        """Every request of the feed, in files; returns the new entries."""
        async for request in self.feed.requests():
            key = self.feed.in_flight.pop(request.row_id)
            leader = self._leaders.get(key)
            if leader is not None:
                self._asked.append(Asked(request.row_id, leader, key.hex()))
                continue
            line = request_line(request.row_id, self._model, request.messages, self._params)
            done = self._splitter.add(request.row_id, line)
            if done is not None:
                await self._seal(done, self._take_asked())
            self._leaders[key] = request.row_id
            self._asked.append(Asked(request.row_id, request.row_id, key.hex()))
            if self._price is not None:
                tokens = estimate_prompt_tokens(request.messages)
                self._cost += cost(tokens, self._completion, self._price)
        last = self._splitter.finish()
        if last is not None:
            await self._seal(last, self._take_asked())
        return self.written

    def _take_asked(self) -> list[Asked]:
        asked, self._asked, self._leaders = self._asked, [], {}
        return asked

    async def _seal(self, content: FileContent, asked: list[Asked]) -> None:
        entry = FileEntry(
            name=self.ledger.next_name(),
            requests=len(content.rows),
            rows=len(asked),
            size=content.size,
            cost_usd=self._cost if self._price is not None else None,
        )
        self._cost = 0.0
        await asyncio.to_thread(self.ledger.add, entry, content.data(), asked)
        self.written.append(entry)


def check_cap(
    max_cost: float | None,
    spend: CostMeter | SpendCap,
    ledger: Ledger,
    entry: FileEntry,
    run_dir: Path,
) -> None:
    """Raise ``SpendCapReached`` when submitting ``entry`` could pass
    ``max_cost``: what is spent, what submitted batches may still cost (their
    worst case) and this file's worst case."""
    if max_cost is None or entry.cost_usd is None:
        return
    outstanding = sum(
        e.cost_usd or 0.0 for e in ledger.files if e.state in ("creating", "submitted")
    )
    if spend.spent + outstanding + entry.cost_usd > max_cost:
        raise SpendCapReached(max_cost, spend.spent, spend.already_spent, run_dir)
