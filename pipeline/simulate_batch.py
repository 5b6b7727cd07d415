"""The simulator's Files and Batches endpoints: OpenAI's Batch API, offline.

Mounted by :class:`pipeline.simulate.Simulator` next to the chat endpoint, so
``enrich simulate``, the demo, the tests and the benchmarks can run the batch
route without a paid account. It follows OpenAI's public contract (the one
``openai.files`` and ``openai.batches`` speak):

``POST /v1/files``
    multipart ``file`` + ``purpose=batch``; the name must end in ``.jsonl``
    (400 otherwise, as OpenAI); past ``max_file_bytes`` a 413
    ``file_too_large``; past ``max_stored_bytes`` held in all a 400
    ``storage_limit_exceeded`` (DELETE frees).
``GET /v1/files``, ``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``,
``DELETE /v1/files/{id}``
``POST /v1/batches``
    ``input_file_id``, ``endpoint`` (only ``/v1/chat/completions`` runs here),
    ``completion_window`` (``24h``), ``metadata``.
``GET /v1/batches/{id}``
    after ``poll_delay_ms`` (a slow poll).
``GET /v1/batches`` (newest first, ``after``/``limit``), ``POST /v1/batches/{id}/cancel``
``POST /_batches/advance?seconds=S``
    not OpenAI's: moves the batches' clock forward, so that a rehearsal or a
    benchmark skips a long turnaround (or reaches the expiry) without waiting.

Lifecycle, on the clock from the batch's creation, with ``T`` the
``turnaround_s``: ``validating`` for the first tenth of ``T``; then
``in_progress`` while the requests complete one after another (in a shuffled
order, evenly spread) until ``0.9 T``; ``finalizing``; ``completed`` at ``T``.
A batch that fails validation is ``failed`` after the validating tenth, with
``errors.data`` (``code``, ``message``, ``param``, ``line``): ``empty_file``,
``invalid_json_line``, ``missing_required_parameter``, ``invalid_method``,
``url_mismatch``, ``duplicate_custom_id``, ``model_mismatch``,
``model_not_found`` (with ``models`` set), ``too_many_tasks`` (more than
``max_requests``), and ``token_limit_exceeded``: the batch's prompt tokens
plus those of the model's unfinished batches pass ``enqueued_tokens``, as
OpenAI's enqueued-token limit does. Past ``expire_after_s`` an unfinished batch
is ``expired``: what completed is in the output file, the rest in the error
file with ``error.code`` ``batch_expired``. A cancel makes it ``cancelling``
(nothing more completes) and ``cancelled`` a tenth of ``T`` later, with what
had completed in the output file and the rest as ``batch_cancelled``.

Each request is answered as the online endpoint would answer it (same answer,
usage and per-prompt directives: ``[[fault:400]]`` is a 400 in the error file,
the transport faults a 500, ``badjson``/``invalid`` shape the answer), with no
latency nor rate limit. Besides, a ``fail_rate`` share of requests fails, half
with a transient 500, half with a permanent 400. Output and error lines come in
completion order, not input order, as OpenAI's do. A request is computed when
the clock passes its turn and someone looks (a poll, a list, a cancel).

Counters (:class:`BatchStats`, under ``"batch"`` in ``GET /_stats``) tell
what the server did: files uploaded, batches created, requests computed per
``custom_id``, answers per prompt, downloads per file; a crash test proves
with them that nothing was submitted, computed or downloaded twice.

State is in memory and bounded: files by ``max_stored_bytes``, batch records
by :data:`MAX_BATCHES` (the oldest finished ones are forgotten first), and a
batch drops its copy of the input once its results are written.
"""

from __future__ import annotations

import array
import asyncio
import collections
import json
import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, Protocol

from aiohttp import BodyPartReader, web

from pipeline.errors import ConfigError

__all__ = [
    "CHAT_ENDPOINT",
    "MAX_BATCHES",
    "BatchAnswerer",
    "BatchConfig",
    "BatchService",
    "BatchStats",
    "Outcome",
]

CHAT_ENDPOINT: Final = "/v1/chat/completions"

# OpenAI's limits per batch input file.
DEFAULT_MAX_REQUESTS: Final = 50_000
DEFAULT_MAX_FILE_BYTES: Final = 200 * 1024 * 1024

