"""Typed, validated run configuration: a TOML file, overridden by CLI flags.

Secrets are never part of the config: it names the *environment variable*
that holds the API key (``model.api_key_env``), so a config file can be
committed and a report can echo the settings without leaking anything.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError, MissingSetting
from pipeline.options import FLAG_FOR_KEY, keyword_names, overrides_from_keywords
from pipeline.outage import DEFAULT_MAX_OUTAGE_S

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
"""What the openai client talks to when neither ``model.base_url`` nor
$OPENAI_BASE_URL is set."""

DEFAULT_MAX_REFUSAL_S: Final = 900.0

# 2M tokens (about 8 MB of text): the largest context windows offered today.
DEFAULT_MAX_PROMPT_TOKENS: Final = 2_000_000


class _Section(BaseModel):
    # Unknown keys are typos that would otherwise be silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputConfig(_Section):
    path: Path
    column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    chunk_size: int = Field(default=1000, gt=0, le=1_000_000)
    # A prompt estimated above this many tokens is never sent (its row is an
    # error at once): a 10 MB cell would otherwise cost a request that fails,
    # or worse, one that is paid for. The default is above the largest
    # context any model offers today, so it only stops what no model takes.
    max_prompt_tokens: int = Field(default=DEFAULT_MAX_PROMPT_TOKENS, gt=0)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputConfig:
        if (self.column is None) == (self.template is None):
            raise ValueError(
                "set exactly one of --column or --template (input.column / input.template)"
            )
        return self


class OutputConfig(_Section):
    path: Path
    run_dir: Path | None = None
    column_prefix: str = ""
    keep_checkpoint: bool = False
    report: Path | None = None
    # The report page (OUTPUT.report.html) written beside the report at the end.
    page: bool = True

    @property
    def resolved_run_dir(self) -> Path:
        # Beside the output, so moving a job's folder moves its checkpoint too.
        if self.run_dir is not None:
            return self.run_dir
        return self.path.with_name(self.path.name + ".enrich")


class ModelConfig(_Section):
    name: str = Field(default="gpt-4o-mini", min_length=1)
    base_url: str | None = None
    api_key_env: str = Field(default="OPENAI_API_KEY", min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, gt=0)
    seed: int | None = None
    # Anything else the endpoint accepts (e.g. {"presence_penalty": 0.5}); part of the fingerprint.
    extra_params: dict[str, Any] = Field(default_factory=dict)
    # The longest one request may take in all; a longer one is cut and retried.
    timeout_s: float = Field(default=60.0, gt=0)
    # A request that goes this long without a byte from the server (before the
    # first one, or between chunks of a streamed answer) is stuck: it is cut and
    # retried. None: learned from the answers (see pipeline.stall).
    stall_timeout_s: float | None = Field(default=None, gt=0)
    # Stream answers, so that a stuck request can be told from a long answer.
    # Servers that cannot are detected and sent plain requests; false: never stream.
    stream: bool = True
    # How requests are sent; never changes an answer, so not in the fingerprint.
    # aiohttp: a lean client at a fraction of the SDK's CPU per request;
    # openai: the official SDK's own client.
    transport: Literal["aiohttp", "openai"] = "aiohttp"

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str | None) -> str | None:
        if value is not None:
            check_base_url(value, "--base-url")
        return value

    def request_params(self) -> dict[str, Any]:
        """Sampling parameters sent with every request (only those set)."""
        params: dict[str, Any] = {
            key: value
            for key, value in (
                ("temperature", self.temperature),
                ("top_p", self.top_p),
                ("max_tokens", self.max_tokens),
                ("seed", self.seed),
            )
            if value is not None
        }
        params.update(self.extra_params)
        return params

    def resolved_base_url(self) -> str | None:
        """The endpoint; one from $OPENAI_BASE_URL is checked here, as the
        flag's is when the config is built, so a bad URL stops the run
        before anything touches the disk."""
        if self.base_url:
            return self.base_url
        from_env = os.environ.get("OPENAI_BASE_URL") or None
        if from_env is not None:
            try:
                check_base_url(from_env, "$OPENAI_BASE_URL")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        return from_env

    def endpoint(self) -> str:
        """Where requests go: ``base_url``, then $OPENAI_BASE_URL, then
        OpenAI's (what the transports send to and what cache keys name)."""
        return self.resolved_base_url() or DEFAULT_BASE_URL


