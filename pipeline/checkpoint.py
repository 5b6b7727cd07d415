"""The run directory: a manifest that pins the input and the settings, and the
results of the run, durable a fraction of a second after they arrive.

Layout::

    out.parquet.enrich/
      manifest.json                  format version, input identity, settings fingerprint
      journal/seg-00000007.log       results as they arrive (see ``journal.py``)
      parts/part-00000006.parquet    sealed results (row id + contract columns), by row id
      damaged/                       files found damaged, set aside (their rows are redone)
      shards/RANGE/*.log             the Ray engine's workers' journals (see ``shards.py``)
      carried.sqlite3                answers of an earlier input's run, by request key

Results are appended to a journal segment with one fsync per group of
answers; once a segment holds ``part_rows`` results (or ``PART_MAX_BYTES``),
it is sealed: written as the Parquet part of the same number (temp file,
fsync, rename) and deleted. A segment found at open was cut off by a crash:
its intact records become its part then. So a SIGKILL at any instant loses
only the answers of the last group commit, and never tears a file.

The newest result wins when a row appears twice (``--retry-failed`` and
pending rows write new results for old rows): parts and segments are numbered
in write order.

Damage costs only its own rows. A part or segment that cannot be read is moved
to ``damaged/`` with a warning, and its rows are sent again; a damaged manifest
is rebuilt from the current input and settings, keeping the parts whose footer
says they were made for the same input and settings.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.cache import CachedAnswer, CacheError, ResponseCache
from pipeline.crashpoints import crash_point
from pipeline.durable import (
    atomic_write_bytes,
    commit_temp,
    disk_full_error,
    fsync_dir,
    is_temp_path,
    move_to_trash,
    remove_trash,
    remove_tree,
    temp_path_for,
)
from pipeline.errors import CheckpointMismatch, UsageError
from pipeline.identity import InputIdentity as InputIdentity
from pipeline.identity import settings_hash as settings_hash
from pipeline.journal import JournalWriter, read_journal
from pipeline.result_table import PART_SCHEMA, REQUEST_KEY, ROW_ID, RowResult, results_to_table
from pipeline.shards import SHARDS, journals, read_results

if TYPE_CHECKING:
    # Imported where results are merged (resume, status, assembly): a fresh
    # run reaches its first request without paying for polars.
    import polars as pl

    # Imported where parts are read or sealed, none of which a fresh run does
    # before its first request (with pyarrow.fs, a tenth of pyarrow's import).
    import pyarrow.parquet as pq

    from pipeline.storage import Location

FORMAT_VERSION: Final = 3
# Format 1 parts lack the internal columns (transient flag, request key);
# they read as "not transient, key unknown". Format 2 parts and journal
# segments lack the timing columns (first_token_ms, generation_ms,
# server_ms), and the older of them the route: they read as null, unknown.
READABLE_FORMATS: Final = frozenset({1, 2, 3})
MANIFEST: Final = "manifest.json"
PARTS: Final = "parts"
JOURNAL: Final = "journal"
DAMAGED: Final = "damaged"
CARRIED: Final = "carried.sqlite3"

# A sealed part's data, at most: what assembly holds per part, whatever the
# size of the answers (100 KB answers make a 1,000-row part 100 MB).
PART_MAX_BYTES: Final = 16 << 20

# Footer metadata of every part: which input and settings its rows belong to,
# so a damaged manifest can be rebuilt without trusting anything else.
_SETTINGS_KEY: Final = b"enrich.settings_sha256"
_INPUT_KEY: Final = b"enrich.input_sha256"


InputChangePolicy = Literal["restart", "refuse"]


@dataclass(frozen=True)
class Manifest:
    input: InputIdentity
    settings: dict[str, Any]
    input_rows: int = 0
    format_version: int = FORMAT_VERSION
    created_at: str = ""

    def to_json(self) -> bytes:
        body = asdict(self)
        body["settings_sha256"] = settings_hash(self.settings)
        return json.dumps(body, indent=2, sort_keys=True, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        body = json.loads(data)
        return cls(
            input=InputIdentity(**body["input"]),
            settings=body["settings"],
            input_rows=int(body.get("input_rows", 0)),
            format_version=int(body["format_version"]),
            created_at=str(body.get("created_at", "")),
        )


@dataclass(frozen=True)
class PartInfo:
    seq: int
    path: Path
    first_row: int
    last_row: int
    rows: int
    data_bytes: int
    """Uncompressed size of the part's data: what reading it costs in memory."""


