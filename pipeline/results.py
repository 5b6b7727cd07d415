"""What a row's result is: the output columns of the data contract.

This module knows nothing about how a request is sent (see ``call.py``), so
another route to the same answers (e.g. the Batch API) fills the same record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import pyarrow as pa

Status = Literal["ok", "error", "skipped"]

ROW_ID: Final = "_row_id"
"""Internal column: the 0-based position of the row in the input. Never in the output."""

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
    ]
)
RESULT_COLUMNS: Final = tuple(RESULT_SCHEMA.names)

# What a checkpoint part holds: the row id, then the contract's columns.
PART_SCHEMA: Final = pa.schema([pa.field(ROW_ID, pa.int64()), *RESULT_SCHEMA])


@dataclass(slots=True)
class RowResult:
    """The outcome of one input row."""

    row_id: int
    status: Status
    response: str | None = None
    error: str | None = None
    latency_ms: float | None = None
    attempts: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    model: str | None = None
    cached: bool = False

    @classmethod
    def skipped(cls, row_id: int) -> RowResult:
        return cls(row_id=row_id, status="skipped")


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
        },
        schema=PART_SCHEMA,
    )
