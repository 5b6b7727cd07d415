"""Typed, validated run configuration: a TOML file, overridden by CLI flags.

Secrets are never part of the config: it names the *environment variable*
that holds the API key (``model.api_key_env``), so a config file can be
committed and a report can echo the settings without leaking anything.

The sections are frozen dataclasses checked by ``_Section.__post_init__``
(types from the annotations, bounds from the field metadata), not pydantic
models: importing pydantic and building the models' schemas cost 110-140 ms
before the first request, most of a cron run's start (issue 11), for a
config this small. The messages keep pydantic's wording ("Input should be
greater than 0"), which ``_describe`` turns into one line naming the flag.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar
from urllib.parse import SplitResult, urlsplit

from pipeline.errors import ConfigError, MissingSetting
from pipeline.options import FLAG_FOR_KEY, keyword_names, overrides_from_keywords
from pipeline.outage import DEFAULT_MAX_OUTAGE_S

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
"""What the openai client talks to when neither ``model.base_url`` nor
$OPENAI_BASE_URL is set."""

DEFAULT_MAX_REFUSAL_S: Final = 900.0

# 2M tokens (about 8 MB of text): the largest context windows offered today.
DEFAULT_MAX_PROMPT_TOKENS: Final = 2_000_000

Loc = tuple[str, ...]


class InvalidSetting(ValueError):
    """One setting that failed validation: where (``loc``, config keys from
    the section that raised it), pydantic's error type and message, and the
    value given. ``load_config`` turns it into a ``ConfigError``."""

    def __init__(self, loc: Loc, kind: str, message: str, given: Any = None) -> None:
        super().__init__(f"{'.'.join(loc) or 'config'}: {message}")
        self.loc = loc
        self.kind = kind
        self.message = message
        self.given = given

    def within(self, key: str) -> InvalidSetting:
        return InvalidSetting((key, *self.loc), self.kind, self.message, self.given)


def _bounded(default: Any = dataclasses.MISSING, **bounds: float) -> Any:
    """A field with bounds (``gt``, ``ge``, ``le``, ``min_length``) checked on construction."""
    return field(default=default, metadata=bounds)


_BOUND_MESSAGES: Final = {
    "gt": ("greater_than", "Input should be greater than {}"),
    "ge": ("greater_than_equal", "Input should be greater than or equal to {}"),
    "le": ("less_than_equal", "Input should be less than or equal to {}"),
}
_TRUE: Final = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE: Final = frozenset({"0", "off", "f", "false", "n", "no"})


def _number(value: Any, kind: type[int] | type[float]) -> int | float:
    """pydantic's lax numbers: ints and floats, whole floats as ints, numeric
    strings; never a bool (``rpm = true`` is a mistake, not 1)."""
    integer = kind is int
    name, code = ("integer", "int") if integer else ("number", "float")
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            article = "an" if integer else "a"
            raise InvalidSetting(
                (),
                f"{code}_parsing",
                f"Input should be a valid {name}, unable to parse string as {article} {name}",
                value,
            ) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSetting((), f"{code}_type", f"Input should be a valid {name}", value)
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise InvalidSetting(
                (),
                "int_from_float",
                "Input should be a valid integer, got a number with a fractional part",
                value,
            )
        return int(value)
    return kind(value)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise InvalidSetting(
        (), "bool_parsing", "Input should be a valid boolean, unable to interpret input", value
    )


def _literal(choices: tuple[Any, ...], value: Any) -> Any:
    if isinstance(value, str) and value in choices:
        return value
    shown = [repr(choice) for choice in choices]
    said = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    raise InvalidSetting((), "literal_error", f"Input should be {said}", value)


def _union(options: tuple[Any, ...], value: Any) -> Any:
    if value is None and type(None) in options:
        return None
    first: InvalidSetting | None = None
    for option in options:
        if option is type(None):
            continue
        try:
            return _coerce(option, value)
        except InvalidSetting as exc:
            first = first or exc
    assert first is not None
    raise first


def _coerce(hint: Any, value: Any) -> Any:
    """``value`` as the annotated type, converted as pydantic's lax mode does."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _union(typing.get_args(hint), value)
    if origin is Literal:
        return _literal(typing.get_args(hint), value)
    if hint is Any:
        return value
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise InvalidSetting((), "dict_type", "Input should be a valid dictionary", value)
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, _Section):
        return hint.from_mapping(value)
    if hint is int or hint is float:
        return _number(value, hint)
    if hint is bool:
        return _boolean(value)
    if hint is str:
        if not isinstance(value, str):
            raise InvalidSetting((), "string_type", "Input should be a valid string", value)
        return value
    if hint is Path:
        if not isinstance(value, str | os.PathLike):
            raise InvalidSetting((), "path_type", "Input should be a valid path", value)
        return Path(value)
    raise TypeError(f"no validation for config type {hint!r}")  # a bug in this module


