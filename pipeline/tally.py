"""The one tally of results by status: what the output, a checkpoint, a
finished report and a run in progress all count the same way.

Rows, ok, error, skipped, pending (errors whose last failure was transient:
the next run sends them again) and tokens. Counted from an Arrow table of
results (the output, checkpoint parts, ``enrich status``) or result by
result as a run collects them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.results import RowResult


@dataclass(frozen=True, slots=True)
class Tally:
    rows: int = 0
    ok: int = 0
    error: int = 0
    skipped: int = 0
    pending: int = 0
    """Errors whose last failure was transient (sent again by the next run)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def of_table(cls, results: pa.Table, prefix: str = "") -> Tally:
        """Counts of a table with ``status`` and token columns (named with
        ``prefix`` in an output that used one); a table without the internal
        transient column (a finished output) has no pending rows."""
        # Here, not at the top: progress displays count results without pyarrow.
        import pyarrow.compute as pc

        from pipeline.results import TRANSIENT

        status = results.column(f"{prefix}status")
        counts = {entry["values"]: entry["counts"] for entry in status.value_counts().to_pylist()}
        pending = 0
        if TRANSIENT in results.column_names:
            errors = pc.equal(status, "error")
            transient = pc.and_(errors, pc.fill_null(results.column(TRANSIENT), False))
            pending = int(pc.sum(transient).as_py() or 0)
        return cls(
            rows=results.num_rows,
            ok=counts.get("ok", 0),
            error=counts.get("error", 0),
            skipped=counts.get("skipped", 0),
            pending=pending,
            prompt_tokens=int(pc.sum(results.column(f"{prefix}prompt_tokens")).as_py() or 0),
            completion_tokens=int(
                pc.sum(results.column(f"{prefix}completion_tokens")).as_py() or 0
            ),
        )

    @classmethod
    def of_report(cls, report: Mapping[str, Any]) -> Tally:
        """The tally a run report recorded (its ``counts`` and ``tokens``)."""
        counts = report.get("counts", {})
        tokens = report.get("tokens", {})
        return cls(
            rows=int(counts.get("rows", 0)),
            ok=int(counts.get("ok", 0)),
            error=int(counts.get("error", 0)),
            skipped=int(counts.get("skipped", 0)),
            pending=int(counts.get("pending", 0)),
            prompt_tokens=int(tokens.get("prompt", 0)),
            completion_tokens=int(tokens.get("completion", 0)),
        )

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Tally)))

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped


class TallyCounter:
    """A tally kept result by result as a run collects them (mutable: a frozen
    ``Tally`` per row would cost a run of a million cached rows seconds)."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts = [0] * len(fields(Tally))

    def add(self, result: RowResult) -> None:
        counts = self._counts
        counts[0] += 1
        if result.status == "ok":
            counts[1] += 1
        elif result.status == "error":
            counts[2] += 1
            counts[4] += result.transient
        else:
            counts[3] += 1
        counts[5] += result.prompt_tokens or 0
        counts[6] += result.completion_tokens or 0

    def tally(self) -> Tally:
        return Tally(*self._counts)

    def by_status(self) -> dict[str, int]:
        """Rows by status so far, for progress displays."""
        return {"ok": self._counts[1], "error": self._counts[2], "skipped": self._counts[3]}