# Batch records kept; past this the oldest finished ones are forgotten.
MAX_BATCHES: Final = 10_000
# Validation errors listed per batch (a file of 50,000 bad lines says enough with these).
MAX_LISTED_ERRORS: Final = 100

# Shares of the turnaround: validating until the first, requests completing
# until the second; a cancel takes the first too.
_VALIDATING: Final = 0.1
_IN_PROGRESS_END: Final = 0.9

_TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})
# Endpoints OpenAI's batches accept; only the chat one runs here.
_KNOWN_ENDPOINTS: Final = frozenset(
    {CHAT_ENDPOINT, "/v1/responses", "/v1/embeddings", "/v1/completions", "/v1/moderations"}
)
_UNFINISHED_MESSAGES: Final = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


@dataclass(frozen=True)
class BatchConfig:
    """How the batch endpoints behave (``enrich simulate --batch-*``)."""

    turnaround_s: float = 5.0
    # OpenAI's completion window is 24 hours.
    expire_after_s: float = 86_400.0
    fail_rate: float = 0.0
    # The enqueued-token limit per model; None: no limit.
    enqueued_tokens: int | None = None
    poll_delay_ms: float = 0.0
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_requests: int = DEFAULT_MAX_REQUESTS
    max_stored_bytes: int = 4 * 1024 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("turnaround_s", "poll_delay_ms"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"simulator batch {name} must be >= 0, got {getattr(self, name)}")
        if not self.expire_after_s > 0:
            raise ConfigError(
                f"simulator batch expire_after_s must be > 0, got {self.expire_after_s}"
            )
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ConfigError(
                f"simulator batch fail_rate must be between 0 and 1, got {self.fail_rate}"
            )
        for name in ("max_file_bytes", "max_requests", "max_stored_bytes", "enqueued_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"simulator batch {name} must be >= 1, got {value}")


@dataclass
class BatchStats:
    """What the batch endpoints did. Plain ints and Counters, read from other
    threads as :class:`pipeline.simulate.SimulatorStats` is."""

    files_uploaded: int = 0
    bytes_uploaded: int = 0
    files_deleted: int = 0
    batches_created: int = 0
    batches_cancelled: int = 0
    polls: int = 0
    # Requests run (answered or failed), those answered 200, their tokens, and
    # those never run (expired or cancelled).
    computed: int = 0
    answered: int = 0
    failed: int = 0
    unfinished: int = 0
    tokens: int = 0
    computed_by_custom_id: collections.Counter[str] = field(default_factory=collections.Counter)
    answered_by_content: collections.Counter[str] = field(default_factory=collections.Counter)
    downloads_by_file: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        counters = ("computed_by_custom_id", "answered_by_content", "downloads_by_file")
        plain = {k: v for k, v in vars(self).items() if k not in counters}
        # dict() of a Counter is one C-level copy: safe while the loop thread counts.
        return {**plain, **{name: dict(getattr(self, name)) for name in counters}}


class Outcome(NamedTuple):
    """One request's answer as the online endpoint would give it."""

    status: int
    body: dict[str, Any]
    # The last user message: what directives were read from, and what
    # ``answered_by_content`` counts.
    content: str


class BatchAnswerer(Protocol):
    """What the batch endpoints need from the chat simulator."""

    def batch_answer(self, body: Any) -> Outcome: ...

    def batch_prompt_tokens(self, body: Any) -> int: ...


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass
class _Batch:
    id: str
    input_file_id: str
    created: float  # on the service's clock
    metadata: dict[str, str] | None
    # The input until the results are out, its non-blank lines as offsets,
    # and the order the requests run in.
    data: bytes | None
    starts: array.array[int]
    ends: array.array[int]
    order: list[int]
    model: str | None = None
    tokens: int = 0
    errors: list[dict[str, Any]] | None = None
    status: str = "validating"
    done: int = 0
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    output: list[bytes] = field(default_factory=list)
    error_lines: list[bytes] = field(default_factory=list)
    # Unix times of each step reached ("in_progress_at", ...).
    times: dict[str, int] = field(default_factory=dict)
    cancel_done: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def total(self) -> int:
        return len(self.starts)


def _error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> web.Response:
    payload = {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    return web.json_response(payload, status=status)


def _batch_error(
    code: str, message: str, line: int | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _line_offsets(data: bytes) -> tuple[array.array[int], array.array[int]]:
    """Start and end of each non-blank line, without copying the lines."""
    starts: array.array[int] = array.array("q")
    ends: array.array[int] = array.array("q")
    position, size = 0, len(data)
    while position < size:
        end = data.find(b"\n", position)
        end = size if end < 0 else end
        if data[position:end].strip():
            starts.append(position)
            ends.append(end)
        position = end + 1
    return starts, ends


class _Validated(NamedTuple):
    model: str | None
    tokens: int
    errors: list[dict[str, Any]]


def _check_line(
    raw: bytes, endpoint: str, seen: set[str], answerer: BatchAnswerer
) -> tuple[str | None, int, tuple[str, str, str | None] | None]:
    """One input line: its model and prompt tokens, or its error (code,
    message, param)."""
    try:
        request = json.loads(raw)
    except ValueError:
        return None, 0, ("invalid_json_line", "This line is not parseable as valid JSON.", None)
    if not isinstance(request, dict):
        return None, 0, ("invalid_json_line", "This line is not a JSON object.", None)
    for name in ("custom_id", "method", "url", "body"):
        if name not in request:
            message = f"Missing required parameter: '{name}'."
            return None, 0, ("missing_required_parameter", message, name)
    custom_id, body = request["custom_id"], request["body"]
    if not isinstance(custom_id, str) or not custom_id:
        return None, 0, ("invalid_request", "'custom_id' must be a non-empty string.", "custom_id")
    if request["method"] != "POST":
        return None, 0, ("invalid_method", "The 'method' of every request must be POST.", "method")
    if request["url"] != endpoint:
        message = f"The url {request['url']!r} does not match the batch's endpoint {endpoint!r}."
        return None, 0, ("url_mismatch", message, "url")
    if custom_id in seen:
        message = f"The custom_id {custom_id!r} is used by more than one request."
        return None, 0, ("duplicate_custom_id", message, "custom_id")
    seen.add(custom_id)
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        message = "Missing required parameter: 'body.model'."
        return None, 0, ("missing_required_parameter", message, "body.model")
    return model, answerer.batch_prompt_tokens(body), None


def _validate(
    data: bytes,
    starts: array.array[int],
    ends: array.array[int],
    endpoint: str,
    answerer: BatchAnswerer,
    models: frozenset[str],
) -> _Validated:
    """Every line of a batch input file checked as OpenAI's validating step does."""
    if not starts:
        return _Validated(None, 0, [_batch_error("empty_file", "The input file is empty.")])
    errors: list[dict[str, Any]] = []
    first_model: str | None = None
    seen: set[str] = set()
    tokens = 0
    for index, (start, end) in enumerate(zip(starts, ends, strict=True)):
        model, count, problem = _check_line(data[start:end], endpoint, seen, answerer)
        if problem is None and model is not None:
            tokens += count
            if first_model is None:
                first_model = model
            elif model != first_model:
                message = (
                    f"The model {model!r} differs from the model {first_model!r} of the "
                    "batch's first request: one model per batch."
                )
                problem = ("model_mismatch", message, "body.model")
        if problem is not None and len(errors) < MAX_LISTED_ERRORS:
            line = data.count(b"\n", 0, starts[index]) + 1
            errors.append(_batch_error(problem[0], problem[1], line, problem[2]))
    if first_model is not None and models and first_model not in models:
        message = f"The model `{first_model}` does not exist or you do not have access to it."
        errors.append(_batch_error("model_not_found", message, None, "body.model"))
    return _Validated(first_model, tokens, errors)


def _unfinished_line(custom_id: str, code: str) -> bytes:
    line = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": _UNFINISHED_MESSAGES[code]},
    }
    return json.dumps(line).encode() + b"\n"


def _result_line(custom_id: str, status: int, body: Mapping[str, Any]) -> bytes:
    line = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{uuid.uuid4().hex}", "body": body},
        "error": None,
    }
    return json.dumps(line).encode() + b"\n"


def _random_failure(transient: bool) -> tuple[int, dict[str, Any]]:
    if transient:
        message = "The server had an error while processing your request (simulated)."
        return 500, {
            "error": {"message": message, "type": "server_error", "param": None, "code": None}
        }
    message = "Invalid request (simulated permanent failure of a batch request)."
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return 400, {"error": error}


class BatchService:
    """The Files and Batches endpoints of one simulator, and their state."""

    def __init__(
        self,
        config: BatchConfig,
        answerer: BatchAnswerer,
        *,
        api_key: str | None = None,
        models: tuple[str, ...] = (),
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = BatchStats()
        self._answerer = answerer
        self._auth = f"Bearer {api_key}" if api_key is not None else None
        self._models = frozenset(models)
        self._rng = random.Random(seed)
        self._clock = clock
        # Unix time = clock + this: a fake clock moves the reported times too.
        self._epoch = time.time() - clock()
        # Time skipped by POST /_batches/advance.
        self._skipped = 0.0
        self._files: dict[str, _File] = {}
        self._stored = 0
        self._batches: dict[str, _Batch] = {}

    def mount(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self._upload)
        router.add_get("/v1/files", self._list_files)
        router.add_get("/v1/files/{id}", self._get_file)
        router.add_get("/v1/files/{id}/content", self._file_content)
        router.add_delete("/v1/files/{id}", self._delete_file)
        router.add_post("/v1/batches", self._create)
        router.add_get("/v1/batches", self._list_batches)
        router.add_get("/v1/batches/{id}", self._get_batch)
        router.add_post("/v1/batches/{id}/cancel", self._cancel)
        router.add_post("/_batches/advance", self._skip)

    def reset_stats(self) -> None:
        """Zero the counters in place (holders of ``stats`` see the reset)."""
        fresh = BatchStats()
        for name, value in vars(fresh).items():
            setattr(self.stats, name, value)

    def _now(self) -> float:
        return self._clock() + self._skipped

    def _unix(self, at: float) -> int:
        return int(self._epoch + at)

    def _refused(self, request: web.Request) -> web.Response | None:
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return _error(
                401,
                "Incorrect API key provided. Set the key the simulator was started with.",
                "invalid_api_key",
            )
        return None

    # -- files -------------------------------------------------------------

    def _store(self, filename: str, purpose: str, data: bytes) -> _File:
        file = _File(f"file-{uuid.uuid4().hex}", filename, purpose, data, self._unix(self._now()))
        self._files[file.id] = file
        self._stored += len(data)
        return file

    async def _read_upload(
        self, request: web.Request
    ) -> tuple[str | None, str | None, bytes | None, int]:
        """The purpose, file name and bytes of a multipart upload, and its
        size; the bytes past ``max_file_bytes`` are read and dropped, so that
        the client gets its 413 rather than a reset connection."""
        purpose = filename = data = None
        size = 0
        reader = await request.multipart()
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.read()).decode("utf-8", "replace")
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                chunks: list[bytes] = []
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if size <= self.config.max_file_bytes:
                        chunks.append(chunk)
                data = b"".join(chunks) if size <= self.config.max_file_bytes else None
        return purpose, filename, data, size

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            purpose, filename, data, size = await self._read_upload(request)
        except (ValueError, AssertionError):
            return _error(400, "The body must be multipart/form-data with 'file' and 'purpose'.")
        if purpose is None:
            return _error(400, "Missing required parameter: 'purpose'.", None, "purpose")
        if filename is None:
            return _error(400, "Missing required parameter: 'file'.", None, "file")
        if purpose != "batch":
            return _error(
                400,
                f"The simulator stores purpose 'batch' files only, not {purpose!r}.",
                None,
                "purpose",
            )
        if not filename.endswith(".jsonl"):
            return _error(400, "Invalid file format for Batch API. Must be .jsonl", None, "file")
        if data is None:
            limit = self.config.max_file_bytes
            message = f"File is too large: {size:,} bytes; batch input files may hold {limit:,}."
            return _error(413, message, "file_too_large", "file")
        if self._stored + len(data) > self.config.max_stored_bytes:
            message = (
                f"Storage limit of {self.config.max_stored_bytes:,} bytes reached; "
                "delete files to upload more."
            )
            return _error(400, message, "storage_limit_exceeded", "file")
        file = self._store(filename, purpose, data)
        self.stats.files_uploaded += 1
        self.stats.bytes_uploaded += len(data)
        return web.json_response(file.as_dict())

    def _file_or_404(self, request: web.Request) -> _File | web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        file_id = request.match_info["id"]
        file = self._files.get(file_id)
        if file is None:
            return _error(404, f"No such File object: {file_id}", None, "id")
        return file

    async def _get_file(self, request: web.Request) -> web.StreamResponse:
        file = self._file_or_404(request)
        return file if isinstance(file, web.Response) else web.json_response(file.as_dict())

    async def _file_content(self, request: web.Request) -> web.StreamResponse:
        file = self._file_or_404(request)
        if isinstance(file, web.Response):
            return file
        self.stats.downloads_by_file[file.id] += 1
        return web.Response(body=file.data, content_type="application/octet-stream")

    async def _delete_file(self, request: web.Request) -> web.StreamResponse:
        file = self._file_or_404(request)
        if isinstance(file, web.Response):
            return file
        # A batch running on it keeps its own reference to the bytes.
        del self._files[file.id]
        self._stored -= len(file.data)
        self.stats.files_deleted += 1
        return web.json_response({"id": file.id, "object": "file", "deleted": True})

    async def _list_files(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        purpose = request.query.get("purpose")
        files = [f for f in self._files.values() if purpose is None or f.purpose == purpose]
        if request.query.get("order", "desc") == "desc":
            files.reverse()
        page = _page([f.id for f in files], request, default_limit=10_000, max_limit=10_000)
        if isinstance(page, web.Response):
            return page
        ids, more = page
        data = [self._files[i].as_dict() for i in ids]
        return web.json_response(_list_payload(data, more))

    # -- batches -----------------------------------------------------------

    async def _create(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.")
        checked = self._check_create(body)
        if isinstance(checked, web.Response):
            return checked
        file, endpoint = checked
        now = self._now()
        starts, ends = _line_offsets(file.data)
        order = list(range(len(starts)))
        self._rng.shuffle(order)
        metadata = body.get("metadata")
        batch = _Batch(
            f"batch_{uuid.uuid4().hex}", file.id, now, metadata, file.data, starts, ends, order
        )
        checked_lines = _validate(file.data, starts, ends, endpoint, self._answerer, self._models)
        batch.model, batch.tokens = checked_lines.model, checked_lines.tokens
        errors = checked_lines.errors
        if len(starts) > self.config.max_requests:
            message = (
                f"The input file holds {len(starts):,} requests; a batch may hold "
                f"{self.config.max_requests:,}."
            )
            errors.insert(0, _batch_error("too_many_tasks", message))
        if not errors:
            errors = self._enqueued_token_errors(batch, now)
        batch.errors = errors or None
        self._batches[batch.id] = batch
        self.stats.batches_created += 1
        self._forget_old_batches()
        return web.json_response(self._batch_dict(batch))

    def _check_create(self, body: Any) -> tuple[_File, str] | web.Response:
        """The input file and endpoint of a create request, or its 400/404."""
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return _error(400, f"Missing required parameter: '{name}'.", None, name)
        endpoint = body["endpoint"]
        if endpoint not in _KNOWN_ENDPOINTS:
            return _error(400, f"Invalid value for 'endpoint': {endpoint!r}.", None, "endpoint")
        if endpoint != CHAT_ENDPOINT:
            message = f"The simulator runs {CHAT_ENDPOINT} batches only, not {endpoint}."
            return _error(400, message, None, "endpoint")
        if body["completion_window"] != "24h":
            message = "Invalid value for 'completion_window': only '24h' is supported."
            return _error(400, message, None, "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(v, str) for v in metadata.values())
        ):
            message = "'metadata' must be an object of at most 16 string values."
            return _error(400, message, None, "metadata")
        file = self._files.get(body["input_file_id"])
        if file is None:
            message = f"No such File object: {body['input_file_id']}"
            return _error(404, message, None, "input_file_id")
        if file.purpose != "batch":
            return _error(400, "The input file must have purpose 'batch'.", None, "input_file_id")
        return file, endpoint

    def _enqueued_token_errors(self, batch: _Batch, now: float) -> list[dict[str, Any]]:
        limit = self.config.enqueued_tokens
        if limit is None:
            return []
        enqueued = 0
        for other in self._batches.values():
            self._advance(other, now)
            if (
                other.model == batch.model
                and other.errors is None
                and other.status not in _TERMINAL
            ):
                enqueued += other.tokens
        if enqueued + batch.tokens <= limit:
            return []
        message = (
            f"Enqueued token limit reached for {batch.model} in organization org-simulator. "
            f"Limit: {limit:,} enqueued tokens. Please try again once some in_progress "
            "batches have been completed."
        )
        return [_batch_error("token_limit_exceeded", message)]

    def _forget_old_batches(self) -> None:
        excess = len(self._batches) - MAX_BATCHES
        if excess <= 0:
            return
        finished = [b.id for b in self._batches.values() if b.status in _TERMINAL][:excess]
        for batch_id in finished:
            del self._batches[batch_id]

    def _batch_or_404(self, request: web.Request) -> _Batch | web.Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        batch_id = request.match_info["id"]
        batch = self._batches.get(batch_id)
        if batch is None:
            return _error(404, f"No batch found with id '{batch_id}'.", None, "batch_id")
        return batch

    async def _get_batch(self, request: web.Request) -> web.StreamResponse:
        if self.config.poll_delay_ms > 0:
            await asyncio.sleep(self.config.poll_delay_ms / 1000.0)
        batch = self._batch_or_404(request)
        if isinstance(batch, web.Response):
            return batch
        self.stats.polls += 1
        self._advance(batch, self._now())
        return web.json_response(self._batch_dict(batch))

    async def _list_batches(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        newest_first = list(reversed(self._batches))
        page = _page(newest_first, request, default_limit=20, max_limit=100)
        if isinstance(page, web.Response):
            return page
        ids, more = page
        now = self._now()
        data = []
        for batch_id in ids:
            batch = self._batches[batch_id]
            self._advance(batch, now)
            data.append(self._batch_dict(batch))
        return web.json_response(_list_payload(data, more))

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch_or_404(request)
        if isinstance(batch, web.Response):
            return batch
        now = self._now()
        self._advance(batch, now)
        if batch.status in _TERMINAL:
            message = f"Cannot cancel a batch with status '{batch.status}'."
            return _error(409, message, None, None)
        if batch.status != "cancelling":
            batch.status = "cancelling"
            batch.times["cancelling_at"] = self._unix(now)
            batch.cancel_done = now + _VALIDATING * self.config.turnaround_s
            self.stats.batches_cancelled += 1
        self._advance(batch, now)
        return web.json_response(self._batch_dict(batch))

    async def _skip(self, request: web.Request) -> web.StreamResponse:
        """Move the batches' clock forward (``?seconds=S``): a rehearsal or a
        benchmark skips a long turnaround without waiting for it."""
        try:
            seconds = float(request.query["seconds"])
        except (KeyError, ValueError):
            seconds = -1.0
        if not seconds >= 0:
            return _error(400, "Pass ?seconds=S, a number >= 0.", None, "seconds")
        self._skipped += seconds
        return web.json_response({"skipped_s": self._skipped})

    # -- the timeline ------------------------------------------------------

    def _advance(self, batch: _Batch, now: float) -> None:
        """Bring a batch up to ``now``: run the requests whose turn has come
        and step its status (see the module docstring)."""
        if batch.status in _TERMINAL:
            return
        if batch.status == "cancelling":
            assert batch.cancel_done is not None
            if now >= batch.cancel_done:
                self._finish(batch, "cancelled", batch.cancel_done)
            return
        turnaround = self.config.turnaround_s
        validated = batch.created + _VALIDATING * turnaround
        finalizing = batch.created + _IN_PROGRESS_END * turnaround
        end = batch.created + turnaround
        expires = batch.created + self.config.expire_after_s
        if batch.errors is not None:
            if now >= validated:
                self._finish(batch, "failed", validated)
            return
        if now >= end and end <= expires:
            self._step(batch, "in_progress", validated)
            self._run_until(batch, batch.total)
            self._step(batch, "finalizing", finalizing)
            self._finish(batch, "completed", end)
        elif now >= expires:
            if expires >= validated:
                self._step(batch, "in_progress", validated)
            self._run_until(batch, self._due(batch, expires))
            self._finish(batch, "expired", expires)
        elif now >= validated:
            self._step(batch, "in_progress", validated)
            self._run_until(batch, self._due(batch, now))
            if now >= finalizing:
                self._step(batch, "finalizing", finalizing)

    def _step(self, batch: _Batch, status: str, at: float) -> None:
        batch.status = status
        batch.times.setdefault(f"{status}_at", self._unix(at))

    def _due(self, batch: _Batch, at: float) -> int:
        """How many requests have had their turn by ``at``: evenly spread
        over the in-progress span."""
        turnaround = self.config.turnaround_s
        span = (_IN_PROGRESS_END - _VALIDATING) * turnaround
        elapsed = at - (batch.created + _VALIDATING * turnaround)
        if span <= 0:
            return batch.total if elapsed >= 0 else 0
        share = min(1.0, max(0.0, elapsed / span))
        return min(batch.total, math.floor(batch.total * share + 1e-9))

    def _run_until(self, batch: _Batch, count: int) -> None:
        while batch.done < count:
            self._execute(batch, batch.order[batch.done])
            batch.done += 1

    def _request(self, batch: _Batch, index: int) -> dict[str, Any]:
        assert batch.data is not None
        request: dict[str, Any] = json.loads(batch.data[batch.starts[index] : batch.ends[index]])
        return request

    def _execute(self, batch: _Batch, index: int) -> None:
        """Run one request: its answer (or failure) goes to the output (or error) lines."""
        request = self._request(batch, index)
        custom_id, body = request["custom_id"], request["body"]
        stats = self.stats
        stats.computed += 1
        stats.computed_by_custom_id[custom_id] += 1
        fail_rate = self.config.fail_rate
        draw = self._rng.random() if fail_rate > 0 else 1.0
        if draw < fail_rate:
            status, payload = _random_failure(transient=draw < fail_rate / 2)
            content = None
        else:
            status, payload, content = self._answerer.batch_answer(body)
        line = _result_line(custom_id, status, payload)
        if status != 200:
            batch.error_lines.append(line)
            batch.failed += 1
            stats.failed += 1
            return
        batch.output.append(line)
        batch.completed += 1
        usage = payload["usage"]
        batch.input_tokens += usage["prompt_tokens"]
        batch.output_tokens += usage["completion_tokens"]
        stats.answered += 1
        stats.tokens += usage["total_tokens"]
        if content is not None:
            stats.answered_by_content[content] += 1

    def _finish(self, batch: _Batch, status: str, at: float) -> None:
        """The end of a batch: requests that never ran go to the error file
        (expired, cancelled), the files are written, the input let go."""
        if batch.errors is None and status in ("expired", "cancelled"):
            code = f"batch_{status}"
            for index in batch.order[batch.done :]:
                custom_id = self._request(batch, index)["custom_id"]
                batch.error_lines.append(_unfinished_line(custom_id, code))
                batch.failed += 1
                self.stats.unfinished += 1
            batch.done = batch.total
        if batch.output:
            name = f"{batch.id}_output.jsonl"
            batch.output_file_id = self._store(name, "batch_output", b"".join(batch.output)).id
        if batch.error_lines:
            name = f"{batch.id}_error.jsonl"
            batch.error_file_id = self._store(name, "batch_output", b"".join(batch.error_lines)).id
        batch.output, batch.error_lines, batch.order = [], [], []
        batch.data = None
        self._step(batch, status, at)

    def _batch_dict(self, batch: _Batch) -> dict[str, Any]:
        times = batch.times
        total = 0 if batch.errors is not None else batch.total
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": CHAT_ENDPOINT,
            "model": batch.model,
            "errors": None if batch.errors is None else {"object": "list", "data": batch.errors},
            "input_file_id": batch.input_file_id,
            "completion_window": "24h",
            "status": batch.status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": self._unix(batch.created),
            "in_progress_at": times.get("in_progress_at"),
            "expires_at": self._unix(batch.created + self.config.expire_after_s),
            "finalizing_at": times.get("finalizing_at"),
            "completed_at": times.get("completed_at"),
            "failed_at": times.get("failed_at"),
            "expired_at": times.get("expired_at"),
            "cancelling_at": times.get("cancelling_at"),
            "cancelled_at": times.get("cancelled_at"),
            "request_counts": {
                "total": total,
                "completed": batch.completed,
                "failed": batch.failed,
            },
            "usage": {
                "input_tokens": batch.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": batch.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": batch.input_tokens + batch.output_tokens,
            },
            "metadata": batch.metadata,
        }


def _page(
    ids: list[str], request: web.Request, *, default_limit: int, max_limit: int
) -> tuple[list[str], bool] | web.Response:
    """One page of a cursor list (``after``, ``limit``), and whether more follow."""
    try:
        limit = int(request.query.get("limit", default_limit))
    except ValueError:
        limit = 0
    if not 1 <= limit <= max_limit:
        return _error(400, f"'limit' must be between 1 and {max_limit}.", None, "limit")
    start = 0
    after = request.query.get("after")
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(ids)
    return ids[start : start + limit], start + limit < len(ids)


def _list_payload(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }
