"""Where datasets live: a local path, or an object-storage URI (``s3://``,
``gs://``, ``hdfs://``, ...) opened through pyarrow's filesystems.

Only the input and the final output may be remote. Everything a run keeps
while it works (checkpoint, journal, cache, lock, report) stays on the local
disk, where fsync and rename make it durable; for a remote output it lives
under a local stand-in path (``enrich-runs/SCHEME/BUCKET/KEY``) in the
current directory. Credentials come from the environment as pyarrow and the
cloud SDKs read them (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...); a URI that
carries keys is refused, so none can reach a report, a log or a checkpoint.

``file://`` URIs are local paths and come back as :class:`~pathlib.Path`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import parse_qsl, unquote, urlsplit

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.errors import EnrichError

__all__ = [
    "LOCAL_RUNS",
    "Location",
    "ObjectUri",
    "file_facts",
    "local_path",
    "parse_location",
]

_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query keys that would put a secret into the config, and so into reports.
_CREDENTIAL_KEYS: Final = frozenset(
    {"access_key", "secret_key", "session_token", "secret_access_key", "access_key_id"}
)
LOCAL_RUNS: Final = Path("enrich-runs")
"""Under the current directory: the local home of a remote output's run
directory, lock and report."""
_CREDENTIALS_HINT: Final = (
    "the credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
    "AWS_PROFILE for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://) and, for a "
    "self-hosted server, AWS_ENDPOINT_URL"
)
# Long enough to show pyarrow's reason, short enough to stay one readable line.
_DETAIL_CHARS: Final = 160


class ObjectUri(str):
    """An object-storage URI exactly as given (a query such as
    ``?endpoint_override=host:port&scheme=http`` included, which pyarrow
    reads); build it with :func:`parse_location`."""

    @property
    def scheme(self) -> str:
        return urlsplit(self).scheme.lower()

    @property
    def key(self) -> str:
        """bucket/key, without the scheme or the query."""
        parts = urlsplit(self)
        return f"{parts.netloc}{parts.path}"

    @property
    def name(self) -> str:
        """The last part of the key, like ``Path.name``."""
        return self.key.rstrip("/").rpartition("/")[2]

    @property
    def suffix(self) -> str:
        dot = self.name.rfind(".")
        return self.name[dot:] if dot > 0 else ""

    @property
    def bucket(self) -> str:
        return urlsplit(self).netloc

    def local_stand_in(self) -> Path:
        """Where this output's local files live: its run directory, lock and
        report are named after this path as they would be after a local output."""
        # "." and ".." are plain names in a key, not steps out of enrich-runs/.
        parts = [p for p in self.key.split("/") if p not in ("", ".", "..")]
        return LOCAL_RUNS / self.scheme / Path(*parts)


Location = Path | ObjectUri
"""A dataset's place: a local file or an object-storage URI."""


def parse_location(value: object) -> Location:
    """A path or URI as the user wrote it, made a Path (plain paths and
    ``file://`` URIs) or an ObjectUri. Raises ValueError naming the fix."""
    if isinstance(value, Path | ObjectUri):
        return value
    text = str(value)
    found = _SCHEME.match(text)
    if found is None:
        return Path(text)
    parts = urlsplit(text)
    if found.group(1).lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"{text!r} names another host ({parts.netloc}); a file:// URI must be local "
                "(file:///absolute/path)"
            )
        return Path(unquote(parts.path))
    secrets = sorted(k for k, _ in parse_qsl(parts.query) if k.lower() in _CREDENTIAL_KEYS)
    if secrets:
        raise ValueError(
            f"the URI {found.group(0)}{parts.netloc}{parts.path} carries credentials "
            f"({', '.join(secrets)}), which enrich would write into its reports; remove them "
            "and set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
        )
    if not parts.netloc:
        raise ValueError(
            f"the URI {text!r} names no bucket; write it as {parts.scheme}://BUCKET/KEY"
        )
    return ObjectUri(text)


def local_path(location: Location) -> Path:
    """The local path that a run's own files are named after."""
    return location if isinstance(location, Path) else location.local_stand_in()


