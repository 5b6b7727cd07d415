"""The command line: the only module that prints, parses flags and exits
with the code of the error that ended the run (``pipeline.errors.ExitCode``,
the one table of exit codes; the README's table is checked against it).

Light to import: ``enrich --help`` (and any subcommand's) loads click and the
standard library only. The config, the runner (pyarrow, aiohttp)
and the rest are imported inside the commands that use them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import json
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import click

from pipeline.errors import (
    ConfigError,
    EnrichError,
    ExitCode,
    MissingSetting,
    UsageError,
)
from pipeline.events import (
    EventSink,
    JsonEventSink,
    ProgressEvents,
    TextEventSink,
    redact,
)
from pipeline.options import OPTIONS, Command, Option
from pipeline.progress import NoProgress, Progress, TqdmProgress, WaitingNotes
from pipeline.version import DISTRIBUTION, VERSION

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.lock import LockHolder
    from pipeline.runner import RunSummary

F = TypeVar("F", bound=Callable[..., Any])

# What each exit code means, in a line: shown by ``enrich run --help`` (the
# README's table says the same at length; a test keeps both complete).
EXIT_CODE_HELP: Final[dict[ExitCode, str]] = {
    ExitCode.OK: "done (or already up to date)",
    ExitCode.TOO_MANY_FAILED_ROWS: "done, but failed rows are above --max-error-rate",
    ExitCode.USAGE: "bad usage, config or input; nothing sent",
    ExitCode.FATAL_API: "fatal API error (bad key, unknown model, quota, --max-pause)",
    ExitCode.LOCK_HELD: "another run holds this output's lock",
    ExitCode.SPEND_CAP: "stopped by --max-cost; checkpoint kept",
    ExitCode.BATCHES_PENDING: "--route batch --no-wait: batches in flight; rerun to collect",
    ExitCode.INTERNAL: "a bug: rerun with ENRICH_DEBUG=1 and report it",
    ExitCode.WRITE_FAILED: "cannot write (disk full, I/O error); checkpoint kept",
    ExitCode.API_UNREACHABLE: "API unreachable for longer than --max-outage; checkpoint kept",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C, SIGTERM); checkpoint kept",
}

USAGE_LINES: Final[dict[str, str]] = {
    "run": "enrich run [CONFIG] --input PATH (--column NAME | --template TEXT) --output PATH "
    "[OPTIONS]",
    "estimate": "enrich estimate [CONFIG] --input PATH (--column NAME | --template TEXT) [OPTIONS]",
    "status": "enrich status (CONFIG | OUTPUT | --output PATH)",
}


def _exit_codes_epilog() -> str:
    # \b keeps click from rewrapping the lines into one paragraph.
    lines = [f"  {int(code):>3}  {text}" for code, text in EXIT_CODE_HELP.items()]
    return "\b\nExit codes:\n" + "\n".join(lines)


def _click_type(option: Option) -> Any:
    if option.choices:
        return _choice(tuple(option.choices))
    if option.kind == "path":
        return _path()
    # A URI ("location") as typed: click.Path would turn s3://b/k into s3:/b/k.
    return {"location": str, "str": str, "int": int, "float": float, "json": str}[option.kind]


# One instance per type, shared by the commands that take it: building a
# click type looks up its translated messages, and the run, estimate and
# status commands take some 120 typed options between them.
@functools.cache
def _path() -> click.Path:
    return click.Path(path_type=Path)


@functools.cache
def _choice(choices: tuple[str, ...]) -> click.Choice[str]:
    return click.Choice(choices)


def dataset_options(command_name: Command) -> Callable[[F], F]:
    """The shared interface of every command that reads a dataset: every
    command accepts every setting (a ``run`` line becomes an ``estimate``
    line by changing one word); ``--help`` lists the ones the command uses."""

    def decorate(command: F) -> F:
        for option in reversed(OPTIONS):
            hidden = command_name not in option.commands
            if option.kind == "toggle":
                decorator = click.option(
                    option.flag, option.dest, default=None, help=option.help_text(), hidden=hidden
                )
            elif option.kind == "switch":
                decorator = click.option(
                    option.flag,
                    option.dest,
                    is_flag=True,
                    default=None,
                    help=option.help_text(),
                    hidden=hidden,
                )
            else:
                decorator = click.option(
                    option.flag,
                    option.dest,
                    type=_click_type(option),
                    default=None,
                    help=option.help_text(),
                    hidden=hidden,
                )
            command = decorator(command)
        return click.argument(
            "config_file", required=False, type=click.Path(path_type=Path), metavar="[CONFIG]"
        )(command)

    return decorate


def _json_setting(option: Option, value: Any) -> Any:
    if option.kind != "json" or value is None:
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{option.flag} is not valid JSON ({exc.msg}); pass a JSON object"
        ) from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"{option.flag} must be a JSON object like '{{\"seed\": 1}}'")
    return parsed


def flag_overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """Parsed flags -> dotted config keys (None: not given)."""
    return {option.key: _json_setting(option, flags.get(option.dest)) for option in OPTIONS}


def build_config(
    config_file: Path | None, flags: dict[str, Any], *, needs_output: bool = True
) -> RunConfig:
    """The config from the file and the flags. ``needs_output=False`` for
    commands that write nothing (estimate): a missing output is no error."""
    from pipeline.config import load_config

    overrides = flag_overrides(flags)
    try:
        return load_config(config_file, overrides)
    except MissingSetting as missing:
        if needs_output or missing.key != "output.path":
            raise
    # Never written: estimating reads the input and the settings only.
    return load_config(config_file, {**overrides, "output.path": Path(os.devnull)})


LOG_FORMAT_KEY: Final = "enrich.log_format"


class _NoPandas:
    """An import finder under which pandas is not installed.

    pyarrow looks for pandas at its first conversion of Python values
    (``pa.array``, ``pa.table``: a run's first checkpoint part) to tell its
    objects apart, and imports it where installed: 0.3-0.4 s of CPU and some
    30 MB in every run, beside the model's server on a shared machine, for
    a check a local run never needs (apache/arrow#34994). The Ray engine
    hands pyarrow pandas objects (Ray Data), and keeps it."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError("a local enrich run does not use pandas", name=name)


# Set by ``main``: the command runs as its own process (the console script,
# python -m pipeline), not inside a caller's (CliRunner, an embedding), so
# what it imports is its own business.
_OWN_PROCESS: list[bool] = [False]


def _without_pandas() -> None:
    """In a process of its own, a local run imports no pandas (see _NoPandas)."""
    if _OWN_PROCESS[0] and "pandas" not in sys.modules and _NoPandas not in sys.meta_path:
        sys.meta_path.insert(0, _NoPandas)


def _log_format() -> str:
    context = click.get_current_context(silent=True)
    return str(context.meta.get(LOG_FORMAT_KEY, "text")) if context else "text"


def _secrets() -> list[str | None]:
    """Values no line we print may contain, whatever the config names."""
    return [os.environ.get("OPENAI_API_KEY")]


def _usage_line() -> str | None:
    context = click.get_current_context(silent=True)
    name = context.info_name if context else None
    usage = USAGE_LINES.get(name or "")
    return f"usage: {usage} (enrich {name} --help lists every flag)" if usage else None


def fail(error: EnrichError) -> None:
    # A missing setting is the first thing a newcomer meets: show the whole shape.
    usage = _usage_line() if isinstance(error, MissingSetting) else None
    if _log_format() == "json":
        fields: dict[str, Any] = {"exit_code": error.exit_code}
        if usage:
            fields["usage"] = usage
        JsonEventSink(sys.stderr, secrets=_secrets()).emit(
            "error", level="error", message=error.message, **fields
        )
    else:
        click.echo(f"enrich: error: {redact(error.message, _secrets())}", err=True)
        if usage:
            click.echo(usage, err=True)
    sys.exit(error.exit_code)


def handle_errors(command: F) -> F:
    """Typed errors become one line and their exit code; bugs become one line
    too unless ENRICH_DEBUG is set, because cron mail should stay readable."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EnrichError as error:
            fail(error)
        except Exception as error:  # a bug: say so plainly
            if os.environ.get("ENRICH_DEBUG"):
                traceback.print_exc()
            fail(
                InternalError(
                    f"internal error: {type(error).__name__}: {error} "
                    "(set ENRICH_DEBUG=1 for a traceback and report it)"
                )
            )
        return None

    return wrapper  # type: ignore[return-value]


def _progress(quiet: bool) -> Progress:
    if quiet or not sys.stderr.isatty():
        return NoProgress()
    return TqdmProgress(sys.stderr)


def _reporting(
    log_format: str,
    quiet: bool,
    secrets: list[str | None],
    live: Callable[[], Mapping[str, Any]] | None = None,
) -> tuple[Progress, EventSink]:
    """Where progress and events go: a bar on a terminal; plain event lines in
    cron logs; one JSON object per line for log shippers (progress included,
    even with --quiet: that is what the shipper is for). ``live``: the run's
    running totals, carried by each progress event."""
    if log_format == "json":
        json_sink = JsonEventSink(sys.stderr, secrets=secrets)
        return ProgressEvents(json_sink, live=live), json_sink
    text_sink = TextEventSink(sys.stderr, secrets=secrets)
    if quiet:
        return NoProgress(), text_sink
    if sys.stderr.isatty():
        bar = TqdmProgress(sys.stderr)
        return bar, WaitingNotes(text_sink, bar)
    return ProgressEvents(text_sink, live=live), text_sink


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _fmt_cost(value: float | None) -> str:
    return (
        "unknown (no price for this model; see --price-file)" if value is None else f"${value:,.4f}"
    )


def _pending(count: int) -> str:
    if not count:
        return ""
    return f" (pending {count:,}: transient failures, the next run sends them again)"


def _headline(summary: RunSummary) -> str:
    if summary.error and not summary.ok:
        return f"failed: every row sent failed ({summary.error:,} of {summary.rows:,} rows)"
    if summary.error:
        return f"done with errors: {summary.rows:,} rows, {summary.error:,} failed"
    return f"done: {summary.rows:,} rows"


def _reasons(reasons: list[tuple[str, int]]) -> list[str]:
    if not reasons:
        return []
    return ["  why rows failed (most common first):"] + [
        f"    {count:,} × {reason}" for reason, count in reasons
    ]


def format_summary(summary: RunSummary, reasons: list[tuple[str, int]] | None = None) -> str:
    return "\n".join(
        [
            f"{_headline(summary)} -> {summary.output}",
            f"  ok {summary.ok:,} · error {summary.error:,}{_pending(summary.pending)}"
            f" · skipped {summary.skipped:,} · from checkpoint {summary.resumed_rows:,}",
            f"  tokens {summary.prompt_tokens:,} in / {summary.completion_tokens:,} out",
            f"  wall {summary.wall_s:,.1f} s · {summary.rows_per_s:,.1f} rows/s"
            f" · latency p50 {_fmt_ms(summary.latency_percentile(50))}"
            f" · p95 {_fmt_ms(summary.latency_percentile(95))}",
            f"  requests {summary.requests:,} (retries {summary.retries:,},"
            f" rate-limited {summary.rate_limited:,}, stalled {summary.stalled:,})"
            f" · from cache {summary.cache_hits:,}"
            f" · deduplicated {summary.deduplicated:,}",
            f"  cost {_fmt_cost(summary.cost_usd)}",
            *_reasons(reasons or []),
        ]
    )


def finish(summary: RunSummary, config: RunConfig, *, log_format: str = "text") -> None:
    from pipeline.api import too_many_failed

    if log_format != "json":
        if summary.up_to_date:
            click.echo(f"up to date: {summary.output} ({summary.rows:,} rows); nothing sent")
        else:
            click.echo(format_summary(summary, list(summary.error_reasons)))
            _echo_page(config)
    failed = too_many_failed(summary, config)
    if failed is not None:
        fail(failed)


def _echo_page(config: RunConfig) -> None:
    from pipeline.report import page_path_for, report_path_for

    page = page_path_for(config.output.report or report_path_for(config.output.local_path))
    if config.output.page and page.exists():
        click.echo(f"  report page {page.resolve().as_uri()}")


class InternalError(EnrichError):
    exit_code = ExitCode.INTERNAL


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(VERSION, package_name=DISTRIBUTION)
def cli() -> None:
    """Enrich a dataset with LLM answers: rate-limited, checkpointed, resumable."""


@cli.command(epilog=_exit_codes_epilog())
@dataset_options("run")
@click.option("--restart", is_flag=True, help="Discard the checkpoint and start over.")
@click.option("--retry-failed", is_flag=True, help="Re-send only rows whose status is error.")
@click.option("--force", is_flag=True, help="Redo the job even if the output is up to date.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line on stderr, for log shippers.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or progress lines.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve live metrics (Prometheus text format) on this port while the run goes "
    "(0: any free port, named in the log).",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="Address the metrics endpoint listens on (0.0.0.0: every interface).",
)
@handle_errors
def run(
    config_file: Path | None,
    restart: bool,
    retry_failed: bool,
    force: bool,
    log_format: str,
    quiet: bool,
    metrics_port: int | None,
    metrics_host: str,
    **flags: Any,
) -> None:
    """Run (or resume) an enrichment job. CONFIG is an optional TOML file;
    flags override it."""
    from pipeline.runner import RunOptions, enrich
    from pipeline.timeline import Timeline

    click.get_current_context().meta[LOG_FORMAT_KEY] = log_format
    config = build_config(config_file, flags)
    if config.run.engine == "local":
        _without_pandas()
    timeline = Timeline()
    progress, events = _reporting(
        log_format, quiet, [*_secrets(), config.api_key()], lambda: timeline.totals().to_dict()
    )
    with contextlib.ExitStack() as stack:
        if metrics_port is not None:
            from pipeline.metrics import serving

            port = stack.enter_context(serving(timeline, metrics_port, metrics_host))
            url = f"http://{metrics_host}:{port}/metrics"
            events.emit("metrics", message=f"serving live metrics at {url}", url=url, port=port)
        summary = enrich(
            config,
            options=RunOptions(restart=restart, retry_failed=retry_failed, force=force),
            progress=progress,
            events=events,
            handle_signals=True,
            timeline=timeline,
        )
    finish(summary, config, log_format=log_format)


@cli.command("report")
# A URI as typed (click.Path would turn s3://b/k into s3:/b/k): its report is local.
@click.argument("output", type=str)
@click.option(
    "--report",
    "report_file",
    type=click.Path(path_type=Path),
    default=None,
    help="The run report to draw [OUTPUT.report.json].",
)
@click.option(
    "--html",
    "html_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Where to write the page [beside the report: OUTPUT.report.html].",
)
@handle_errors
def report_page(output: str, report_file: Path | None, html_file: Path | None) -> None:
    """Draw a run's report page: one HTML file that opens offline in any
    browser (charts, failed rows and what to run next, settings)."""
    from pipeline.config import output_local_path
    from pipeline.page import write_page
    from pipeline.report import page_path_for, read_report, report_path_for

    source = report_file or report_path_for(output_local_path(output))
    body = read_report(source)
    if body is None:
        raise UsageError(
            f"no readable run report at {source}; run `enrich run` for {output} first, "
            "or name the report with --report"
        )
    target = html_file or page_path_for(source)
    try:
        write_page(target, body)
    except OSError as exc:
        raise UsageError(
            f"cannot write the page {target} ({exc.strerror or exc}); choose another path "
            "with --html"
        ) from None
    click.echo(f"wrote {target}: open it in any browser ({target.resolve().as_uri()})")


@cli.command()
@dataset_options("estimate")
@click.option(
    "--latency", type=float, default=2.0, show_default=True, help="Assumed seconds per request."
)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as one JSON object.")
@handle_errors
def estimate(config_file: Path | None, latency: float, as_json: bool, **flags: Any) -> None:
    """Rows, tokens, cost and time at the configured limits; with --route
    batch, the cost through the Batch API too and the number of batch files.
    Sends nothing and writes nothing, so no --output is needed. Takes the same
    CONFIG and flags as run (those that change nothing here are accepted and
    not listed)."""
    from pipeline.estimate import estimate_job
    from pipeline.runner import prepare

    config = build_config(config_file, flags, needs_output=False)
    found, text = estimate_job(prepare(config, check_output=False), latency)
    click.echo(json.dumps(found) if as_json else text)


@cli.command()
@dataset_options("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@handle_errors
def status(config_file: Path | None, as_json: bool, **flags: Any) -> None:
    """How far a run is: done / ok / error / remaining, tokens, last update.

    The argument is the run's TOML config or its output file. Reads only;
    takes run's flags too (only these are listed)."""
    from pipeline.config import OutputConfig, read_toml, section_from
    from pipeline.lock import live_holder, lock_path_for
    from pipeline.status import run_status

    tree: dict[str, Any] = {}
    if config_file is not None and config_file.suffix == ".toml":
        tree = dict(read_toml(config_file).get("output", {}))
    elif config_file is not None:
        tree = {"path": config_file}
    for name in ("output", "run_dir", "column_prefix"):
        if flags.get(name) is not None:
            tree["path" if name == "output" else name] = flags[name]
    if "path" not in tree:
        raise UsageError("enrich status needs the run's config file or output path (or --output)")
    output = section_from(OutputConfig, tree)
    report = run_status(output.path, output.resolved_run_dir, output.column_prefix)
    updated = report.last_update.isoformat(timespec="seconds") if report.last_update else None
    holder = live_holder(lock_path_for(output.local_path))
    from pipeline.batch_route import batch_summary, in_flight

    batches = batch_summary(output.resolved_run_dir)
    state, said = _run_state(holder, batches is not None and in_flight(batches), report.source)
    if as_json:
        counts = ("total_rows", "done", "remaining", "ok", "error", "skipped", "pending")
        body: dict[str, Any] = {name: getattr(report, name) for name in counts}
        body.update(
            state=state,
            pid=holder.pid if holder else None,
            source=report.source,
            path=str(report.path),
            prompt_tokens=report.prompt_tokens,
            completion_tokens=report.completion_tokens,
            last_update=updated,
        )
        if batches is not None:
            body["batches"] = {kind: {"files": f, "rows": r} for kind, (f, r) in batches.items()}
        click.echo(json.dumps(body))
        return
    click.echo(
        f"{said}: {report.path}\n"
        f"  done {report.done:,} of {report.total_rows:,} · remaining {report.remaining:,}\n"
        f"  ok {report.ok:,} · error {report.error:,}{_pending(report.pending)}"
        f" · skipped {report.skipped:,}\n"
        f"  tokens {report.prompt_tokens:,} in / {report.completion_tokens:,} out\n"
        f"  last update {updated or '-'}"
    )
    if batches is not None:
        click.echo(_batches_line(batches))


def _run_state(holder: LockHolder | None, batches_out: bool, source: str) -> tuple[str, str]:
    """The run's state for ``enrich status``: its word and its sentence."""
    if holder is not None:
        return "running", f"running (pid {holder.pid} on {holder.host}, since {holder.started_at})"
    if batches_out:
        return "batches_pending", "waiting on its batches (the same command collects what is done)"
    if source == "checkpoint":
        return "interrupted", "interrupted (no run holds the lock; the same command resumes it)"
    return "finished", "finished"


def _batches_line(batches: Mapping[str, tuple[int, int]]) -> str:
    shown = " · ".join(
        f"{kind.replace('_', ' ')} {files} ({rows:,} rows)"
        for kind, (files, rows) in batches.items()
        if files
    )
    return f"  batches (as last polled): {shown or 'none'}"


@cli.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="The run's checkpoint directory [OUTPUT.enrich].",
)
@handle_errors
def cancel(output: Path, run_dir: Path | None) -> None:
    """Cancel the batches of a --route batch run that are still in flight.
    What they finished is kept: the next `enrich run` collects it and sends
    the rest (a run waiting on them stops, exit 130)."""
    from pipeline.batch_route import cancel_run
    from pipeline.config import OutputConfig

    directory = OutputConfig(path=output, run_dir=run_dir).resolved_run_dir
    count = cancel_run(directory)
    if count is None:
        raise UsageError(
            f"no batches to cancel in {directory}; give the output of a --route batch run "
            "(or its --run-dir)"
        )
    click.echo(
        f"cancelled {count} batch(es) of {output}; what they finished is kept: run the same "
        "`enrich run` again to collect it and send the rest"
    )


@cli.command()
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset to run [data/questions.csv].",
)
@click.option("--column", default="question", show_default=True, help="Column holding the prompt.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("data/out/demo.parquet"),
    show_default=True,
    help="Enriched Parquet file to write.",
)
@click.option(
    "--latency-ms",
    type=float,
    default=300.0,
    show_default=True,
    help="Mean latency of the local server's answers (jitter: half of it).",
)
@click.option(
    "--fail-rate",
    type=float,
    default=0.05,
    show_default=True,
    help="Share of requests the server answers 5xx, and again 429 (0 for a clean run).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option(
    "--route",
    type=click.Choice(["online", "batch"]),
    default="online",
    show_default=True,
    help="batch: through the local server's Batch API (files of 20 requests, a few seconds each).",
)
@handle_errors
def demo(
    input_path: Path | None,
    column: str,
    output: Path,
    latency_ms: float,
    fail_rate: float,
    quiet: bool,
    route: str,
) -> None:
    """Run the sample dataset through the built-in local server: no key, no network."""
    import polars as pl

    from pipeline.config import load_config
    from pipeline.runner import RunOptions, enrich
    from pipeline.simulate import BatchConfig, Simulator, SimulatorConfig

    input_path = input_path or _sample_path()
    output.parent.mkdir(parents=True, exist_ok=True)
    server_config = SimulatorConfig(
        latency_ms=latency_ms,
        jitter_ms=latency_ms / 2,
        fail_rate_5xx=fail_rate,
        fail_rate_429=fail_rate,
        seed=7,
        batch=BatchConfig(turnaround_s=3.0, fail_rate=fail_rate),
    )

    with Simulator.run_in_thread(server_config) as server:
        click.echo(
            _demo_intro(server.base_url, input_path, column, latency_ms, fail_rate, route),
            err=True,
        )
        config = load_config(
            None,
            {
                "input.path": input_path,
                "input.column": column,
                "output.path": output,
                "model.name": "sim-1",
                "model.base_url": server.base_url,
                "limits.concurrency": 16,
                "limits.backoff_base_s": 0.05,
                **_DEMO_ROUTES[route],
            },
        )
        summary = enrich(
            config,
            options=RunOptions(restart=True),
            progress=_progress(quiet),
            handle_signals=True,
        )
    finish(summary, config)
    with pl.Config(
        tbl_rows=5, fmt_str_lengths=60, tbl_width_chars=120, tbl_hide_dataframe_shape=True
    ):
        preview = pl.read_parquet(output).select(
            column, "response", "status", "latency_ms", "attempts", "route"
        )
        click.echo(preview.head(5))
    click.echo(_demo_next_steps(output, column), err=True)


