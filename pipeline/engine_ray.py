"""The Ray engine: workers on a Ray cluster enrich shards that enrich plans
itself, under one rate limit for the whole cluster.

The only module that imports Ray. The driver (the process running
``enrich``) plans the shards from the input's metadata (pipeline.shards),
never reads the input's rows, and hands the shards still to do to a Ray Data
pipeline: ``from_items(shards).map_batches(ShardWorker, ActorPoolStrategy)``,
one shard a batch. Each ``ShardWorker`` (an async actor) runs
``pipeline.shard_work.ShardJob``: it reads its rows, sends them through the
single-machine ``CallStage`` with a ``LeasedLimiter`` drawing on the one
``LedgerActor`` (see pipeline.lease), and journals every result in the run
directory as it finishes. The driver gathers each finished shard's journal
into the checkpoint, so assembly, ``enrich status``, the report and resume
are the single-machine ones.

Resume is keyed on the shards' row ranges, never on Ray's blocks. A worker
killed mid-shard is restarted by Ray, which runs its shard again: that
attempt skips what the journals hold and pays only for what was in flight.
The ledger actor also holds the board (pipeline.shard_work.Board): a fatal
error or the spend cap posted there stops every worker; each attempt's
counts and warnings wait there for the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import ray
from ray.exceptions import RayError

from pipeline import errors
from pipeline.call import CallStage, CallStats
from pipeline.lease import LeasedLimiter, LedgerSnapshot, LimitLedger, Report
from pipeline.plan import answer_check
from pipeline.shard_work import Board, NoticeSink, ShardJob, Stop, WorkerSpec
from pipeline.shards import SHARDS, ShardSummary, ShardTask
from pipeline.transport import make_transport

if TYPE_CHECKING:
    from collections.abc import Sequence

    import pyarrow as pa

    from pipeline.events import EventSink
    from pipeline.lease import Grant
    from pipeline.plan import Plan
    from pipeline.ratelimit import RateLimiter
    from pipeline.shard_work import Notice
    from pipeline.transport import Transport

# How often the driver gathers the workers' counts and warnings.
STATS_EVERY_S: Final = 1.0
LEDGER_NAME: Final = "enrich-ledger"


class _ActorSource:
    """A worker's lease source: the ledger actor."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def exchange(self, reports: Sequence[Report], want: int, tokens_each: int) -> Grant:
        grant: Grant = await self._handle.exchange.remote(list(reports), want, tokens_each)
        return grant


class LedgerActor:
    """The cluster's one ``LimitLedger`` (made in the actor's event loop) and
    its board."""

    def __init__(self, rpm: int | None, tpm: int | None, adaptive: bool) -> None:
        self._settings = (rpm, tpm, adaptive)
        self._ledger: LimitLedger | None = None
        self.board = Board()

    def _get(self) -> LimitLedger:
        if self._ledger is None:
            rpm, tpm, adaptive = self._settings
            self._ledger = LimitLedger(rpm, tpm, adaptive=adaptive)
        return self._ledger

    async def exchange(self, reports: list[Report], want: int, tokens_each: int) -> Grant:
        return await self._get().exchange(reports, want, tokens_each)

    async def snapshot(self) -> LedgerSnapshot:
        return self._get().snapshot()

    async def set_spend(self, max_cost: float | None, spent: float) -> None:
        self.board.max_cost, self.board.spent = max_cost, spent

    async def report(
        self,
        worker: str,
        stats: CallStats,
        notices: list[Notice],
        spent: float,
        stop: Stop | None,
        finished: tuple[str, int] | None,
    ) -> Stop | None:
        return self.board.report(worker, stats, notices, spent, stop, finished)

    async def post_stop(self, stop: Stop) -> None:
        self.board.post_stop(stop)

    async def hello(self, worker: str, pid: int) -> None:
        self.board.pids[worker] = pid

    async def pids(self) -> list[int]:
        return list(self.board.pids.values())

    async def gather(self) -> tuple[list[CallStats], list[Notice], dict[str, int]]:
        """Every worker's counts, the warnings not yet gathered, the rows
        finished in each shard."""
        board = self.board
        return list(board.counts.values()), board.take_notices(), dict(board.rows)


