"""Streaming readers: CSV, Parquet and JSONL in, fixed-size chunks with stable row ids out.

A row's id is its 0-based position in the input file. Resume, dedup and the final
assembly all key on it, so it must come out the same on every run over the same file.

Every chunk has the same schema. Streaming readers normally infer types from the
first block and then fail (or silently disagree) when a column turns from numbers to
text a million rows later, so CSV and JSONL inputs are scanned once in full by
``open_input`` to settle the schema. That pass also finds encoding and syntax errors
before anything is sent to the API, and counts the rows. Memory stays bounded by one
block (a few MiB) plus one chunk, never by the size of the file.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from pipeline import storage
from pipeline.errors import InputError
from pipeline.head_read import BOOL_TEXTS, FLOAT_PATTERN, INT_PATTERN
from pipeline.storage import Location, ObjectUri

if TYPE_CHECKING:
    # Imported by the Parquet reader: CSV and JSONL input never load it.
    import pyarrow.parquet as pq

__all__ = ["Chunk", "Format", "InputSource", "detect_format", "open_input"]

Format = Literal["csv", "parquet", "jsonl"]

_EXTENSIONS: Final[dict[str, Format]] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".ndjson": "jsonl",
    ".ndjson.gz": "jsonl",
}
_SUPPORTED: Final = ", ".join(_EXTENSIONS)


# Long enough to show which row or value broke, short enough to stay one readable line.
_DETAIL_CHARS: Final = 160


@dataclass(frozen=True)
class Chunk:
    """A slice of the input: rows ``offset`` .. ``offset + num_rows - 1``."""

    offset: int
    table: pa.Table

    @property
    def num_rows(self) -> int:
        return int(self.table.num_rows)


class InputSource(ABC):
    """One input file, opened and validated. Build it with :func:`open_input`."""

    path: Location
    format: Format
    schema: pa.Schema

    def __init__(self, path: Location, fmt: Format, schema: pa.Schema) -> None:
        self.path = path
        self.format = fmt
        self.schema = schema

    def columns(self) -> list[str]:
        return list(self.schema.names)

    @abstractmethod
    def count_rows(self) -> int:
        """The exact number of rows (known once the file is open)."""

    def bytes_per_row(self, sample_rows: int = 256) -> float:
        """Mean in-memory size of a row, from the first ``sample_rows``: what
        sizes chunks by bytes when rows are large (100 KB prompts make a
        1,000-row chunk 100 MB)."""
        sample = next(iter(self.chunks(sample_rows)), None)
        if sample is None or sample.num_rows == 0:
            return 0.0
        return float(sample.table.nbytes) / sample.num_rows

    def rows_within(self, budget_bytes: int, max_rows: int, extra_bytes_per_row: float = 0) -> int:
        """How many rows (at most ``max_rows``, at least 1) fit in ``budget_bytes``
        together with ``extra_bytes_per_row`` each (their results, say)."""
        per_row = max(1.0, self.bytes_per_row() + extra_bytes_per_row)
        return max(1, min(max_rows, int(budget_bytes // per_row)))

    def chunks(
        self, chunk_size: int, start_row: int = 0, columns: Sequence[str] | None = None
    ) -> Iterator[Chunk]:
        """Chunks of exactly ``chunk_size`` rows (the last may be shorter), from
        ``start_row``, of ``columns`` only (None: all; Parquet reads no others).

        Rows before ``start_row`` may still be parsed, but are dropped as they go.
        """
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        if start_row < 0:
            raise ValueError(f"start_row must be at least 0, got {start_row}")
        pieces = self._pieces(chunk_size, start_row, columns)
        if columns is not None:
            pieces = ((offset, table.select(list(columns))) for offset, table in pieces)
        return _rechunk(pieces, chunk_size, start_row)

    @abstractmethod
    def _pieces(
        self, chunk_size: int, start_row: int, columns: Sequence[str] | None
    ) -> Iterator[tuple[int, pa.Table]]:
        """(offset, table) pieces of any size, in order, with ``self.schema``
        (or at least ``columns`` of it, when the format can skip the others).

        May start at any piece boundary at or before ``start_row``.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, columns={self.columns()!r})"


