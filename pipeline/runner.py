"""The entry points: ``enrich`` (synchronous, what a cron job's CLI or an
Airflow task calls) and ``enrich_async``. They take the output's lock and
hand the run to ``pipeline.run``, which reads as its stages."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING, Final

from pipeline.errors import RunInterrupted
from pipeline.events import EventSink, NullEventSink
from pipeline.lock import RunLock, lock_path_for, takeover_message
from pipeline.plan import PreparedRun, answer_settings, prepare
from pipeline.progress import NoProgress, Progress
from pipeline.resume import RunOptions
from pipeline.run import DRAIN_GRACE_S, Wiring, run
from pipeline.summary import RunSummary

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.timeline import Timeline
    from pipeline.transport import Transport

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
    events = events or NullEventSink()
    prepared = prepare(config)
    with RunLock(lock_path_for(config.output.local_path), secrets=[config.api_key()]) as lock:
        if lock.stale_holder is not None:
            events.emit(
                "warning",
                level="warning",
                kind="stale_lock",
                message=takeover_message(lock.path, lock.stale_holder),
            )
        wiring = Wiring(events, progress or NoProgress(), transport, stop, timeline)
        return await run(prepared, options, wiring)


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
