"""A checkpoint part's columns as Arrow types, and results to and from that
table. Apart from ``pipeline.results`` so that sending a request, which only
makes ``RowResult`` records, does not import pyarrow."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import pyarrow as pa

# The record's names a table's user needs besides the table, from one import.
from pipeline.results import REQUEST_KEY as REQUEST_KEY
from pipeline.results import ROW_ID as ROW_ID
from pipeline.results import TRANSIENT as TRANSIENT
from pipeline.results import RowResult as RowResult
from pipeline.results import reused as reused

RESULT_SCHEMA: Final = pa.schema(
    [
        pa.field("response", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("latency_ms", pa.float64()),
        pa.field("attempts", pa.int32()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("model", pa.string()),
        pa.field("cached", pa.bool_()),
        pa.field("route", pa.string()),
        # Where the time went, where known (added in checkpoint format 3,
        # after the columns above, so their positions stay as they were).
        pa.field("first_token_ms", pa.float64()),
        pa.field("generation_ms", pa.float64()),
        pa.field("server_ms", pa.float64()),
    ]
)

# What a checkpoint part holds: the row id, the contract's columns, then the
# internal ones.
PART_SCHEMA: Final = pa.schema(
    [
        pa.field(ROW_ID, pa.int64()),
        *RESULT_SCHEMA,
        pa.field(TRANSIENT, pa.bool_()),
        pa.field(REQUEST_KEY, pa.binary()),
    ]
)


def results_to_table(results: Sequence[RowResult]) -> pa.Table:
    """Columnar form of results, sorted by row id (parts are range-scanned later)."""
    ordered = sorted(results, key=lambda r: r.row_id)
    return pa.table(
        {
            ROW_ID: [r.row_id for r in ordered],
            "response": [r.response for r in ordered],
            "status": [r.status for r in ordered],
            "error": [r.error for r in ordered],
            "latency_ms": [r.latency_ms for r in ordered],
            "attempts": [r.attempts for r in ordered],
            "prompt_tokens": [r.prompt_tokens for r in ordered],
            "completion_tokens": [r.completion_tokens for r in ordered],
            "finish_reason": [r.finish_reason for r in ordered],
            "model": [r.model for r in ordered],
            "cached": [r.cached for r in ordered],
            "route": [r.route for r in ordered],
            "first_token_ms": [r.first_token_ms for r in ordered],
            "generation_ms": [r.generation_ms for r in ordered],
            "server_ms": [r.server_ms for r in ordered],
            TRANSIENT: [r.transient for r in ordered],
            REQUEST_KEY: [r.request_key for r in ordered],
        },
        schema=PART_SCHEMA,
    )


def results_from_table(table: pa.Table) -> list[RowResult]:
    """The results a table of ``results_to_table``'s schema holds (a journal's
    records, read back), in its order."""
    names = {ROW_ID: "row_id", TRANSIENT: "transient", REQUEST_KEY: "request_key"}
    return [
        RowResult(**{names.get(key, key): value for key, value in row.items()})
        for row in table.to_pylist()
    ]