class DamagedPart(Exception):
    """A part could not be read; it has been set aside (see ``Checkpoint.set_aside``)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _restart_hint(run_dir: Path) -> str:
    return (
        f"rerun with --restart to discard the checkpoint in {run_dir} and start over, "
        "or write to another --output"
    )


def _describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changed = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return ", ".join(changed) if changed else "settings"


def _read_footer(path: Path) -> pq.FileMetaData:
    import pyarrow.parquet as pq

    return pq.read_metadata(path)


def _row_id_bounds(metadata: pq.FileMetaData) -> tuple[int, int] | None:
    """First and last row id of a part, from the footer's statistics (parts are
    sorted by row id), so scanning a million-row checkpoint reads no data pages."""
    low: int | None = None
    high: int | None = None
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        if group.num_rows == 0:
            continue
        stats = group.column(0).statistics
        if stats is None or not stats.has_min_max:
            raise pa.ArrowInvalid("row id statistics missing")
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    if low is None or high is None:
        return None
    return int(low), int(high)


def _with_internal_columns(table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``columns`` of ``table``, those an older format lacks as nulls."""
    for name in columns:
        if name not in table.column_names:
            kind = PART_SCHEMA.field(name).type
            table = table.append_column(name, pa.nulls(table.num_rows, kind))
    return table.select(list(columns))


def read_part(path: Path, columns: Sequence[str] | None = None) -> pa.Table:
    """A part's rows (all columns, or ``columns``), checksums verified. Raises
    ``DamagedPart`` for anything unreadable."""
    import pyarrow.parquet as pq

    wanted = list(columns) if columns is not None else PART_SCHEMA.names
    try:
        present = pq.read_schema(path).names
        table = pq.read_table(
            path,
            columns=[name for name in wanted if name in present],
            page_checksum_verification=True,
        )
        table = _with_internal_columns(table, wanted)
        return table.cast(pa.schema([PART_SCHEMA.field(name) for name in wanted]))
    except (OSError, pa.ArrowException, ValueError, KeyError) as exc:
        raise DamagedPart(path, str(exc) or type(exc).__name__) from None


