"""JSONL input: its own module because it reads with polars (``read_ndjson``
types nested values), which CSV and Parquet inputs never need, so a run over
them does not pay polars' import before its first request."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from typing import Final

import polars as pl
import pyarrow as pa
from polars.datatypes import DataTypeClass

from pipeline import storage
from pipeline.errors import InputError
from pipeline.read import InputSource, _detail, _iconv_fix, _no_rows
from pipeline.storage import Location

_BOM: Final = b"\xef\xbb\xbf"


def _merge_types(a: pl.DataType, b: pl.DataType) -> pl.DataType:
    """The type that holds values of both, falling back to text (JSON for nested values).

    Stricter than polars' supertypes on purpose: true/false must not become 1/0.
    """
    if a == b:
        return a
    if isinstance(a, pl.Null):
        return b
    if isinstance(b, pl.Null):
        return a
    if {type(a), type(b)} == {pl.Int64, pl.Float64}:
        return pl.Float64()
    if isinstance(a, pl.Struct) and isinstance(b, pl.Struct):
        merged: dict[str, pl.DataType] = {f.name: _dtype(f.dtype) for f in a.fields}
        for f in b.fields:
            other = _dtype(f.dtype)
            merged[f.name] = _merge_types(merged[f.name], other) if f.name in merged else other
        return pl.Struct(merged)
    if isinstance(a, pl.List) and isinstance(b, pl.List):
        return pl.List(_merge_types(_dtype(a.inner), _dtype(b.inner)))
    return pl.String()


def _dtype(t: pl.DataType | DataTypeClass) -> pl.DataType:
    # polars hands back bare classes (pl.Int64) for some fields; compare instances only.
    return t() if isinstance(t, DataTypeClass) else t


def _python_kind_types(block: bytes) -> dict[str, pl.DataType]:
    """Per-key types for a block polars cannot type by itself (e.g. true and 1 in one key)."""
    kinds: dict[str, pl.DataType] = {}
    for line in block.splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key, value in record.items():
            typ: pl.DataType
            if value is None:
                typ = pl.Null()
            elif isinstance(value, bool):
                typ = pl.Boolean()
            elif isinstance(value, int):
                typ = pl.Int64() if -(2**63) <= value < 2**63 else pl.Float64()
            elif isinstance(value, float):
                typ = pl.Float64()
            else:
                typ = pl.String()
            kinds[key] = _merge_types(kinds[key], typ) if key in kinds else typ
    return kinds


class JsonlSource(InputSource):
    # Lines are parsed a block at a time; a longer line just makes a longer block.
    _BLOCK_SIZE: Final = 1 << 20

    def __init__(self, path: Location) -> None:
        merged: dict[str, pl.DataType] = {}
        rows = 0
        for block, first_line in self._blocks(path):
            try:
                df = pl.read_ndjson(io.BytesIO(block), infer_schema_length=None)
                block_types = {name: _dtype(t) for name, t in df.schema.items()}
                rows += df.height
            except pl.exceptions.PolarsError:
                self._raise_for_bad_line(path, block, first_line)
                block_types = _python_kind_types(block)
                rows += sum(1 for line in block.splitlines() if line.strip())
            for name, typ in block_types.items():
                merged[name] = _merge_types(merged[name], typ) if name in merged else typ
        if rows == 0:
            raise _no_rows(path, "the file is empty")
        # A key that is null on every row has no type to keep; text is the useful guess.
        self._pl_schema = pl.Schema(
            {n: pl.String() if isinstance(t, pl.Null) else t for n, t in merged.items()}
        )
        self._num_rows = rows
        schema = pl.DataFrame(schema=self._pl_schema).to_arrow().schema
        super().__init__(path, "jsonl", schema)

    def _blocks(self, path: Location) -> Iterator[tuple[bytes, int]]:
        """Blocks of whole lines, with the 1-based number of each block's first line."""
        line_no = 1
        carry = b""
        try:
            with storage.open_stream(path, "detect") as stream:
                first = True
                while True:
                    data = stream.read(self._BLOCK_SIZE)
                    if first:
                        data = data.removeprefix(_BOM)
                        first = False
                    if not data:
                        break
                    data = carry + data
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:
                        carry = data
                        continue
                    block, carry = data[:cut], data[cut:]
                    yield block, line_no
                    line_no += block.count(b"\n")
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f"input {path} could not be read near line {line_no} ({_detail(e)}); "
                "check --input (is a .gz file truncated?)"
            ) from None
        if carry.strip():
            yield carry, line_no

    @staticmethod
    def _raise_for_bad_line(path: Location, block: bytes, first_line: int) -> None:
        """Name the first line polars choked on; return if every line is a JSON object."""
        for n, line in enumerate(block.splitlines(), start=first_line):
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(
                    f"input {path} line {n} is not valid UTF-8; " + _iconv_fix(path)
                ) from None
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise InputError(
                    f"input {path} line {n} is not valid JSON ({err.msg} at column {err.colno}); "
                    "fix or remove that line, then check --input"
                ) from None
            if not isinstance(record, dict):
                raise InputError(
                    f"input {path} line {n} is a JSON {type(record).__name__}, not an object; "
                    "JSONL input needs one {...} object per line: check --input"
                )

    def count_rows(self) -> int:
        return self._num_rows

    def _pieces(
        self, chunk_size: int, start_row: int, columns: Sequence[str] | None
    ) -> Iterator[tuple[int, pa.Table]]:
        offset = 0
        for block, first_line in self._blocks(self.path):
            try:
                df = pl.read_ndjson(io.BytesIO(block), schema=self._pl_schema)
            except pl.exceptions.PolarsError as e:
                self._raise_for_bad_line(self.path, block, first_line)
                raise InputError(
                    f"input {self.path} could not be read near line {first_line} "
                    f"({_detail(e)}); check --input"
                ) from None
            if offset + df.height > start_row:
                yield offset, df.to_arrow().cast(self.schema)
            offset += df.height
