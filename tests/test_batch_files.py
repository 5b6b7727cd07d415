"""Batch input files: request lines built from the online route's body, and
split into files within the provider's limits."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from pipeline.batch_files import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_REQUESTS,
    FileLimits,
    LineTooLarge,
    custom_id,
    request_line,
    row_of,
    split_lines,
)
from pipeline.config import ModelConfig
from pipeline.errors import UsageError
from pipeline.transport import body_params, chat_body

MESSAGES = [{"role": "user", "content": "Why is the sky blue? ✓"}]


def test_a_request_line_carries_the_online_body_under_its_custom_id() -> None:
    model = ModelConfig(name="gpt-4o-mini", temperature=0.0, max_tokens=50)
    params = body_params(model, {"response_format": {"type": "json_object"}})
    line = request_line(17, model.name, MESSAGES, params)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert parsed == {
        "custom_id": "row-17",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat_body(model.name, MESSAGES, params),
    }
    assert parsed["body"]["temperature"] == 0.0 and parsed["body"]["max_tokens"] == 50
    assert "stream" not in parsed["body"]


def test_custom_ids_map_back_to_rows_and_foreign_ids_do_not() -> None:
    assert row_of(custom_id(0)) == 0 and row_of(custom_id(123_456)) == 123_456
    for foreign in ("request-1", "row-", "row-x1", "row--1", None, 5):
        assert row_of(foreign) is None


def test_the_defaults_are_openais_limits() -> None:
    assert FileLimits() == FileLimits(DEFAULT_MAX_REQUESTS, DEFAULT_MAX_BYTES)
    assert (DEFAULT_MAX_REQUESTS, DEFAULT_MAX_BYTES) == (50_000, 200 * 1024 * 1024)


def _lines(count: int, size: int = 100) -> Iterator[tuple[int, bytes]]:
    for row in range(count):
        yield row, b"x" * (size - 1) + b"\n"


def test_files_are_cut_by_requests_per_file() -> None:
    files = list(split_lines(_lines(25), FileLimits(max_requests=10, max_bytes=10_000)))
    assert [len(f.rows) for f in files] == [10, 10, 5]
    assert [row for f in files for row in f.rows] == list(range(25))


def test_files_are_cut_by_bytes_per_file() -> None:
    files = list(split_lines(_lines(10, size=100), FileLimits(max_requests=100, max_bytes=350)))
    assert [len(f.rows) for f in files] == [3, 3, 3, 1]
    assert all(f.size <= 350 and f.size == len(f.data()) for f in files)
    assert b"".join(f.data() for f in files) == b"".join(line for _, line in _lines(10))


def test_a_line_that_exactly_fills_a_file_gets_a_file_of_its_own() -> None:
    files = list(split_lines(_lines(3, size=100), FileLimits(max_requests=10, max_bytes=100)))
    assert [f.rows for f in files] == [[0], [1], [2]]


def test_a_request_larger_than_a_file_says_which_row_and_the_fix() -> None:
    with pytest.raises(LineTooLarge, match=r"row 0's request .*--batch-max-bytes"):
        list(split_lines(_lines(1, size=500), FileLimits(max_requests=10, max_bytes=100)))


def test_splitting_holds_one_file_at_a_time() -> None:
    pulled: list[int] = []

    def lines() -> Iterator[tuple[int, bytes]]:
        for row, line in _lines(1000):
            pulled.append(row)
            yield row, line

    files = split_lines(lines(), FileLimits(max_requests=10, max_bytes=10_000))
    first = next(files)
    assert first.rows == list(range(10))
    assert len(pulled) == 11  # the line that did not fit, nothing more


def test_nothing_to_send_makes_no_file() -> None:
    assert list(split_lines(iter(()))) == []


def test_limits_below_one_are_refused() -> None:
    with pytest.raises(UsageError, match="--batch-max-requests"):
        FileLimits(max_requests=0)