# The batch demo: files of 20 requests (the sample makes three), polled every second.
_DEMO_ROUTES: Final[dict[str, dict[str, Any]]] = {
    "online": {},
    "batch": {"route": "batch", "batch.max_requests": 20, "batch.poll_interval_s": 1.0},
}


_DEMO_BATCH_INTRO: Final = {
    "batch": "\n  --route batch: the rows go through the server's Batch API instead, in files "
    "of 20 requests; each batch finishes about 3 s after it is created (a real one within "
    "24 h, at half the price); its error file's failures are sent again in a new batch. "
    "latency_ms is the batch's turnaround."
}


def _demo_intro(
    base_url: str,
    input_path: Path,
    column: str,
    latency_ms: float,
    fail_rate: float,
    route: str = "online",
) -> str:
    faults = (
        f"  It answers {fail_rate:.0%} of requests with a 5xx and {fail_rate:.0%} with a 429 "
        "on purpose: enrich retries them (attempts > 1) and slows down on 429s, so every row "
        "still gets its answer. --fail-rate 0 turns the faults off.\n"
        if fail_rate
        else ""
    )
    return (
        f"enrich demo: a local OpenAI-compatible server at {base_url} answers every prompt "
        f"with '[sim-1] answer to: <the prompt>' after about {latency_ms:g} ms (no key, no "
        "network).\n"
        f"{faults}"
        f"  Rows of {input_path} whose '{column}' is blank are skipped (status skipped), "
        "never sent." + _DEMO_BATCH_INTRO.get(route, "")
    )