class ShardWorker:
    """A Ray Data UDF (an async actor of the pool): enriches the shards it is
    given, one at a time, with one call stage for the actor's life."""

    def __init__(self, spec: WorkerSpec, ledger: str) -> None:
        self._spec = spec
        # By name, not handle: a handle argument lives in the object store,
        # which a restarted worker's constructor could not count on.
        self._ledger_name = ledger
        self._ledger: Any = None
        self._id = uuid.uuid4().hex[:12]
        self._stage: CallStage | None = None
        self._sink = NoticeSink()
        self._one_at_a_time: asyncio.Lock | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        summaries = []
        async with self._one_at_a_time:  # one call stage: one shard at a time
            for text in batch.column("task").to_pylist():
                task = ShardTask.from_json(text)
                summary = await self._run(task)
                summaries.append(summary.to_json())
        return pa.table({"summary": summaries})

    async def _run(self, task: ShardTask) -> ShardSummary:
        from pathlib import Path

        if not (Path(self._spec.run_dir) / SHARDS).is_dir():
            return ShardSummary(
                task.shard.name,
                error_kind="ConfigError",
                error_message=f"the run directory {self._spec.run_dir} is not visible on the "
                f"Ray node {os.uname().nodename}: put --run-dir on storage every node mounts "
                "at the same path",
            )
        job = ShardJob(self._spec, await self._get(), self._sink, self._report)
        # Counts are the call stage's totals for the actor's life: kept
        # under the actor's key, the newest report replaces the last.
        return await job.run(task, self._id)

    async def _report(
        self,
        worker: str,
        stats: CallStats,
        notices: list[Notice],
        spent: float,
        stop: Stop | None,
        finished: tuple[str, int] | None,
    ) -> Stop | None:
        posted: Stop | None = await self._ledger.report.remote(
            worker, stats, notices, spent, stop, finished
        )
        return posted

    async def _get(self) -> CallStage:
        # Built in the actor's event loop, on the first shard: the limiter's
        # clock is that loop's.
        if self._stage is None:
            self._ledger = ray.get_actor(self._ledger_name)
            await self._ledger.hello.remote(self._id, os.getpid())
            self._stage = _worker_stage(self._spec, self._ledger, self._sink)
        return self._stage