def detect_format(path: Location) -> Format:
    """The format implied by the file name; the content is checked by :func:`open_input`."""
    name = path.name.lower()
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return _EXTENSIONS[ext]
    suffix = path.suffix or "no extension"
    hint = ""
    if name.endswith(".json"):
        hint = " (if it holds one JSON object per line, rename it to .jsonl)"
    raise InputError(
        f"input {path} has an unsupported extension ({suffix}){hint}; "
        f"--input must end in one of {_SUPPORTED}"
    )


def open_input(path: str | Location) -> InputSource:
    """Open and validate an input file: it exists, is readable, parses, and has rows."""
    location = storage.parse_location(path)
    if isinstance(location, ObjectUri):
        storage.check_exists(location, InputError, "--input", "input")
        return _source(location, detect_format(location))
    p = location.expanduser()
    where = "" if p.is_absolute() else f" (looked for {p.absolute()})"
    if not p.exists():
        raise InputError(f"input file {p} does not exist{where}; check --input")
    if p.is_dir():
        raise InputError(f"input {p} is a directory, not a file; pass one data file to --input")
    fmt = detect_format(p)
    try:
        with p.open("rb") as f:
            f.read(1)
    except PermissionError:
        raise InputError(
            f"cannot read input {p}: permission denied; fix its permissions (chmod +r {p}) "
            "or pass a readable file to --input"
        ) from None
    except OSError as e:
        raise InputError(f"cannot read input {p}: {e.strerror or e}; check --input") from None
    return _source(p, fmt)


def _source(location: Location, fmt: Format) -> InputSource:
    _check_compression(location, fmt)
    if fmt == "parquet":
        return _ParquetSource(location)
    if fmt == "csv":
        return _CsvSource(location)
    from pipeline.read_jsonl import JsonlSource  # polars: only JSONL input needs it

    return JsonlSource(location)


def _rechunk(
    pieces: Iterable[tuple[int, pa.Table]], chunk_size: int, start_row: int
) -> Iterator[Chunk]:
    # Slices are zero-copy views, so regrouping costs no copies; a chunk keeps at most
    # the pieces it spans alive.
    pending: list[pa.Table] = []
    pending_rows = 0
    next_offset = start_row
    for offset, piece in pieces:
        if offset + piece.num_rows <= start_row:
            continue
        if offset < start_row:
            piece = piece.slice(start_row - offset)
        while piece.num_rows:
            take = min(chunk_size - pending_rows, piece.num_rows)
            pending.append(piece.slice(0, take))
            pending_rows += take
            piece = piece.slice(take)
            if pending_rows == chunk_size:
                yield Chunk(next_offset, pa.concat_tables(pending))
                next_offset += pending_rows
                pending, pending_rows = [], 0
    if pending:
        yield Chunk(next_offset, pa.concat_tables(pending))


