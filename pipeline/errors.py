"""One hierarchy of typed errors and the one table of exit codes. The library
raises these and never prints; the CLI exits with the error's code.

Every message is one line that names the problem *and* the fix (a flag, a
config key, an environment variable or a command).
"""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.summary import RunSummary


class ExitCode(IntEnum):
    """Every code ``enrich`` exits with: the README's table, the report's
    ``outcome`` and the error classes all come from here."""

    OK = 0
    TOO_MANY_FAILED_ROWS = 1
    USAGE = 2
    FATAL_API = 3
    LOCK_HELD = 4
    SPEND_CAP = 5
    BATCHES_PENDING = 6
    # sysexits.h: EX_SOFTWARE, EX_IOERR, EX_TEMPFAIL ("try again later").
    INTERNAL = 70
    WRITE_FAILED = 74
    API_UNREACHABLE = 75
    INTERRUPTED = 130

    @property
    def outcome(self) -> str:
        """The word the run report uses for this code."""
        return _OUTCOMES[self]


_OUTCOMES: dict[ExitCode, str] = {
    ExitCode.OK: "done",
    ExitCode.TOO_MANY_FAILED_ROWS: "too_many_failed_rows",
    ExitCode.USAGE: "usage_error",
    ExitCode.FATAL_API: "fatal_api_error",
    ExitCode.LOCK_HELD: "lock_held",
    ExitCode.SPEND_CAP: "stopped_by_spend_cap",
    ExitCode.BATCHES_PENDING: "batches_pending",
    ExitCode.INTERNAL: "internal_error",
    ExitCode.WRITE_FAILED: "write_failed",
    ExitCode.API_UNREACHABLE: "api_unreachable",
    ExitCode.INTERRUPTED: "interrupted",
}


class EnrichError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code: int = ExitCode.TOO_MANY_FAILED_ROWS

    def __init__(self, message: str) -> None:
        # One line, always: cron mail and Airflow logs show the first line only.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(EnrichError):
    """Bad usage, config or input: nothing was sent, nothing was written."""

    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """An unknown key, a bad value, or a missing required setting."""


class MissingSetting(ConfigError):
    """A required setting is missing; ``key`` names it (the CLI adds a usage line)."""

    def __init__(self, message: str, *, key: str) -> None:
        super().__init__(message)
        self.key = key


class TooManyFailedRows(EnrichError):
    """The run finished, but the share of failed rows is above
    ``max_error_rate``. ``summary`` is the finished run's summary (the output
    was written)."""

    exit_code = ExitCode.TOO_MANY_FAILED_ROWS

    def __init__(self, message: str, *, summary: RunSummary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


class InputError(UsageError):
    """The input dataset cannot be read as asked (missing, corrupt, wrong column...)."""


class OutputError(UsageError):
    """The output path cannot be written (missing directory, same as input...)."""


class CheckpointMismatch(UsageError):
    """The run directory belongs to a different input or different settings."""


class FatalAPIError(EnrichError):
    """A run-level API failure (bad key, unknown model, no quota): retrying
    row by row would only fail every row, so the run stops early."""

    exit_code = ExitCode.FATAL_API


class APIUnreachable(EnrichError):
    """The API failed for transient reasons across the run (connections
    refused or reset, timeouts, 5xx) for longer than ``--max-outage``. Nothing
    about the rows is wrong: the checkpoint is kept and the same command,
    rerun once the API is back, finishes the job."""

    exit_code = ExitCode.API_UNREACHABLE


class BatchesPending(EnrichError):
    """``--route batch --no-wait``: batches are submitted and not finished
    yet. Not a failure: the same command, rerun later (cron), collects them."""

    exit_code = ExitCode.BATCHES_PENDING


class BatchFailed(FatalAPIError):
    """A batch the provider refused as a whole (validation): its reason, and
    the fix. Its rows are free again: the next run sends them in a new file."""


class WriteFailed(EnrichError):
    """The checkpoint, report or output cannot be written (an I/O error). What
    was already checkpointed is kept; fixing the cause and rerunning resumes."""

    exit_code = ExitCode.WRITE_FAILED


class DiskFull(WriteFailed):
    """No space left on the device (or quota) where enrich writes."""


class RunInterrupted(EnrichError):
    """Ctrl-C or SIGTERM: what was done is flushed to the checkpoint."""

    exit_code = ExitCode.INTERRUPTED

    @classmethod
    def saved_in(cls, run_dir: Path) -> RunInterrupted:
        return cls(
            f"interrupted; finished rows are saved in {run_dir}; "
            "run the same command again to resume"
        )
