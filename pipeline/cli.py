"""The command line: the only module that prints, parses flags and exits
with the code of the error that ended the run (``pipeline.errors.ExitCode``,
the one table of exit codes; the README's table is checked against it).

Light to import: ``enrich --help`` (and any subcommand's) loads click and the
standard library only. The config (pydantic), the runner (pyarrow, aiohttp)
and the rest are imported inside the commands that use them.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from pipeline.errors import EnrichError, ExitCode, UsageError
from pipeline.events import (
    EventSink,
    JsonEventSink,
    ProgressEvents,
    TextEventSink,
    redact,
)
from pipeline.progress import NoProgress, Progress, TqdmProgress
from pipeline.stall import STALL_DEFAULT_S, STALL_FLOOR_S, STALL_MULTIPLE, STALL_WARMUP
from pipeline.version import DISTRIBUTION

if TYPE_CHECKING:
    from pipeline.config import RunConfig
    from pipeline.runner import RunSummary

F = TypeVar("F", bound=Callable[..., Any])

# (flag, config key, click type, help). One table so every dataset command
# takes the same flags and they cannot drift apart.
DATASET_OPTIONS: Final[list[tuple[str, str, Any, str]]] = [
    (
        "--input",
        "input.path",
        click.Path(path_type=Path),
        "Input dataset (.csv, .parquet, .jsonl).",
    ),
    ("--column", "input.column", str, "Column holding the prompt."),
    ("--template", "input.template", str, "Prompt template with {column} placeholders."),
    ("--system-prompt", "input.system_prompt", str, "System message sent with every row."),
    ("--chunk-size", "input.chunk_size", int, "Rows read per chunk (bounds memory)."),
    ("--output", "output.path", click.Path(path_type=Path), "Enriched Parquet file to write."),
    (
        "--run-dir",
        "output.run_dir",
        click.Path(path_type=Path),
        "Checkpoint directory [OUTPUT.enrich].",
    ),
    ("--column-prefix", "output.column_prefix", str, "Prefix for the added columns."),
    ("--model", "model.name", str, "Model name sent to the API."),
    ("--base-url", "model.base_url", str, "OpenAI-compatible base URL [$OPENAI_BASE_URL]."),
    ("--api-key-env", "model.api_key_env", str, "Variable holding the API key [OPENAI_API_KEY]."),
    ("--temperature", "model.temperature", float, "Sampling temperature."),
    ("--max-tokens", "model.max_tokens", int, "Completion token cap per row."),
    (
        "--timeout",
        "model.timeout_s",
        float,
        "Longest one request may take in all, in seconds [60]; longer is cut and retried.",
    ),
    (
        "--stall-timeout",
        "model.stall_timeout_s",
        float,
        "Cut and retry a request that sends no byte for this many seconds (before its "
        f"first or between chunks) [learned: {STALL_MULTIPLE:g}x the p99 of recent answers' "
        f"longest silence, {STALL_FLOOR_S:g} s at least, {STALL_DEFAULT_S:g} s until "
        f"{STALL_WARMUP} answers; doubled on each retry of a row].",
    ),
    (
        "--transport",
        "model.transport",
        click.Choice(["aiohttp", "openai"]),
        "HTTP client: aiohttp (fast, default) or openai (the official SDK's).",
    ),
    ("--concurrency", "limits.concurrency", int, "Requests in flight at most."),
    ("--rpm", "limits.rpm", int, "Requests per minute."),
    ("--tpm", "limits.tpm", int, "Tokens per minute."),
    ("--max-attempts", "limits.max_attempts", int, "Attempts per row before it is marked error."),
    (
        "--max-pause",
        "limits.max_pause_s",
        float,
        "Longest 429 retry-after to wait out, in seconds; longer ends the run (exit 3).",
    ),
    (
        "--max-outage",
        "limits.max_outage_s",
        float,
        "Longest API outage (connections refused, timeouts, 5xx across rows) to wait out "
        "while probing, in seconds [600]; longer ends the run (exit 75, checkpoint kept).",
    ),
    (
        "--max-refusal",
        "limits.max_refusal_s",
        float,
        "Longest time the API may answer every request with 429 (none admitted), in "
        "seconds [900]; longer ends the run (exit 3, checkpoint kept).",
    ),
    ("--flush-every", "checkpoint.flush_every", int, "Results per sealed checkpoint part."),
    (
        "--flush-interval",
        "checkpoint.flush_interval_s",
        float,
        "Longest a finished answer waits before it is durable, in seconds [0.1].",
    ),
    (
        "--on-input-change",
        "checkpoint.on_input_change",
        click.Choice(["restart", "refuse"]),
        "Input changed since an unfinished run: restart (reusing unchanged answers) or refuse.",
    ),
    ("--max-error-rate", "max_error_rate", float, "Failed share above which the exit code is 1."),
    ("--max-cost", "max_cost", float, "Spend cap in USD for the whole job (exit 5 when reached)."),
    (
        "--price-file",
        "price_file",
        click.Path(path_type=Path),
        "Extra prices (TOML, per 1M tokens).",
    ),
    (
        "--report",
        "output.report",
        click.Path(path_type=Path),
        "Run report path [OUTPUT.report.json].",
    ),
    ("--cache-path", "cache.path", click.Path(path_type=Path), "Response cache file."),
    ("--schema", "structured.schema", str, "JSON Schema (file or inline JSON): typed columns."),
    ("--schema-attempts", "structured.max_attempts", int, "Answers asked until one validates."),
]

# On/off switches whose unset state means "decide from the request": on for
# deterministic requests (no temperature or 0), off for sampled ones.
TOGGLE_OPTIONS: Final[list[tuple[str, str, str]]] = [
    ("--cache/--no-cache", "cache.enabled", "Use the response cache across runs."),
    ("--dedup/--no-dedup", "cache.dedup", "Send identical requests once per run."),
    ("--adaptive/--no-adaptive", "limits.adaptive", "Learn limits from headers and 429s (AIMD)."),
    (
        "--stream/--no-stream",
        "model.stream",
        "Stream answers, so a stuck request is cut in seconds while a long answer is not "
        "[on; servers that cannot stream are detected].",
    ),
]


def _option_dest(flag: str) -> str:
    return flag.removeprefix("--").replace("-", "_")


def _toggle_dest(key: str) -> str:
    return key.replace(".", "_")


def dataset_options(command: F) -> F:
    """The shared interface of every command that reads a dataset."""
    for flag, _key, kind, help_text in reversed(DATASET_OPTIONS):
        command = click.option(flag, _option_dest(flag), type=kind, default=None, help=help_text)(
            command
        )
    for flags, key, help_text in TOGGLE_OPTIONS:
        command = click.option(flags, _toggle_dest(key), default=None, help=help_text)(command)
    command = click.option(
        "--keep-checkpoint",
        is_flag=True,
        default=None,
        help="Keep the run directory after success.",
    )(command)
    return click.argument(
        "config_file", required=False, type=click.Path(path_type=Path), metavar="[CONFIG]"
    )(command)


def build_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    from pipeline.config import load_config

    overrides = {key: flags.get(_option_dest(flag)) for flag, key, _, _ in DATASET_OPTIONS}
    overrides["output.keep_checkpoint"] = flags.get("keep_checkpoint")
    for _, key, _ in TOGGLE_OPTIONS:
        overrides[key] = flags.get(_toggle_dest(key))
    return load_config(config_file, overrides)


LOG_FORMAT_KEY: Final = "enrich.log_format"


def _log_format() -> str:
    context = click.get_current_context(silent=True)
    return str(context.meta.get(LOG_FORMAT_KEY, "text")) if context else "text"


def _secrets() -> list[str | None]:
    """Values no line we print may contain, whatever the config names."""
    return [os.environ.get("OPENAI_API_KEY")]


def fail(error: EnrichError) -> None:
    if _log_format() == "json":
        JsonEventSink(sys.stderr, secrets=_secrets()).emit(
            "error", level="error", message=error.message, exit_code=error.exit_code
        )
    else:
        click.echo(f"enrich: error: {redact(error.message, _secrets())}", err=True)
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
    log_format: str, quiet: bool, secrets: list[str | None]
) -> tuple[Progress, EventSink]:
    """Where progress and events go: a bar on a terminal; plain event lines in
    cron logs; one JSON object per line for log shippers (progress included,
    even with --quiet: that is what the shipper is for)."""
    if log_format == "json":
        json_sink = JsonEventSink(sys.stderr, secrets=secrets)
        return ProgressEvents(json_sink), json_sink
    text_sink = TextEventSink(sys.stderr, secrets=secrets)
    if quiet:
        return NoProgress(), text_sink
    if sys.stderr.isatty():
        return TqdmProgress(sys.stderr), text_sink
    return ProgressEvents(text_sink), text_sink


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _fmt_cost(value: float | None) -> str:
    return (
        "unknown (no price for this model; see --price-file)" if value is None else f"${value:,.4f}"
    )


def _pending(summary: RunSummary) -> str:
    if not summary.pending:
        return ""
    return f" (pending {summary.pending:,}: transient failures, the next run sends them again)"


def format_summary(summary: RunSummary) -> str:
    return "\n".join(
        [
            f"done: {summary.rows:,} rows -> {summary.output}",
            f"  ok {summary.ok:,} · error {summary.error:,}{_pending(summary)}"
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
        ]
    )


def finish(summary: RunSummary, config: RunConfig, *, log_format: str = "text") -> None:
    if log_format != "json":
        if summary.up_to_date:
            click.echo(f"up to date: {summary.output} ({summary.rows:,} rows); nothing sent")
        else:
            click.echo(format_summary(summary))
    if summary.error_rate > config.max_error_rate:
        fail(
            TooManyErrors(
                f"{summary.error} rows failed ({summary.error_rate:.1%}), above "
                f"--max-error-rate {config.max_error_rate:.1%}; rerun with --retry-failed"
            )
        )


class TooManyErrors(EnrichError):
    exit_code = ExitCode.TOO_MANY_FAILED_ROWS


class InternalError(EnrichError):
    exit_code = ExitCode.INTERNAL


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name=DISTRIBUTION)
def cli() -> None:
    """Enrich a dataset with LLM answers: rate-limited, checkpointed, resumable."""


@cli.command()
@dataset_options
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
@handle_errors
def run(
    config_file: Path | None,
    restart: bool,
    retry_failed: bool,
    force: bool,
    log_format: str,
    quiet: bool,
    **flags: Any,
) -> None:
    """Run (or resume) an enrichment job. CONFIG is an optional TOML file;
    flags override it."""
    from pipeline.runner import RunOptions, enrich

    click.get_current_context().meta[LOG_FORMAT_KEY] = log_format
    config = build_config(config_file, flags)
    progress, events = _reporting(log_format, quiet, [*_secrets(), config.api_key()])
    summary = enrich(
        config,
        options=RunOptions(restart=restart, retry_failed=retry_failed, force=force),
        progress=progress,
        events=events,
        handle_signals=True,
    )
    finish(summary, config, log_format=log_format)


@cli.command()
@dataset_options
@click.option(
    "--latency", type=float, default=2.0, show_default=True, help="Assumed seconds per request."
)
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as one JSON object.")
@handle_errors
def estimate(config_file: Path | None, latency: float, as_json: bool, **flags: Any) -> None:
    """Rows, tokens, cost and time at the configured limits. Sends nothing."""
    from pipeline.costs import PriceTable, format_estimate, iter_prompt_tokens
    from pipeline.costs import estimate as estimate_run
    from pipeline.runner import prepare

    config = build_config(config_file, flags)
    prepared = prepare(config, check_output=False)
    result = estimate_run(
        iter_prompt_tokens(prepared.source, prepared.spec, config.input.chunk_size),
        model=config.model.name,
        price=PriceTable.load(config.price_file).price_for(config.model.name),
        max_tokens=config.model.max_tokens,
        concurrency=config.limits.concurrency,
        rpm=config.limits.rpm,
        tpm=config.limits.tpm,
        latency_s=latency,
    )
    click.echo(json.dumps(result.to_dict()) if as_json else format_estimate(result))


@cli.command()
@dataset_options
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@handle_errors
def status(config_file: Path | None, as_json: bool, **flags: Any) -> None:
    """How far a run is: done / ok / error / remaining, tokens, last update.

    The argument is the run's TOML config or its output file. Reads only."""
    from pipeline.config import OutputConfig, read_toml
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
    output = OutputConfig.model_validate(tree)
    report = run_status(output.path, output.resolved_run_dir, output.column_prefix)
    updated = report.last_update.isoformat(timespec="seconds") if report.last_update else None
    if as_json:
        counts = ("total_rows", "done", "remaining", "ok", "error", "skipped")
        body: dict[str, Any] = {name: getattr(report, name) for name in counts}
        body.update(
            source=report.source,
            path=str(report.path),
            prompt_tokens=report.prompt_tokens,
            completion_tokens=report.completion_tokens,
            last_update=updated,
        )
        click.echo(json.dumps(body))
        return
    state = "in progress or interrupted" if report.source == "checkpoint" else "finished"
    click.echo(
        f"{state}: {report.path}\n"
        f"  done {report.done:,} of {report.total_rows:,} · remaining {report.remaining:,}\n"
        f"  ok {report.ok:,} · error {report.error:,} · skipped {report.skipped:,}\n"
        f"  tokens {report.prompt_tokens:,} in / {report.completion_tokens:,} out\n"
        f"  last update {updated or '-'}"
    )


