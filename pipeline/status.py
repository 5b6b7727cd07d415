"""What ``enrich status`` reports: how far a run is, read from its run
directory while it runs (or after it stopped), or from the finished output.
Reads only: a live run is never disturbed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import polars as pl

from pipeline.checkpoint import Checkpoint
from pipeline.errors import EnrichError, OutputError, UsageError
from pipeline.results import TRANSIENT
from pipeline.storage import Location, ObjectUri, file_facts, read_parquet_columns
from pipeline.tally import Tally


@dataclass(frozen=True)
class RunStatus:
    source: Literal["checkpoint", "output"]
    path: Location
    total_rows: int
    ok: int
    error: int
    skipped: int
    pending: int
    """Errors whose last failure was transient: the next run sends them again."""
    prompt_tokens: int
    completion_tokens: int
    last_update: datetime | None

    @property
    def done(self) -> int:
        return self.ok + self.error + self.skipped

    @property
    def remaining(self) -> int:
        return max(0, self.total_rows - self.done)


def _counts(tally: Tally) -> dict[str, int]:
    return {
        "ok": tally.ok,
        "error": tally.error,
        "skipped": tally.skipped,
        "pending": tally.pending,
        "prompt_tokens": tally.prompt_tokens,
        "completion_tokens": tally.completion_tokens,
    }


def checkpoint_status(run_dir: Path) -> RunStatus | None:
    manifest = Checkpoint.read_manifest(run_dir)
    if manifest is None:
        return None
    checkpoint = Checkpoint(run_dir, manifest)
    latest = checkpoint.latest_results(["status", TRANSIENT, "prompt_tokens", "completion_tokens"])
    return RunStatus(
        source="checkpoint",
        path=run_dir,
        total_rows=manifest.input_rows,
        last_update=checkpoint.last_update(),
        **_counts(Tally.of_table(latest.to_arrow())),
    )


def _read_columns(output: Location, columns: list[str]) -> pl.DataFrame:
    if isinstance(output, ObjectUri):
        frame = pl.from_arrow(read_parquet_columns(output, columns))
        assert isinstance(frame, pl.DataFrame)  # a Table makes a DataFrame
        return frame
    return pl.read_parquet(output, columns=columns)


def output_status(output: Location, prefix: str = "") -> RunStatus | None:
    facts = file_facts(output)
    if facts is None:
        return None
    columns = [f"{prefix}{name}" for name in ("status", "prompt_tokens", "completion_tokens")]
    try:
        frame = _read_columns(output, columns)
    except Exception as exc:  # polars raises several unrelated types for a bad file
        raise OutputError(
            f"{output} is not an enriched Parquet file ({type(exc).__name__}); "
            "check the path, or pass --column-prefix if the run used one"
        ) from None
    return RunStatus(
        source="output",
        path=output,
        total_rows=frame.height,
        last_update=datetime.fromtimestamp(facts[1] / 1e9, tz=UTC),
        **_counts(Tally.of_table(frame.to_arrow(), prefix)),
    )


def run_status(output: Location, run_dir: Path, prefix: str = "") -> RunStatus:
    """The run directory if it is newer than the output (a live or interrupted
    run), else the output (a finished run keeps its run directory when rows
    failed, for the rerun that sends them again)."""
    in_progress = checkpoint_status(run_dir)
    finished = output_status(output, prefix)
    status = in_progress or finished
    if in_progress is not None and finished is not None:
        newer = in_progress.last_update is not None and (
            finished.last_update is None or in_progress.last_update > finished.last_update
        )
        # A finished run keeps its run directory for its failed rows; only the
        # checkpoint knows which of them failed for transient reasons.
        status = in_progress if newer else replace(finished, pending=in_progress.pending)
    if status is None:
        raise UsageError(
            f"no run found: neither {run_dir} nor {output} exists; "
            "check --output (and --run-dir), or start the run with enrich run"
        )
    return status


def error_reasons(
    output: Location, column_prefix: str = "", limit: int = 3
) -> list[tuple[str, int]]:
    """The most common reasons rows failed in a written output, with their
    counts, most common first: what a summary shows under "error N"."""
    column = f"{column_prefix}error"
    try:
        errors = _read_columns(output, [column]).drop_nulls()
    except (OSError, pl.exceptions.PolarsError, EnrichError):
        return []
    counts = errors[column].value_counts(sort=True).head(limit)
    return [(str(reason), int(count)) for reason, count in counts.iter_rows()]
