"""The final enriched Parquet file: input columns plus result columns, written atomically.

The file is written under a hidden temp name in the output's directory and renamed
into place only once complete and fsynced, so a crash, a full disk or an exception
never leaves a half-written file (or a damaged previous one) under the final name.
An object-storage output is written to a local temp file the same way, then
uploaded in one call once complete (see storage.upload).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.durable import commit_temp, disk_full_error, remove_stale_temps, temp_path_for
from pipeline.errors import ConfigError, OutputError
from pipeline.result_table import RESULT_SCHEMA
from pipeline.results import RESULT_COLUMNS, ROW_ID
from pipeline.storage import Location, ObjectUri, local_path, upload
from pipeline.storage import check_output_path as check_output_path

if TYPE_CHECKING:
    # Imported where the output is written (AtomicParquetWriter).
    import pyarrow.parquet as pq

__all__ = [
    "AtomicParquetWriter",
    "check_output_path",
    "enriched_chunk",
    "output_column_names",
    "output_schema",
]

_SUGGESTED_PREFIXES: Final = ("llm_", "enrich_", "out_")


def output_column_names(input_columns: Sequence[str], prefix: str = "") -> list[str]:
    """The result columns' names in the output; they must not shadow an input column."""
    names = [prefix + name for name in RESULT_COLUMNS]
    taken = set(input_columns)
    clashes = [n for n in names if n in taken]
    if clashes:
        suggestion = next(
            (
                p
                for p in _SUGGESTED_PREFIXES
                if p != prefix and not taken.intersection(p + n for n in RESULT_COLUMNS)
            ),
            "my_",
        )
        shown = ", ".join(clashes)
        raise ConfigError(
            f"the input already has column(s) named {shown}, which the output adds; "
            f"pass --column-prefix (e.g. --column-prefix {suggestion}) to name the added "
            "columns differently"
        )
    return names


def output_schema(input_schema: pa.Schema, prefix: str = "") -> pa.Schema:
    """Input fields, then the result fields with ``prefix``.

    Schema-level metadata is dropped: pandas metadata describing the input's columns
    would misdescribe the output's.
    """
    names = output_column_names(input_schema.names, prefix)
    added = [field.with_name(name) for field, name in zip(RESULT_SCHEMA, names, strict=True)]
    return pa.schema([*input_schema, *added])


def enriched_chunk(chunk: pa.Table, results: pa.Table, schema: pa.Schema) -> pa.Table:
    """The input rows of ``chunk`` with their results, as ``schema`` (from output_schema).

    ``results`` holds one row per chunk row, sorted by row id, in the chunk's order.
    """
    if results.num_rows != chunk.num_rows:
        raise ValueError(
            f"{results.num_rows} results for a chunk of {chunk.num_rows} rows: they must align"
        )
    if results.num_rows:
        ids = results.column(ROW_ID)
        first = ids[0].as_py()
        expected = pa.array(range(first, first + results.num_rows), type=ids.type)
        if not pc.all(pc.equal(ids, expected)).as_py():
            raise ValueError("results must hold contiguous row ids in order, one per chunk row")
    if len(schema) != chunk.num_columns + len(RESULT_COLUMNS):
        raise ValueError("schema does not match the chunk: build it with output_schema()")
    arrays = [*chunk.columns, *(results.column(name) for name in RESULT_COLUMNS)]
    return pa.Table.from_arrays(arrays, names=schema.names).cast(schema)


def _codec_available(name: str) -> bool:
    if name.lower() in ("none", "uncompressed"):
        return True
    try:
        return bool(pa.Codec.is_available(name))
    except ValueError:  # pyarrow raises for names it has never heard of
        return False


class AtomicParquetWriter:
    """Writes a Parquet file that appears under ``path`` only when complete.

    Use as a context manager; each ``write`` call becomes (at least) one row group.
    Leaving the block by an exception deletes the temp file and leaves whatever was at
    ``path`` before untouched.
    """

    def __init__(self, path: Location, schema: pa.Schema, *, compression: str = "zstd") -> None:
        if not _codec_available(compression):
            raise ConfigError(
                f"unknown Parquet compression {compression!r}; use zstd, snappy, gzip, "
                "lz4, brotli or none"
            )
        self.path = path
        self.schema = schema
        self.compression = compression
        # A remote output's temp file sits beside its local stand-in (with its
        # run directory), so stale ones are found and removed the same way.
        self._temp = temp_path_for(local_path(path))
        if isinstance(path, ObjectUri):
            self._temp.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = None

    def __enter__(self) -> Self:
        # Here, not with the module: a run checks its output path long before
        # it writes the file, and a fresh run's first request needs no Parquet.
        import pyarrow.parquet as pq

        # Only one run writes an output at a time (the lock), so any temp
        # file of an earlier writer is left by a killed run.
        remove_stale_temps(local_path(self.path))
        try:
            self._writer = pq.ParquetWriter(self._temp, self.schema, compression=self.compression)
        except (OSError, pa.ArrowException) as e:
            self._temp.unlink(missing_ok=True)
            raise disk_full_error(e, local_path(self.path)) or OutputError(
                f"cannot create {self._temp} next to the output ({e}); check that the "
                f"directory of --output {self.path} exists and is writable"
            ) from None
        return self

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            raise RuntimeError("AtomicParquetWriter.write() called outside its with-block")
        if not table.schema.equals(self.schema):
            table = table.cast(self.schema)
        try:
            self._writer.write_table(table)
        except OSError as e:
            raise disk_full_error(e, local_path(self.path)) or OutputError(
                f"writing {self.path} failed ({e.strerror or e}); free disk space or "
                "change --output, then run the same command again"
            ) from None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writer, self._writer = self._writer, None
        if exc_type is not None:
            self._discard(writer)
            return
        try:
            if writer is not None:
                writer.close()
            if isinstance(self.path, ObjectUri):
                upload(self._temp, self.path)
                self._temp.unlink()
            else:
                commit_temp(self._temp, self.path)
        except OSError as e:
            self._discard(None)
            raise disk_full_error(e, local_path(self.path)) or OutputError(
                f"finishing {self.path} failed ({e.strerror or e}); free disk space or "
                "change --output, then run the same command again"
            ) from None
        except BaseException:
            self._discard(None)
            raise

    def _discard(self, writer: pq.ParquetWriter | None) -> None:
        # Cleanup must not mask the error that made us give up on the file.
        if writer is not None:
            with contextlib.suppress(Exception):
                writer.close()
        with contextlib.suppress(OSError):
            self._temp.unlink(missing_ok=True)
