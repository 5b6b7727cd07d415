"""The first rows of a CSV or JSONL input, read with the standard library, for
a fresh run to send before pyarrow is loaded (``pipeline.head``).

A row's prompt is taken only when it is provably the text the full path
(``pipeline.read`` then ``prompt.render``) gives for that row id:

- rows are counted as pyarrow and polars count them: CSV by ``csv`` with the
  parse options ``read._CsvSource`` gives pyarrow (empty lines are not rows),
  JSONL one non-blank line a row;
- every value the prompt uses is "decisively text": non-empty, with no
  whitespace or control character at either end (so no reader's notion of
  blank can differ), and, in a CSV, not a value the type scan could read as
  a number or a boolean (``INT_PATTERN``, ``FLOAT_PATTERN``, ``BOOL_TEXTS``:
  such a column stays text whatever the other rows hold, and text renders as
  it is); in a JSONL file, a JSON string (``read_jsonl`` merges a string with
  any other type into text).

Anything irregular in what is read (bad UTF-8, a wrong field count, a line
that is not a JSON object) gives no head at all: the full path reports it
before anything is sent. Only ``HEAD_BYTES`` are read.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from pipeline import prompt

__all__ = ["BOOL_TEXTS", "FLOAT_PATTERN", "HEAD_BYTES", "INT_PATTERN", "HeadRows", "read_head"]

# Types are only inferred when converting back to text would give the same value, so
# zip codes ("02134"), ids with leading zeros and 20-digit numbers stay text. The one
# definition: pipeline.read's type scan uses these too.
INT_PATTERN: Final = r"^(0|-?[1-9][0-9]{0,17})$"
FLOAT_PATTERN: Final = r"^-?(0|[1-9][0-9]{0,14})(\.[0-9]+)?([eE][-+]?[0-9]{1,3})?$"
BOOL_TEXTS: Final = ("true", "false", "True", "False", "TRUE", "FALSE")

# Enough for a starting burst of short prompts; a file of long ones gives fewer.
HEAD_BYTES: Final = 1 << 20

_INT: Final = re.compile(INT_PATTERN)
_FLOAT: Final = re.compile(FLOAT_PATTERN)
_BLANK_LINE: Final = " \t\r\n\x0b\x0c"

Format = Literal["csv", "jsonl"]


@dataclass(frozen=True)
class HeadRows:
    """What the first rows give: the CSV header (None for JSONL) and, in row
    order, the rows whose prompt is exact, with their row ids."""

    columns: list[str] | None
    prompts: list[tuple[int, str]]


def read_head(path: Path, fmt: Format, spec: prompt.PromptSpec, limit: int) -> HeadRows | None:
    """Up to ``limit`` exact prompts from the start of ``path``; None when the
    start of the file is not regular enough to vouch for. Raises the full
    path's error for a prompt column the CSV header lacks (before anything is
    sent)."""
    start = _start_of(path)
    if start is None:
        return None
    text, complete = start
    if fmt == "csv":
        return _csv_head(text, complete, spec, limit, str(path))
    return _jsonl_head(text, complete, spec, limit)


def _start_of(path: Path) -> tuple[str, bool] | None:
    """The first ``HEAD_BYTES`` decoded (a character cut at the end is left
    out), and whether that is the whole file."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                data = stream.read(HEAD_BYTES + 1)
        else:
            with path.open("rb") as raw:
                data = raw.read(HEAD_BYTES + 1)
    except (OSError, EOFError, zlib.error):
        return None
    complete = len(data) <= HEAD_BYTES
    if data[:2] == b"\x1f\x8b" and not path.name.lower().endswith(".gz"):
        return None  # a gzip file under a plain name: the full path says so
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:HEAD_BYTES], final=complete)
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff"), complete