def _check_bounds(value: Any, bounds: Mapping[str, Any], given: Any) -> None:
    if value is None:
        return
    minimum = bounds.get("min_length")
    if minimum is not None and len(value) < minimum:
        noun = "character" if minimum == 1 else "characters"
        raise InvalidSetting(
            (), "string_too_short", f"String should have at least {minimum} {noun}", given
        )
    for bound, limit in bounds.items():
        if bound not in _BOUND_MESSAGES:
            continue
        ok = value > limit if bound == "gt" else value >= limit if bound == "ge" else value <= limit
        if not ok:
            kind, message = _BOUND_MESSAGES[bound]
            raise InvalidSetting((), kind, message.format(limit), given)


def _key(section_field: dataclasses.Field[Any]) -> str:
    """The field's config key (``alias`` where the name would clash)."""
    return str(section_field.metadata.get("alias", section_field.name))


_S = TypeVar("_S", bound="_Section")


class _Section:
    """A config section: a frozen, keyword-only dataclass (``_section``)
    whose values are converted and checked on construction, from a config
    tree (``from_mapping``) or by a caller."""

    # Which fields the caller gave (pydantic's ``model_fields_set``): set by ``_section``.
    _given: frozenset[str] = frozenset()

    @property
    def fields_set(self) -> frozenset[str]:
        return self._given

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for section_field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _field_value(section_field, hints, getattr(self, section_field.name))
            object.__setattr__(self, section_field.name, value)
        self._check()

    def _check(self) -> None:
        """Checks across fields (after each field is valid): raise ValueError."""

    @classmethod
    def from_mapping(cls: type[_S], tree: Any) -> _S:
        """The section from a config table: unknown keys and missing required
        ones are errors, as are bad values (``InvalidSetting``)."""
        if isinstance(tree, cls):
            return tree
        if not isinstance(tree, Mapping):
            raise InvalidSetting(
                (),
                "model_type",
                f"Input should be a valid dictionary or instance of {cls.__name__}",
                tree,
            )
        values: dict[str, Any] = {}
        known: set[str] = set()
        hints = _hints(cls)
        # Field by field, in order, so the first error is the first field's
        # (as pydantic reports them): a missing [input] before a missing [output].
        for section_field in dataclasses.fields(cls):  # type: ignore[arg-type]
            key = _key(section_field)
            known.add(key)
            if key in tree:
                values[section_field.name] = _field_value(section_field, hints, tree[key])
            elif _required(section_field):
                raise InvalidSetting((key,), "missing", "Field required")
        try:
            made = cls(**values)
        except ValueError as exc:
            if isinstance(exc, InvalidSetting):
                raise
            raise InvalidSetting((), "value_error", str(exc)) from None
        for key in tree:
            if key not in known:
                raise InvalidSetting(
                    (str(key),), "extra_forbidden", "Extra inputs are not permitted"
                )
        return made

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values (what the report and the manifest keep)."""
        return {
            section_field.name: _jsonable(getattr(self, section_field.name))
            for section_field in dataclasses.fields(self)  # type: ignore[arg-type]
        }


def _field_value(section_field: dataclasses.Field[Any], hints: dict[str, Any], given: Any) -> Any:
    try:
        value = _coerce(hints[section_field.name], given)
        _check_bounds(value, section_field.metadata, given)
    except InvalidSetting as exc:
        raise exc.within(_key(section_field)) from None
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    return value


def _required(section_field: dataclasses.Field[Any]) -> bool:
    return (
        section_field.default is dataclasses.MISSING
        and section_field.default_factory is dataclasses.MISSING
    )


_HINTS: Final[dict[type[_Section], dict[str, Any]]] = {}


def _hints(cls: type[_Section]) -> dict[str, Any]:
    """The section's annotations, resolved once per class."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _section(made: type[_S]) -> type[_S]:
    """The section (a frozen, keyword-only dataclass) remembering which
    fields its caller gave: a concurrency the user set is where the run
    starts, the default is only a ceiling."""
    init: Callable[..., None] = made.__init__

    @functools.wraps(init)
    def __init__(self: _S, **values: Any) -> None:
        init(self, **values)
        object.__setattr__(self, "_given", frozenset(values))

    setattr(made, "__init__", __init__)  # noqa: B010 (mypy forbids assigning a method)
    return made


