"""One hierarchy of typed errors. The library raises these and never prints;
the CLI maps each class to its documented exit code.

Every message is one line that names the problem *and* the fix (a flag, a
config key, an environment variable or a command).
"""

from __future__ import annotations


class EnrichError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str) -> None:
        # One line, always: cron mail and Airflow logs show the first line only.
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self.args[0])


class UsageError(EnrichError):
    """Bad usage, config or input: nothing was sent, nothing was written."""

    exit_code = 2


class ConfigError(UsageError):
    """An unknown key, a bad value, or a missing required setting."""


class InputError(UsageError):
    """The input dataset cannot be read as asked (missing, corrupt, wrong column...)."""


class OutputError(UsageError):
    """The output path cannot be written (missing directory, same as input...)."""


class CheckpointMismatch(UsageError):
    """The run directory belongs to a different input or different settings."""


class FatalAPIError(EnrichError):
    """A run-level API failure (bad key, unknown model, no quota): retrying
    row by row would only fail every row, so the run stops early."""

    exit_code = 3

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class RunInterrupted(EnrichError):
    """Ctrl-C or SIGTERM: what was done is flushed to the checkpoint."""

    exit_code = 130