def _csv_head(
    text: str, complete: bool, spec: prompt.PromptSpec, limit: int, source: str
) -> HeadRows | None:
    # strict: a quote where the CSV rules do not expect one ends the head
    # rather than be read one way here and another by pyarrow.
    records = _whole_records(csv.reader(io.StringIO(text, newline=""), strict=True), complete)
    header = next(records, None)
    if header is None or header is _MALFORMED:
        return None
    if any("\ufffd" in name for name in header) or max(Counter(header).values()) > 1:
        return None
    prompts: list[tuple[int, str]] = []
    prompt.validate(spec, header, source=source)
    index = {name: i for i, name in enumerate(header)}
    for row_id, row in enumerate(records):
        if row is _MALFORMED or len(row) != len(header):
            return None
        text_of = _exact_prompt(spec, lambda name, row=row: _csv_text(row[index[name]]))
        if text_of is not None:
            prompts.append((row_id, text_of))
            if len(prompts) >= limit:
                break
    return HeadRows(header, prompts)


# What _whole_records gives for a record the csv module refused.
_MALFORMED: Final[list[str]] = []


def _whole_records(reader: Iterator[list[str]], complete: bool) -> Iterator[list[str]]:
    """The reader's records, read only as far as asked, without empty lines
    (pyarrow's ignore_empty_lines) and without the last record when the text
    is cut short (it may be cut too). A record the reader refuses comes out
    as ``_MALFORMED`` when the text is whole; a cut text just ends there."""
    pending: list[str] | None = None
    try:
        for record in reader:
            if not record:
                continue
            if pending is not None:
                yield pending
            pending = record
    except csv.Error:
        if pending is not None and complete:
            yield pending
        if complete:
            yield _MALFORMED
        return
    if pending is not None and complete:
        yield pending


def _jsonl_head(text: str, complete: bool, spec: prompt.PromptSpec, limit: int) -> HeadRows | None:
    lines = text.split("\n")
    if not complete:
        lines = lines[:-1]  # the last line may be cut short
    prompts: list[tuple[int, str]] = []
    row_id = 0
    for line in lines:
        if not line.strip(_BLANK_LINE):
            continue  # a blank line is not a row
        if "\r" in line.rstrip("\r"):
            break  # a lone CR inside a line: leave the line count to the full path
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        text_of = _exact_prompt(spec, lambda name, record=record: _json_text(record.get(name)))
        if text_of is not None:
            prompts.append((row_id, text_of))
            if len(prompts) >= limit:
                break
        row_id += 1
    return HeadRows(None, prompts)


def _exact_prompt(spec: prompt.PromptSpec, value_of: Any) -> str | None:
    """The row's prompt when every value it uses is decisively text, else None."""
    if spec.column is not None:
        value: str | None = value_of(spec.column)
        return value
    assert spec.template is not None
    literals, names = prompt.parse_template(spec.template)
    parts = [literals[0]]
    for name, literal in zip(names, literals[1:], strict=True):
        value = value_of(name)
        if value is None:
            return None
        parts += [value, literal]
    return "".join(parts)


def _csv_text(value: str) -> str | None:
    if not _plain(value) or value in BOOL_TEXTS or _INT.match(value) or _FLOAT.match(value):
        return None
    return value


def _json_text(value: object) -> str | None:
    if not isinstance(value, str) or not _plain(value):
        return None
    try:
        value.encode("utf-8")  # a lone surrogate ("\ud800") is not text polars keeps
    except UnicodeEncodeError:
        return None
    return value


def _plain(value: str) -> bool:
    """Non-empty, no NUL, and neither end a space, separator or control
    character in anyone's sense (Python's and pyarrow's whitespace differ)."""
    return bool(value) and "\x00" not in value and _solid(value[0]) and _solid(value[-1])


def _solid(char: str) -> bool:
    return not char.isspace() and unicodedata.category(char)[0] not in "ZC"


def _unique_keys(pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        # Which of two values a reader keeps is its own choice: not exact.
        raise ValueError("duplicate key")
    return record
