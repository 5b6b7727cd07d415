"""The Python entry points: ``enrich`` and ``enrich_async`` as a notebook, a
script or an Airflow task calls them.

What they add to the runner: a config from a TOML path and keyword settings
named like the flags (``enrich("job.toml", rpm=500)``, or no file at all:
``enrich(input="reviews.csv", column="body", output="out.parquet")``); a run
from inside a running event loop (a notebook cell); and the same verdict on
failed rows as the CLI's exit code 1 (``TooManyFailedRows``, carrying the
summary), so a task cannot succeed where the command line fails.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from pipeline.errors import ConfigError, RunInterrupted, TooManyFailedRows

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.events import EventSink
    from pipeline.progress import Progress
    from pipeline.runner import RunOptions, RunSummary
    from pipeline.transport import Transport


def too_many_failed(summary: RunSummary, config: RunConfig) -> TooManyFailedRows | None:
    """The error a finished run ends with when its failed share of rows is
    above ``max_error_rate`` (the CLI exits 1 with it), else None."""
    if summary.error_rate <= config.max_error_rate:
        return None
    return TooManyFailedRows(
        f"{summary.error:,} rows failed ({summary.error_rate:.1%}), above "
        f"--max-error-rate (max_error_rate) {config.max_error_rate:.1%}; the output "
        f"{summary.output} is written: fix the cause and rerun with --retry-failed",
        summary=summary,
    )


def resolve_config(
    config: RunConfig | str | os.PathLike[str] | None, settings: dict[str, Any]
) -> RunConfig:
    """A ready config, a TOML path, or nothing; plus keyword settings."""
    from pipeline.config import RunConfig, load_config

    if isinstance(config, RunConfig):
        if settings:
            raise ConfigError(
                f"pass either a RunConfig or settings ({', '.join(sorted(settings))}), not "
                "both; e.g. load_config('job.toml', rpm=500)"
            )
        return config
    return load_config(config, **settings)


def _checked(summary: RunSummary, config: RunConfig, raise_on_failed_rows: bool) -> RunSummary:
    failed = too_many_failed(summary, config) if raise_on_failed_rows else None
    if failed is not None:
        raise failed
    return summary


async def enrich_async(
    config: RunConfig | str | os.PathLike[str] | None = None,
    *,
    options: RunOptions | None = None,
    progress: Progress | None = None,
    events: EventSink | None = None,
    transport: Transport | None = None,
    stop: asyncio.Event | None = None,
    raise_on_failed_rows: bool = True,
    **settings: Any,
) -> RunSummary:
    """Run (or resume) one job inside the caller's event loop (``await`` it
    from a notebook cell or an async service). Setting ``stop`` ends it
    gracefully (``RunInterrupted``). Raises ``TooManyFailedRows`` (with
    ``.summary``) when failed rows pass ``max_error_rate``, unless
    ``raise_on_failed_rows=False``."""
    from pipeline import runner

    resolved = resolve_config(config, settings)
    summary = await runner.enrich_async(
        resolved,
        options=options or runner.RunOptions(),
        progress=progress,
        events=events,
        transport=transport,
        stop=stop,
    )
    return _checked(summary, resolved, raise_on_failed_rows)


def enrich(
    config: RunConfig | str | os.PathLike[str] | None = None,
    *,
    options: RunOptions | None = None,
    progress: Progress | None = None,
    events: EventSink | None = None,
    handle_signals: bool = False,
    raise_on_failed_rows: bool = True,
    **settings: Any,
) -> RunSummary:
    """Run (or resume) one job and wait for it: from a script, a task, or a
    notebook cell (where an event loop already runs, the job gets its own
    loop in a worker thread; Ctrl-C / interrupting the kernel stops it
    gracefully). See ``enrich_async`` for the rest."""
    from pipeline import runner

    resolved = resolve_config(config, settings)
    chosen = options or runner.RunOptions()
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        summary = runner.enrich(
            resolved,
            options=chosen,
            progress=progress,
            events=events,
            handle_signals=handle_signals,
        )
    else:
        summary = _in_own_thread(resolved, chosen, progress, events)
    return _checked(summary, resolved, raise_on_failed_rows)


def _in_own_thread(
    config: RunConfig, options: RunOptions, progress: Progress | None, events: EventSink | None
) -> RunSummary:
    """asyncio.run refuses to nest in a running loop, and blocking that loop
    is what a synchronous call does anyway: run the job's loop beside it."""
    from pipeline import runner

    started = threading.Event()
    loop_and_stop: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> RunSummary:
        stop = asyncio.Event()
        loop_and_stop.append((asyncio.get_running_loop(), stop))
        started.set()
        try:
            return await runner.enrich_async(
                config, options=options, progress=progress, events=events, stop=stop
            )
        except asyncio.CancelledError:
            if stop.is_set():
                raise _interrupted(config) from None
            raise

    with ThreadPoolExecutor(1, thread_name_prefix="enrich") as pool:
        future = pool.submit(asyncio.run, main())
        try:
            return future.result()
        except KeyboardInterrupt:
            started.wait()
            loop, stop = loop_and_stop[0]
            loop.call_soon_threadsafe(stop.set)
            return future.result()


def _interrupted(config: RunConfig) -> RunInterrupted:
    return RunInterrupted(
        f"interrupted; finished rows are saved in {config.output.resolved_run_dir}; "
        "run the same job again to resume"
    )
