"""Structured output: a JSON Schema sent as ``response_format``, answers parsed,
validated, and their top-level fields turned into typed columns.

The flow, and who does what:

1. :func:`load_schema` reads the schema once (a ``.json`` file, an inline JSON
   string, or an inline TOML table) and checks it is a JSON Schema whose top
   level is an object with properties.
2. :func:`response_format` is what each request carries
   (``{"type": "json_schema", "json_schema": {...}, "strict": true}``).
3. :func:`parse_answer` turns one answer's text into a dict, or raises
   :class:`StructuredAnswerError` with a short reason (``not JSON: ...``,
   ``missing field 'label'``, ``field 'score' must be integer (got string)``).
   The call stage retries such answers a limited number of times, counted apart
   from transport retries, then marks the row ``error`` with the reason. Only
   answers that passed belong in the response cache.
4. :func:`columns_schema` and :func:`to_columns` give the typed columns, while
   the raw text stays in ``response``. Because the columns are a pure function
   of the text, they can be rebuilt from ``response`` when the final file is
   assembled (:func:`load_answer`), so checkpoints and the cache store text only.

Column types (every column is nullable; a row that failed has nulls):

=============================================  ======================
property schema                                column
=============================================  ======================
``string`` (any format)                        string
``integer``                                    int64
``number``                                     float64
``boolean``                                    bool
``enum``/``const`` of one kind of scalar       that kind (ints and floats: float64)
``array`` whose items are one of the above     list of that type
``["string", "null"]``, ``anyOf: [X, null]``   as X
object, other arrays, mixed ``anyOf``, ``$ref``  string holding JSON
=============================================  ======================

Validation uses the ``jsonschema`` package (Draft 2020-12 unless the schema's
``$schema`` names another draft), so what passes here is what the schema says,
not a home-made subset of it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    # Imported where columns are made: a run's requests and their answer
    # checks need none of it.
    import pyarrow as pa

__all__ = [
    "DEFAULT_NAME",
    "SCHEMA_SETTING",
    "StructuredAnswerError",
    "columns_schema",
    "load_answer",
    "load_schema",
    "parse_answer",
    "response_format",
    "to_columns",
    "unsupported_message",
]

SCHEMA_SETTING: Final = "--schema (structured.schema)"
"""How errors name the setting that holds the schema."""

DEFAULT_NAME: Final = "row"

# What OpenAI accepts as json_schema.name.
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Field metadata: which property a column holds, and whether its values are JSON text.
PROPERTY_KEY: Final = b"enrich.property"
JSON_KEY: Final = b"enrich.json"

# JSON Schema's scalar types, each a column of its own Arrow type (_arrow_type).
_SCALARS: Final = ("string", "integer", "number", "boolean")
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1

# A reason is one short line in the error column: long server texts are cut.
_MAX_REASON: Final = 200

_FENCE: Final = re.compile(r"^```[A-Za-z0-9_-]*\s*\n(.*?)\n?```$", re.DOTALL)


class StructuredAnswerError(Exception):
    """An answer that is not JSON or does not match the schema; ``reason`` is
    the short human explanation that ends up in the row's ``error``."""

    def __init__(self, reason: str) -> None:
        reason = " ".join(reason.split())
        if len(reason) > _MAX_REASON:
            reason = reason[: _MAX_REASON - 1] + "…"
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------
# Loading the schema.


def load_schema(
    value: str | Mapping[str, Any],
    *,
    setting: str = SCHEMA_SETTING,
) -> dict[str, Any]:
    """The schema from a path to a ``.json`` file, an
    inline JSON string (starting with ``{``), or a mapping (an inline TOML
    table). Raises ``ConfigError`` naming ``setting`` when it cannot be used."""
    if isinstance(value, Mapping):
        try:
            # A deep copy that also rejects what JSON cannot hold (TOML dates).
            schema = json.loads(json.dumps(value))
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"the schema given to {setting} is not JSON-compatible ({exc}); "
                "use only strings, numbers, booleans, arrays and tables"
            ) from None
        where = f"the schema given to {setting}"
    elif value.lstrip().startswith("{"):
        where = f"the inline schema given to {setting}"
        schema = _parse_json(value, where)
    else:
        path = Path(value).expanduser()
        where = f"schema file {path}"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"schema file {path} not found; pass a .json file or an inline JSON "
                f"object to {setting}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise ConfigError(
                f"schema file {path} cannot be read ({detail}); fix {setting}"
            ) from None
        schema = _parse_json(text, where)
    _check_schema(schema, where, setting)
    return schema  # type: ignore[no-any-return]


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "fix the JSON"
        ) from None


