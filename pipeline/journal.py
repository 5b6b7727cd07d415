"""An append-only journal of results with group commit: what makes a paid
answer durable a fraction of a second after it arrives.

A segment file is a header, then records::

    ENRJNL01                                  8-byte header (format 1)
    ENRR | length u32 | crc32 u32 | payload   one record per group commit
    ...

A payload is one Arrow IPC stream (schema + one record batch) of results. Each
append is one ``write`` and one ``fsync``: a group of answers costs one disk
flush, however many rows it holds, so the run can commit several times a
second without slowing down.

Reading stops at the first record that is not whole and intact. A record cut
short at the end of the file (a kill or power cut during the append) is the
expected leftover of a crash and is dropped silently; anything else (a bad
checksum followed by more data, a wrong marker) is *damage*: the records
before it are kept, and the caller sets the file aside.
"""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pyarrow as pa

HEADER: Final = b"ENRJNL01"
_MARKER: Final = b"ENRR"
_RECORD: Final = struct.Struct("<4sII")


def encode_record(table: pa.Table) -> bytes:
    """One framed record holding ``table``."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    payload: bytes = sink.getvalue().to_pybytes()
    return _RECORD.pack(_MARKER, len(payload), zlib.crc32(payload)) + payload


class JournalWriter:
    """Appends records to one segment file. Not thread-safe: one writer thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # O_APPEND: a record lands after whatever is there, even after a
        # truncation by ``_rewind``.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.size = os.fstat(self._fd).st_size
            if self.size == 0:
                self._write_durably(HEADER)
        except BaseException:
            os.close(self._fd)
            raise

    def append(self, table: pa.Table) -> int:
        """Write ``table`` as one record and make it durable; returns its size
        in bytes. On failure (a full disk) the file is cut back to its last
        whole record, so later reads and appends are unaffected."""
        record = encode_record(table)
        self._write_durably(record)
        return len(record)

    def _write_durably(self, data: bytes) -> None:
        start = self.size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            self._rewind(start)
            raise
        self.size = start + len(data)

    def _rewind(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            os.fsync(self._fd)
        except OSError:
            # Nothing more to do here: a reader stops at the torn record anyway.
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass
class JournalContents:
    """What a segment holds: its intact records, in write order."""

    tables: list[pa.Table] = field(default_factory=list)
    damage: str | None = None
    """Why reading stopped before the end, when that is not a torn final append."""
    torn_bytes: int = 0
    """Bytes of an incomplete final record (the expected leftover of a crash)."""

    @property
    def rows(self) -> int:
        return sum(table.num_rows for table in self.tables)


def read_journal(path: Path) -> JournalContents:
    """Every intact record of a segment; see the module docstring for what
    counts as damage. Raises only ``OSError`` (the file cannot be read)."""
    data = path.read_bytes()
    contents = JournalContents()
    if len(data) < len(HEADER):
        if HEADER.startswith(data):
            contents.torn_bytes = len(data)  # killed while writing the header
        else:
            contents.damage = "not an enrich journal (bad header)"
        return contents
    if data[: len(HEADER)] != HEADER:
        contents.damage = "not an enrich journal (bad header)"
        return contents
    offset = len(HEADER)
    while offset < len(data):
        problem = _read_record(data, offset, contents)
        if problem is None:
            offset += _RECORD.size + _RECORD.unpack_from(data, offset)[1]
            continue
        rest = data[offset:]
        if problem == "short" or not rest.strip(b"\0"):
            # The last append was cut short (or the file system zero-filled
            # what it had allocated for it): a crash, not damage.
            contents.torn_bytes = len(rest)
        else:
            contents.damage = f"{problem} at byte {offset}"
        break
    return contents


def _read_record(data: bytes, offset: int, contents: JournalContents) -> str | None:
    """Reads the record at ``offset`` into ``contents``; returns what is wrong
    with it instead ("short" when it runs past the end of the file)."""
    if offset + _RECORD.size > len(data):
        return "short"
    marker, length, checksum = _RECORD.unpack_from(data, offset)
    if marker != _MARKER:
        return "bad record marker"
    start = offset + _RECORD.size
    if start + length > len(data):
        return "short"
    payload = data[start : start + length]
    if zlib.crc32(payload) != checksum:
        return "bad checksum"
    try:
        contents.tables.append(pa.ipc.open_stream(payload).read_all())
    except (pa.ArrowException, ValueError) as exc:
        return f"unreadable record ({exc})"
    return None
