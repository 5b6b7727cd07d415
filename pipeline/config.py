"""Typed, validated run configuration: a TOML file, overridden by CLI flags.

Secrets are never part of the config: it names the *environment variable*
that holds the API key (``model.api_key_env``), so a config file can be
committed and a report can echo the settings without leaking anything.

The sections are msgspec Structs (frozen, keyword-only, unknown keys
refused), not pydantic models: importing pydantic and building the models'
schemas cost 110-140 ms before the first request, most of a cron run's start
(issue 11), where msgspec adds about 5 ms of imports of its own and converts
a config tree in C (numbers and booleans from strings, bounds from ``Meta``,
literals, unions). ``_describe`` turns its error ("Expected `int` >= 1 - at
`$.limits.rpm`") into one line naming the flag that fixes it.

No ``from __future__ import annotations`` here: msgspec would compile every
field's annotation from its string on first use (about 8 ms before the
first request).
"""

import abc
import functools
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self
from urllib.parse import SplitResult, urlsplit

import msgspec
from msgspec import Meta, field

from pipeline.errors import ConfigError, MissingSetting
from pipeline.options import FLAG_FOR_KEY, keyword_names, overrides_from_keywords
from pipeline.outage import DEFAULT_MAX_OUTAGE_S
from pipeline.storage import Location, ObjectUri, local_path, parse_location

DEFAULT_BASE_URL: Final = "https://api.openai.com/v1"
"""What the openai client talks to when neither ``model.base_url`` nor
$OPENAI_BASE_URL is set."""

DEFAULT_MAX_REFUSAL_S: Final = 900.0

# 2M tokens (about 8 MB of text): the largest context windows offered today.
DEFAULT_MAX_PROMPT_TOKENS: Final = 2_000_000

PositiveInt = Annotated[int, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0)]
NonEmpty = Annotated[str, Meta(min_length=1)]