def _check_schema(schema: Any, where: str, setting: str) -> None:
    shape = 'a JSON object like {"type": "object", "properties": {...}}'
    if not isinstance(schema, dict):
        raise ConfigError(f"{where} must be {shape}; fix {setting}")
    # Imported only with a schema: a plain run does not pay for it.
    import jsonschema  # type: ignore[import-untyped, unused-ignore]

    try:
        jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator).check_schema(
            schema
        )
    except jsonschema.SchemaError as exc:
        at = "/".join(str(part) for part in exc.absolute_path) or "the top level"
        raise ConfigError(
            f"{where} is not a valid JSON Schema ({exc.message} at {at}); fix {setting}"
        ) from None
    properties = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(properties, dict) or not properties:
        raise ConfigError(
            f"{where} must have an object at the top level with at least one property "
            f"({shape}): each property becomes a column; fix {setting}"
        )


def response_format(
    schema: Mapping[str, Any], name: str = DEFAULT_NAME, *, strict: bool = True
) -> dict[str, Any]:
    """The ``response_format`` request parameter for ``schema``.

    With ``strict`` (OpenAI's Structured Outputs), OpenAI requires every
    property to be listed in ``required`` and ``additionalProperties: false`` at
    every object level; it answers 400 otherwise, which
    :func:`unsupported_message` turns into one clear line.
    """
    if not _NAME.match(name):
        raise ConfigError(
            f"schema name {name!r} must be 1 to 64 letters, digits, '_' or '-'; change it"
        )
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": dict(schema), "strict": strict},
    }


# ---------------------------------------------------------------------------
# Columns.


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _merge_kinds(kinds: set[str]) -> str | None:
    # An integer is also a number: a mix is a float column, like JSON itself.
    if kinds == {"integer", "number"}:
        return "number"
    if len(kinds) == 1:
        (kind,) = kinds
        return kind
    return None


def _unwrap(prop: Any) -> Any:
    """``anyOf``/``oneOf`` of one schema and ``null`` is that schema (how
    pydantic and others write an optional field); columns are nullable anyway."""
    while isinstance(prop, Mapping) and "type" not in prop:
        branches = prop.get("anyOf", prop.get("oneOf"))
        if not isinstance(branches, list):
            break
        rest = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
        if len(rest) != 1:
            break
        prop = rest[0]
    return prop


def _declared_type(prop: Mapping[str, Any]) -> str | None:
    declared = prop.get("type")
    if isinstance(declared, list):
        return _merge_kinds({t for t in declared if t != "null"})
    return declared if isinstance(declared, str) else None


def _scalar_kind(prop: Any) -> str | None:
    """'string', 'integer', 'number' or 'boolean' when every value the property
    allows is of that one scalar kind; None otherwise."""
    prop = _unwrap(prop)
    if not isinstance(prop, Mapping):
        return None
    if "enum" in prop or "const" in prop:
        values = prop["enum"] if "enum" in prop else [prop["const"]]
        if not isinstance(values, list):
            return None
        kind = _merge_kinds({_json_type(v) for v in values if v is not None})
        return kind if kind in _SCALARS else None
    kind = _declared_type(prop)
    return kind if kind in _SCALARS else None


def _arrow_type(kind: str) -> pa.DataType:
    import pyarrow as pa

    types = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64()}
    return types.get(kind) or pa.bool_()


def _column_type(prop: Any) -> tuple[pa.DataType, bool]:
    """The arrow type of a property's column, and whether it holds JSON text."""
    import pyarrow as pa

    kind = _scalar_kind(prop)
    if kind is not None:
        return _arrow_type(kind), False
    prop = _unwrap(prop)
    if isinstance(prop, Mapping) and _declared_type(prop) == "array":
        item_kind = _scalar_kind(prop.get("items"))
        if item_kind is not None:
            return pa.list_(_arrow_type(item_kind)), False
    return pa.string(), True


