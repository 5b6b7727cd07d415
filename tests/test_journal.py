"""The results journal: what a crash or damage leaves is read back to the
last intact record, and nothing after a damaged one is trusted."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.journal import HEADER, JournalWriter, encode_record, read_journal
from pipeline.result_table import results_to_table
from pipeline.results import RowResult


def batch(start: int, rows: int = 3) -> pa.Table:
    return results_to_table(
        [
            RowResult(row_id=i, status="ok", response=f"answer {i}")
            for i in range(start, start + rows)
        ]
    )


def write(path: Path, *tables: pa.Table) -> list[int]:
    """Writes the tables as records; returns the file size after each."""
    writer = JournalWriter(path)
    sizes = []
    for table in tables:
        writer.append(table)
        sizes.append(writer.size)
    writer.close()
    return sizes


def row_ids(path: Path) -> list[int]:
    return [i for table in read_journal(path).tables for i in table.column("_row_id").to_pylist()]


def test_records_are_read_back_in_write_order(tmp_path: Path) -> None:
    path = tmp_path / "seg.log"
    write(path, batch(0), batch(3), batch(6))
    contents = read_journal(path)
    assert row_ids(path) == list(range(9))
    assert contents.damage is None and contents.torn_bytes == 0


def test_appending_to_an_existing_segment_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "seg.log"
    write(path, batch(0))
    write(path, batch(3))
    assert row_ids(path) == list(range(6))
    assert path.read_bytes().count(HEADER) == 1


@pytest.mark.parametrize("cut", [1, 5, 12, 40, -1])
def test_a_record_cut_short_by_a_crash_is_dropped_silently(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "seg.log"
    sizes = write(path, batch(0), batch(3))
    data = path.read_bytes()
    end = sizes[0] + cut if cut > 0 else sizes[1] + cut
    path.write_bytes(data[:end])
    contents = read_journal(path)
    assert row_ids(path) == [0, 1, 2]
    assert contents.damage is None and contents.torn_bytes == end - sizes[0]


def test_zeros_where_a_last_record_was_allocated_count_as_a_torn_append(tmp_path: Path) -> None:
    path = tmp_path / "seg.log"
    write(path, batch(0))
    with path.open("ab") as handle:
        handle.write(b"\0" * 4096)
    contents = read_journal(path)
    assert row_ids(path) == [0, 1, 2]
    assert contents.damage is None


def test_a_garbled_record_is_damage_and_nothing_after_it_is_trusted(tmp_path: Path) -> None:
    path = tmp_path / "seg.log"
    sizes = write(path, batch(0), batch(3), batch(6))
    data = bytearray(path.read_bytes())
    data[sizes[0] + 30] ^= 0xFF  # inside the second record's payload
    path.write_bytes(bytes(data))
    contents = read_journal(path)
    assert row_ids(path) == [0, 1, 2]
    assert contents.damage is not None and "checksum" in contents.damage


@pytest.mark.parametrize("content", [b"PAR1 something else entirely", b"ENRJNL99" + b"x" * 40])
def test_a_file_that_is_not_a_journal_is_damage(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "seg.log"
    path.write_bytes(content)
    contents = read_journal(path)
    assert contents.tables == [] and contents.damage is not None


def test_an_empty_or_half_header_file_is_a_crash_before_the_first_record(tmp_path: Path) -> None:
    path = tmp_path / "seg.log"
    for content in (b"", HEADER[:3]):
        path.write_bytes(content)
        contents = read_journal(path)
        assert contents.tables == [] and contents.damage is None


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """Writes past a size fail like a full disk (EFBIG instead of ENOSPC)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_append_leaves_the_segment_whole_for_later_appends(
    tmp_path: Path, file_size_limit: None
) -> None:
    path = tmp_path / "seg.log"
    writer = JournalWriter(path)
    writer.append(batch(0))
    big = batch(100, rows=2000)
    _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (writer.size + len(encode_record(big)) // 2, hard))
    with pytest.raises(OSError):
        writer.append(big)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, hard))
    writer.append(batch(3))
    writer.close()
    contents = read_journal(path)
    assert row_ids(path) == list(range(6))
    assert contents.damage is None and contents.torn_bytes == 0
