"""What a row's result is: the output columns of the data contract.

This module knows nothing about how a request is sent (see ``call.py``), so
another route to the same answers (e.g. the Batch API) fills the same record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal

if TYPE_CHECKING:
    from pipeline.cache import CachedAnswer

Status = Literal["ok", "error", "skipped"]

ROW_ID: Final = "_row_id"
"""Internal column: the 0-based position of the row in the input. Never in the output."""

RESULT_COLUMNS: Final = (
    "response",
    "status",
    "error",
    "latency_ms",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
    "model",
    "cached",
    "route",
    "first_token_ms",
    "generation_ms",
    "server_ms",
)
"""The contract's result columns, in their order (``pipeline.result_table``
gives their types; a test keeps the two the same)."""

TRANSIENT: Final = "_transient"
"""Internal column: the row's last failure was transient (5xx, timeout, dropped
connection) and its attempts ran out. Such a row is pending, not final: the next
plain run sends it again. Never in the output."""

REQUEST_KEY: Final = "_request_key"
"""Internal column: the row's request key (see ``cache.key_function``), so a run
over a changed input can reuse every answer whose request did not change."""


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