def columns_schema(schema: Mapping[str, Any], prefix: str = "") -> pa.Schema:
    """One nullable column per top-level property, in the schema's order, named
    ``prefix + property``. Field metadata records the property name and
    whether the column holds JSON text (used by :func:`to_columns`)."""
    import pyarrow as pa

    fields = []
    for name, prop in schema["properties"].items():
        arrow_type, is_json = _column_type(prop)
        metadata = {PROPERTY_KEY: name.encode(), JSON_KEY: b"1" if is_json else b"0"}
        fields.append(pa.field(prefix + name, arrow_type, nullable=True, metadata=metadata))
    return pa.schema(fields)


def _to_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _coerce(value: Any, arrow_type: pa.DataType) -> Any:
    """``value`` as the column's Python type; None when it cannot be (answers
    were validated first, so that only happens to answers nobody checked)."""
    import pyarrow as pa

    if value is None:
        return None
    if pa.types.is_string(arrow_type):
        return value if isinstance(value, str) else _to_json(value)
    if isinstance(value, bool):
        return value if pa.types.is_boolean(arrow_type) else None
    if pa.types.is_int64(arrow_type):
        # JSON Schema counts 2.0 as an integer.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return value if isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX else None
    if pa.types.is_float64(arrow_type):
        if isinstance(value, int | float):
            try:
                return float(value)
            except OverflowError:
                return None
        return None
    if pa.types.is_list(arrow_type):
        if not isinstance(value, list):
            return None
        return [_coerce(item, arrow_type.value_type) for item in value]
    return None


def to_columns(values: Sequence[Mapping[str, Any] | None], schema: pa.Schema) -> pa.Table:
    """A table with one row per value, typed as ``schema`` (from
    :func:`columns_schema`). ``None`` (a row without a parsed answer) and
    missing properties are nulls; objects and other non-scalars are JSON text."""
    import pyarrow as pa

    columns: list[pa.Array] = []
    for field in schema:
        metadata = field.metadata or {}
        name = metadata.get(PROPERTY_KEY, field.name.encode()).decode()
        if metadata.get(JSON_KEY) == b"1":
            cells = [
                None if v is None or v.get(name) is None else _to_json(v[name]) for v in values
            ]
        else:
            cells = [None if v is None else _coerce(v.get(name), field.type) for v in values]
        columns.append(pa.array(cells, type=field.type))
    return pa.Table.from_arrays(columns, schema=schema)


# ---------------------------------------------------------------------------
# Answers.

# Validators compiled per schema object: compiling costs far more than
# validating one small answer, and the same schema object serves a whole run.
_VALIDATORS: dict[int, tuple[Mapping[str, Any], Any]] = {}


def _validator(schema: Mapping[str, Any]) -> Any:
    entry = _VALIDATORS.get(id(schema))
    if entry is not None and entry[0] is schema:
        return entry[1]
    import jsonschema  # type: ignore[import-untyped, unused-ignore]

    cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    validator = cls(schema)
    if len(_VALIDATORS) >= 16:
        _VALIDATORS.clear()
    # Holding the schema keeps its id from being reused by another object.
    _VALIDATORS[id(schema)] = (schema, validator)
    return validator


def _strip_fence(text: str) -> str:
    # Some servers wrap JSON in a Markdown code fence even under a schema.
    text = text.strip()
    match = _FENCE.match(text)
    return match.group(1).strip() if match else text


