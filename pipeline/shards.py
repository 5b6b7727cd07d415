"""Shards: the row ranges the Ray engine's workers enrich, planned by enrich
itself from the input's metadata (plain Python, no Ray).

Resume must never be keyed on Ray's blocks: Ray reads one Parquet file as one
block whatever it is told, and splits several files differently from one run
to the next. A shard is whole row groups of one Parquet file, about
``shard_rows`` rows, read from the footers, so the same input always gives
the same shards, with the single-machine engine's row ids (the offset of the
file plus the row's index in it). CSV and JSONL carry no row groups: the
driver stages them once into Parquet files of ``shard_rows`` rows in the run
directory (streaming, memory bounded by one chunk), written durably, with a
manifest written last so that a rerun finds them made and does not stage
again.

Each shard has a directory in the run directory, named after its row range::

    out.parquet.enrich/shards/000000001000-000000002000/
      a1b2c3d4.log      one journal per attempt (results as they finish)
      done.json         the shard's summary, written durably when it is done

Journals use the checkpoint's format (pipeline.journal, the results schema):
the driver gathers a finished shard's journals into the checkpoint, and a
checkpoint opened after a crash adopts whatever shard journals it finds.
An attempt never appends to another's journal: a journal cut off by a kill
ends in a torn record, after which nothing may be appended.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyarrow as pa

from pipeline import storage
from pipeline.durable import atomic_write_bytes, commit_temp, fsync_dir, remove_tree, temp_path_for
from pipeline.errors import InputError
from pipeline.journal import read_journal
from pipeline.storage import Location

if TYPE_CHECKING:
    import pyarrow.parquet as pq

    from pipeline.read import InputSource

# Rows a shard holds, about (whole row groups): enough that a worker spends
# its time on requests, not on starting a shard; few enough that a shard a
# dead worker leaves half done is little to reread.
DEFAULT_SHARD_ROWS: Final = 10_000
# A Parquet file whose row groups make shards of more rows than this many
# shards' worth is staged: whole row groups would leave the other workers idle.
OVERSIZED_GROUP: Final = 2
SHARDS: Final = "shards"
STAGED: Final = "staged"
DONE: Final = "done.json"
_STAGED_MANIFEST: Final = "manifest.json"
_STAGED_BYTES: Final = 64 << 20


@dataclass(frozen=True)
class Shard:
    """Rows ``first_row`` .. ``first_row + rows - 1`` of the input: the row
    groups ``row_groups`` of the Parquet file ``path``."""

    path: str
    row_groups: tuple[int, ...]
    first_row: int
    rows: int

    @property
    def stop_row(self) -> int:
        return self.first_row + self.rows

    @property
    def name(self) -> str:
        """Its directory's name: the row range, which the plan always gives
        the same (an index would not survive a change of ``shard_rows``)."""
        return f"{self.first_row:012d}-{self.stop_row:012d}"


@dataclass(frozen=True)
class ShardTask:
    """What a worker is given: the shard, and which of its rows the
    checkpoint already holds (one byte a row; None: none of them)."""

    shard: Shard
    done: bytes | None = None

    def to_json(self) -> str:
        body: dict[str, Any] = asdict(self.shard)
        body["done"] = None if self.done is None else base64.b64encode(self.done).decode()
        return json.dumps(body)

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        body = json.loads(text)
        done = body.pop("done")
        body["row_groups"] = tuple(body["row_groups"])
        return cls(Shard(**body), None if done is None else base64.b64decode(done))


@dataclass
class ShardSummary:
    """What a worker says about a shard (and keeps in its done marker):
    counts of this shard's rows, and the run-level error that stopped it."""

    name: str
    rows: int = 0
    sent: int = 0
    """Rows this worker sent (a request each, retries aside)."""
    journaled: int = 0
    """Rows whose result is in the shard's journals (earlier attempts' too)."""
    deduplicated: int = 0
    done: bool = False
    error_kind: str | None = None
    error_message: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardSummary:
        return cls(**json.loads(text))


# -- planning ------------------------------------------------------------------


def plan_parquet(files: Sequence[Location], shard_rows: int) -> list[Shard]:
    """Shards of whole row groups, about ``shard_rows`` rows each, of the
    Parquet ``files`` in the order given (their rows numbered on from one
    file to the next). Reads footers only. Raises ``InputError``."""
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be at least 1, got {shard_rows}")
    shards: list[Shard] = []
    offset = 0
    for location in files:
        groups = _row_group_sizes(location)
        start, first_group, rows = offset, 0, 0
        for index, size in enumerate(groups):
            # A row group is never split: reading part of one reads all of it.
            if rows and rows + size > shard_rows:
                shards.append(_shard(location, first_group, index, start, rows))
                start, first_group, rows = start + rows, index, 0
            rows += size
        if rows:
            shards.append(_shard(location, first_group, len(groups), start, rows))
        offset += sum(groups)
    return shards


def _shard(location: Location, first: int, stop: int, start: int, rows: int) -> Shard:
    # Absolute: a Ray worker's working directory is not the driver's.
    path = location.resolve() if isinstance(location, Path) else location
    return Shard(str(path), tuple(range(first, stop)), start, rows)