class Checkpoint:
    """A run directory opened for one run. ``warnings`` says what was found
    damaged and set aside, or what changed, for the runner to report."""

    def __init__(self, run_dir: Path, manifest: Manifest, *, writable: bool = False) -> None:
        self.run_dir = run_dir
        self.manifest = manifest
        self.writable = writable
        self.warnings: list[str] = []
        self.carried_answers = 0
        """Answers carried over from a run over an earlier version of the input."""
        self._parts_dir = run_dir / PARTS
        self._journal_dir = run_dir / JOURNAL

    # -- opening -----------------------------------------------------------
    @classmethod
    def open(
        cls,
        run_dir: Path,
        input_path: Location,
        settings: dict[str, Any],
        *,
        input_rows: int,
        restart: bool = False,
        on_input_change: InputChangePolicy = "restart",
    ) -> Checkpoint:
        """Resume the run directory if it was made for these settings, create
        it if absent. A changed input starts over (reusing the answers of
        unchanged requests) or, with ``on_input_change="refuse"``, raises
        ``CheckpointMismatch``; changed settings always raise it."""
        remove_trash(run_dir)
        if restart:
            remove_tree(run_dir)
        warnings: list[str] = []
        previous = cls._read_manifest_or_set_aside(run_dir, warnings)
        identity = InputIdentity.of(input_path, previous.input if previous else None)
        fresh = Manifest(
            input=identity,
            settings=settings,
            input_rows=input_rows,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        input_changed = previous is not None and not previous.input.same_content(identity)
        if previous is not None:
            cls._check_settings(run_dir, previous, settings)
            if input_changed and on_input_change == "refuse":
                raise CheckpointMismatch(
                    f"the input changed since the checkpoint in {run_dir} was made "
                    f"(was {previous.input.path}, {previous.input.size} bytes); "
                    f"{_restart_hint(run_dir)}, or let it start over reusing unchanged "
                    "answers with --on-input-change restart"
                )
        if previous is None or input_changed:
            cls._create(run_dir)
        checkpoint = cls(run_dir, previous or fresh, writable=True)
        checkpoint.warnings = warnings
        checkpoint._remove_stray_temp_files()
        checkpoint._recover_journal(vouched=previous is not None)
        checkpoint._check_parts(
            trust_footer_only=previous is None, settings_sha=settings_hash(settings)
        )
        if previous is None:
            checkpoint._write_manifest(fresh)
        elif input_changed:
            checkpoint._start_over_on(fresh)
        elif previous.input != identity or previous.format_version != FORMAT_VERSION:
            # Same content, new facts (a touch, a copy): remember them, so the
            # next open does not hash the file again. An older format's
            # checkpoint gets parts of this one from now on: say so, so that
            # an older enrich refuses it rather than misread it.
            checkpoint._write_manifest(replace_input(previous, identity))
        return checkpoint

    @staticmethod
    def read_manifest(run_dir: Path) -> Manifest | None:
        """The manifest, or None when there is none; raises ``CheckpointMismatch``
        when it is unreadable (for readers that must not repair anything)."""
        path = run_dir / MANIFEST
        try:
            return Manifest.from_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointMismatch(
                f"the checkpoint manifest {path} is unreadable ({type(exc).__name__}); "
                "run the same command to repair it"
            ) from None

    @classmethod
    def _read_manifest_or_set_aside(cls, run_dir: Path, warnings: list[str]) -> Manifest | None:
        try:
            return cls.read_manifest(run_dir)
        except CheckpointMismatch:
            _set_aside(run_dir, run_dir / MANIFEST)
            warnings.append(
                f"the checkpoint manifest in {run_dir} was damaged and is set aside in "
                f"{DAMAGED}/; it is rebuilt, keeping the results made for this input "
                "and these settings"
            )
            return None

    @staticmethod
    def _check_settings(run_dir: Path, previous: Manifest, settings: Mapping[str, Any]) -> None:
        if previous.format_version not in READABLE_FORMATS:
            raise CheckpointMismatch(
                f"checkpoint {run_dir} was written by another version of enrich "
                f"(format {previous.format_version}, this one reads "
                f"{', '.join(map(str, sorted(READABLE_FORMATS)))}); {_restart_hint(run_dir)}"
            )
        if settings_hash(previous.settings) != settings_hash(settings):
            changed = _describe_changes(previous.settings, settings)
            raise CheckpointMismatch(
                f"settings changed since the checkpoint in {run_dir} was made ({changed}); "
                f"{_restart_hint(run_dir)}"
            )

    @staticmethod
    def _create(run_dir: Path) -> None:
        try:
            (run_dir / PARTS).mkdir(parents=True, exist_ok=True)
            (run_dir / JOURNAL).mkdir(exist_ok=True)
        except OSError as exc:
            raise disk_full_error(exc, run_dir) or UsageError(
                f"cannot create the run directory {run_dir} ({exc.strerror}); "
                "choose a writable place with --run-dir"
            ) from None

    def _write_manifest(self, manifest: Manifest) -> None:
        try:
            atomic_write_bytes(self.run_dir / MANIFEST, manifest.to_json())
        except OSError as exc:
            raise disk_full_error(exc, self.run_dir) or UsageError(
                f"cannot write the checkpoint manifest in {self.run_dir} ({exc.strerror}); "
                "choose a writable place with --run-dir"
            ) from None
        self.manifest = manifest

    def _start_over_on(self, fresh: Manifest) -> None:
        """The input changed: keep every answer under its request key (in
        ``carried.sqlite3``), then start the checkpoint over for the new input.

        Ordered so that a kill at any instant leaves a state the next open
        finishes: the answers are carried before the old results go, and the
        old manifest (which makes the next open do this again) goes last."""
        previous_path = self.manifest.input.path
        with self._carry_store() as carried:
            for part in self.parts():
                with contextlib.suppress(DamagedPart):
                    carried.put_many(_answers_by_key(read_part(part.path)))
            self.carried_answers = carried.stats().entries
        for directory in (self._parts_dir, self._journal_dir):
            remove_tree(directory)
            directory.mkdir()
        self._write_manifest(fresh)
        self.warnings.append(
            f"the input changed since the unfinished run in {self.run_dir} "
            f"(was {previous_path}); starting over on the new input, reusing "
            f"{self.carried_answers:,} answers whose request is unchanged "
            "(--on-input-change refuse stops instead)"
        )

    # -- files ---------------------------------------------------------------
    def _numbered(self, directory: Path, pattern: str, prefix: str) -> list[tuple[int, Path]]:
        found = []
        for path in directory.glob(pattern):
            try:
                found.append((int(path.stem.removeprefix(prefix)), path))
            except ValueError:
                continue
        return sorted(found)

    def _part_files(self) -> list[tuple[int, Path]]:
        return self._numbered(self._parts_dir, "part-*.parquet", "part-")

    def _segment_files(self) -> list[tuple[int, Path]]:
        return self._numbered(self._journal_dir, "seg-*.log", "seg-")

    def _shard_journals(self) -> list[tuple[int, Path]]:
        """The Ray engine's shard journals, numbered after every part and
        segment (they hold the newest results)."""
        root = self.run_dir / SHARDS
        found = [path for directory in sorted(root.glob("*")) for path in journals(directory)]
        first = self.next_seq() + 1_000_000
        return [(first + index, path) for index, path in enumerate(found)]

    def part_path(self, seq: int) -> Path:
        return self._parts_dir / f"part-{seq:08d}.parquet"

    def segment_path(self, seq: int) -> Path:
        return self._journal_dir / f"seg-{seq:08d}.log"

    def next_seq(self) -> int:
        numbers = [seq for seq, _ in (*self._part_files(), *self._segment_files())]
        return max(numbers, default=0) + 1

    def _remove_stray_temp_files(self) -> None:
        # A crash between creating a temp file and renaming it leaves it behind;
        # it was never part of the checkpoint.
        for directory in (self.run_dir, self._parts_dir):
            for path in directory.glob(".*"):
                if is_temp_path(path):
                    path.unlink(missing_ok=True)

    def set_aside(self, path: Path, reason: str) -> None:
        """Move a damaged file to ``damaged/`` and say so; its rows are redone."""
        _set_aside(self.run_dir, path)
        self.warnings.append(
            f"checkpoint file {path.name} is damaged ({reason}); it is set aside in "
            f"{self.run_dir / DAMAGED} and its rows are sent again"
        )

    # -- recovery at open ----------------------------------------------------
    def _recover_journal(self, *, vouched: bool) -> None:
        """Seal what a killed run left in its journal into parts. Without a
        manifest to vouch for them (``vouched=False``: it was damaged), the
        segments cannot be told apart from another job's and are set aside."""
        for seq, segment in self._segment_files():
            if not vouched:
                self.set_aside(segment, "no manifest vouches for it")
                continue
            if self.part_path(seq).exists():
                segment.unlink()  # sealed already; the kill came before the unlink
                continue
            try:
                contents = read_journal(segment)
            except OSError as exc:
                self.set_aside(segment, exc.strerror or str(exc))
                continue
            if contents.tables:
                write_part(
                    self.part_path(seq),
                    pa.concat_tables(contents.tables),
                    self.footer(),
                )
            if contents.damage is not None:
                self.set_aside(segment, contents.damage)
            else:
                segment.unlink()
        fsync_dir(self._journal_dir)
        self._adopt_shard_journals(vouched=vouched)

    def _adopt_shard_journals(self, *, vouched: bool) -> None:
        """What the Ray engine's workers journaled and no driver gathered (it
        was killed) becomes a part. A kill between the part and the removal
        adopts the same results again: the newest result of a row wins, and
        they are the same."""
        root = self.run_dir / SHARDS
        if not root.is_dir():
            return
        for directory in sorted(path for path in root.iterdir() if path.is_dir()):
            table = read_results(directory) if vouched else None
            if table is not None and table.num_rows:
                write_part(self.part_path(self.next_seq()), table, self.footer())
            remove_tree(directory)

    def footer(self) -> dict[bytes, bytes]:
        """What every part's footer says about the rows it holds."""
        return {
            _SETTINGS_KEY: settings_hash(self.manifest.settings).encode(),
            _INPUT_KEY: self.manifest.input.sha256.encode(),
        }

    def _check_parts(self, *, trust_footer_only: bool, settings_sha: str) -> None:
        """Set aside parts whose footer cannot be read; with no manifest to
        vouch for them, also those not made for these settings."""
        for _, path in self._part_files():
            try:
                metadata = _read_footer(path)
                _row_id_bounds(metadata)
            except (OSError, pa.ArrowException, ValueError) as exc:
                self.set_aside(path, str(exc) or type(exc).__name__)
                continue
            footer = metadata.metadata or {}
            vouched = (
                footer.get(_SETTINGS_KEY) == settings_sha.encode()
                and footer.get(_INPUT_KEY) == self.manifest.input.sha256.encode()
            )
            if trust_footer_only and not vouched:
                self.set_aside(path, "made for another input or settings, or by an older enrich")

    # -- reading -------------------------------------------------------------
    def parts(self) -> list[PartInfo]:
        infos = []
        for seq, path in self._part_files():
            try:
                metadata = _read_footer(path)
                bounds = _row_id_bounds(metadata)
            except (OSError, pa.ArrowException) as exc:
                if not self.writable:
                    continue
                self.set_aside(path, str(exc))
                continue
            if bounds is not None:
                data_bytes = sum(
                    metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)
                )
                infos.append(PartInfo(seq, path, *bounds, metadata.num_rows, data_bytes))
        return infos

    def has_results(self) -> bool:
        """Whether any result was kept (a part, or for a read-only view a
        journal segment): False for a fresh run, with no file read."""
        return bool(
            self._part_files()
            or (not self.writable and (self._segment_files() or self._shard_journals()))
        )

    def latest_results(self, columns: Sequence[str] = ("status",)) -> pl.DataFrame:
        """One row per row id seen so far, from its newest result: the row id
        and the requested result columns. A part that cannot be read is set
        aside (skipped, for a read-only view); a read-only view also reads the
        journal of a run that is still going or was killed."""
        import polars as pl

        wanted = [ROW_ID, *columns]
        pieces: list[pl.DataFrame] = []
        for seq, path in self._part_files():
            try:
                table = read_part(path, wanted)
            except DamagedPart as damaged:
                if self.writable:
                    self.set_aside(path, damaged.reason)
                continue
            pieces.append(_numbered_frame(table, seq))
        if not self.writable:
            for seq, path in self._segment_files() + self._shard_journals():
                with contextlib.suppress(OSError):
                    for table in read_journal(path).tables:
                        table = _with_internal_columns(table, wanted)
                        pieces.append(_numbered_frame(table, seq))
        if not pieces:
            return pl.DataFrame(PART_SCHEMA.empty_table()).select(wanted)
        return (
            pl.concat(pieces)
            .sort([ROW_ID, "_seq"])
            .unique(subset=ROW_ID, keep="last", maintain_order=True)
            .select(wanted)
        )

    def last_update(self) -> datetime | None:
        """When results last reached the disk (the newest part or segment)."""
        files = [
            path
            for _, path in (*self._part_files(), *self._segment_files(), *self._shard_journals())
        ]
        times = [path.stat().st_mtime for path in files if path.exists()]
        return datetime.fromtimestamp(max(times), tz=UTC) if times else None

    def carried(self) -> ResponseCache | None:
        """Answers carried over from an earlier input's run, if any (a damaged
        file is set aside: its answers are asked for again)."""
        path = self.run_dir / CARRIED
        if not path.exists():
            return None
        try:
            return ResponseCache(path, readonly=True)
        except CacheError as exc:
            self.set_aside(path, exc.message)
            return None

    def _carry_store(self) -> ResponseCache:
        path = self.run_dir / CARRIED
        try:
            return ResponseCache(path)
        except CacheError as exc:
            self.set_aside(path, exc.message)
            return ResponseCache(path)

    # -- writing -------------------------------------------------------------
    def writer(self, part_rows: int) -> CheckpointWriter:
        return CheckpointWriter(self, part_rows)

    def remove(self) -> None:
        trash = move_to_trash(self.run_dir)
        crash_point("after-checkpoint-trashed")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def replace_input(manifest: Manifest, identity: InputIdentity) -> Manifest:
    return Manifest(
        input=identity,
        settings=manifest.settings,
        input_rows=manifest.input_rows,
        format_version=FORMAT_VERSION,
        created_at=manifest.created_at,
    )