def load_answer(text: str | None) -> dict[str, Any] | None:
    """The JSON object in an answer that already passed :func:`parse_answer`
    (e.g. from a checkpoint or the cache, when assembling the output); None
    when there is none. Does not validate."""
    if not text:
        return None
    try:
        value = json.loads(_strip_fence(text))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _where(path: Iterable[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _quoted(values: Iterable[Any], limit: int = 8) -> str:
    shown = [json.dumps(v, ensure_ascii=False) for v in values]
    more = len(shown) - limit
    return ", ".join(shown[:limit]) + (f" and {more} more" if more > 0 else "")


def _reason(error: Any) -> str:
    """A short human reason for a jsonschema ValidationError."""
    where = _where(error.absolute_path)
    field = f"field '{where}'" if where else "the answer"
    keyword, expected, instance = error.validator, error.validator_value, error.instance
    if keyword == "required" and isinstance(instance, dict):
        missing = [name for name in expected if name not in instance]
        if missing:
            prefix = f"{where}." if where else ""
            return "missing field " + ", ".join(f"'{prefix}{name}'" for name in missing)
    if keyword == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else str(expected)
        return f"{field} must be {wanted} (got {_json_type(instance)})"
    if keyword == "enum":
        return f"{field} must be one of {_quoted(expected)} (got {_quoted([instance])})"
    if keyword == "const":
        return f"{field} must be {_quoted([expected])} (got {_quoted([instance])})"
    if keyword == "additionalProperties" and isinstance(instance, dict):
        known = error.schema.get("properties", {})
        extra = [name for name in instance if name not in known]
        if extra:
            return "unexpected field " + ", ".join(
                f"'{where + '.' if where else ''}{name}'" for name in extra
            )
    return f"{field}: {error.message}"


def _check_int64(answer: Mapping[str, Any], schema: Mapping[str, Any]) -> None:
    # JSON integers are unbounded; an int64 column is not. Such an answer is as
    # unusable as one of the wrong type, so it is retried like one.
    import pyarrow as pa

    for name, prop in schema["properties"].items():
        arrow_type, _ = _column_type(prop)
        value = answer.get(name)
        values: list[Any]
        if pa.types.is_int64(arrow_type):
            values = [value]
        elif pa.types.is_list(arrow_type) and pa.types.is_int64(arrow_type.value_type):
            values = value if isinstance(value, list) else []
        else:
            continue
        for item in values:
            numeric = isinstance(item, int | float) and not isinstance(item, bool)
            if numeric and not _INT64_MIN <= item <= _INT64_MAX:
                raise StructuredAnswerError(f"field '{name}' is outside the 64-bit integer range")


def parse_answer(
    text: str | None, schema: Mapping[str, Any], *, finish_reason: str | None = None
) -> dict[str, Any]:
    """The answer as a dict that satisfies ``schema``, or ``StructuredAnswerError``.

    ``finish_reason`` (optional) only sharpens the reason: an answer cut at
    ``max_tokens`` is rarely valid JSON, and the fix is a larger ``--max-tokens``.
    """
    cut = finish_reason == "length"
    if text is None or not text.strip():
        ended = f" (finish_reason '{finish_reason}')" if finish_reason not in (None, "stop") else ""
        raise StructuredAnswerError(f"empty answer{ended}")
    try:
        value = json.loads(_strip_fence(text))
    except json.JSONDecodeError as exc:
        if cut:
            raise StructuredAnswerError(
                "not JSON: the answer was cut at max_tokens (finish_reason 'length'); "
                "raise --max-tokens"
            ) from None
        raise StructuredAnswerError(f"not JSON: {exc.msg} at char {exc.pos}") from None
    if not isinstance(value, dict):
        raise StructuredAnswerError(f"not a JSON object (got {_json_type(value)})")
    import jsonschema  # type: ignore[import-untyped, unused-ignore]  # loaded by _validator

    error = jsonschema.exceptions.best_match(_validator(schema).iter_errors(value))
    if error is not None:
        raise StructuredAnswerError(_reason(error))
    _check_int64(value, schema)
    return value


# ---------------------------------------------------------------------------
# Servers that cannot do it.

_MENTIONS: Final = ("response_format", "json_schema", "structured output", "response format")
_SCHEMA_REJECTED: Final = ("invalid schema", "schema for response_format", "additionalproperties")


def unsupported_message(server_message: str) -> str | None:
    """One line naming the fix when a server's rejection (a 400 or 422 to a
    request that carried ``response_format``) is about structured output;
    None when it is about something else.

    Two cases: the server or model does not support ``json_schema`` at all
    (older models, older vLLM / llama.cpp / Azure API versions), or it
    supports it but refuses this schema (e.g. OpenAI's strict-mode rules).
    Either way every row would fail alike, so the caller should stop the run
    with this message rather than mark rows one by one.
    """
    text = " ".join(server_message.split())
    lowered = text.lower()
    if not any(word in lowered for word in _MENTIONS):
        return None
    shown = text if len(text) <= 160 else text[:159] + "…"
    if any(word in lowered for word in _SCHEMA_REJECTED):
        return (
            f"the server rejected the JSON Schema ({shown}); fix the schema given to "
            f"{SCHEMA_SETTING} (OpenAI strict mode needs every property listed in "
            "'required' and \"additionalProperties\": false on every object)"
        )
    return (
        f"the server or model does not support structured outputs (response_format "
        f"json_schema): {shown}; use a server and model that support json_schema "
        f"structured outputs, or remove {SCHEMA_SETTING}"
    )
