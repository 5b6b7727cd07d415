"""A head start: a fresh local run's first requests go out before the input
is read in full, and before pyarrow (and polars, and numpy) are imported.

Taken (``plan_head``) for ``--engine local`` on the online route with a
local CSV or JSONL input (``.gz`` too), a prompt column or template, no
``--json-schema`` and no ``--max-cost``, when the run directory holds no
checkpoint and no report says the output may already be up to date
(``--restart``/``--force`` skip that check, as the full path does). In order:
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
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline import prompt
from pipeline.call import CallStage, ChatRequest
from pipeline.costs import PriceTable
from pipeline.head_read import Format, HeadRows, read_head
from pipeline.results import RowResult, reused
from pipeline.reuse import Admission, Messages, Reuse, cached_answer, open_reuse
from pipeline.stage import open_stage
from pipeline.storage import ObjectUri, check_output_path

if TYPE_CHECKING:
    from pipeline.cache import CachedAnswer
    from pipeline.config import RunConfig
    from pipeline.feed import Feed
    from pipeline.transport import Completion
    from pipeline.wiring import RunOptions, Wiring

__all__ = ["Head", "HeadPlan", "open_head", "plan_head"]

_FORMATS: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".ndjson.gz": "jsonl",
}


# Event-loop turns the head's requests may take to reach the transport before
# the preparation starts anyway (a turn is microseconds when nothing waits).
_SETTLE_TURNS: Final = 100


@dataclass(frozen=True)
class HeadPlan:
    """A head start decided on: the config, this invocation's options and
    the first rows (what ``pipeline.stage`` needs of a plan, too)."""

    config: RunConfig
    options: RunOptions
    rows: HeadRows
    extra_params: dict[str, Any] | None = None
    check_answer: Callable[[Completion], str | None] | None = None
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    started_s: float = field(default_factory=time.perf_counter)

    def fresh(self) -> bool:
        """Whether the run starts from nothing: no checkpoint to resume and no
        report that could say the output is up to date. Asked with the
        output's lock held (an overlapping run may have made one meanwhile)."""
        output = self.config.output
        run_dir = output.resolved_run_dir
        if run_dir.exists() and any(run_dir.iterdir()):
            return False
        return self.options.restart or self.options.force or not output.resolved_report.exists()


def _spec(config: RunConfig) -> prompt.PromptSpec:
    return prompt.PromptSpec(
        column=config.input.column,
        template=config.input.template,
        system_prompt=config.input.system_prompt,
    )


def _format(config: RunConfig) -> Format | None:
    """The input's format when the run can take a head start."""
    if config.run.engine != "local" or config.route != "online":
        return None
    if config.structured.json_schema is not None or config.max_cost is not None:
        return None  # answer columns and the spend cap are settled by the full path
    path, output = config.input.path, config.output.path
    if isinstance(path, ObjectUri) or isinstance(output, ObjectUri):
        return None
    name = path.name.lower()
    for ext in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(ext):
            return _FORMATS[ext]
    return None


def plan_head(config: RunConfig, options: RunOptions) -> HeadPlan | None:
    """The head start this run can take, or None (the full path). Raises
    the full path's typed errors for what it checks: the base URL, the prompt
    source, the output path and a prompt column the CSV header lacks."""
    fmt = _format(config)
    if fmt is None:
        return None
    config.model.resolved_base_url()  # a bad $OPENAI_BASE_URL stops here, before any write
    spec = _spec(config)
    prompt.needed_columns(spec)
    if config.price_file is not None:
        PriceTable.load(config.price_file)  # a bad --price-file stops here, as on the full path
    check_output_path(config.output.path, config.input.path)
    assert isinstance(config.input.path, Path)
    rows = read_head(config.input.path.expanduser(), fmt, spec, config.limits.concurrency)
    if rows is None:
        return None
    bound = config.input.max_prompt_tokens
    if bound is not None:
        # A prompt over the bound is refused by the feed, with its warning.
        prompts = [
            (row_id, text)
            for row_id, text in rows.prompts
            if prompt.estimate_prompt_tokens(prompt.messages(spec, text)) <= bound
        ]
        rows = HeadRows(rows.columns, prompts)
    if not rows.prompts:
        return None
    config.output.local_path.parent.mkdir(parents=True, exist_ok=True)
    return HeadPlan(config, options, rows)


class Head:
    """The head's rows on their way through the call stage, their results
    held until the first pass takes them (``hand_over``, ``results``)."""

    def __init__(self, plan: HeadPlan, stage: CallStage, reuse: Reuse) -> None:
        self.plan = plan
        self.stage = stage
        self.reuse = reuse
        spec = _spec(plan.config)
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
    try:
        async with open_stage(plan, wiring.transport, events, wiring.stop) as stage:
            head = Head(plan, stage, reuse)
            await head.start()
            yield head
    finally:
        reuse.close()
