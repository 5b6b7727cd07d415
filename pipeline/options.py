"""The one table of run settings: each config key with its flag, its type,
its help and the default ``--help`` shows.

The CLI builds its flags from it, the config names the flag of a key in its
errors from it, and the Python API maps keyword settings (``rpm=500``) to keys
with it, so the three cannot drift apart. A test checks that every key of
``RunConfig`` is here and that every shown default is the model's own.

Light on purpose (standard library and pipeline.stall's constants only): ``enrich --help`` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from pipeline.stall import STALL_DEFAULT_S, STALL_FLOOR_S, STALL_MULTIPLE, STALL_WARMUP

Kind = Literal["path", "location", "str", "int", "float", "json", "toggle", "switch"]
Command = Literal["run", "estimate", "status"]

RUN: Final[frozenset[Command]] = frozenset({"run"})
RUN_ESTIMATE: Final[frozenset[Command]] = frozenset({"run", "estimate"})
RUN_STATUS: Final[frozenset[Command]] = frozenset({"run", "status"})
EVERYWHERE: Final[frozenset[Command]] = frozenset({"run", "estimate", "status"})


@dataclass(frozen=True)
class Option:
    """One setting. ``commands`` are where ``--help`` lists it; every command
    that reads a dataset still accepts it (hidden), so a ``run`` line turns
    into an ``estimate`` line by changing one word."""

    flag: str
    """``--rpm``; an on/off pair is written ``--cache/--no-cache``."""
    key: str
    """The dotted config key: ``limits.rpm``."""
    kind: Kind
    help: str
    default: str | None = None
    """What ``--help`` shows as the default (None: unset unless given)."""
    commands: frozenset[Command] = RUN
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        """The keyword name: ``--max-cost`` -> ``max_cost``; ``--cache/--no-cache`` -> ``cache``."""
        return self.flag.split("/")[0].removeprefix("--").replace("-", "_")

    def help_text(self) -> str:
        shown = self.help
        if self.choices:
            shown += f" One of: {', '.join(self.choices)}."
        if self.default is not None:
            shown += f"  [default: {self.default}]"
        return f"{shown}  (config: {self.key})"


OPTIONS: Final[tuple[Option, ...]] = (
    Option(
        "--input",
        "input.path",
        "location",
        "Input dataset: .csv, .parquet/.pq, .jsonl/.ndjson; gzip as .csv.gz, .jsonl.gz, "
        ".ndjson.gz. A local path or a URI pyarrow opens (s3://bucket/key, gs://, file://).",
        commands=RUN_ESTIMATE,
    ),
    Option("--column", "input.column", "str", "Column holding the prompt.", commands=RUN_ESTIMATE),
    Option(
        "--template",
        "input.template",
        "str",
        "Prompt template with {column} placeholders (instead of --column).",
        commands=RUN_ESTIMATE,
    ),
    Option(
        "--system-prompt",
        "input.system_prompt",
        "str",
        "System message sent with every row.",
        commands=RUN_ESTIMATE,
    ),
    Option(
        "--chunk-size",
        "input.chunk_size",
        "int",
        "Rows read per chunk (bounds memory).",
        "1000",
        RUN_ESTIMATE,
    ),
    Option(
        "--max-prompt-tokens",
        "input.max_prompt_tokens",
        "int",
        "A row whose prompt is estimated above this many tokens is marked error without a "
        "request (set it to your model's context).",
        "2000000",
        RUN_ESTIMATE,
    ),
    Option(
        "--output",
        "output.path",
        "location",
        "Enriched Parquet file to write: a local path or a URI (s3://bucket/key.parquet).",
        commands=RUN_STATUS,
    ),
    Option(
        "--run-dir",
        "output.run_dir",
        "path",
        "Checkpoint directory.",
        "OUTPUT.enrich",
        RUN_STATUS,
    ),
    Option(
        "--column-prefix",
        "output.column_prefix",
        "str",
        "Prefix for the added columns (when the input already has e.g. 'response').",
        "none",
        EVERYWHERE,
    ),
    Option(
        "--keep-checkpoint",
        "output.keep_checkpoint",
        "switch",
        "Keep the run directory after success.",
    ),
    Option("--report", "output.report", "path", "Run report path.", "OUTPUT.report.json"),
    Option(
        "--page/--no-page",
        "output.page",
        "toggle",
        "Write the report page (HTML beside the report, opens offline) when the run ends.",
        "on",
    ),
    Option(
        "--model",
        "model.name",
        "str",
        "Model name sent to the API.",
        "gpt-4o-mini",
        RUN_ESTIMATE,
    ),
    Option(
        "--base-url",
        "model.base_url",
        "str",
        "OpenAI-compatible base URL.",
        "$OPENAI_BASE_URL, else OpenAI's",
    ),
    Option(
        "--api-key-env",
        "model.api_key_env",
        "str",
        "Environment variable holding the API key (never the key itself).",
        "OPENAI_API_KEY",
    ),
    Option("--temperature", "model.temperature", "float", "Sampling temperature (0-2)."),
    Option("--top-p", "model.top_p", "float", "Nucleus sampling (0-1]."),
    Option(
        "--max-tokens",
        "model.max_tokens",
        "int",
        "Completion token cap per row.",
        commands=RUN_ESTIMATE,
    ),
    Option("--seed", "model.seed", "int", "Sampling seed, for endpoints that honour it."),
    Option(
        "--extra-params",
        "model.extra_params",
        "json",
        "Other request parameters as a JSON object, e.g. '{\"presence_penalty\": 0.5}'.",
    ),
    Option(
        "--timeout",
        "model.timeout_s",
        "float",
        "Longest one request may take in all, in seconds; longer is cut and retried.",
        "60",
    ),
    Option(
        "--stall-timeout",
        "model.stall_timeout_s",
        "float",
        "Cut and retry a request that sends no byte for this many seconds (before its "
        "first or between chunks).",
        f"learned: {STALL_MULTIPLE:g}x the p99 of recent answers' longest silence, "
        f"{STALL_FLOOR_S:g} s at least, {STALL_DEFAULT_S:g} s until {STALL_WARMUP} answers; "
        "doubled on each retry of a row",
    ),
    Option(
        "--stream/--no-stream",
        "model.stream",
        "toggle",
        "Stream answers, so a stuck request is cut in seconds while a long answer is not "
        "(servers that cannot stream are detected).",
        "on",
    ),
    Option(
        "--transport",
        "model.transport",
        "str",
        "HTTP client: h11 (lean, quick to start), aiohttp or openai (the official SDK's).",
        "h11",
        choices=("h11", "aiohttp", "openai"),
    ),
    Option(
        "--concurrency",
        "limits.concurrency",
        "int",
        "Requests in flight at most.",
        "32",
        RUN_ESTIMATE,
    ),
    Option(
        "--rpm",
        "limits.rpm",
        "int",
        "Requests per minute.",
        "learned from the API",
        RUN_ESTIMATE,
    ),
    Option(
        "--tpm",
        "limits.tpm",
        "int",
        "Tokens per minute.",
        "learned from the API",
        RUN_ESTIMATE,
    ),
    Option(
        "--max-attempts",
        "limits.max_attempts",
        "int",
        "Attempts per row before it is marked error (a 429 counts a quarter).",
        "6",
    ),
    Option(
        "--adaptive/--no-adaptive",
        "limits.adaptive",
        "toggle",
        "Learn limits from x-ratelimit-* headers and 429s (AIMD).",
        "on",
    ),
    Option(
        "--backoff-base",
        "limits.backoff_base_s",
        "float",
        "First retry delay in seconds (doubled per attempt, jittered).",
        "0.5",
    ),
    Option(
        "--backoff-max",
        "limits.backoff_max_s",
        "float",
        "Longest retry delay in seconds (a server's retry-after wins when longer).",
        "60",
    ),
    Option(
        "--max-pause",
        "limits.max_pause_s",
        "float",
        "Longest 429 retry-after to wait out, in seconds; longer ends the run (exit 3).",
        "wait as long as asked",
    ),
    Option(
        "--max-outage",
        "limits.max_outage_s",
        "float",
        "Longest API outage (refused, timeouts, 5xx across rows) to wait out while probing, "
        "in seconds; longer ends the run (exit 75, checkpoint kept).",
        "600",
    ),
    Option(
        "--max-refusal",
        "limits.max_refusal_s",
        "float",
        "Longest time the API may answer every request with 429 (none admitted), in "
        "seconds; longer ends the run (exit 3, checkpoint kept).",
        "900",
    ),
    Option(
        "--flush-every",
        "checkpoint.flush_every",
        "int",
        "Results per sealed checkpoint part.",
        "5000",
    ),
    Option(
        "--flush-interval",
        "checkpoint.flush_interval_s",
        "float",
        "Longest a finished answer waits before it is durable, in seconds.",
        "0.1",
    ),
    Option(
        "--on-input-change",
        "checkpoint.on_input_change",
        "str",
        "Input changed since an unfinished run: restart (reusing unchanged answers) or refuse "
        "(exit 2).",
        "restart",
        choices=("restart", "refuse"),
    ),
    Option(
        "--cache/--no-cache",
        "cache.enabled",
        "toggle",
        "Use the response cache across runs.",
        "on for deterministic requests (no temperature, or 0)",
    ),
    Option(
        "--cache-path",
        "cache.path",
        "path",
        "Response cache file.",
        "$ENRICH_CACHE_DIR/cache.sqlite3, else ~/.cache/enrich/cache.sqlite3",
    ),
    Option(
        "--dedup/--no-dedup",
        "cache.dedup",
        "toggle",
        "Send identical requests once per run.",
        "on for deterministic requests",
    ),
    Option(
        "--schema",
        "structured.schema",
        "str",
        "JSON Schema (a .json file or inline JSON): answers become typed columns.",
        commands=RUN_ESTIMATE,
    ),
    Option(
        "--schema-name",
        "structured.name",
        "str",
        "Name of the schema sent in response_format.",
        "row",
    ),
    Option(
        "--schema-attempts",
        "structured.max_attempts",
        "int",
        "Answers asked per row until one validates.",
        "3",
    ),
    Option(
        "--engine",
        "run.engine",
        "str",
        "Where the run happens: one process, or workers on a Ray cluster sharing one "
        "rate limit (pip install 'enrich-llm[ray]').",
        "local",
        choices=("local", "ray"),
    ),
    Option(
        "--ray-address",
        "ray.address",
        "str",
        "Ray cluster to join with --engine ray: auto, or ray://HOST:10001.",
        "a local Ray started for the run",
    ),
    Option(
        "--workers",
        "ray.workers",
        "int",
        "Worker actors with --engine ray, each with up to --concurrency requests in flight.",
        "2",
    ),
    Option(
        "--shared-limit/--no-shared-limit",
        "ray.shared_limit",
        "toggle",
        "With --engine ray: one rate limit for all workers; off: each worker paces at "
        "--rpm/--tpm divided by --workers on its own (the baseline).",
        "on",
    ),
    Option(
        "--shard-rows",
        "ray.shard_rows",
        "int",
        "With --engine ray: rows a shard holds, about (whole Parquet row groups): what a "
        "worker reads, journals and resumes as one.",
        "10000",
    ),
    Option(
        "--route",
        "route",
        "str",
        "How requests are sent: online (one by one, now) or batch (the provider's Batch "
        "API: half the price, answers within 24 h; rerun to collect).",
        "online",
        RUN_ESTIMATE,
        choices=("online", "batch"),
    ),
    Option(
        "--wait/--no-wait",
        "batch.wait",
        "toggle",
        "With --route batch: wait for the batches to finish (--no-wait: submit, then exit 6; "
        "rerun the same command later to collect).",
        "on",
    ),
    Option(
        "--finish-online-after",
        "batch.finish_online_after",
        "str",
        "With --route batch: once the oldest batch is this old (e.g. 20h, 90m), cancel what "
        "is still out, keep what finished and send the rest online.",
        "never",
    ),
    Option(
        "--batch-max-requests",
        "batch.max_requests",
        "int",
        "Requests per batch input file at most.",
        "50000",
        RUN_ESTIMATE,
    ),
    Option(
        "--batch-max-bytes",
        "batch.max_bytes",
        "int",
        "Bytes per batch input file at most.",
        "209715200",
        RUN_ESTIMATE,
    ),
    Option(
        "--batch-poll-interval",
        "batch.poll_interval_s",
        "float",
        "Longest wait between two polls of a batch, in seconds (polls start at 1 s and back off).",
        "60",
    ),
    Option(
        "--max-error-rate",
        "max_error_rate",
        "float",
        "Failed share of rows above which the run exits 1.",
        "1.0: never",
    ),
    Option(
        "--max-cost",
        "max_cost",
        "float",
        "Spend cap in USD for the whole job (exit 5 when reached).",
        "no cap",
    ),
    Option(
        "--price-file",
        "price_file",
        "path",
        "Extra prices (TOML, USD per 1M tokens).",
        commands=RUN_ESTIMATE,
    ),
)

FLAG_FOR_KEY: Final[dict[str, str]] = {option.key: option.flag for option in OPTIONS}
_BY_DEST: Final[dict[str, Option]] = {option.dest: option for option in OPTIONS}


def keyword_names() -> list[str]:
    return sorted(_BY_DEST)


def overrides_from_keywords(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"rpm": 500, "input": "a.csv"}`` -> ``{"limits.rpm": 500, "input.path": "a.csv"}``:
    keyword settings are named like the flags. Unknown names raise KeyError
    with the name, for the caller to turn into its own error."""
    overrides: dict[str, Any] = {}
    for name, value in settings.items():
        option = _BY_DEST.get(name)
        if option is None:
            raise KeyError(name)
        overrides[option.key] = value
    return overrides