def _detail(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


_GZIP_MAGIC: Final = b"\x1f\x8b"
_UTF16_BOMS: Final = (b"\xff\xfe", b"\xfe\xff")


def _head(path: Location, size: int = 4) -> bytes:
    try:
        with storage.open_stream(path) as handle:
            return bytes(handle.read(size))
    except (OSError, pa.ArrowException, InputError):
        return b""


def _check_compression(path: Location, fmt: Format) -> None:
    """A gzip file under a plain name would fail as "wrong number of fields"
    or "not UTF-8" far from the cause: say what it is and how to name it."""
    if fmt == "parquet" or path.name.lower().endswith(".gz"):
        return
    if _head(path, 2) == _GZIP_MAGIC:
        raise InputError(
            f"input {path} is gzip-compressed but its name does not say so; rename it to "
            f"{path.name}.gz (.csv.gz, .jsonl.gz and .ndjson.gz are read as they are) or "
            "decompress it (gunzip)"
        )


def _iconv_fix(path: Location) -> str:
    stem, dot, rest = path.name.partition(".")
    if isinstance(path, Path):
        fixed: Path | str = path.with_name(f"{stem}.utf8{''.join(path.suffixes)}")
    else:  # a local copy: the re-encoded file is uploaded again by the user
        fixed = f"{stem}.utf8{dot}{rest}"
    # A UTF-16 file (Excel's "Unicode text") starts with its byte order mark.
    source = "utf-16" if _head(path, 2) in _UTF16_BOMS else "latin1"
    return (
        f"re-encode it to UTF-8 (e.g. iconv -f {source} -t utf-8 {path} > {fixed}) "
        "and pass the new file to --input"
    )


def _no_rows(path: Location, what: str) -> InputError:
    return InputError(f"input {path} has no rows ({what}); pass a file with data to --input")


def _check_column_names(path: Location, names: list[str]) -> None:
    dupes = sorted(n for n, count in Counter(names).items() if count > 1)
    if dupes:
        shown = ", ".join(repr(n) for n in dupes)
        raise InputError(
            f"input {path} has duplicate column names ({shown}); rename them so each "
            "column name is unique, then re-run with --input"
        )


# ---------------------------------------------------------------------------- Parquet


class _ParquetSource(InputSource):
    def __init__(self, path: Location) -> None:
        try:
            with self._open(path) as pf:
                schema = pf.schema_arrow.remove_metadata()
                meta = pf.metadata
                self._num_rows = int(meta.num_rows)
                self._group_rows = [
                    int(meta.row_group(i).num_rows) for i in range(meta.num_row_groups)
                ]
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f"input {path} is not a valid Parquet file ({_detail(e)}); "
                "check --input (was it fully written?)"
            ) from None
        super().__init__(path, "parquet", schema)
        _check_column_names(path, schema.names)
        if self._num_rows == 0:
            raise _no_rows(path, "the Parquet file is empty")

    @staticmethod
    def _open(path: Location) -> pq.ParquetFile:
        # pre_buffer would load whole row groups (possibly the whole file) at once;
        # page-by-page reads keep memory bounded by the batch.
        import pyarrow.parquet as pq

        source = path if isinstance(path, Path) else storage.open_random_access(path)
        return pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)

    def count_rows(self) -> int:
        return self._num_rows

    def _pieces(
        self, chunk_size: int, start_row: int, columns: Sequence[str] | None
    ) -> Iterator[tuple[int, pa.Table]]:
        # Row groups that end before start_row are skipped without being read.
        first_group, offset = 0, 0
        for rows in self._group_rows:
            if offset + rows > start_row:
                break
            offset += rows
            first_group += 1
        if first_group >= len(self._group_rows):
            return
        try:
            with self._open(self.path) as pf:
                batches = pf.iter_batches(
                    batch_size=chunk_size,
                    row_groups=range(first_group, len(self._group_rows)),
                    columns=None if columns is None else list(columns),
                )
                for batch in batches:
                    table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
                    yield offset, table
                    offset += table.num_rows
        except (pa.ArrowException, OSError) as e:
            raise InputError(
                f"input {self.path} could not be read near row {offset} ({_detail(e)}); "
                "the file may be truncated or corrupt: re-export it and check --input"
            ) from None


# -------------------------------------------------------------------------------- CSV

# Types are only inferred when converting back to text would give the same value
# (pipeline.head_read holds the patterns: a fresh run's first rows are judged by them).
_INT_RE: Final = INT_PATTERN
_FLOAT_RE: Final = FLOAT_PATTERN
_BOOLS: Final = pa.array(BOOL_TEXTS)
# Candidate types in order of preference; a column keeps the first that fits all rows.
_CANDIDATES: Final = (pa.int64(), pa.float64(), pa.bool_())


def _fits(values: pa.Array, typ: pa.DataType) -> bool:
    if typ == pa.bool_():
        return bool(pc.all(pc.is_in(values, value_set=_BOOLS)).as_py() is not False)
    pattern = _INT_RE if typ == pa.int64() else _FLOAT_RE
    if pc.all(pc.match_substring_regex(values, pattern)).as_py() is False:
        return False
    try:
        pc.cast(values, typ)
    except pa.ArrowInvalid:
        return False
    return True