@_section
@dataclass(frozen=True, kw_only=True)
class InputConfig(_Section):
    path: Path
    column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    chunk_size: int = _bounded(1000, gt=0, le=1_000_000)
    # A prompt estimated above this many tokens is never sent (its row is an
    # error at once): a 10 MB cell would otherwise cost a request that fails,
    # or worse, one that is paid for. The default is above the largest
    # context any model offers today, so it only stops what no model takes.
    max_prompt_tokens: int = _bounded(DEFAULT_MAX_PROMPT_TOKENS, gt=0)

    def _check(self) -> None:
        if (self.column is None) == (self.template is None):
            raise InvalidSetting(
                (),
                "value_error",
                "set exactly one of --column or --template (input.column / input.template)",
            )


@_section
@dataclass(frozen=True, kw_only=True)
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


@_section
@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    name: str = _bounded("gpt-4o-mini", min_length=1)
    base_url: str | None = None
    api_key_env: str = _bounded("OPENAI_API_KEY", min_length=1)
    temperature: float | None = _bounded(None, ge=0, le=2)
    top_p: float | None = _bounded(None, gt=0, le=1)
    max_tokens: int | None = _bounded(None, gt=0)
    seed: int | None = None
    # Anything else the endpoint accepts (e.g. {"presence_penalty": 0.5}); part of the fingerprint.
    extra_params: dict[str, Any] = field(default_factory=dict)
    # The longest one request may take in all; a longer one is cut and retried.
    timeout_s: float = _bounded(60.0, gt=0)
    # A request that goes this long without a byte from the server (before the
    # first one, or between chunks of a streamed answer) is stuck: it is cut and
    # retried. None: learned from the answers (see pipeline.stall).
    stall_timeout_s: float | None = _bounded(None, gt=0)
    # Stream answers, so that a stuck request can be told from a long answer.
    # Servers that cannot are detected and sent plain requests; false: never stream.
    stream: bool = True
    # How requests are sent; never changes an answer, so not in the fingerprint.
    # aiohttp: a lean client at a fraction of the SDK's CPU per request;
    # openai: the official SDK's own client.
    transport: Literal["aiohttp", "openai"] = "aiohttp"

    def _check(self) -> None:
        if self.base_url is not None:
            try:
                check_base_url(self.base_url, "--base-url")
            except ValueError as exc:
                raise InvalidSetting(("base_url",), "value_error", str(exc)) from None

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


