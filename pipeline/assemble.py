"""The assemble stage: the final file, written from the input and the
checkpoint in input order, exactly one row per input row, atomically.

Memory is bounded by bytes, not rows: a row group holds as many rows as fit
in ``GROUP_BYTES`` of input and results together, so 100 KB answers make
small row groups instead of a 3 GB one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import structured, write
from pipeline.checkpoint import Checkpoint, PartSweep, bytes_per_row
from pipeline.crashpoints import crash_point
from pipeline.durable import remove_stale_temps
from pipeline.errors import EnrichError
from pipeline.read import InputSource
from pipeline.results import TRANSIENT

# Rows per row group at most: big enough for fast scans downstream, small
# enough that the input chunk, the results, the enriched chunk and the
# compressor's buffers together are not the run's peak.
GROUP_ROWS: Final = 32_768
# Bytes of input plus results per row group at most.
GROUP_BYTES: Final = 32 << 20


@dataclass(frozen=True)
class Tally:
    """What the output holds, counted as it is written."""

    rows: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    pending: int = 0
    """Errors whose last failure was transient (sent again by the next run)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def plus(self, results: pa.Table) -> Tally:
        counts = {
            entry["values"]: entry["counts"]
            for entry in results.column("status").value_counts().to_pylist()
        }
        errors = pc.equal(results.column("status"), "error")
        transient = pc.and_(errors, pc.fill_null(results.column(TRANSIENT), False))
        return Tally(
            rows=self.rows + results.num_rows,
            ok=self.ok + counts.get("ok", 0),
            error=self.error + counts.get("error", 0),
            skipped=self.skipped + counts.get("skipped", 0),
            pending=self.pending + int(pc.sum(transient).as_py() or 0),
            prompt_tokens=self.prompt_tokens
            + int(pc.sum(results.column("prompt_tokens")).as_py() or 0),
            completion_tokens=self.completion_tokens
            + int(pc.sum(results.column("completion_tokens")).as_py() or 0),
        )


def rows_per_group(source: InputSource, result_bytes_per_row: float) -> int:
    return source.rows_within(GROUP_BYTES, GROUP_ROWS, result_bytes_per_row)


def assemble_output(
    source: InputSource,
    checkpoint: Checkpoint,
    output: Path,
    *,
    prefix: str = "",
    schema: dict[str, Any] | None = None,
) -> Tally:
    """Write ``output`` from ``source`` and the checkpoint's results. With a
    JSON ``schema``, the answer's fields follow as typed columns (the
    checkpoint keeps only the text). Raises ``DamagedPart`` (the part set
    aside) when a part turns out unreadable: its rows must be sent again."""
    base_schema = write.output_schema(source.schema, prefix)
    fields = structured.columns_schema(schema, prefix) if schema is not None else None
    file_schema = pa.schema([*base_schema, *fields]) if fields is not None else base_schema
    parts = checkpoint.parts()
    sweep = PartSweep(checkpoint, parts)
    group_rows = rows_per_group(source, bytes_per_row(parts))
    remove_stale_temps(output)
    tally = Tally()
    with write.AtomicParquetWriter(output, file_schema) as writer:
        for chunk in source.chunks(group_rows):
            rows = chunk.table.num_rows
            results = sweep.results(chunk.offset, chunk.offset + rows)
            if results.num_rows != rows:
                raise EnrichError(
                    f"{rows - results.num_rows} rows between {chunk.offset} and "
                    f"{chunk.offset + rows} have no result in {checkpoint.run_dir}; "
                    "run the same command again to finish them"
                )
            enriched = write.enriched_chunk(chunk.table, results, base_schema)
            if fields is not None:
                enriched = _with_answer_fields(enriched, results, fields)
            writer.write(enriched)
            tally = tally.plus(results)
        crash_point("before-output-rename")
    crash_point("after-output-rename")
    return tally


def _with_answer_fields(enriched: pa.Table, results: pa.Table, fields: pa.Schema) -> pa.Table:
    answers = [
        structured.load_answer(text) if status == "ok" else None
        for text, status in zip(
            results.column("response").to_pylist(),
            results.column("status").to_pylist(),
            strict=True,
        )
    ]
    typed = structured.to_columns(answers, fields)
    for index, field in enumerate(fields):
        enriched = enriched.append_column(field, typed.column(index))
    return enriched
