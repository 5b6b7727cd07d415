"""The Ray engine: the same run, its requests sent by worker actors on a Ray
cluster under one rate limit for the whole cluster.

The only module that imports Ray. What it changes is where a request is
sent from, nothing else: the driver (the process running ``enrich``) plans,
reads, renders, dedups, caches, caps the spend, journals every result as it
arrives and assembles the output, exactly as on one machine, so resume,
exactly-once output in input order, the report and the timeline are the
single-process ones. ``RayStage`` is a ``CallStage`` whose ``call`` hands the
row to a worker actor; each worker runs its own ``CallStage`` (transport,
retries, structured output, classification, adaptive in-flight limit) with a
``LeasedLimiter`` drawing on one ``LimitLedger`` actor (see pipeline.lease).

Resume is keyed on the input's row ids in the driver's journal, never on
Ray's blocks. A worker that dies (SIGKILL, a lost node) is restarted by Ray
and the rows it held are sent again: what it had in flight is paid twice,
nothing else. A driver that dies takes its job's actors with it; the same
command resumes from the journal, paying again for what was in flight and
the last group commit (``checkpoint.flush_interval_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import ray
from ray.exceptions import RayActorError

from pipeline import errors
from pipeline.call import CallStage, CallStats, ChatRequest
from pipeline.lease import LeasedLimiter, LedgerSnapshot, LimitLedger, Report
from pipeline.plan import answer_check
from pipeline.results import RowResult
from pipeline.transport import make_transport

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.config import RunConfig
    from pipeline.events import EventSink
    from pipeline.lease import Grant
    from pipeline.plan import Plan
    from pipeline.ratelimit import RateLimiter
    from pipeline.transport import Messages, Transport

# Ray restarts a dead worker this many times; its rows are sent again by the
# driver, never re-run by Ray (max_task_retries=0: Ray's own retry would pay
# for them a second time on top of the driver's).
WORKER_RESTARTS: Final = 4
# A row given to workers that died this many times in a row ends the run.
ROW_RESENDS: Final = 3 * WORKER_RESTARTS
# How often the driver gathers the workers' counts for the live timeline.
STATS_EVERY_S: Final = 1.0
WORKER_NAME: Final = "enrich-worker"
LEDGER_NAME: Final = "enrich-ledger"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its call stage. ``api_key`` travels as an
    actor argument (never logged, never in the runtime env Ray shows)."""

    config: RunConfig
    extra_params: dict[str, Any] | None
    schema: dict[str, Any] | None
    api_key: str

    def __repr__(self) -> str:
        return f"WorkerSpec(model={self.config.model.name!r}, api_key=<redacted>)"


@dataclass(frozen=True)
class _Failed:
    """A run-level error in a worker, sent back as a value: its class name in
    pipeline.errors and its message."""

    kind: str
    message: str

    def error(self) -> errors.EnrichError:
        cls = getattr(errors, self.kind, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.EnrichError)):
            cls = errors.ClusterLost
        return cls(self.message)


