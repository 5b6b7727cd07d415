"""Batch input files: each row's request as one JSONL line, and the lines
split into files a provider accepts.

A request line is OpenAI's Batch API format (and every server that copies
it)::

    {"custom_id": "row-17", "method": "POST", "url": "/v1/chat/completions",
     "body": {...the same body the online route POSTs...}}

The body comes from ``transport.chat_body``, the online route's own builder,
so both routes ask the same question and a cached answer serves either.

Splitting is streaming: lines go into the current file until the next one
would pass the requests or bytes limit, so memory holds one file at most,
whatever the size of the dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.errors import UsageError
from pipeline.transport import JSON_ENCODER, Messages, chat_body

CHAT_URL: Final = "/v1/chat/completions"

# OpenAI's limits for one batch input file (Batch API reference, Files API).
DEFAULT_MAX_REQUESTS: Final = 50_000
DEFAULT_MAX_BYTES: Final = 200 * 1024 * 1024

_CUSTOM_ID_PREFIX: Final = "row-"


def custom_id(row_id: int) -> str:
    """The id a row's request carries through the batch (results come back unordered)."""
    return f"{_CUSTOM_ID_PREFIX}{row_id}"


def row_of(custom: object) -> int | None:
    """The row a result's ``custom_id`` names; None for an id this tool did not write."""
    if not isinstance(custom, str) or not custom.startswith(_CUSTOM_ID_PREFIX):
        return None
    digits = custom[len(_CUSTOM_ID_PREFIX) :]
    return int(digits) if digits.isdigit() else None


def request_line(row_id: int, model: str, messages: Messages, params: Mapping[str, Any]) -> bytes:
    """One request line (newline included) of a batch input file."""
    line: dict[str, Any] = {
        "custom_id": custom_id(row_id),
        "method": "POST",
        "url": CHAT_URL,
        "body": chat_body(model, messages, params),
    }
    return (JSON_ENCODER.encode(line) + "\n").encode()


@dataclass(frozen=True)
class FileLimits:
    """What one batch input file may hold (the provider's limits)."""

    max_requests: int = DEFAULT_MAX_REQUESTS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_bytes < 1:
            raise UsageError(
                "batch file limits must be at least 1; fix --batch-max-requests / --batch-max-bytes"
            )


@dataclass
class FileContent:
    """One batch input file's lines and the rows they ask for, in order."""

    rows: list[int] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)
    size: int = 0

    def add(self, row_id: int, line: bytes) -> None:
        self.rows.append(row_id)
        self.lines.append(line)
        self.size += len(line)

    def data(self) -> bytes:
        return b"".join(self.lines)


class LineTooLarge(UsageError):
    """One request is larger than a whole batch file may be."""


class FileSplitter:
    """Cuts a stream of request lines into files within ``limits``: ``add``
    returns the file the line did not fit in (now complete), ``finish`` the
    last one. Only the file being filled is held."""

    def __init__(self, limits: FileLimits = FileLimits()) -> None:
        self.limits = limits
        self.current = FileContent()

    def add(self, row_id: int, line: bytes) -> FileContent | None:
        """Raises ``LineTooLarge`` for a line larger than a whole file may be."""
        limits = self.limits
        if len(line) > limits.max_bytes:
            raise LineTooLarge(
                f"row {row_id}'s request is {len(line):,} bytes, more than a batch file may hold "
                f"({limits.max_bytes:,}); raise --batch-max-bytes, shorten the prompt, or send "
                "this job with --route online"
            )
        current, done = self.current, None
        full = len(current.rows) >= limits.max_requests
        if current.rows and (full or current.size + len(line) > limits.max_bytes):
            done, self.current = current, FileContent()
        self.current.add(row_id, line)
        return done

    def finish(self) -> FileContent | None:
        current, self.current = self.current, FileContent()
        return current if current.rows else None


def split_lines(
    lines: Iterable[tuple[int, bytes]], limits: FileLimits = FileLimits()
) -> Iterator[FileContent]:
    """``(row_id, line)`` pairs as files within ``limits``, in order (see
    ``FileSplitter``)."""
    splitter = FileSplitter(limits)
    for row_id, line in lines:
        done = splitter.add(row_id, line)
        if done is not None:
            yield done
    last = splitter.finish()
    if last is not None:
        yield last