def _demo_next_steps(output: Path, column: str) -> str:
    return (
        "next:\n"
        f"  python -c \"import polars as pl; print(pl.read_parquet('{output}'))\"   "
        "# the whole output\n"
        f"  enrich simulate --port 8000 --latency-ms 200 --rpm 600 &   # a server to try limits\n"
        f"  enrich run --input data/questions.csv --column {column} --output out.parquet "
        "--base-url http://127.0.0.1:8000/v1 --model sim-1\n"
        "  enrich run --help   # every flag, its default and the exit codes"
    )


def _sample_path() -> Path:
    # Package data: the demo works from a wheel install, offline.
    sample = Path(__file__).resolve().parent / "sample" / "questions.csv"
    if not sample.exists():
        raise UsageError(f"the sample {sample} is missing from this install; pass --input")
    return sample


# The server's own times the simulator's answers carry (--timings).
_SIMULATOR_TIMINGS: Final[dict[str, Literal["llama.cpp", "vllm"] | None]] = {
    "llama.cpp": "llama.cpp",
    "vllm": "vllm",
    "none": None,
}


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option(
    "--latency-ms", type=float, default=0.0, show_default=True, help="Mean latency per answer."
)
@click.option(
    "--jitter-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Latency varies uniformly by up to this much either way.",
)
@click.option("--rpm", type=int, default=None, help="Server-enforced requests/min.")
@click.option("--tpm", type=int, default=None, help="Server-enforced tokens/min.")
@click.option(
    "--window-s",
    type=float,
    default=60.0,
    show_default=True,
    help="Window the --rpm/--tpm limits are counted over.",
)
@click.option(
    "--rpm-schedule",
    default=None,
    metavar="S:RPM,...",
    help="Change the requests/min over time: seconds since the first request and the "
    "rpm from then on, e.g. 10:600,25:6000 (0 refuses everything).",
)
@click.option("--no-rate-headers", is_flag=True, help="Send no x-ratelimit-* headers.")
@click.option(
    "--rate-headers-until",
    "rate_headers_until_s",
    type=float,
    default=None,
    metavar="S",
    help="Stop sending x-ratelimit-* headers S seconds after the first request.",
)
@click.option(
    "--fail-rate-5xx",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of requests answered with a 500/502/503.",
)
@click.option(
    "--fail-rate-429",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of requests answered 429 with a retry-after (besides --rpm/--tpm).",
)
@click.option(
    "--drop-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of connections closed without an answer.",
)
@click.option(
    "--hang-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of requests that send nothing for --hang-s.",
)
@click.option(
    "--hang-s",
    type=float,
    default=30.0,
    show_default=True,
    help="How long a hanging request sends nothing.",
)
@click.option(
    "--hang-max-s",
    type=float,
    default=None,
    help="Each hang lasts a uniform draw between --hang-s and this.",
)
@click.option(
    "--hang-answers",
    is_flag=True,
    help="A hang ends in the answer (a stuck connection that answers late), not a drop.",
)
@click.option(
    "--chunk-delay-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Pause between the chunks of a streamed answer.",
)
@click.option(
    "--no-streaming",
    is_flag=True,
    help="Answer stream=true with a 400, like servers that cannot stream.",
)
@click.option(
    "--malformed-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of answers whose body is not valid JSON.",
)
@click.option(
    "--slots",
    type=int,
    default=None,
    help="Compute this many requests at once and queue the rest, like a self-hosted server.",
)
@click.option(
    "--slot-order",
    type=click.Choice(["fifo", "any"]),
    default="fifo",
    show_default=True,
    help="Serve the queue for --slots in the order it came, or in any (llama-cpp-python's).",
)
@click.option(
    "--timings",
    type=click.Choice(list(_SIMULATOR_TIMINGS)),
    default="llama.cpp",
    show_default=True,
    help="The server's own times each answer carries with --slots: llama.cpp's "
    "timings, vLLM's metrics, or none (llama-cpp-python's server).",
)
@click.option(
    "--token-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Service time per completion token, added to --latency-ms; with --slots "
    "a streamed answer's tokens come this far apart, as generated.",
)
@click.option("--api-key", default=None, help="Require this bearer key (else any key works).")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the faults and latencies."
)
@click.option(
    "--batch-turnaround",
    "batch_turnaround_s",
    type=float,
    default=5.0,
    show_default=True,
    metavar="S",
    help="Seconds from a batch's creation to completed (validating the first tenth).",
)
@click.option(
    "--batch-expire-after",
    "batch_expire_after_s",
    type=float,
    default=86_400.0,
    show_default=True,
    metavar="S",
    help="A batch not done this many seconds after creation expires, keeping what completed.",
)
@click.option(
    "--batch-fail-rate",
    type=float,
    default=0.0,
    show_default=True,
    help="Share of batch requests in the error file, half 500 (transient), half 400.",
)
@click.option(
    "--batch-enqueued-tokens",
    type=int,
    default=None,
    help="Enqueued-token limit per model: a batch past it fails with token_limit_exceeded.",
)
@click.option(
    "--batch-poll-delay-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Delay before answering GET /v1/batches/{id} (a slow poll).",
)
@click.option(
    "--batch-max-file-bytes",
    type=int,
    default=200 * 1024 * 1024,
    show_default=True,
    help="Largest upload; past it POST /v1/files answers 413.",
)
@click.option(
    "--batch-max-requests",
    type=int,
    default=50_000,
    show_default=True,
    help="Most requests in a batch file; past it the batch fails with too_many_tasks.",
)
@click.option(
    "--batch-max-stored-bytes",
    type=int,
    default=4 * 1024 * 1024 * 1024,
    show_default=True,
    help="Bytes of files held in memory; past it uploads are refused until files are deleted.",
)
@handle_errors
def simulate(
    host: str,
    port: int,
    no_rate_headers: bool,
    no_streaming: bool,
    api_key: str | None,
    rpm_schedule: str | None,
    timings: str,
    **settings: Any,
) -> None:
    """Serve a local OpenAI-compatible API with latency, limits and faults, and
    the Files and Batches endpoints of OpenAI's Batch API."""
    from pipeline.simulate import BatchConfig, SimulatorConfig, parse_rpm_schedule, serve_forever

    batch = {
        name.removeprefix("batch_"): settings.pop(name)
        for name in list(settings)
        if name.startswith("batch_")
    }
    config = SimulatorConfig(
        rate_headers=not no_rate_headers,
        streaming=not no_streaming,
        api_key=api_key,
        rpm_schedule=parse_rpm_schedule(rpm_schedule) if rpm_schedule else (),
        timings=_SIMULATOR_TIMINGS[timings],
        batch=BatchConfig(**batch),
        **settings,
    )
    serve_forever(config, host, port, ready=lambda url: click.echo(f"serving {url}", err=True))