@cli.command()
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset to run [data/questions.csv].",
)
@click.option("--column", default="question", show_default=True)
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("data/out/demo.parquet"),
    show_default=True,
)
@click.option("--latency-ms", type=float, default=300.0, show_default=True)
@click.option("--quiet", "-q", is_flag=True)
@handle_errors
def demo(
    input_path: Path | None, column: str, output: Path, latency_ms: float, quiet: bool
) -> None:
    """Run the sample dataset through the built-in local server: no key, no network."""
    import polars as pl

    from pipeline.config import load_config
    from pipeline.runner import RunOptions, enrich
    from pipeline.simulate import Simulator, SimulatorConfig

    input_path = input_path or _sample_path()
    output.parent.mkdir(parents=True, exist_ok=True)
    server_config = SimulatorConfig(
        latency_ms=latency_ms,
        jitter_ms=latency_ms / 2,
        fail_rate_5xx=0.05,
        fail_rate_429=0.05,
        seed=7,
    )
    with Simulator.run_in_thread(server_config) as server:
        click.echo(f"enrich demo: local OpenAI-compatible server at {server.base_url}", err=True)
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
            column, "response", "status", "latency_ms", "attempts"
        )
        click.echo(preview.head(5))


def _sample_path() -> Path:
    # Package data: the demo works from a wheel install, offline.
    sample = Path(__file__).resolve().parent / "sample" / "questions.csv"
    if not sample.exists():
        raise UsageError(f"the sample {sample} is missing from this install; pass --input")
    return sample


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--jitter-ms", type=float, default=0.0, show_default=True)
@click.option("--rpm", type=int, default=None, help="Server-enforced requests/min.")
@click.option("--tpm", type=int, default=None, help="Server-enforced tokens/min.")
@click.option("--window-s", type=float, default=60.0, show_default=True)
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
@click.option("--fail-rate-5xx", type=float, default=0.0, show_default=True)
@click.option("--fail-rate-429", type=float, default=0.0, show_default=True)
@click.option("--drop-rate", type=float, default=0.0, show_default=True)
@click.option("--hang-rate", type=float, default=0.0, show_default=True)
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
@click.option("--malformed-rate", type=float, default=0.0, show_default=True)
@click.option(
    "--slots",
    type=int,
    default=None,
    help="Compute this many requests at once and queue the rest, like a self-hosted server.",
)
@click.option(
    "--token-ms",
    type=float,
    default=0.0,
    show_default=True,
    help="Service time per completion token, added to --latency-ms.",
)
@click.option("--api-key", default=None, help="Require this bearer key (else any key works).")
@click.option("--seed", type=int, default=0, show_default=True)
@handle_errors
def simulate(
    host: str,
    port: int,
    no_rate_headers: bool,
    no_streaming: bool,
    api_key: str | None,
    rpm_schedule: str | None,
    **settings: Any,
) -> None:
    """Serve a local OpenAI-compatible API with latency, limits and faults."""
    from pipeline.simulate import SimulatorConfig, parse_rpm_schedule, serve_forever

    config = SimulatorConfig(
        rate_headers=not no_rate_headers,
        streaming=not no_streaming,
        api_key=api_key,
        rpm_schedule=parse_rpm_schedule(rpm_schedule) if rpm_schedule else (),
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


def main() -> None:
    cli(prog_name="enrich")


if __name__ == "__main__":
    main()