class _ActorSource:
    """A worker's lease source: the ledger actor."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    async def exchange(self, reports: Sequence[Report], want: int, tokens_each: int) -> Grant:
        grant: Grant = await self._handle.exchange.remote(list(reports), want, tokens_each)
        return grant


class LedgerActor:
    """The cluster's one ``LimitLedger`` (made in the actor's event loop)."""

    def __init__(self, rpm: int | None, tpm: int | None, adaptive: bool) -> None:
        self._settings = (rpm, tpm, adaptive)
        self._ledger: LimitLedger | None = None

    def _get(self) -> LimitLedger:
        if self._ledger is None:
            rpm, tpm, adaptive = self._settings
            self._ledger = LimitLedger(rpm, tpm, adaptive=adaptive)
        return self._ledger

    async def exchange(self, reports: list[Report], want: int, tokens_each: int) -> Grant:
        return await self._get().exchange(reports, want, tokens_each)

    async def snapshot(self) -> LedgerSnapshot:
        return self._get().snapshot()


class WorkerActor:
    """One worker: the single-machine call stage, leasing from the ledger."""

    def __init__(self, spec: WorkerSpec, ledger: str) -> None:
        self._spec = spec
        # By name, not handle: a handle argument lives in the object store,
        # which a restarted worker's constructor could not count on.
        self._ledger = ledger
        self._stage: CallStage | None = None
        self._transport: Transport | None = None

    def _get(self) -> CallStage:
        # Built in the actor's event loop, on the first row: the limiter's
        # clock is that loop's.
        if self._stage is None:
            spec = self._spec
            config = spec.config
            self._transport = make_transport(
                config.model, spec.api_key, config.model.transport, extra_params=spec.extra_params
            )
            limits = config.limits
            limiter: RateLimiter | None = None
            if config.ray.shared_limit:
                limiter = LeasedLimiter(
                    _ActorSource(ray.get_actor(self._ledger)),
                    concurrency=limits.concurrency,
                    adaptive=limits.adaptive,
                    latency=True,
                    start_at_ceiling="concurrency" in limits.model_fields_set,
                )
            else:
                workers = config.ray.workers
                limits = limits.model_copy(
                    update={
                        "rpm": limits.rpm and max(1, limits.rpm // workers),
                        "tpm": limits.tpm and max(1, limits.tpm // workers),
                    }
                )
            self._stage = CallStage(
                config.model,
                limits,
                self._transport,
                check_answer=answer_check(spec.schema),
                answer_attempts=config.structured.max_attempts,
                limiter=limiter,
            )
        return self._stage

    async def call(self, row_id: int, messages: Messages) -> RowResult | _Failed:
        try:
            return await self._get().call(ChatRequest(row_id, messages))
        except errors.EnrichError as exc:
            return _Failed(type(exc).__name__, str(exc))

    async def stats(self) -> CallStats:
        return self._get().stats

    async def pid(self) -> int:
        return os.getpid()

    async def close(self) -> None:
        if self._stage is not None:
            limiter = self._stage.limiter
            if isinstance(limiter, LeasedLimiter):
                await limiter.aclose()
        if self._transport is not None:
            await self._transport.aclose()


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
    """The driver's call stage: every row goes to a worker actor; the crew of
    ``CallStage.results`` keeps ``workers x concurrency`` rows in flight."""

    def __init__(self, plan: Plan, transport: Transport, events: EventSink) -> None:
        config = plan.config
        workers = config.ray.workers
        limits = config.limits.model_copy(
            update={"concurrency": config.limits.concurrency * workers}
        )
        super().__init__(config.model, limits, transport, events=events)
        self._owns_ray = connect(config.ray.address)
        limits = config.limits
        self.ledger_name = f"{LEDGER_NAME}-{os.getpid()}-{id(self)}"
        # Handles typed Any: Ray's stubs do not see the methods of a class
        # made remote at run time.
        self.ledger: Any = (
            ray.remote(LedgerActor)
            .options(num_cpus=0, name=self.ledger_name)
            .remote(limits.rpm, limits.tpm, limits.adaptive)
        )
        cpus = float(ray.cluster_resources().get("CPU", 1.0))  # type: ignore[no-untyped-call]
        spec = WorkerSpec(config, plan.extra_params, plan.prepared.schema, config.api_key())
        self.workers: list[Any] = [
            ray.remote(WorkerActor)
            .options(
                name=f"{WORKER_NAME}-{os.getpid()}-{id(self)}-{i}",
                # Leave CPUs for Ray's own tasks: actors that take them all
                # starve them (a silent hang).
                num_cpus=min(1.0, cpus / (workers + 1)),
                max_restarts=WORKER_RESTARTS,
                max_task_retries=0,
                max_concurrency=max(1000, 4 * config.limits.concurrency),
            )
            .remote(spec, self.ledger_name)
            for i in range(workers)
        ]
        # Up before the first row: a worker's process takes seconds to start,
        # which belongs to the start-up, not to the rows it would hold up.
        ray.get([worker.pid.remote() for worker in self.workers])
        self._load = [0] * workers
        self._worker_stats: list[CallStats | None] = [None] * workers
        self._ledger_stats: LedgerSnapshot | None = None
        self.resent = 0
        self._poller: asyncio.Task[None] | None = None

    @property
    def stats(self) -> CallStats:
        return combine([s for s in self._worker_stats if s is not None], self._ledger_stats)

    async def call(self, request: ChatRequest) -> RowResult:
        if self._poller is None:
            self._poller = asyncio.create_task(self._poll())
        for _ in range(ROW_RESENDS):
            index = min(range(len(self.workers)), key=self._load.__getitem__)
            self._load[index] += 1
            self.limiter.gate.in_flight += 1
            try:
                reply = await self.workers[index].call.remote(request.row_id, request.messages)
            except RayActorError:
                # The worker died with the row in flight: Ray restarts it,
                # and the row goes again (to the least loaded worker).
                self.resent += 1
                continue
            finally:
                self._load[index] -= 1
                self.limiter.gate.in_flight -= 1
            if isinstance(reply, _Failed):
                raise reply.error()
            result: RowResult = reply
            return result
        raise errors.ClusterLost(
            f"row {request.row_id} was lost with its worker {ROW_RESENDS} times: the Ray "
            "cluster keeps losing workers; check its nodes (`ray status`), then rerun the "
            "same command to resume"
        )

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(STATS_EVERY_S)
            with contextlib.suppress(RayActorError):
                await self.gather_stats()

    async def gather_stats(self) -> None:
        """Every worker's counts and the ledger's, for the report and timeline."""
        for i, worker in enumerate(self.workers):
            with contextlib.suppress(RayActorError):
                self._worker_stats[i] = await worker.stats.remote()
        self._ledger_stats = await self.ledger.snapshot.remote()
        self.limiter.stats.paused_s = self._ledger_stats.paused_s

    async def aclose(self) -> None:
        """Gather the final counts, then end the actors (and a Ray this run started)."""
        if self._poller is not None:
            self._poller.cancel()
        with contextlib.suppress(RayActorError):
            await self.gather_stats()
        for worker in self.workers:
            with contextlib.suppress(RayActorError):
                await worker.close.remote()
            ray.kill(worker, no_restart=True)
        ray.kill(self.ledger, no_restart=True)
        if self._owns_ray:
            ray.shutdown()


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