def _shown_url(parts: SplitResult) -> str:
    # Never echo a password, even in an error line.
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def check_base_url(url: str, where: str) -> None:
    """Raise ValueError (one line naming ``where`` and the fix) unless ``url``
    is an http(s) URL with a host, no credentials and a valid port."""
    fix = f"fix {where} (e.g. http://127.0.0.1:8000/v1)"
    try:
        parts = urlsplit(url)
        port = parts.port  # parses it: an out-of-range or non-numeric port raises here
    except ValueError as exc:
        raise ValueError(f"{where} is not a valid URL ({exc}); {fix}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"{where} {_shown_url(parts)!r} is not an http:// or https:// URL with a host; {fix}"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{where} {_shown_url(parts)!r} holds a user name or password, which enrich never "
            "sends; remove it and put the key in $OPENAI_API_KEY (or the variable named by "
            "--api-key-env)"
        )
    del port


class LimitsConfig(_Section):
    concurrency: int = Field(default=32, gt=0, le=10_000)
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    max_attempts: int = Field(default=6, gt=0, le=100)
    # Learn the provider's limits from x-ratelimit-* headers and 429s, and move
    # the in-flight limit up additively / down multiplicatively (AIMD) below
    # `concurrency`, and to a self-hosted server's capacity by latency (see
    # pipeline.concurrency). false: always `concurrency` in flight.
    adaptive: bool = True
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_max_s: float = Field(default=60.0, gt=0)
    # The longest retry-after a 429 may pause the run for; a longer one (a
    # daily limit) ends the run with exit 3 and the checkpoint kept.
    # None: pause as long as the server asks.
    max_pause_s: float | None = Field(default=None, gt=0)
    # How long the API may stay unreachable (connections refused or reset,
    # timeouts, 5xx across the run) while the run holds its rows and probes;
    # longer ends the run with exit 75 and the checkpoint kept.
    max_outage_s: float = Field(default=DEFAULT_MAX_OUTAGE_S, gt=0)
    # How long the API may answer every request with 429 (no request admitted)
    # before the run ends with exit 3 and the checkpoint kept: a quota used up
    # without saying so, a key with no limit left.
    max_refusal_s: float = Field(default=DEFAULT_MAX_REFUSAL_S, gt=0)


class CheckpointConfig(_Section):
    # Results per sealed checkpoint part (the journal holds them until then).
    flush_every: int = Field(default=5000, gt=0)
    # The longest a finished answer waits before it is durable (journal and
    # cache, one group commit): what a SIGKILL can cost beyond the requests
    # in flight.
    flush_interval_s: float = Field(default=0.1, gt=0)
    # The input changed since an unfinished run: "restart" starts over on the
    # new input, reusing every answer whose request is unchanged; "refuse"
    # stops with exit 2.
    on_input_change: Literal["restart", "refuse"] = "restart"


class CacheConfig(_Section):
    # None: on for deterministic requests (no temperature, or 0), off otherwise,
    # because a row that asks for a sample wants its own.
    enabled: bool | None = None
    path: Path | None = None
    dedup: bool | None = None


class StructuredConfig(_Section):
    # A JSON Schema: a path to a .json file, inline JSON text, or a TOML table.
    # "schema" would shadow a pydantic method, hence the alias.
    json_schema: str | dict[str, Any] | None = Field(default=None, alias="schema")
    name: str = Field(default="row", min_length=1)
    # Answers that fail to parse or validate are asked again this many times in
    # all (counted apart from transport retries).
    max_attempts: int = Field(default=3, gt=0, le=20)


