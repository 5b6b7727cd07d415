"""The call stage a run sends through, and its graceful stop (``stop``: no
new request, those in flight get ``DRAIN_GRACE_S``). Made before the input
is read in full when a fresh run starts with its first rows (``pipeline.head``),
so it needs nothing but the config: no pyarrow."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.call import CallStage
from pipeline.errors import ConfigError
from pipeline.transport import Transport, make_transport
from pipeline.wiring import DRAIN_GRACE_S

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.events import EventSink
    from pipeline.transport import Completion

__all__ = ["DRAIN_GRACE_S", "StagePlan", "open_stage"]


class StagePlan(Protocol):
    """What the stage needs of a run's plan (``pipeline.plan.Plan``)."""

    @property
    def config(self) -> RunConfig: ...

    @property
    def extra_params(self) -> dict[str, Any] | None: ...

    @property
    def check_answer(self) -> Callable[[Completion], str | None] | None: ...


@contextlib.asynccontextmanager
async def open_stage(
    plan: StagePlan, transport: Transport | None, events: EventSink, stop: asyncio.Event | None
) -> AsyncIterator[CallStage]:
    """The run's call stage over ``transport`` (else one made from the config,
    closed on the way out), drained when ``stop`` is set."""
    config = plan.config
    own_transport = transport is None
    if transport is None:
        transport = make_transport(
            config.model, config.api_key(), config.model.transport, extra_params=plan.extra_params
        )
    stage = (
        _ray_stage(plan, transport, events)
        if config.run.engine == "ray"
        else CallStage(
            config.model,
            config.limits,
            transport,
            check_answer=plan.check_answer,
            answer_attempts=config.structured.max_attempts,
            events=events,
        )
    )
    watcher = None
    if stop is not None:
        this_task = asyncio.current_task()
        assert this_task is not None
        watcher = asyncio.create_task(_drain_on(stop, stage, this_task))
    try:
        yield stage
    finally:
        if watcher is not None:
            watcher.cancel()
        closing = getattr(stage, "aclose", None)
        if closing is not None:
            await closing()
        if own_transport:
            await transport.aclose()


def _ray_stage(plan: StagePlan, transport: Transport, events: EventSink) -> CallStage:
    """The Ray engine's stage (its module is the only one that imports Ray)."""
    from pipeline.plan import Plan

    assert isinstance(plan, Plan), "a head start is only taken with --engine local"
    try:
        from pipeline.engine_ray import RayStage
    except ImportError as exc:
        if exc.name != "ray" and not (exc.name or "").startswith("ray."):
            raise
        raise ConfigError(
            "--engine ray needs Ray: pip install 'enrich-llm[ray]' (or use --engine local)"
        ) from None
    return RayStage(plan, transport, events)


async def _drain_on(stop: asyncio.Event, stage: CallStage, run: asyncio.Task[Any]) -> None:
    await stop.wait()
    stage.drain()
    await asyncio.sleep(DRAIN_GRACE_S)
    # Still waiting (a long retry-after, a hung request): stop now; what is
    # finished is flushed on the way out.
    run.cancel()
