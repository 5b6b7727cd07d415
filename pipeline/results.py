"""What a row's result is: the output columns of the data contract.

This module knows nothing about how a request is sent (see ``call.py``), so
another route to the same answers (e.g. the Batch API) fills the same record.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

import pyarrow as pa

if TYPE_CHECKING:
    from pipeline.cache import CachedAnswer

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
        pa.field("route", pa.string()),
        # Where the time went, where known (added in checkpoint format 3,
        # after the columns above, so their positions stay as they were).
        pa.field("first_token_ms", pa.float64()),
        pa.field("generation_ms", pa.float64()),
        pa.field("server_ms", pa.float64()),
    ]
)
RESULT_COLUMNS: Final = tuple(RESULT_SCHEMA.names)

TRANSIENT: Final = "_transient"
"""Internal column: the row's last failure was transient (5xx, timeout, dropped
connection) and its attempts ran out. Such a row is pending, not final: the next
plain run sends it again. Never in the output."""

REQUEST_KEY: Final = "_request_key"
"""Internal column: the row's request key (see ``cache.key_function``), so a run
over a changed input can reuse every answer whose request did not change."""

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
    route: str | None = None
    """Which route answered the row (``online`` or ``batch``); None when skipped."""
    first_token_ms: float | None = None
    """Streamed answers: from sending the request to the first content."""
    generation_ms: float | None = None
    """The model's time generating the answer: the server's own figure where
    it says it, else the span over which a stream's content came."""
    server_ms: float | None = None
    """The server's own time for the request (llama.cpp's ``timings``);
    ``latency_ms`` less this is waiting: the server's queue and the network."""
    transient: bool = False
    """An error whose last failure was transient: pending, retried by the next run."""
    request_key: bytes | None = None

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


def reused(row_id: int, answer: RowResult | CachedAnswer) -> RowResult:
    """A row answered without a request of its own (the response cache, or
    an identical row's request): tokens are the original request's (what
    the answer took), attempts 0 and no latency (nothing paid). A failure
    stays what it was: a transient one is pending for the next run."""
    failed = answer if isinstance(answer, RowResult) else None
    return RowResult(
        row_id=row_id,
        status=failed.status if failed else "ok",
        response=answer.response,
        error=failed.error if failed else None,
        attempts=0,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        finish_reason=answer.finish_reason,
        model=answer.model,
        cached=True,
        transient=failed.transient if failed else False,
    )