def _row_group_sizes(location: Location) -> list[int]:
    try:
        with open_parquet(str(location)) as parquet:
            meta = parquet.metadata
            return [int(meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"input {location} is not a valid Parquet file ({storage.detail(exc)}); check --input"
        ) from None


def parquet_files(location: Location) -> list[Location]:
    """A Parquet input's files: the file, or a local directory's ``*.parquet``
    files in name order."""
    if isinstance(location, Path) and location.is_dir():
        return sorted(location.glob("*.parquet"))
    return [location]


def open_parquet(path: str) -> pq.ParquetFile:
    """A Parquet file (a local path or an object-storage URI) opened for
    reading ranges, page by page."""
    import pyarrow.parquet as pq

    location = storage.parse_location(path)
    source = location if isinstance(location, Path) else storage.open_random_access(location)
    return pq.ParquetFile(source, pre_buffer=False, buffer_size=1 << 20)


def read_shard(shard: Shard, columns: Sequence[str]) -> pa.Table:
    """The shard's rows, only ``columns``: only its row groups are read."""
    try:
        with open_parquet(shard.path) as parquet:
            return parquet.read_row_groups(list(shard.row_groups), columns=list(columns))
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"input {shard.path} could not be read at rows {shard.first_row:,}-"
            f"{shard.stop_row - 1:,} ({storage.detail(exc)}); check --input"
        ) from None


def plan_input(
    source: InputSource,
    run_dir: Path,
    shard_rows: int,
    identity: str,
    columns: Sequence[str],
) -> list[Shard]:
    """The shards of the run's input. CSV, JSONL and Parquet with a row group
    of more than ``OVERSIZED_GROUP`` shards' rows are staged first, their
    ``columns`` only (once: ``identity`` names the input's content, and a
    rerun over the same input finds its staged files)."""
    if source.format == "parquet":
        shards = plan_parquet(parquet_files(source.path), shard_rows)
        if all(shard.rows <= OVERSIZED_GROUP * shard_rows for shard in shards):
            return shards
    staged = stage(source, run_dir / STAGED, shard_rows, identity, columns)
    return plan_parquet(staged, shard_rows)


def stage(
    source: InputSource,
    directory: Path,
    shard_rows: int,
    identity: str,
    columns: Sequence[str],
) -> list[Path]:
    """Parquet copies of ``source``'s ``columns``, ``shard_rows`` rows a file
    (fewer when rows are large), each written durably; the manifest written
    last says they are complete. Found complete for ``identity``: nothing is
    written."""
    manifest = directory / _STAGED_MANIFEST
    wanted = {"input": identity, "shard_rows": shard_rows, "columns": list(columns)}
    try:
        made = json.loads(manifest.read_bytes())
        files = [directory / name for name in made["files"]]
        if made["made_for"] == wanted and all(path.exists() for path in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    remove_tree(directory)
    directory.mkdir(parents=True)
    files = list(_write_staged(source, directory, shard_rows, columns))
    fsync_dir(directory)
    body = {"made_for": wanted, "files": [path.name for path in files]}
    atomic_write_bytes(manifest, json.dumps(body).encode())
    return files


def _write_staged(
    source: InputSource, directory: Path, shard_rows: int, columns: Sequence[str]
) -> Iterator[Path]:
    import pyarrow.parquet as pq

    chunk_rows = source.rows_within(_STAGED_BYTES, shard_rows)
    for number, chunk in enumerate(source.chunks(chunk_rows, columns=columns)):
        path = directory / f"rows-{number:08d}.parquet"
        temp = temp_path_for(path)
        pq.write_table(chunk.table, temp, row_group_size=chunk.num_rows)
        commit_temp(temp, path)
        yield path


# -- a shard's files -------------------------------------------------------------


def shard_dir(run_dir: Path, shard: Shard) -> Path:
    return run_dir / SHARDS / shard.name


def journals(directory: Path) -> list[Path]:
    """A shard's journals, oldest first (the newest result of a row wins)."""
    return sorted(directory.glob("*.log"))


def new_journal_path(directory: Path) -> Path:
    """A journal of its own for one attempt at a shard, named to sort after
    every earlier attempt's."""
    return directory / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.log"


def read_results(directory: Path) -> pa.Table | None:
    """Every intact result in a shard's journals, oldest first (None: none).
    A damaged journal's intact records are kept; its rows past the damage
    are simply not there, and are sent again."""
    tables = []
    for path in journals(directory):
        try:
            tables.extend(read_journal(path).tables)
        except OSError:
            continue
    return pa.concat_tables(tables, promote_options="default") if tables else None


def read_done(directory: Path) -> ShardSummary | None:
    try:
        return ShardSummary.from_json((directory / DONE).read_text())
    except (OSError, ValueError, TypeError):
        return None


def write_done(directory: Path, summary: ShardSummary) -> None:
    atomic_write_bytes(directory / DONE, summary.to_json().encode())
