"""The batch ledger: what the batch route has written, uploaded and submitted,
durable in the run directory before the next step is taken.

Layout (inside the run directory)::

    batch/ledger.json              every file's state and ids (replaced atomically)
    batch/file-00003.jsonl         a batch input file, as uploaded
    batch/file-00003.rows.json     its rows: [row, asked row, request key] each

A file goes ``written -> uploaded -> creating -> submitted -> collected``
(or ``failed``). Each state is durable before the step that follows it, so a
SIGKILL at any instant leaves a ledger the next run continues from:

- killed after writing a file: the next run uploads it;
- killed after the upload, before its id was kept: the next run uploads the
  file again (an unused upload costs nothing; no batch was made);
- killed while creating the batch (``creating``): the next run looks for a
  batch the provider made from this file before it creates one, so rows are
  never submitted twice;
- killed while polling or downloading: the next run polls and downloads again;
  a file is ``collected`` only once its results are in the checkpoint, and a
  collected file is never downloaded again.

Rows of a file not yet collected are *live*: no other file, and no online
request, asks for them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from pipeline.durable import atomic_write_bytes, remove_tree
from pipeline.errors import CheckpointMismatch, WriteFailed

FileState = Literal["written", "uploaded", "creating", "submitted", "collected", "failed"]
LIVE_STATES: Final[frozenset[str]] = frozenset({"written", "uploaded", "creating", "submitted"})

BATCH_DIR: Final = "batch"
LEDGER: Final = "ledger.json"
LEDGER_VERSION: Final = 1


@dataclass(frozen=True)
class Asked:
    """One row a file answers: ``asked`` is the row whose request line
    carries the question (the row itself, or an identical request's row in
    the same file: in-file dedup), ``key`` its request key (hex)."""

    row: int
    asked: int
    key: str | None


@dataclass(frozen=True)
class FileEntry:
    """One batch input file and what became of it."""

    name: str
    requests: int
    rows: int
    size: int
    cost_usd: float | None
    """Its worst-case cost at batch prices (what ``--max-cost`` counts)."""
    state: FileState = "written"
    file_id: str | None = None
    batch_id: str | None = None
    submitted_at: str | None = None
    status: str | None = None
    """The provider's last word on the batch (``in_progress``, ``expired``...)."""
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    reason: str | None = None
    """Why the batch failed or was requeued, in the provider's words."""

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def submitted_time(self) -> datetime | None:
        return datetime.fromisoformat(self.submitted_at) if self.submitted_at else None


