"""The entry points: ``enrich`` (synchronous, what a cron job's CLI or an
Airflow task calls) and ``enrich_async``. They take the output's lock and
hand the run to ``pipeline.run``, which reads as its stages; a fresh run
sends its first rows first (``pipeline.head``), and the modules that need
pyarrow are imported after those requests are out."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Any, Final

from pipeline.crashpoints import crash_point
from pipeline.errors import RunInterrupted
from pipeline.head import HeadPlan, open_head, plan_head
from pipeline.lock import RunLock, lock_path_for, takeover_message
from pipeline.summary import RunSummary
from pipeline.wiring import DRAIN_GRACE_S, RunOptions, Wiring

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.events import EventSink
    from pipeline.plan import PreparedRun, answer_settings, prepare
    from pipeline.progress import Progress
    from pipeline.timeline import Timeline
    from pipeline.transport import Transport
else:

    def __getattr__(name: str) -> Any:
        # The plan's names, imported when asked for: a fresh run's first
        # requests go out before pyarrow is loaded, and the plan needs it.
        if name in ("PreparedRun", "answer_settings", "prepare"):
            from pipeline import plan

            return getattr(plan, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# One value for every call: options are frozen.
_NO_OPTIONS: Final = RunOptions()

__all__ = [
    "DRAIN_GRACE_S",
    "PreparedRun",
    "RunOptions",
    "RunSummary",
    "answer_settings",
    "enrich",
    "enrich_async",
    "prepare",
]


async def enrich_async(
    config: RunConfig,
    *,
    options: RunOptions = _NO_OPTIONS,
    progress: Progress | None = None,
    events: EventSink | None = None,
    transport: Transport | None = None,
    stop: asyncio.Event | None = None,
    timeline: Timeline | None = None,
) -> RunSummary:
    """Run (or resume) one enrichment job. Raises typed errors; never prints.

    One run per output at a time (a lock beside it); an output that is already
    complete for this input and these settings is left alone. Setting ``stop``
    ends the run gracefully: no new request is sent, those in flight get up to
    ``DRAIN_GRACE_S`` to finish, everything finished is flushed, and
    ``RunInterrupted`` is raised. ``timeline`` records the run interval by
    interval (pass one to read its live totals during the run).
    """
    wiring = Wiring.of(events, progress, transport, stop, timeline)
    head = plan_head(config, options)
    prepared = None if head is not None else _prepare(config)
    with RunLock(lock_path_for(config.output.local_path), secrets=[config.api_key()]) as lock:
        if lock.stale_holder is not None:
            wiring.events.emit(
                "warning",
                level="warning",
                kind="stale_lock",
                message=takeover_message(lock.path, lock.stale_holder),
            )
        if head is not None and head.fresh():
            return await _run_with_head(head, options, wiring)
        from pipeline.run import run

        return await run(prepared or _prepare(config), options, wiring)


def _prepare(config: RunConfig) -> PreparedRun:
    """``pipeline.plan.prepare``, with the modules the run needs after it
    imported on the way (in a thread when a head start is under way)."""
    from pipeline import run  # noqa: F401
    from pipeline.plan import prepare

    prepared = prepare(config)
    crash_point("head-prepared")  # the input scanned, the checkpoint not yet open
    return prepared


async def _run_with_head(plan: HeadPlan, options: RunOptions, wiring: Wiring) -> RunSummary:
    """The head's requests go out while the input is scanned and pyarrow is
    imported, off the event loop; then the run goes on as any other."""
    async with open_head(plan, wiring) as head:
        await head.underway()
        crash_point("head-in-flight")  # its requests out, nothing durable yet
        try:
            prepared = await asyncio.to_thread(_prepare, plan.config)
            from pipeline.run import run

            return await run(prepared, options, wiring, head)
        except asyncio.CancelledError:
            await head.abandon(wait=False)
            raise
        except Exception:
            # A bad row further down, or the checkpoint refused: the head's
            # answers (paid for) go to the cache unless the run took them.
            await head.abandon(wait=True)
            raise


def enrich(
    config: RunConfig,
    *,
    options: RunOptions = _NO_OPTIONS,
    progress: Progress | None = None,
    events: EventSink | None = None,
    handle_signals: bool = False,
    timeline: Timeline | None = None,
) -> RunSummary:
    """Synchronous entry point (what a cron job's CLI or an Airflow task calls).

    With ``handle_signals`` (the CLI), the first Ctrl-C or SIGTERM stops
    gracefully (see ``enrich_async``) and a second one stops at once; either
    way finished rows are flushed and ``RunInterrupted`` is raised. Without it,
    Ctrl-C still flushes and raises ``RunInterrupted``.
    """

    async def main() -> RunSummary:
        stop = asyncio.Event()
        if handle_signals:
            task = asyncio.current_task()
            assert task is not None

            def on_signal() -> None:
                if stop.is_set():
                    task.cancel()
                stop.set()

            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal)
        try:
            return await enrich_async(
                config,
                options=options,
                progress=progress,
                events=events,
                stop=stop,
                timeline=timeline,
            )
        except asyncio.CancelledError:
            if stop.is_set():
                raise RunInterrupted.saved_in(config.output.resolved_run_dir) from None
            raise

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        raise RunInterrupted.saved_in(config.output.resolved_run_dir) from None
