"""How a batch is sent to OpenAI's Batch API (and every server that copies
it): upload a file through the Files API, create a batch from it, poll it,
cancel it, download its output and error files.

This module knows nothing about rows or results (``batch_route`` does): it
moves files and reads batch objects. HTTP failures are translated here, at
the boundary, into enrich's own errors: transient ones (429, 5xx, timeouts,
dropped connections, as ``classify`` decides for the online route) are
retried with backoff and end in ``APIUnreachable``; the rest are
``FatalAPIError`` naming the fix; a full enqueued-token queue is
``QueueFull``. A second provider (Anthropic's Message Batches) is one more
module with the same methods.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from pipeline.classify import classify
from pipeline.errors import APIUnreachable, FatalAPIError
from pipeline.redact import redact
from pipeline.transport import resolve_base_url
from pipeline.transport_errors import APIConnectionFailed, APIStatus, APITimeout, lowered_headers

if TYPE_CHECKING:
    import aiohttp

    from pipeline.config import ModelConfig

# Codes with which a provider says its queue of enqueued batch tokens is full:
# wait for running batches to finish, then submit the next file.
QUEUE_FULL_CODES: Final = frozenset({"token_limit_exceeded", "batch_token_limit_exceeded"})

# A management call (upload, create, poll) gets this long in all.
CALL_TIMEOUT_S: Final = 600.0

TERMINAL: Final = frozenset({"completed", "failed", "expired", "cancelled"})


class QueueFull(Exception):
    """The provider's enqueued-token limit is reached: not an error, a wait."""


@dataclass(frozen=True)
class BatchInfo:
    """What a provider says about one batch."""

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completed: int = 0
    failed: int = 0
    total: int = 0
    errors: tuple[tuple[str, str], ...] = ()
    """(code, message) of a batch that failed validation."""
    created_at: float | None = None
    finished_at: float | None = None
    """When it completed, expired, was cancelled or failed (Unix seconds)."""

    @property
    def turnaround_ms(self) -> float | None:
        if self.created_at is None or self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.created_at) * 1000.0)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @property
    def queue_full(self) -> bool:
        return any(code in QUEUE_FULL_CODES for code, _ in self.errors)

    def reason(self) -> str:
        if not self.errors:
            return self.status
        return "; ".join(f"{code}: {message}" if code else message for code, message in self.errors)

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> BatchInfo:
        counts = body.get("request_counts") or {}
        errors = (body.get("errors") or {}).get("data") or []
        return cls(
            id=str(body["id"]),
            status=str(body.get("status")),
            input_file_id=body.get("input_file_id"),
            output_file_id=body.get("output_file_id"),
            error_file_id=body.get("error_file_id"),
            completed=int(counts.get("completed") or 0),
            failed=int(counts.get("failed") or 0),
            total=int(counts.get("total") or 0),
            errors=tuple((str(e.get("code") or ""), str(e.get("message") or "")) for e in errors),
            created_at=_seconds(body.get("created_at")),
            finished_at=next(
                (_seconds(body.get(f"{s}_at")) for s in _FINISHED if body.get(f"{s}_at")), None
            ),
        )


_FINISHED: Final = ("completed", "expired", "cancelled", "failed")