@functools.cache
def _fields(section: type[msgspec.Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    # msgspec.structs.fields reads the class's annotations again on every call.
    return msgspec.structs.fields(section)


class _SectionMeta(msgspec.StructMeta):
    """A section built in Python (``LimitsConfig(rpm=60)``) goes through
    ``msgspec.convert`` as a config file's table does: msgspec's own
    constructor converts and checks nothing."""

    def __call__(cls, **values: Any) -> Any:
        # Any, so that type checkers keep the section's own signature and type.
        section = typing.cast(type[_Section], cls)
        names = {info.name: info.encode_name for info in _fields(section)}
        return _convert(section, {names.get(name, name): value for name, value in values.items()})


class _Section(
    msgspec.Struct,
    metaclass=_SectionMeta,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,
    # Room for which fields the caller gave (``fields_set``), outside the fields.
    dict=True,
):
    """A config section: frozen, checked on construction (from a config tree
    or in Python), remembering which fields its caller gave: a concurrency
    the user set is where the run starts, the default is only a ceiling."""

    @property
    def fields_set(self) -> frozenset[str]:
        given: frozenset[str] = self.__dict__.get("_given", frozenset())
        return given

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``, not checked (as pydantic's ``model_copy``):
        for values derived in code, such as the Ray driver's concurrency of
        all its workers together; the fields changed count as given, the
        others given stay given (``msgspec.structs.replace`` forgets them)."""
        made = msgspec.structs.replace(self, **changes)
        return _remember(made, self.fields_set | changes.keys())

    def __replace__(self, **changes: Any) -> Self:
        return self.replace(**changes)  # copy.replace (Python 3.13)

    def __copy__(self) -> Self:
        return self  # frozen: a copy would be the same

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled to a worker process (Ray), a section keeps its given fields.
        values = {info.name: getattr(self, info.name) for info in _fields(type(self))}
        return (_unpickle, (type(self), values, self.fields_set))

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values under their field names (what the
        report and the manifest keep, and the fingerprint hashes)."""
        return {info.name: _jsonable(getattr(self, info.name)) for info in _fields(type(self))}


_S = typing.TypeVar("_S", bound=_Section)


def _remember(made: _S, given: typing.AbstractSet[str]) -> _S:
    made.__dict__["_given"] = frozenset(given)
    return made


def _unpickle(section: type[_S], values: dict[str, Any], given: frozenset[str]) -> _S:
    # The values were checked when first built: msgspec's plain constructor.
    made: _S = msgspec.StructMeta.__call__(section, **values)
    return _remember(made, given)


def _note_given(section: _Section, table: Mapping[str, Any]) -> None:
    """Record, section by section, which keys the config tree gave."""
    given = set()
    for info in _fields(type(section)):
        if info.encode_name not in table:
            continue
        given.add(info.name)
        value, subtable = getattr(section, info.name), table[info.encode_name]
        if isinstance(value, _Section) and isinstance(subtable, Mapping):
            _note_given(value, subtable)
    _remember(section, given)


class _Location(abc.ABC):  # noqa: B024 (a virtual base: registered types only)
    """What msgspec checks ``--input``/``--output`` against: a Path or an
    ObjectUri (msgspec takes one custom type in a union, so one ABC stands
    for both; ``_decode`` makes it from the string as given)."""


_Location.register(Path)
_Location.register(ObjectUri)

if typing.TYPE_CHECKING:
    LocationField = Location
else:
    LocationField = _Location


def _decode(kind: type, value: Any) -> Any:
    # msgspec has no Path type: a string names one.
    if isinstance(value, str | os.PathLike):
        if kind is Path:
            return Path(value)
        if kind is _Location:
            # Not Path(value): Path("s3://b/k") would lose a "/". A ValueError
            # (keys in the URI, say) is msgspec's ValidationError, text kept.
            return parse_location(value)
    raise TypeError(f"Expected `str` (a path), got `{type(value).__name__}`")


def _encode(value: Any) -> Any:
    if isinstance(value, Path | ObjectUri):
        return str(value)
    raise TypeError(f"no JSON value for {type(value).__name__}")  # a bug: a new type in a section


def _jsonable(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    return msgspec.to_builtins(value, enc_hook=_encode)


def _convert(section: type[_S], tree: Mapping[str, Any], path: Path | None = None) -> _S:
    """The section from its table (keys as in the file); ConfigError with one line."""
    try:
        made = msgspec.convert(tree, section, strict=False, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        raise _describe(exc, section, tree, path) from None
    _note_given(made, tree)
    return made


class InputConfig(_Section, frozen=True, kw_only=True):
    path: LocationField
    column: str | None = None
    template: str | None = None
    system_prompt: str | None = None
    chunk_size: Annotated[int, Meta(gt=0, le=1_000_000)] = 1000
    # A prompt estimated above this many tokens is never sent (its row is an
    # error at once): a 10 MB cell would otherwise cost a request that fails,
    # or worse, one that is paid for. The default is above the largest
    # context any model offers today, so it only stops what no model takes.
    max_prompt_tokens: PositiveInt = DEFAULT_MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        # A ValueError here is msgspec's ValidationError, its text kept as is.
        if (self.column is None) == (self.template is None):
            raise ValueError(
                "set exactly one of --column or --template (input.column / input.template)"
            )


class OutputConfig(_Section, frozen=True, kw_only=True):
    path: LocationField
    run_dir: Path | None = None
    column_prefix: str = ""
    keep_checkpoint: bool = False
    report: Path | None = None
    # The report page (OUTPUT.report.html) written beside the report at the end.
    page: bool = True

    @property
    def local_path(self) -> Path:
        """What the run's local files (run directory, lock, report) are named
        after: the output itself, or for a remote output its stand-in under
        ./enrich-runs/ (see pipeline.storage)."""
        return local_path(self.path)

    @property
    def resolved_run_dir(self) -> Path:
        # Beside the output, so moving a job's folder moves its checkpoint too.
        if self.run_dir is not None:
            return self.run_dir
        return self.local_path.with_name(self.local_path.name + ".enrich")

    @property
    def resolved_report(self) -> Path:
        """Where the run report goes: ``--report``, else beside the output
        (``pipeline.report.report_path_for``; a test keeps the two the same)."""
        if self.report is not None:
            return self.report
        return self.local_path.with_name(self.local_path.name + ".report.json")


def output_local_path(output: str | Path) -> Path:
    """What the local files of the run writing ``output`` (a path or a URI)
    are named after; ConfigError for a URI that cannot be one."""
    try:
        return local_path(parse_location(output))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


class ModelConfig(_Section, frozen=True, kw_only=True):
    name: NonEmpty = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: NonEmpty = "OPENAI_API_KEY"
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    max_tokens: PositiveInt | None = None
    seed: int | None = None
    # Anything else the endpoint accepts (e.g. {"presence_penalty": 0.5}); part of the fingerprint.
    extra_params: dict[str, Any] = field(default_factory=dict)
    # The longest one request may take in all; a longer one is cut and retried.
    timeout_s: PositiveFloat = 60.0
    # A request that goes this long without a byte from the server (before the
    # first one, or between chunks of a streamed answer) is stuck: it is cut and
    # retried. None: learned from the answers (see pipeline.stall).
    stall_timeout_s: PositiveFloat | None = None
    # Stream answers, so that a stuck request can be told from a long answer.
    # Servers that cannot are detected and sent plain requests; false: never stream.
    stream: bool = True
    # How requests are sent; never changes an answer, so not in the fingerprint.
    # h11: a lean client over asyncio streams, quick to import (the default);
    # aiohttp: a lean client on aiohttp; openai: the official SDK's own client.
    transport: Literal["h11", "aiohttp", "openai"] = "h11"

    def __post_init__(self) -> None:
        if self.base_url is not None:
            check_base_url(self.base_url, "--base-url")

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


class LimitsConfig(_Section, frozen=True, kw_only=True):
    concurrency: Annotated[int, Meta(gt=0, le=10_000)] = 32
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_attempts: Annotated[int, Meta(gt=0, le=100)] = 6
    # Learn the provider's limits from x-ratelimit-* headers and 429s, and move
    # the in-flight limit up additively / down multiplicatively (AIMD) below
    # `concurrency`, and to a self-hosted server's capacity by latency (see
    # pipeline.concurrency). false: always `concurrency` in flight.
    adaptive: bool = True
    backoff_base_s: PositiveFloat = 0.5
    backoff_max_s: PositiveFloat = 60.0
    # The longest retry-after a 429 may pause the run for; a longer one (a
    # daily limit) ends the run with exit 3 and the checkpoint kept.
    # None: pause as long as the server asks.
    max_pause_s: PositiveFloat | None = None
    # How long the API may stay unreachable (connections refused or reset,
    # timeouts, 5xx across the run) while the run holds its rows and probes;
    # longer ends the run with exit 75 and the checkpoint kept.
    max_outage_s: PositiveFloat = DEFAULT_MAX_OUTAGE_S
    # How long the API may answer every request with 429 (no request admitted)
    # before the run ends with exit 3 and the checkpoint kept: a quota used up
    # without saying so, a key with no limit left.
    max_refusal_s: PositiveFloat = DEFAULT_MAX_REFUSAL_S


class CheckpointConfig(_Section, frozen=True, kw_only=True):
    # Results per sealed checkpoint part (the journal holds them until then).
    flush_every: PositiveInt = 5000
    # The longest a finished answer waits before it is durable (journal and
    # cache, one group commit): what a SIGKILL can cost beyond the requests
    # in flight.
    flush_interval_s: PositiveFloat = 0.1
    # The input changed since an unfinished run: "restart" starts over on the
    # new input, reusing every answer whose request is unchanged; "refuse"
    # stops with exit 2.
    on_input_change: Literal["restart", "refuse"] = "restart"


class CacheConfig(_Section, frozen=True, kw_only=True):
    # None: on for deterministic requests (no temperature, or 0), off otherwise,
    # because a row that asks for a sample wants its own.
    enabled: bool | None = None
    path: Path | None = None
    dedup: bool | None = None


class StructuredConfig(_Section, frozen=True, kw_only=True):
    # A JSON Schema: a path to a .json file, inline JSON text, or a TOML table.
    # Its key is "schema" (the field's name says what it holds).
    json_schema: str | dict[str, Any] | None = field(default=None, name="schema")
    name: NonEmpty = "row"
    # Answers that fail to parse or validate are asked again this many times in
    # all (counted apart from transport retries).
    max_attempts: Annotated[int, Meta(gt=0, le=20)] = 3


class EngineConfig(_Section, frozen=True, kw_only=True):
    # Where the stages run: "local" (one process) or "ray" (workers on a Ray
    # cluster sharing one rate limit; needs the [ray] extra).
    engine: Literal["local", "ray"] = "local"


class RayConfig(_Section, frozen=True, kw_only=True):
    # The cluster to join ("auto": the one `ray start` runs on this machine;
    # "ray://host:10001": a remote one). None: a local Ray started for the run.
    address: str | None = None
    # Worker actors, each running the call stage with up to
    # limits.concurrency requests in flight.
    workers: Annotated[int, Meta(gt=0, le=10_000)] = 2
    # false: no ledger; each worker paces at limits.rpm/tpm divided by the
    # number of workers on its own (what Ray Data's LLM processor does; kept
    # as the baseline the shared limit is measured against).
    shared_limit: bool = True
    # Rows a shard holds, about (whole Parquet row groups; CSV and JSONL are
    # staged into files of this many rows): the unit a worker enriches,
    # journals and resumes.
    shard_rows: Annotated[int, Meta(gt=0, le=10_000_000)] = 10_000


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


class BatchConfig(_Section, frozen=True, kw_only=True):
    """The batch route (``--route batch``): file limits, waiting, and when
    what is still out goes online."""

    # OpenAI's limits for one batch input file.
    max_requests: PositiveInt = 50_000
    max_bytes: PositiveInt = 200 * 1024 * 1024
    wait: bool = True
    # Longest wait between two polls of a batch (polls start at 1 s and back off).
    poll_interval_s: PositiveFloat = 60.0
    finish_online_after: str | None = None

    def __post_init__(self) -> None:
        if self.finish_online_after is not None:
            parse_duration(self.finish_online_after)  # its ValueError names the flag

    @property
    def finish_online_after_s(self) -> float | None:
        if self.finish_online_after is None:
            return None
        return parse_duration(self.finish_online_after)


class RunConfig(_Section, frozen=True, kw_only=True):
    input: InputConfig
    output: OutputConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    structured: StructuredConfig = field(default_factory=StructuredConfig)
    run: EngineConfig = field(default_factory=EngineConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    # How requests are sent: one by one (online) or through the provider's Batch API.
    route: Literal["online", "batch"] = "online"
    max_error_rate: Annotated[float, Meta(ge=0, le=1)] = 1.0
    # A budget in USD for the whole job (resumed runs included); unset: no cap.
    max_cost: PositiveFloat | None = None
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


_AT: Final = re.compile(r"(?P<problem>.*?)(?: - at `\$(?P<at>[^`]*)`)?", re.DOTALL)
_FIELD: Final = re.compile(
    r"Object (?P<kind>contains unknown|missing required) field `(?P<name>.*)`"
)
_NOTHING: Final = object()


def _given_at(tree: Mapping[str, Any], keys: list[str]) -> Any:
    node: Any = tree
    for key in keys:
        if not isinstance(node, Mapping) or key not in node:
            return _NOTHING
        node = node[key]
    return node


def _choices(section: type[_Section], keys: list[str]) -> tuple[Any, ...]:
    """The values a Literal setting allows (msgspec says only "Invalid enum value")."""
    hint: Any = section
    for key in keys:
        if not (isinstance(hint, type) and issubclass(hint, msgspec.Struct)):
            return ()
        hint = next((f.type for f in _fields(hint) if f.encode_name == key), None)
    for option in (hint, *typing.get_args(hint)):
        if typing.get_origin(option) is Literal:
            return typing.get_args(option)
    return ()


def _describe(
    error: msgspec.ValidationError,
    section: type[_Section],
    tree: Mapping[str, Any],
    path: Path | None,
) -> ConfigError:
    if isinstance(error.__cause__, ValueError):
        # Our own checks (``__post_init__``) already name the flags to use.
        return ConfigError(str(error.__cause__))
    found = _AT.fullmatch(str(error))
    assert found is not None  # the pattern matches any text
    problem, keys = found["problem"], [key for key in (found["at"] or "").split(".") if key]
    about_field = _FIELD.fullmatch(problem)
    if about_field is not None:
        keys.append(about_field["name"])
    prefix = [f.encode_name for f in _fields(RunConfig) if f.type is section]
    key = ".".join([*prefix[:1], *keys])
    if about_field is not None and about_field["kind"] == "missing required":
        return _missing(key, path)
    if about_field is not None:
        where = f" in {path}" if path is not None else ""
        return ConfigError(
            f"unknown config key '{key}'{where}; remove it or check its spelling "
            "(see configs/example.toml)"
        )
    choices = _choices(section, keys)
    given = _given_at(tree, keys)
    if choices:
        problem = f"Expected {' or '.join(repr(choice) for choice in choices)}"
    elif given is not _NOTHING:
        problem = re.sub(r", got `[^`]*`$", "", problem)  # the value itself is shown
    shown = f" (got {given!r})" if given is not _NOTHING else ""
    in_file = f"'{key}' in {path}" if path is not None else ""
    fix = " or ".join(part for part in (FLAG_FOR_KEY.get(key), in_file) if part) or f"'{key}'"
    return ConfigError(f"bad value for '{key}': {problem}{shown}; fix {fix}")


def section_from(section: type[_S], tree: Mapping[str, Any], path: Path | None = None) -> _S:
    """A config section from its table (``enrich status`` reads only
    ``[output]``); raises ConfigError with one line."""
    return _convert(section, tree, path)


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
    return _convert(RunConfig, tree, file)