def detail(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "..."


def filesystem(uri: ObjectUri, error: type[EnrichError], flag: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for ``uri`` and the path within it; ``error``
    (naming ``flag``) when pyarrow knows no such scheme or cannot set it up."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as e:
        if "Unrecognized filesystem type" in str(e):
            raise error(
                f"{flag} {uri}: pyarrow has no filesystem for {uri.scheme}://; use a local path "
                "or an s3://, gs://, hdfs:// or file:// URI"
            ) from None
        raise error(
            f"{flag} {uri} is not a URI pyarrow can open ({detail(e)}); fix {flag}"
        ) from None
    except (pa.ArrowException, OSError) as e:
        raise error(f"cannot open {flag} {uri} ({detail(e)}); check {_CREDENTIALS_HINT}") from None
    return fs, str(path)


def file_info(uri: ObjectUri, error: type[EnrichError], flag: str) -> pafs.FileInfo:
    import pyarrow as pa

    fs, path = filesystem(uri, error, flag)
    try:
        return fs.get_file_info(path)
    except (pa.ArrowException, OSError) as e:
        raise error(
            f"cannot reach {uri} ({detail(e)}); check {flag} and {_CREDENTIALS_HINT}"
        ) from None


def check_exists(uri: ObjectUri, error: type[EnrichError], flag: str, what: str) -> None:
    """``error`` unless ``uri`` is an object (a file, not a prefix)."""
    import pyarrow.fs as pafs

    info = file_info(uri, error, flag)
    if info.type == pafs.FileType.NotFound:
        raise error(
            f"{what} {uri} does not exist; check the bucket and key given to {flag} "
            f"(and {_CREDENTIALS_HINT})"
        )
    if info.type != pafs.FileType.File:
        raise error(
            f"{what} {uri} is a directory (a prefix), not an object; pass one file to {flag}"
        )


def open_stream(location: Location, compression: str | None = None) -> pa.NativeFile:
    """A sequential reader; ``compression="detect"`` decompresses by extension."""
    import pyarrow as pa

    from pipeline.errors import InputError

    if isinstance(location, Path):
        return pa.input_stream(str(location), compression=compression)
    fs, path = filesystem(location, InputError, "--input")
    return fs.open_input_stream(path, compression=compression)


def open_random_access(location: Location) -> pa.NativeFile:
    """A seekable reader (Parquet reads its footer first, then ranges)."""
    import pyarrow as pa

    from pipeline.errors import InputError

    if isinstance(location, Path):
        return pa.OSFile(str(location))
    fs, path = filesystem(location, InputError, "--input")
    return fs.open_input_file(path)


def file_facts(location: Location) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file or object; None when absent or unreachable."""
    if isinstance(location, Path):
        try:
            stat = location.stat()
        except OSError:
            return None
        return stat.st_size, stat.st_mtime_ns
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.errors import EnrichError

    try:
        fs, path = filesystem(location, EnrichError, "--output")
        info = fs.get_file_info(path)
    except (EnrichError, pa.ArrowException, OSError):
        return None
    if info.type != pafs.FileType.File:
        return None
    return int(info.size or 0), int(info.mtime_ns or 0)


def remote_identity(uri: ObjectUri, error: type[EnrichError]) -> tuple[int, int, str]:
    """(size, mtime_ns, digest) of an object. Hashing its content would mean
    downloading all of it once more before every run, so the digest is of its
    URI, size and last-modified time: a rewrite of the object changes it."""
    check_exists(uri, error, "--input", "input")
    facts = file_facts(uri)
    if facts is None:
        raise error(f"input {uri} vanished while it was opened; check --input")
    size, mtime_ns = facts
    digest = hashlib.sha256(f"{uri}\n{size}\n{mtime_ns}".encode()).hexdigest()
    return size, mtime_ns, digest


def check_output_bucket(uri: ObjectUri) -> None:
    """Fail before any request if the output's bucket is missing or the key
    is a prefix (writability shows only when the object is written)."""
    import pyarrow.fs as pafs

    from pipeline.errors import OutputError

    fs, path = filesystem(uri, OutputError, "--output")
    bucket = ObjectUri(f"{uri.scheme}://{uri.bucket}")
    try:
        found = fs.get_file_info([path.partition("/")[0], path])
    except OSError as e:
        raise OutputError(
            f"cannot reach output {uri} ({detail(e)}); check --output and {_CREDENTIALS_HINT}"
        ) from None
    if found[0].type == pafs.FileType.NotFound:
        raise OutputError(
            f"output bucket {bucket} does not exist; create it or change --output "
            f"(and check {_CREDENTIALS_HINT})"
        )
    if found[1].type == pafs.FileType.Directory:
        raise OutputError(
            f"output {uri} is a directory (a prefix); pass an object name such as "
            f"--output {uri.rstrip('/')}/enriched.parquet"
        )


def upload(local: Path, uri: ObjectUri) -> None:
    """Copy the finished file ``local`` to ``uri`` in one call. Object stores
    publish an object only when its upload completes (a single PUT, or the
    completion of a multipart upload), so a kill or an error midway leaves
    nothing under the final name; the copy runs in pyarrow's C++ code, with
    no Python step between parts that an exception could cut short and leave
    a half-written object to be completed by a destructor."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.errors import WriteFailed

    fs, path = filesystem(uri, WriteFailed, "--output")
    try:
        pafs.copy_files(
            str(local.absolute()),
            path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )
    except (pa.ArrowException, OSError) as e:
        raise WriteFailed(
            f"uploading the output to {uri} failed ({detail(e)}); the checkpoint is kept: "
            f"check --output and {_CREDENTIALS_HINT}, then run the same command again"
        ) from None


def read_parquet_columns(uri: ObjectUri, columns: list[str]) -> pa.Table:
    """Some columns of a remote Parquet file (``enrich status``)."""
    import pyarrow.parquet as pq

    from pipeline.errors import OutputError

    fs, path = filesystem(uri, OutputError, "--output")
    return pq.read_table(path, columns=columns, filesystem=fs)


def check_output_path(output: Location, input_path: Location) -> None:
    """Fail before any request is sent if the output could not be written at the end."""
    from pipeline.errors import OutputError

    if isinstance(output, ObjectUri):
        _check_remote_output(output, input_path)
        return
    if isinstance(input_path, ObjectUri):
        input_path = local_path(input_path)  # a local output is never a remote input
    output = Path(output).expanduser()
    if _same_file(output, Path(input_path).expanduser()):
        raise OutputError(
            f"output {output} is the input file; writing it would destroy the input: "
            "choose another path with --output"
        )
    if output.is_dir():
        raise OutputError(
            f"output {output} is a directory; pass a file path such as "
            f"--output {output / 'enriched.parquet'}"
        )
    if output.suffix.lower() != ".parquet":
        raise OutputError(
            f"output {output} does not end in .parquet; the output is always Parquet: "
            f"use --output {output.with_suffix('.parquet')}"
        )
    parent = output.absolute().parent
    if not parent.exists():
        raise OutputError(
            f"output directory {parent} does not exist; create it (mkdir -p {parent}) "
            "or change --output"
        )
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} is not a directory; change --output")
    # The rename needs write access to the directory, not to any existing output file.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(
            f"output directory {parent} is not writable; fix its permissions or change --output"
        )


def _check_remote_output(output: ObjectUri, input_path: Location) -> None:
    from pipeline.errors import OutputError

    if isinstance(input_path, ObjectUri) and output.key == input_path.key:
        raise OutputError(
            f"output {output} is the input object; writing it would destroy the input: "
            "choose another key with --output"
        )
    if output.suffix.lower() != ".parquet":
        raise OutputError(
            f"output {output} does not end in .parquet; the output is always Parquet: "
            "name the object KEY.parquet in --output"
        )
    check_output_bucket(output)


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        # samefile sees through symlinks, hard links and relative paths.
        return a.samefile(b)
    return a.absolute().resolve() == b.absolute().resolve()