@cli.group()
def cache() -> None:
    """Inspect or empty the response cache."""


def _cache_path_option(command: F) -> F:
    return click.option(
        "--cache-path",
        type=click.Path(path_type=Path),
        default=None,
        help="Cache file [$ENRICH_CACHE_DIR or ~/.cache/enrich/cache.sqlite3].",
    )(command)


@cache.command("stats")
@_cache_path_option
@handle_errors
def cache_stats_command(cache_path: Path | None) -> None:
    """Entries, size and age of the cache."""
    from pipeline.cache import cache_stats, default_cache_path

    stats = cache_stats(cache_path or default_cache_path())
    oldest, newest = (
        datetime.fromtimestamp(moment, tz=UTC).isoformat(timespec="seconds") if moment else "-"
        for moment in (stats.oldest, stats.newest)
    )
    click.echo(
        f"{stats.path}: {stats.entries:,} answers, {stats.size_bytes / 1e6:,.1f} MB, "
        f"oldest {oldest}, newest {newest}"
    )


@cache.command("clear")
@_cache_path_option
@handle_errors
def cache_clear_command(cache_path: Path | None) -> None:
    """Delete every cached answer (a damaged cache is removed and created anew)."""
    from pipeline.cache import clear_cache, default_cache_path

    path = cache_path or default_cache_path()
    cleared = clear_cache(path)
    if cleared.repaired:
        click.echo(f"{path}: the cache was damaged; removed and created anew")
    else:
        click.echo(f"{path}: removed {cleared.entries:,} answers")