def _frame(table: pa.Table) -> pl.DataFrame:
    import polars as pl

    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)  # a Table always makes a DataFrame
    return frame


def _numbered_frame(table: pa.Table, seq: int) -> pl.DataFrame:
    import polars as pl

    return _frame(table).with_columns(pl.lit(seq, dtype=pl.Int64).alias("_seq"))


def _set_aside(run_dir: Path, path: Path) -> None:
    damaged = run_dir / DAMAGED
    damaged.mkdir(exist_ok=True)
    target = damaged / f"{path.name}.{datetime.now(UTC):%Y%m%dT%H%M%S%f}"
    with contextlib.suppress(FileNotFoundError):
        path.replace(target)


def _answers_by_key(table: pa.Table) -> list[tuple[bytes, CachedAnswer]]:
    usable = table.filter(
        pc.and_(pc.equal(table.column("status"), "ok"), pc.is_valid(table.column(REQUEST_KEY)))
    )
    return [
        (
            row[REQUEST_KEY],
            CachedAnswer(
                row["response"],
                row["finish_reason"],
                row["model"],
                row["prompt_tokens"],
                row["completion_tokens"],
            ),
        )
        for row in usable.to_pylist()
    ]


def write_part(path: Path, table: pa.Table, footer: Mapping[bytes, bytes]) -> None:
    """Durably write one part, sorted by row id with the newest result per row
    (a segment may hold a row twice), and page checksums, so damage inside a
    data page is found when read rather than passed on as an answer."""
    import pyarrow.parquet as pq

    # A segment an older enrich left lacks the newer columns.
    table = _with_internal_columns(table, PART_SCHEMA.names)
    ordered = (
        _frame(table.cast(PART_SCHEMA))
        .with_row_index("_order")
        .sort([ROW_ID, "_order"])
        .unique(subset=ROW_ID, keep="last", maintain_order=True)
        .drop("_order")
        .to_arrow()
        .cast(PART_SCHEMA)
        .replace_schema_metadata(dict(footer))
    )
    temp = temp_path_for(path)
    try:
        pq.write_table(ordered, temp, compression="zstd", write_page_checksum=True)
        commit_temp(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class CheckpointWriter:
    """Appends one run's results: journal records (one fsync per call), sealed
    into a part every ``part_rows`` results or ``PART_MAX_BYTES``.

    ``append`` is called from one worker thread at a time (the collect
    stage's), never the event loop. Sealing runs on a thread of its own: a
    part takes far longer to write than a record (130 ms against 8 for 5,000
    rows here), and the group commits that follow must not wait for it, or
    answers would wait past the durability bound."""

    def __init__(self, checkpoint: Checkpoint, part_rows: int) -> None:
        self.checkpoint = checkpoint
        self.part_rows = part_rows
        self._next_seq = checkpoint.next_seq()
        self._seq = 0
        self._journal: JournalWriter | None = None
        self._tables: list[pa.Table] = []
        self._rows = 0
        self._bytes = 0
        self._sealer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="enrich-seal")
        self._seals: list[Future[None]] = []

    def append(self, results: Sequence[RowResult]) -> None:
        """Make ``results`` durable. Raises ``DiskFull`` when the disk is full
        (what was appended before stays durable) and ``OSError`` otherwise."""
        self._raise_seal_failure()
        table = results_to_table(results)
        offset = 0
        # A group larger than what is left of the part is split at the part's
        # end, so parts hold part_rows results, however the answers bunch up.
        while offset < table.num_rows:
            piece = table.slice(offset, self.part_rows - self._rows)
            self._append(piece)
            offset += piece.num_rows

    def _append(self, table: pa.Table) -> None:
        try:
            if self._journal is None:
                self._seq, self._next_seq = self._next_seq, self._next_seq + 1
                self._journal = JournalWriter(self.checkpoint.segment_path(self._seq))
            self._journal.append(table)
        except OSError as exc:
            raise disk_full_error(exc, self.checkpoint.run_dir) or exc from None
        crash_point("after-journal-append")
        self._tables.append(table)
        self._rows += table.num_rows
        self._bytes += table.nbytes
        if self._rows >= self.part_rows or self._bytes >= PART_MAX_BYTES:
            self._hand_over()

    def _hand_over(self) -> None:
        """Close the current segment and have it sealed; the next append opens
        the next one."""
        if self._journal is None:
            return
        journal, self._journal = self._journal, None
        journal.close()
        tables, self._tables = self._tables, []
        self._rows = self._bytes = 0
        self._seals.append(self._sealer.submit(self._seal, self._seq, journal.path, tables))

    def _seal(self, seq: int, segment: Path, tables: list[pa.Table]) -> None:
        """Turn a segment into its part. A kill before the part's rename
        leaves the segment, which the next open seals; after it, the segment
        is redundant and the next open deletes it."""
        try:
            write_part(
                self.checkpoint.part_path(seq), pa.concat_tables(tables), self.checkpoint.footer()
            )
        except OSError as exc:
            raise disk_full_error(exc, self.checkpoint.run_dir) or exc from None
        crash_point("after-part-seal")
        segment.unlink()

    def _raise_seal_failure(self) -> None:
        pending = []
        for seal in self._seals:
            if not seal.done():
                pending.append(seal)
            elif seal.exception() is not None:
                seal.result()  # raises it
        self._seals = pending

    def close(self) -> None:
        """Seal what is left and wait for every seal; raises the first failure."""
        try:
            self._hand_over()
            for seal in self._seals:
                seal.result()
        finally:
            self._sealer.shutdown(wait=True)