class _CsvSource(InputSource):
    # pyarrow reads a few dozen blocks ahead, so memory is ~40x the block size.
    _BLOCK_SIZE: Final = 1 << 20
    # A row longer than a block cannot be parsed; retry with bigger blocks up to this.
    _MAX_BLOCK_SIZE: Final = 64 << 20

    def __init__(self, path: Location) -> None:
        self._block_size = self._BLOCK_SIZE
        self._header: list[str] = []
        while True:
            try:
                schema, self._num_rows = self._scan(path)
                break
            except pa.ArrowInvalid as e:
                if "straddl" not in str(e) or self._block_size >= self._MAX_BLOCK_SIZE:
                    raise self._error(path, e, None) from None
                self._block_size *= 4
            except (pa.ArrowException, OSError) as e:
                raise self._error(path, e, None) from None
        super().__init__(path, "csv", schema)

    def _reader(self, path: Location) -> pcsv.CSVStreamingReader:
        return pcsv.open_csv(
            str(path) if isinstance(path, Path) else storage.open_stream(path, "detect"),
            read_options=pcsv.ReadOptions(block_size=self._block_size),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            # Everything is read as text and converted by us (see _scan), so every block
            # is converted the same way whatever the first block looked like. An unquoted
            # empty field is null; a quoted "" stays an empty string; "NA" is text.
            convert_options=pcsv.ConvertOptions(
                default_column_type=pa.string(),
                strings_can_be_null=True,
                null_values=[""],
                quoted_strings_can_be_null=False,
            ),
        )

    def _scan(self, path: Location) -> tuple[pa.Schema, int]:
        reader = self._reader(path)
        bad_header = InputError(
            f"input {path} has a header that is not valid UTF-8; " + _iconv_fix(path)
        )
        # pyarrow checks the values' encoding but not the header's: it either fails on
        # decoding the names or replaces the bad bytes with U+FFFD.
        try:
            names = list(reader.schema.names)
        except UnicodeDecodeError:
            raise bad_header from None
        if any("\ufffd" in n for n in names):
            raise bad_header
        _check_column_names(path, names)
        self._header = names
        candidates = [list(_CANDIDATES) for _ in names]
        seen_value = [False] * len(names)
        rows = 0
        for batch in reader:
            rows += batch.num_rows
            for i, column in enumerate(batch.columns):
                if not candidates[i] or column.null_count == len(column):
                    continue
                seen_value[i] = True
                values = column.drop_null()
                candidates[i] = [t for t in candidates[i] if _fits(values, t)]
        if rows == 0:
            raise _no_rows(path, "only a header" if names else "the file is empty")
        fields = [
            pa.field(name, cands[0] if cands and seen else pa.string())
            for name, cands, seen in zip(names, candidates, seen_value, strict=True)
        ]
        return pa.schema(fields), rows

    def _error(self, path: Location, e: BaseException, row: int | None) -> InputError:
        text = str(e)
        near = f" near row {row}" if row is not None else ""
        if "Empty CSV file" in text:
            return _no_rows(path, "the file is empty or has only a header")
        if "UTF8" in text or "UTF-8" in text:
            column = re.search(r"column #(\d+)", text)
            if column and int(column.group(1)) < len(self._header):
                near += f" in column {self._header[int(column.group(1))]!r}"
            return InputError(f"input {path} is not valid UTF-8{near}; " + _iconv_fix(path))
        if "Expected" in text and "columns" in text:
            return InputError(
                f"input {path} has a row with the wrong number of fields{near} "
                f"({_detail(e)}); quote fields that contain commas, then check --input"
            )
        if "straddl" in text:
            return InputError(
                f"input {path} has a field larger than {self._MAX_BLOCK_SIZE >> 20} MiB "
                "or an unbalanced quote; fix the quoting, then check --input"
            )
        return InputError(
            f"input {path} is not a readable CSV file{near} ({_detail(e)}); check --input"
        )

    def count_rows(self) -> int:
        return self._num_rows

    def _pieces(
        self, chunk_size: int, start_row: int, columns: Sequence[str] | None
    ) -> Iterator[tuple[int, pa.Table]]:
        offset = 0
        converted = [
            (i, field.type) for i, field in enumerate(self.schema) if field.type != pa.string()
        ]
        try:
            for batch in self._reader(self.path):
                if offset + batch.num_rows <= start_row:
                    offset += batch.num_rows
                    continue
                arrays = list(batch.columns)
                for i, typ in converted:
                    arrays[i] = pc.cast(arrays[i], typ)
                yield offset, pa.Table.from_arrays(arrays, schema=self.schema)
                offset += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            # The scan in open_input passed, so the file changed since it was opened.
            raise self._error(self.path, e, offset) from None