def _wants_json(args: list[str]) -> bool:
    # Click failed before any command ran, so no context holds the format:
    # read it off the command line as click would have.
    for index, arg in enumerate(args):
        if arg == "--log-format" and index + 1 < len(args):
            return args[index + 1] == "json"
        if arg == "--log-format=json":
            return True
    return False


def main(args: list[str] | None = None) -> None:
    """The ``enrich`` command. Argument errors (an unknown flag, a bad
    number) exit 2 as click's usage text, or one JSON ``error`` event with
    ``--log-format json``, as the README promises a log shipper."""
    args = sys.argv[1:] if args is None else args
    _OWN_PROCESS[0] = True
    # The interpreter's last collections walk every object the imports made
    # (openai's types, pyarrow, polars, matplotlib): 0.3-0.4 s after a run,
    # here, to free memory the process is about to give back anyway. Frozen
    # objects are skipped; atexit handlers, thread joins and the standard
    # streams' flush still run. Registered once however often main is called.
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    try:
        code = cli.main(args, prog_name="enrich", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.Abort:
        click.echo("enrich: interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as error:
        if not _wants_json(args):
            error.show()
            sys.exit(error.exit_code)
        context = getattr(error, "ctx", None)  # usage errors carry it, others do not
        command = context.command_path if isinstance(context, click.Context) else "enrich"
        JsonEventSink(sys.stderr, secrets=_secrets()).emit(
            "error",
            level="error",
            message=f"{error.format_message().rstrip('.')}; see {command} --help",
            exit_code=ExitCode.USAGE,
        )
        sys.exit(ExitCode.USAGE)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