def _worker_stage(spec: WorkerSpec, ledger: Any, sink: NoticeSink) -> CallStage:
    config = spec.config
    transport = make_transport(
        config.model,
        spec.api_key,
        config.model.transport,
        extra_params=None
        if spec.response_format is None
        else {"response_format": spec.response_format},
    )
    limits = config.limits
    limiter: RateLimiter | None = None
    if config.ray.shared_limit:
        limiter = LeasedLimiter(
            _ActorSource(ledger),
            concurrency=limits.concurrency,
            adaptive=limits.adaptive,
            latency=True,
            start_at_ceiling="concurrency" in limits.fields_set,
        )
    else:
        workers = config.ray.workers
        limits = limits.replace(
            rpm=limits.rpm and max(1, limits.rpm // workers),
            tpm=limits.tpm and max(1, limits.tpm // workers),
        )
    return CallStage(
        config.model,
        limits,
        transport,
        check_answer=answer_check(spec.schema),
        answer_attempts=config.structured.max_attempts,
        events=sink,
        limiter=limiter,
    )


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (None: start a local one), unless this
    process is connected already. True if this call connected it."""
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            # Only the CLI talks to the terminal: workers' output stays in
            # Ray's session logs.
            log_to_driver=False,
            logging_level=logging.ERROR,
        )
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise errors.ConfigError(
            f"cannot join the Ray cluster at {address or 'a new local instance'}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "fix --ray-address (ray.address), or start one with `ray start --head`"
        ) from None
    return True


class RayStage(CallStage):
    """The driver's side: the cluster is joined, the ledger made and the
    shards sent to a Ray Data pipeline on the first ``run_shards`` (a batch
    route that finishes everything never starts Ray). ``stats`` are every
    worker's, as the board last had them."""

    def __init__(self, plan: Plan, transport: Transport, events: EventSink) -> None:
        config = plan.config
        limits = config.limits.replace(concurrency=config.limits.concurrency * config.ray.workers)
        super().__init__(config.model, limits, transport, events=events)
        self._plan = plan
        self._owns_ray = False
        self.ledger: Any = None
        self._worker_stats: list[CallStats] = []
        self._ledger_stats: LedgerSnapshot | None = None
        self.rows_in_shards: dict[str, int] = {}

    @property
    def stats(self) -> CallStats:
        return combine(self._worker_stats, self._ledger_stats)

    def drain(self) -> None:
        super().drain()
        if self.ledger is not None:
            self.ledger.post_stop.remote(Stop("drain", "stopped by the driver"))

    def _start(self) -> None:
        plan = self._plan
        config = plan.config
        self._owns_ray = connect(config.ray.address)
        self.ledger_name = f"{LEDGER_NAME}-{os.getpid()}-{id(self)}"
        limits = config.limits
        # Typed Any: Ray's stubs do not see the methods of a class made
        # remote at run time.
        self.ledger = (
            ray.remote(LedgerActor)
            .options(num_cpus=0, name=self.ledger_name)
            .remote(limits.rpm, limits.tpm, limits.adaptive)
        )

    async def run_shards(
        self, tasks: Sequence[ShardTask], spec: WorkerSpec, spent_usd: float
    ) -> AsyncIterator[ShardSummary]:
        """Each shard's summary as its worker finishes it (in any order)."""
        if not tasks:
            return
        if self.ledger is None:
            self._start()
        await self.ledger.set_spend.remote(self._plan.config.max_cost, spent_usd)
        if self.draining:
            await self.ledger.post_stop.remote(Stop("drain", "stopped by the driver"))
        queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        pump = threading.Thread(
            target=_pump,
            args=(self._dataset(tasks, spec), asyncio.get_running_loop(), queue),
            name="enrich-ray-shards",
            daemon=True,
        )
        pump.start()
        poller = asyncio.create_task(self._poll())
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise errors.ClusterLost(
                        f"the Ray workers failed ({_first_line(item)}); check the cluster "
                        "(`ray status`) and the workers' logs, then rerun the same command "
                        "to resume"
                    ) from None
                yield ShardSummary.from_json(item)
        finally:
            poller.cancel()
            with contextlib.suppress(RayError):
                await self.gather_stats()

    def _dataset(self, tasks: Sequence[ShardTask], spec: WorkerSpec) -> Any:
        import ray.data

        # Only the CLI talks to the terminal.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        workers = min(self._plan.config.ray.workers, len(tasks))
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        items = [{"task": task.to_json()} for task in tasks]
        # One shard a block and a batch: Ray Data hands out work by block.
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardWorker,
            fn_constructor_args=(spec, self.ledger_name),
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            # Leave CPUs for Ray Data's own tasks: actors that take them all
            # starve them (a silent hang).
            num_cpus=min(1.0, cpus / (workers + 1)),
        )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            with contextlib.suppress(RayError):
                await self.gather_stats()

    async def gather_stats(self) -> None:
        """Every attempt's counts and the ledger's, for the report and
        timeline; the workers' warnings, into the driver's events."""
        counts, notices, self.rows_in_shards = await self.ledger.gather.remote()
        self._worker_stats = counts
        for notice in notices:
            self.events.emit(
                notice.event, level=notice.level, message=notice.message, **notice.fields
            )
        self._ledger_stats = await self.ledger.snapshot.remote()
        self.limiter.stats.paused_s = self._ledger_stats.paused_s

    async def aclose(self) -> None:
        """End the ledger (and a Ray this run started)."""
        if self.ledger is not None:
            ray.kill(self.ledger, no_restart=True)
        if self._owns_ray:
            ray.shutdown()


def _pump(dataset: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
    """Runs the pipeline (on a thread: Ray Data's iterator blocks) and posts
    each summary to the driver's loop, then None, or what failed."""
    item: Any = None
    try:
        for row in dataset.iter_rows():
            loop.call_soon_threadsafe(queue.put_nowait, row["summary"])
    except Exception as exc:
        item = exc
    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
        loop.call_soon_threadsafe(queue.put_nowait, item)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:200] if text else type(exc).__name__


def combine(workers: Sequence[CallStats], ledger: LedgerSnapshot | None) -> CallStats:
    """The cluster's stats: workers' counts added up, the learned limits the
    ledger's (a worker's limiter learns nothing itself)."""
    total = CallStats()
    if not workers:
        return total
    summed = {
        name: sum(getattr(s, name) for s in workers)
        for name in (
            "requests",
            "retries",
            "bad_answers",
            "rate_limited",
            "concurrency_limit",
            "outages",
            "stalled",
            "abandoned",
            "saturated",
            "first_byte_s_sum",
            "first_byte_count",
            "server_s_sum",
            "waiting_s_sum",
            "server_count",
        )
    }
    stalls = [s.stall_timeout_s for s in workers if s.stall_timeout_s is not None]
    return CallStats(
        **summed,
        learned_rpm=ledger.learned_rpm if ledger else None,
        learned_tpm=ledger.learned_tpm if ledger else None,
        estimated_rpm=ledger.estimated_rpm if ledger else None,
        paused_s=ledger.paused_s if ledger else 0.0,
        outage_s=max(s.outage_s for s in workers),
        stall_timeout_s=max(stalls) if stalls else None,
        streamed=any(s.streamed for s in workers) if workers[0].streamed is not None else None,
        concurrency_reason=workers[0].concurrency_reason,
    )
