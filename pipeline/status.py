"""What ``enrich status`` reports: how far a run is, read from its run
directory while it runs (or after it stopped), or from the finished output.
Reads only: a live run is never disturbed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import polars as pl

from pipeline.checkpoint import Checkpoint
from pipeline.errors import OutputError, UsageError
from pipeline.results import TRANSIENT


@dataclass(frozen=True)
class RunStatus:
    source: Literal["checkpoint", "output"]
    path: Path
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


def _tally(frame: pl.DataFrame, prefix: str = "") -> dict[str, int]:
    counts = dict(frame.group_by(f"{prefix}status").len().iter_rows())
    pending = 0
    if TRANSIENT in frame.columns:
        pending = frame.filter(
            (pl.col("status") == "error") & pl.col(TRANSIENT).fill_null(False)
        ).height
    return {
        "pending": pending,
        "ok": int(counts.get("ok", 0)),
        "error": int(counts.get("error", 0)),
        "skipped": int(counts.get("skipped", 0)),
        "prompt_tokens": int(frame[f"{prefix}prompt_tokens"].sum() or 0),
        "completion_tokens": int(frame[f"{prefix}completion_tokens"].sum() or 0),
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
        **_tally(latest),
    )


def output_status(output: Path, prefix: str = "") -> RunStatus | None:
    if not output.exists():
        return None
    columns = [f"{prefix}{name}" for name in ("status", "prompt_tokens", "completion_tokens")]
    try:
        frame = pl.read_parquet(output, columns=columns)
    except Exception as exc:  # polars raises several unrelated types for a bad file
        raise OutputError(
            f"{output} is not an enriched Parquet file ({type(exc).__name__}); "
            "check the path, or pass --column-prefix if the run used one"
        ) from None
    return RunStatus(
        source="output",
        path=output,
        total_rows=frame.height,
        last_update=datetime.fromtimestamp(output.stat().st_mtime, tz=UTC),
        **_tally(frame, prefix),
    )


def run_status(output: Path, run_dir: Path, prefix: str = "") -> RunStatus:
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
        status = in_progress if newer else finished
    if status is None:
        raise UsageError(
            f"no run found: neither {run_dir} nor {output} exists; "
            "check --output (and --run-dir), or start the run with enrich run"
        )
    return status


def error_reasons(output: Path, column_prefix: str = "", limit: int = 3) -> list[tuple[str, int]]:
    """The most common reasons rows failed in a written output, with their
    counts, most common first: what a summary shows under "error N"."""
    column = f"{column_prefix}error"
    try:
        errors = pl.scan_parquet(output).select(column).drop_nulls().collect()
    except (OSError, pl.exceptions.PolarsError):
        return []
    counts = errors[column].value_counts(sort=True).head(limit)
    return [(str(reason), int(count)) for reason, count in counts.iter_rows()]