@dataclass
class Ledger:
    """The run directory's batch ledger. ``save`` after every change (the
    route does, before each next step)."""

    directory: Path
    endpoint: str
    api_key_env: str
    files: list[FileEntry] = field(default_factory=list)
    input_sha256: str = ""
    """The input its row numbers are of."""

    @classmethod
    def open(cls, run_dir: Path, endpoint: str, api_key_env: str, input_sha256: str) -> Ledger:
        """The ledger of ``run_dir`` (an empty one when there is none yet, or
        when the one there is of an earlier input and has nothing in flight).
        Raises ``CheckpointMismatch`` for an earlier input's batches in flight:
        their row numbers are not this input's."""
        found = read_ledger(run_dir)
        if found is not None and found.input_sha256 not in ("", input_sha256):
            if found.live():
                rows = sum(entry.rows for entry in found.live())
                raise CheckpointMismatch(
                    f"the input changed while {len(found.live())} batch file(s) with {rows:,} "
                    f"rows of the earlier input are in flight ({found.directory}); rerun with "
                    "the earlier input to collect them, or `enrich cancel` them and rerun with "
                    "--restart"
                )
            remove_tree(found.directory)
            found = None
        if found is not None:
            found.endpoint, found.api_key_env = endpoint, api_key_env
            found.input_sha256 = input_sha256
            return found
        return cls(run_dir / BATCH_DIR, endpoint, api_key_env, input_sha256=input_sha256)

    def save(self) -> None:
        body = {
            "version": LEDGER_VERSION,
            "endpoint": self.endpoint,
            "api_key_env": self.api_key_env,
            "input_sha256": self.input_sha256,
            "files": [asdict(entry) for entry in self.files],
        }
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.directory / LEDGER, json.dumps(body, indent=1).encode())
        except OSError as exc:
            raise WriteFailed(
                f"cannot write the batch ledger in {self.directory} ({exc.strerror or exc}); "
                "fix the disk, then rerun the same command (submitted batches are kept)"
            ) from None

    def update(self, name: str, **changes: Any) -> FileEntry:
        """Change one file's entry and make it durable."""
        for index, entry in enumerate(self.files):
            if entry.name == name:
                self.files[index] = replace(entry, **changes)
                self.save()
                return self.files[index]
        raise KeyError(name)

    def next_name(self) -> str:
        return f"file-{len(self.files) + 1:05d}"

    def data_path(self, name: str) -> Path:
        return self.directory / f"{name}.jsonl"

    def rows_path(self, name: str) -> Path:
        return self.directory / f"{name}.rows.json"

    def add(self, entry: FileEntry, data: bytes, asked: Iterable[Asked]) -> None:
        """A new file: its content and rows first, then its entry (so an
        entry always has both)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        rows = [[a.row, a.asked, a.key] for a in asked]
        atomic_write_bytes(self.data_path(entry.name), data)
        atomic_write_bytes(self.rows_path(entry.name), json.dumps(rows).encode())
        self.files.append(entry)
        self.save()

    def asked(self, name: str) -> list[Asked]:
        rows = json.loads(self.rows_path(name).read_bytes())
        return [Asked(int(row), int(asked), key) for row, asked, key in rows]

    def live(self) -> list[FileEntry]:
        return [entry for entry in self.files if entry.live]

    def live_rows(self) -> Iterator[int]:
        for entry in self.live():
            for asked in self.asked(entry.name):
                yield asked.row

    def forget_data(self, name: str) -> None:
        """A collected file's content is not needed any more (its ids stay)."""
        self.data_path(name).unlink(missing_ok=True)


def read_ledger(run_dir: Path) -> Ledger | None:
    """The ledger in ``run_dir``, None when the run never used batches."""
    path = run_dir / BATCH_DIR / LEDGER
    try:
        body = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WriteFailed(
            f"the batch ledger {path} cannot be read ({exc}); its batches may still be "
            "running: cancel them on the provider's console, then rerun with --restart"
        ) from None
    files = [FileEntry(**entry) for entry in body.get("files", [])]
    return Ledger(
        path.parent,
        body.get("endpoint", ""),
        body.get("api_key_env", ""),
        files,
        input_sha256=body.get("input_sha256", ""),
    )


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# What `enrich status` calls each file, from its state and the provider's last word.
BATCH_KINDS: Final = (
    "queued",
    "submitted",
    "in_progress",
    "done",
    "failed",
    "expired",
    "cancelled",
)


def kind_of(entry: FileEntry) -> str:
    """``queued`` (not a batch yet), ``submitted`` (validating), ``in_progress``
    (running, finalizing or cancelling), ``done``, ``failed``, ``expired``,
    ``cancelled``."""
    if entry.state == "failed":
        return "failed"
    if entry.state in ("written", "uploaded", "creating"):
        return "queued"
    if entry.status in ("expired", "cancelled"):
        return entry.status
    if entry.status == "completed" or entry.state == "collected":
        return "done"
    if entry.status == "validating":
        return "submitted"
    return "in_progress"


def batch_summary(run_dir: Path) -> dict[str, tuple[int, int]] | None:
    """Files and rows per kind (``BATCH_KINDS``), as last polled; None when
    the run has no batches. Reads only."""
    ledger = read_ledger(run_dir)
    if ledger is None:
        return None
    summary = dict.fromkeys(BATCH_KINDS, (0, 0))
    for entry in ledger.files:
        files, rows = summary[kind_of(entry)]
        summary[kind_of(entry)] = (files + 1, rows + entry.rows)
    return summary


def in_flight(summary: dict[str, tuple[int, int]]) -> bool:
    """Whether a ``batch_summary`` has files still to submit or running."""
    return any(summary[kind][0] for kind in ("queued", "submitted", "in_progress"))
