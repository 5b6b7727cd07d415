"""What a run is of: the input's identity (by content) and the hash of the
settings that change an answer. Plain Python: the checkpoint's manifest and
the run report record them, and a fresh run compares them before it imports
pyarrow (``pipeline.head``)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from pipeline import prompt
from pipeline.errors import InputError
from pipeline.storage import Location, ObjectUri, remote_identity
from pipeline.storage import file_facts as file_facts

if TYPE_CHECKING:
    from pipeline.config import RunConfig

__all__ = ["InputIdentity", "answer_settings", "file_facts", "settings_hash"]

_HASH_BLOCK: Final = 1 << 20


@dataclass(frozen=True)
class InputIdentity:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    # With mtime, what tells an edit that kept the size and mtime (cp -p,
    # rsync -t, tar x): those restore mtime, but ctime is the kernel's own.
    inode: int = 0
    ctime_ns: int = 0

    @classmethod
    def of(cls, path: Location, known: InputIdentity | None = None) -> InputIdentity:
        """Identify the input by content. Hashing a big file costs seconds, so
        the known hash is reused while the file's size, mtime, inode and ctime
        are all unchanged. An object in object storage is identified by its
        URI, size and last-modified time (see storage.remote_identity)."""
        if isinstance(path, ObjectUri):
            return cls(str(path), *remote_identity(path, InputError))
        stat = path.stat()
        resolved = str(path.resolve())
        facts = (stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns)
        if known is not None and (known.size, known.mtime_ns, known.inode, known.ctime_ns) == facts:
            return cls(resolved, *facts[:2], known.sha256, *facts[2:])
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(_HASH_BLOCK):
                digest.update(block)
        return cls(resolved, *facts[:2], digest.hexdigest(), *facts[2:])

    def same_content(self, other: InputIdentity) -> bool:
        return (self.sha256, self.size) == (other.sha256, other.size)


def settings_hash(settings: Mapping[str, Any]) -> str:
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def answer_settings(
    config: RunConfig, response_format: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything that changes an answer: a checkpoint made under other values
    must not be mixed into this run's output."""
    settings = {
        **prompt.fingerprint_fields(prompt.prompt_spec(config)),
        "model": config.model.name,
        "params": config.model.request_params(),
    }
    if response_format is not None:
        settings["response_format"] = response_format
    return settings
