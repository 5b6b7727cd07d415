"""The assemble stage: the final file, written from the input and the
checkpoint in input order, exactly one row per input row, atomically.

Memory is bounded by bytes, not rows: a row group holds as many rows as fit
in ``GROUP_BYTES`` of input and results together, so 100 KB answers make
small row groups instead of a 3 GB one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa

from pipeline import structured, write
from pipeline.checkpoint import Checkpoint, DamagedPart, PartSweep, bytes_per_row
from pipeline.crashpoints import crash_point
from pipeline.errors import EnrichError
from pipeline.read import InputSource
from pipeline.tally import Tally

if TYPE_CHECKING:
    from pipeline.plan import Plan
    from pipeline.storage import Location

# Rows per row group at most: big enough for fast scans downstream, small
# enough that the input chunk, the results, the enriched chunk and the
# compressor's buffers together are not the run's peak.
GROUP_ROWS: Final = 32_768
# Bytes of input plus results per row group at most.
GROUP_BYTES: Final = 32 << 20


def rows_per_group(source: InputSource, result_bytes_per_row: float) -> int:
    return source.rows_within(GROUP_BYTES, GROUP_ROWS, result_bytes_per_row)


def assemble(plan: Plan, checkpoint: Checkpoint) -> Tally | None:
    """The output from the checkpoint, and what it holds; None when a part
    turned out damaged (set aside: its rows are to be sent again)."""
    config = plan.config
    try:
        return assemble_output(
            plan.prepared.source,
            checkpoint,
            config.output.path,
            prefix=config.output.column_prefix,
            schema=plan.prepared.schema,
        )
    except DamagedPart:
        return None


def assemble_output(
    source: InputSource,
    checkpoint: Checkpoint,
    output: Location,
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
            tally += Tally.of_table(results)
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
