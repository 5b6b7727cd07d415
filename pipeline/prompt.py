"""Prompt rendering: a column of prompts, or a template filled from columns. Pure functions.

Rendering is vectorised with pyarrow compute: it runs on every chunk, and a Python
loop per row would cost seconds per million rows. pyarrow is imported by the
functions that take tables: the rest (the spec's checks, messages, token
estimates) is what a run needs before its first request, which a fresh run
sends before pyarrow is loaded (``pipeline.head``).
"""

from __future__ import annotations

import difflib
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from pipeline.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.config import RunConfig

__all__ = [
    "DEFAULT_COMPLETION_ESTIMATE",
    "RENDERING_VERSION",
    "PromptSpec",
    "estimate_prompt_tokens",
    "fingerprint_fields",
    "messages",
    "parse_template",
    "placeholders",
    "prompt_spec",
    "render",
    "validate",
]

RENDERING_VERSION: Final = "1"
"""Bump when the text a row renders to changes (e.g. how floats or nulls are written):
a checkpoint made under other rules must not be resumed as if the prompts were equal."""

# Completion tokens assumed for a request when max_tokens is unset (the
# limiter's budget until answers show the real mean; the offline estimate).
DEFAULT_COMPLETION_ESTIMATE: Final = 256

# Enough columns to spot the intended one; wide tables have hundreds.
_MAX_LISTED_COLUMNS: Final = 20


@dataclass(frozen=True)
class PromptSpec:
    """Where a row's prompt comes from: exactly one of ``column`` or ``template``."""

    column: str | None = None
    template: str | None = None
    system_prompt: str | None = None


def prompt_spec(config: RunConfig) -> PromptSpec:
    """The run's prompt source, from its config."""
    return PromptSpec(
        column=config.input.column,
        template=config.input.template,
        system_prompt=config.input.system_prompt,
    )