@_section
@dataclass(frozen=True, kw_only=True)
class LimitsConfig(_Section):
    concurrency: int = _bounded(32, gt=0, le=10_000)
    rpm: int | None = _bounded(None, gt=0)
    tpm: int | None = _bounded(None, gt=0)
    max_attempts: int = _bounded(6, gt=0, le=100)
    # Learn the provider's limits from x-ratelimit-* headers and 429s, and move
    # the in-flight limit up additively / down multiplicatively (AIMD) below
    # `concurrency`, and to a self-hosted server's capacity by latency (see
    # pipeline.concurrency). false: always `concurrency` in flight.
    adaptive: bool = True
    backoff_base_s: float = _bounded(0.5, gt=0)
    backoff_max_s: float = _bounded(60.0, gt=0)
    # The longest retry-after a 429 may pause the run for; a longer one (a
    # daily limit) ends the run with exit 3 and the checkpoint kept.
    # None: pause as long as the server asks.
    max_pause_s: float | None = _bounded(None, gt=0)
    # How long the API may stay unreachable (connections refused or reset,
    # timeouts, 5xx across the run) while the run holds its rows and probes;
    # longer ends the run with exit 75 and the checkpoint kept.
    max_outage_s: float = _bounded(DEFAULT_MAX_OUTAGE_S, gt=0)
    # How long the API may answer every request with 429 (no request admitted)
    # before the run ends with exit 3 and the checkpoint kept: a quota used up
    # without saying so, a key with no limit left.
    max_refusal_s: float = _bounded(DEFAULT_MAX_REFUSAL_S, gt=0)


@_section
@dataclass(frozen=True, kw_only=True)
class CheckpointConfig(_Section):
    # Results per sealed checkpoint part (the journal holds them until then).
    flush_every: int = _bounded(5000, gt=0)
    # The longest a finished answer waits before it is durable (journal and
    # cache, one group commit): what a SIGKILL can cost beyond the requests
    # in flight.
    flush_interval_s: float = _bounded(0.1, gt=0)
    # The input changed since an unfinished run: "restart" starts over on the
    # new input, reusing every answer whose request is unchanged; "refuse"
    # stops with exit 2.
    on_input_change: Literal["restart", "refuse"] = "restart"


@_section
@dataclass(frozen=True, kw_only=True)
class CacheConfig(_Section):
    # None: on for deterministic requests (no temperature, or 0), off otherwise,
    # because a row that asks for a sample wants its own.
    enabled: bool | None = None
    path: Path | None = None
    dedup: bool | None = None


@_section
@dataclass(frozen=True, kw_only=True)
class StructuredConfig(_Section):
    # A JSON Schema: a path to a .json file, inline JSON text, or a TOML table.
    # Its key is "schema" (the name would shadow dataclasses' and pydantic's habits).
    json_schema: str | dict[str, Any] | None = field(default=None, metadata={"alias": "schema"})
    name: str = _bounded("row", min_length=1)
    # Answers that fail to parse or validate are asked again this many times in
    # all (counted apart from transport retries).
    max_attempts: int = _bounded(3, gt=0, le=20)


@_section
@dataclass(frozen=True, kw_only=True)
class RunConfig(_Section):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    max_error_rate: float = _bounded(1.0, ge=0, le=1)
    # A budget in USD for the whole job (resumed runs included); unset: no cap.
    max_cost: float | None = _bounded(None, gt=0)
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


def _describe(error: InvalidSetting, path: Path | None) -> ConfigError:
    key = ".".join(error.loc)
    flag = FLAG_FOR_KEY.get(key)
    in_file = f"'{key}' in {path}" if path is not None else ""
    fix = " or ".join(part for part in (flag, in_file) if part) or f"'{key}'"
    if error.kind == "extra_forbidden":
        where = f" in {path}" if path is not None else ""
        return ConfigError(
            f"unknown config key '{key}'{where}; remove it or check its spelling "
            "(see configs/example.toml)"
        )
    if error.kind == "missing":
        return _missing(key, path)
    if error.kind == "value_error":
        # Our own validators already name the flags to use.
        return ConfigError(error.message)
    return ConfigError(f"bad value for '{key}': {error.message} (got {error.given!r}); fix {fix}")


def section_from(section: type[_S], tree: Mapping[str, Any], path: Path | None = None) -> _S:
    """A config section from its table (``enrich status`` reads only
    ``[output]``); raises ConfigError with one line."""
    try:
        return section.from_mapping(tree)
    except InvalidSetting as exc:
        raise _describe(exc, path) from None


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
    return section_from(RunConfig, tree, file)