class PartSweep:
    """Reads the results of consecutive row ranges from the parts, holding only
    the parts that overlap the current range (parts cover narrow, mostly
    increasing ranges and at most ``PART_MAX_BYTES`` each, so memory follows
    the window, not the run). Raises ``DamagedPart`` for a part that cannot be
    read, after setting it aside through ``checkpoint``."""

    def __init__(self, checkpoint: Checkpoint, parts: Sequence[PartInfo]) -> None:
        self._checkpoint = checkpoint
        self._pending = sorted(parts, key=lambda part: (part.first_row, part.seq))
        self._next = 0
        self._active: list[tuple[PartInfo, pa.Table]] = []

    def results(self, start: int, stop: int) -> pa.Table:
        """The newest result for each row id in [start, stop), sorted by row id."""
        import polars as pl

        self._active = [(info, table) for info, table in self._active if info.last_row >= start]
        while self._next < len(self._pending) and self._pending[self._next].first_row < stop:
            info = self._pending[self._next]
            self._next += 1
            if info.last_row >= start:
                try:
                    table = read_part(info.path)
                except DamagedPart as damaged:
                    self._checkpoint.set_aside(info.path, damaged.reason)
                    raise
                self._active.append((info, table))
        pieces = []
        for info, table in self._active:
            ids = table.column(ROW_ID)
            mask = pc.and_(pc.greater_equal(ids, start), pc.less(ids, stop))
            piece = table.filter(mask)
            if piece.num_rows:
                pieces.append(_numbered_frame(piece, info.seq))
        if not pieces:
            return PART_SCHEMA.empty_table()
        merged = (
            pl.concat(pieces)
            .sort([ROW_ID, "_seq"])
            .unique(subset=ROW_ID, keep="last", maintain_order=True)
            .drop("_seq")
        )
        return merged.to_arrow().cast(PART_SCHEMA)


def bytes_per_row(parts: Sequence[PartInfo]) -> float:
    """Mean uncompressed bytes of a result row, from the parts' footers."""
    rows = sum(part.rows for part in parts)
    return sum(part.data_bytes for part in parts) / rows if rows else 0.0