def _seconds(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


class BatchClient(Protocol):
    """A provider's batch API, as the batch route uses it."""

    async def upload(self, name: str, data: bytes) -> str: ...
    async def create(self, file_id: str) -> BatchInfo: ...
    async def find(self, file_id: str) -> BatchInfo | None: ...
    async def get(self, batch_id: str) -> BatchInfo: ...
    async def cancel(self, batch_id: str) -> BatchInfo: ...
    async def download(self, file_id: str) -> bytes: ...
    async def aclose(self) -> None: ...


class OpenAIBatchClient:
    """The Files and Batches endpoints under the run's base URL."""

    def __init__(
        self,
        model: ModelConfig,
        api_key: str,
        *,
        attempts: int = 6,
        backoff_s: float = 0.5,
        backoff_max_s: float = 60.0,
    ) -> None:
        self._base = resolve_base_url(model).rstrip("/")
        self._model = model.name
        self._key = api_key
        self._attempts = attempts
        self._backoff = (backoff_s, backoff_max_s)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._key}"},
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            )
        return self._session

    async def upload(self, name: str, data: bytes) -> str:
        import aiohttp

        def form() -> aiohttp.FormData:
            # Built per attempt: a FormData is consumed by the request.
            fields = aiohttp.FormData()
            fields.add_field("purpose", "batch")
            fields.add_field(
                "file", data, filename=f"{name}.jsonl", content_type="application/jsonl"
            )
            return fields

        body = await self._call("POST", "/files", form=form)
        return str(body["id"])

    async def create(self, file_id: str) -> BatchInfo:
        payload = {
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        return BatchInfo.parse(await self._call("POST", "/batches", json=payload))

    async def find(self, file_id: str) -> BatchInfo | None:
        """The batch made from ``file_id``, if any: what a run killed while
        creating it looks for before creating another."""
        after: str | None = None
        while True:
            query = {"limit": "100", **({"after": after} if after else {})}
            page = await self._call("GET", "/batches", params=query)
            for item in page.get("data") or []:
                # A failed batch ran nothing (e.g. the queue was full): not it.
                if item.get("input_file_id") == file_id and item.get("status") != "failed":
                    return BatchInfo.parse(item)
            if not page.get("has_more") or not page.get("data"):
                return None
            after = str(page["data"][-1]["id"])

    async def get(self, batch_id: str) -> BatchInfo:
        return BatchInfo.parse(await self._call("GET", f"/batches/{batch_id}"))

    async def cancel(self, batch_id: str) -> BatchInfo:
        return BatchInfo.parse(await self._call("POST", f"/batches/{batch_id}/cancel"))

    async def download(self, file_id: str) -> bytes:
        body = await self._call("GET", f"/files/{file_id}/content", raw=True)
        assert isinstance(body, bytes)
        return body

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _call(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        """One management call, retried while its failures are transient."""
        form = kwargs.pop("form", None)
        for attempt in range(1, self._attempts + 1):
            try:
                if form is not None:
                    kwargs["data"] = form()
                return await self._once(method, path, raw=raw, **kwargs)
            except (APIStatus, APIConnectionFailed, APITimeout) as exc:
                failure = classify(exc, model=self._model)
                if isinstance(exc, APIStatus) and {exc.code, exc.type} & QUEUE_FULL_CODES:
                    raise QueueFull(exc.message) from None
                if failure.kind != "retry":
                    raise self._fatal(method, path, exc, failure.reason) from None
                if attempt == self._attempts:
                    raise APIUnreachable(
                        f"the batch API at {self._base} kept failing ({failure.reason}); "
                        "nothing is lost: rerun the same command once it answers"
                    ) from None
                base, most = self._backoff
                delay = min(most, base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                await asyncio.sleep(max(delay, failure.retry_after or 0.0))
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, *, raw: bool, **kwargs: Any) -> Any:
        import aiohttp

        try:
            async with self._open().request(method, self._base + path, **kwargs) as response:
                body = await response.read()
                if not 200 <= response.status < 300:
                    headers = lowered_headers(response.headers.items())
                    raise APIStatus.from_response(response.status, body, headers)
        except TimeoutError:
            raise APITimeout("batch API call timed out") from None
        except (aiohttp.ClientError, OSError) as exc:
            # Not chained: aiohttp errors carry the request headers, and so the key.
            raise APIConnectionFailed(
                redact(f"Connection error: {type(exc).__name__}", [self._key])
            ) from None
        if raw:
            return body
        import json

        try:
            return json.loads(body)
        except ValueError:
            raise APIConnectionFailed(
                "the batch API answered with a body that is not JSON"
            ) from None

    def _fatal(self, method: str, path: str, exc: BaseException, reason: str) -> FatalAPIError:
        if isinstance(exc, APIStatus) and exc.status_code in (404, 405):
            return FatalAPIError(
                f"the server at {self._base} has no Batch API ({method} {path} answered "
                f"{exc.status_code}); send this job with --route online"
            )
        return FatalAPIError(
            f"the batch API refused {method} {path}: {redact(reason, [self._key])}"
        )