_DURATION_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``20h``, ``90m``, ``45s``, ``1d`` or a bare number of seconds.
    Raises ValueError naming the forms."""
    value = text.strip().lower()
    scale = _DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(
            f"--finish-online-after wants a duration like 20h, 90m or 600s, got {text!r}"
        )
    return seconds


class BatchConfig(_Section):
    """The batch route (``--route batch``): file limits, waiting, and when
    what is still out goes online."""

    # OpenAI's limits for one batch input file.
    max_requests: int = Field(default=50_000, gt=0)
    max_bytes: int = Field(default=200 * 1024 * 1024, gt=0)
    wait: bool = True
    # Longest wait between two polls of a batch (polls start at 1 s and back off).
    poll_interval_s: float = Field(default=60.0, gt=0)
    finish_online_after: str | None = None

    @field_validator("finish_online_after")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def finish_online_after_s(self) -> float | None:
        if self.finish_online_after is None:
            return None
        return parse_duration(self.finish_online_after)


class RunConfig(_Section):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    structured: StructuredConfig = Field(default_factory=StructuredConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    # How requests are sent: one by one (online) or through the provider's Batch API.
    route: Literal["online", "batch"] = "online"
    max_error_rate: float = Field(default=1.0, ge=0, le=1)
    # A budget in USD for the whole job (resumed runs included); unset: no cap.
    max_cost: float | None = Field(default=None, gt=0)
    # Extra or overriding prices, same format as configs/prices.toml.
    price_file: Path | None = None

    def api_key(self) -> str:
        """The key from the environment. Local servers accept any key, so a
        missing variable only fails where the server says so (401)."""
        return os.environ.get(self.model.api_key_env) or "sk-no-key-set"


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found; check the path given to enrich") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML ({exc}); fix the file") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(
                f"config key {part} must be a table like [{part}]; fix the config file"
            )
        node = child
    node[leaf] = value


def _missing(key: str, path: Path | None) -> MissingSetting:
    # A whole missing section ("input") is really its one required key.
    if key not in FLAG_FOR_KEY and f"{key}.path" in FLAG_FOR_KEY:
        key = f"{key}.path"
    section, _, leaf = key.rpartition(".")
    in_file = f"{leaf} under [{section}]" if section else key
    where = f"in {path}" if path is not None else "in a config file"
    flag = FLAG_FOR_KEY.get(key)
    how = f"pass {flag} (or set {in_file} {where})" if flag else f"set {in_file} {where}"
    return MissingSetting(f"missing setting {key}: {how}", key=key)


def _describe(error: Any, path: Path | None) -> ConfigError:
    key = ".".join(str(part) for part in error["loc"])
    flag = FLAG_FOR_KEY.get(key)
    in_file = f"'{key}' in {path}" if path is not None else ""
    fix = " or ".join(part for part in (flag, in_file) if part) or f"'{key}'"
    if error["type"] == "extra_forbidden":
        where = f" in {path}" if path is not None else ""
        return ConfigError(
            f"unknown config key '{key}'{where}; remove it or check its spelling "
            "(see configs/example.toml)"
        )
    if error["type"] == "missing":
        return _missing(key, path)
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "value_error":
        # Our own validators already name the flags to use.
        return ConfigError(message)
    return ConfigError(f"bad value for '{key}': {message} (got {error.get('input')!r}); fix {fix}")


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    **settings: Any,
) -> RunConfig:
    """Build the run config from an optional TOML file, dotted-key overrides
    (``{"limits.rpm": 500}``) and keyword settings named like the flags
    (``input="reviews.csv", column="body", output="out.parquet", rpm=500``);
    keywords win over overrides, which win over the file. Raises ConfigError
    with one line."""
    file = Path(path) if path is not None else None
    tree: dict[str, Any] = read_toml(file) if file is not None else {}
    try:
        keyword_overrides = overrides_from_keywords(settings)
    except KeyError as exc:
        raise ConfigError(
            f"unknown setting {exc.args[0]!r}; settings are named like the flags "
            f"({', '.join(keyword_names())}), or pass dotted config keys as overrides"
        ) from None
    for dotted, value in {**(overrides or {}), **keyword_overrides}.items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise _describe(exc.errors()[0], file) from None