@lru_cache(maxsize=64)
def parse_template(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(literals, names) with ``len(literals) == len(names) + 1``, names in template order.

    Placeholders are column names taken literally, so ``{a.b}`` and ``{user name}`` name
    columns "a.b" and "user name" (str.format would read attributes and indexes).
    """
    literals: list[str] = []
    names: list[str] = []
    pending = ""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(
            f"--template is malformed ({e}); write placeholders as {{column}} and literal "
            "braces as {{ and }}"
        ) from None
    for literal, name, spec, conversion in parsed:
        pending += literal
        if name is None:
            continue
        if not name.strip():
            raise ConfigError(
                "--template has an empty placeholder {}; name an input column in the "
                "braces, e.g. {title}"
            )
        if name.isdigit():
            raise ConfigError(
                f"--template has a positional placeholder {{{name}}}, which is not supported; "
                "name an input column in the braces, e.g. {title}"
            )
        if spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            raise ConfigError(
                f"--template placeholder {{{shown}}} uses a format spec or conversion, which "
                f"is not supported; use plain {{{name}}} (format the column beforehand)"
            )
        literals.append(pending)
        names.append(name)
        pending = ""
    literals.append(pending)
    return tuple(literals), tuple(names)


def placeholders(template: str) -> list[str]:
    """Column names the template uses, in order of first use, each once."""
    return list(dict.fromkeys(parse_template(template)[1]))


def _mode_error(spec: PromptSpec) -> ConfigError | None:
    if spec.column is not None and spec.template is not None:
        return ConfigError("both --column and --template are set; use one of them")
    if spec.column is None and spec.template is None:
        return ConfigError(
            "no prompt source: pass --column NAME (a column holding the prompts) "
            "or --template 'text with {column} placeholders'"
        )
    return None


def needed_columns(spec: PromptSpec) -> list[str]:
    """The input columns the prompts are made from."""
    return _needed_columns(spec)


def _needed_columns(spec: PromptSpec) -> list[str]:
    error = _mode_error(spec)
    if error is not None:
        raise error
    if spec.column is not None:
        if not spec.column.strip():
            raise ConfigError("--column is empty; name the input column holding the prompts")
        return [spec.column]
    assert spec.template is not None
    if not spec.template.strip():
        raise ConfigError("--template is empty; e.g. --template 'Summarize: {body}'")
    names = placeholders(spec.template)
    if not names:
        raise ConfigError(
            "--template has no {column} placeholders, so every row would get the same "
            "prompt; name input columns in braces, e.g. 'Summarize: {body}'"
        )
    return names


def _missing_column_error(
    spec: PromptSpec, missing: Sequence[str], columns: Sequence[str], source: str
) -> InputError:
    flag = "--column" if spec.column is not None else "--template"
    listed = ", ".join(columns[:_MAX_LISTED_COLUMNS])
    if len(columns) > _MAX_LISTED_COLUMNS:
        listed += f", ... (+{len(columns) - _MAX_LISTED_COLUMNS} more)"
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, columns, n=1)
        if close:
            hints.append(f"{close[0]!r} for {name!r}" if len(missing) > 1 else repr(close[0]))
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    what = "column" if len(missing) == 1 else "columns"
    shown = ", ".join(repr(n) for n in missing)
    return InputError(
        f"{flag} names {what} {shown} not found in {source}{hint}; "
        f"available columns: {listed}; fix {flag}"
    )


def validate(spec: PromptSpec, columns: Sequence[str], source: str = "input") -> None:
    """Check the spec against the input's columns before anything is read or sent."""
    needed = _needed_columns(spec)
    present = set(columns)
    missing = [n for n in needed if n not in present]
    if missing:
        raise _missing_column_error(spec, missing, list(columns), source)


def check_types(spec: PromptSpec, schema: pa.Schema, source: str = "input") -> None:
    """Refuse prompt columns whose values have no one obvious text form:
    lists, records and maps (JSON? which layout? an empty list would be sent
    as "[]") and binary (which encoding?). Numbers, booleans, dates and times
    are written as a person would, so they are fine."""
    import pyarrow as pa

    for name in _needed_columns(spec):
        if name not in schema.names:
            continue
        typ = schema.field(name).type
        if pa.types.is_dictionary(typ):
            typ = typ.value_type
        if pa.types.is_nested(typ) or pa.types.is_map(typ):
            kind = "nested values (lists, records or maps)"
        elif pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
            kind = "binary values"
        else:
            continue
        raise InputError(
            f"column {name!r} of {source} holds {kind} ({typ}), which enrich does not turn "
            "into prompt text on its own; convert it to a text column first (e.g. JSON, or "
            "decoded text) and pass that to --column or --template"
        )


def render(spec: PromptSpec, table: pa.Table) -> list[str | None]:
    """One prompt per row of ``table``; None marks a row to skip (nothing to ask).

    Column mode skips null and blank values. Template mode skips a row only when every
    placeholder is null or blank; otherwise a null fills in as "".
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    # Passed to pyarrow compute as scalars, not Python values: converting a Python
    # value costs ~100x the kernel call itself on small chunks.
    empty, null = pa.scalar("", pa.string()), pa.scalar(None, pa.string())
    needed = _needed_columns(spec)
    missing = [n for n in needed if n not in table.column_names]
    if missing:
        raise _missing_column_error(spec, missing, table.column_names, "the input")
    if spec.column is not None:
        text = _as_text(table.column(spec.column))
        blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(text, empty)), empty)
        return list(pc.if_else(blank, null, text).to_pylist())

    assert spec.template is not None
    texts, slots = parse_template(spec.template)
    literals = [pa.scalar(text, pa.string()) for text in texts]
    filled = {name: pc.fill_null(_as_text(table.column(name)), empty) for name in needed}
    # A row is skipped when all its placeholder values together are blank.
    values = list(filled.values())
    together = values[0] if len(values) == 1 else pc.binary_join_element_wise(*values, empty)
    all_blank = pc.equal(pc.utf8_trim_whitespace(together), empty)
    parts: list[Any] = [literals[0]]
    for name, literal in zip(slots, literals[1:], strict=True):
        parts += [filled[name], literal]
    # The last argument is the separator between parts, not a part.
    joined = pc.binary_join_element_wise(*parts, empty)
    return list(pc.if_else(all_blank, null, joined).to_pylist())


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column as plain strings, as a person would write the values in a prompt."""
    import pyarrow as pa
    import pyarrow.compute as pc

    typ = column.type
    if pa.types.is_dictionary(typ):
        return _as_text(pc.cast(column, typ.value_type))
    if pa.types.is_string(typ):
        return column
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ) or pa.types.is_null(typ):
        return pc.cast(column, pa.string())
    if pa.types.is_floating(typ):
        # NaN is how pandas and friends write "missing"; it is not something to ask about.
        # pyarrow writes 3.0 as "3" and 0.1 as "0.1" (shortest round-trip form).
        return pc.cast(pc.if_else(pc.is_nan(column), pa.scalar(None, typ), column), pa.string())
    if pa.types.is_integer(typ) or pa.types.is_boolean(typ) or pa.types.is_decimal(typ):
        return pc.cast(column, pa.string())
    if pa.types.is_map(typ):
        # pyarrow gives maps as lists of (key, value) pairs; a model reads them as objects.
        return _python_text(column, lambda v: _json(dict(v)))
    if pa.types.is_nested(typ):
        # JSON is what a model reads best for records and lists.
        return _python_text(column, _json)
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return _python_text(column, lambda v: bytes(v).decode("utf-8", errors="replace"))
    # Dates, times, timestamps, durations...: Python's str() is the familiar ISO form.
    return _python_text(column, str)


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _python_text(column: pa.ChunkedArray, to_text: Any) -> pa.ChunkedArray:
    import pyarrow as pa

    values = column.to_pylist()
    return pa.chunked_array(
        [pa.array([None if v is None else to_text(v) for v in values], type=pa.string())],
        type=pa.string(),
    )


def messages(spec: PromptSpec, prompt: str) -> list[dict[str, str]]:
    """The chat messages for one prompt: the system prompt (if any), then the user turn."""
    out: list[dict[str, str]] = []
    if spec.system_prompt:
        out.append({"role": "system", "content": spec.system_prompt})
    out.append({"role": "user", "content": prompt})
    return out


def estimate_prompt_tokens(messages: Sequence[Mapping[str, str | None]]) -> int:
    """A cheap offline estimate of a request's prompt tokens: about 4 bytes a
    token plus per-message overhead. The one estimate: the rate limiter's
    reservations, the spend cap and ``enrich estimate`` all use it. A
    tokenizer would need a download at run time, and the limiter settles
    every reservation with the usage the API reports."""
    return sum(len((message.get("content") or "").encode()) // 4 + 4 for message in messages) + 3


def fingerprint_fields(spec: PromptSpec) -> dict[str, str | None]:
    """Everything in the prompt spec that changes an answer (for the checkpoint fingerprint)."""
    return {
        "column": spec.column,
        "template": spec.template,
        # An empty system prompt sends the same messages as none (see messages()).
        "system_prompt": spec.system_prompt or None,
        "prompt_rendering": RENDERING_VERSION,
    }
