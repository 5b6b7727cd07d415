"""The async LLM stage: rows in, results out, under limits and retries.

Self-contained on purpose: it takes its settings and an async stream of
requests and yields one ``RowResult`` per request. It knows nothing about the
CLI, files or checkpoints, so the runner, an Airflow task or a Ray actor can
drive it the same way. *How* a request is sent lives in a ``Transport``; *what*
a row's result is lives in ``pipeline.results``.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import openai

from pipeline.config import LimitsConfig, ModelConfig
from pipeline.errors import FatalAPIError
from pipeline.ratelimit import RateLimiter
from pipeline.results import RowResult
from pipeline.transport import Messages, Transport, UnparseableResponse

# Completion budget assumed when max_tokens is unset, for the tokens/min bucket.
DEFAULT_COMPLETION_ESTIMATE = 256


@dataclass(frozen=True, slots=True)
class ChatRequest:
    row_id: int
    messages: Messages


FailureKind = Literal["retry", "row", "fatal"]


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    reason: str
    retry_after: float | None = None
    rate_limited: bool = False


def _retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _server_message(exc: openai.APIStatusError, limit: int = 160) -> str:
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    text = str(message or exc.message or "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify(exc: BaseException, *, model: str) -> Failure:
    """Decide what a failed attempt means: retry it, fail the row, or stop the run."""
    if isinstance(exc, openai.APITimeoutError):
        return Failure("retry", "request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return Failure("retry", "connection error")
    if isinstance(exc, UnparseableResponse):
        return Failure("retry", str(exc))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        code = getattr(exc, "code", None)
        if status == 429:
            if code == "insufficient_quota":
                return Failure(
                    "fatal",
                    "the API says the quota is exhausted (429 insufficient_quota); "
                    "add credit to the account or use another key",
                )
            return Failure(
                "retry",
                f"rate limited (429): {_server_message(exc)}",
                retry_after=_retry_after_seconds(exc.response.headers),
                rate_limited=True,
            )
        if status in (401, 403):
            # The server's text may echo part of the key: never repeat it.
            return Failure(
                "fatal",
                f"the API rejected the credentials ({status}); set a valid key in "
                "$OPENAI_API_KEY or the variable named by --api-key-env",
            )
        if status == 404:
            return Failure(
                "fatal",
                f"the API answered 404 for model '{model}': {_server_message(exc)}; "
                "check --model and --base-url",
            )
        if status in (408, 409) or status >= 500:
            return Failure(
                "retry",
                f"server error ({status}): {_server_message(exc)}",
                retry_after=_retry_after_seconds(exc.response.headers),
            )
        return Failure("row", f"request rejected ({status}): {_server_message(exc)}")
    if isinstance(exc, openai.APIResponseValidationError):
        return Failure("retry", "unparseable response body")
    raise exc


def estimate_tokens(messages: Messages, max_tokens: int | None) -> int:
    """A cheap offline estimate (about 4 bytes a token, plus per-message
    overhead). Tokenizer downloads are not possible offline, and the budget is
    a rate, not an invoice, so a close estimate is enough."""
    prompt = sum(len(message.get("content") or "") // 4 + 4 for message in messages) + 3
    return prompt + (max_tokens or DEFAULT_COMPLETION_ESTIMATE)


@dataclass
class CallStats:
    """Counters for the summary and the report."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0


class CallStage:
    """Sends requests concurrently under limits, retrying what is transient.

    A run-level failure (bad key, unknown model, no quota) raises
    ``FatalAPIError`` out of ``results()`` after every finished result has
    been yielded, so nothing already paid for is dropped.
    """

    def __init__(
        self,
        model: ModelConfig,
        limits: LimitsConfig,
        transport: Transport,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self._model = model
        self._limits = limits
        self._transport = transport
        self._limiter = RateLimiter(limits.rpm, limits.tpm)
        self._rng = rng or random.Random()
        self.stats = CallStats()
        self.draining = False
        self._stop_feeding: Callable[[], None] | None = None

    def drain(self) -> None:
        """Send no new request; those in flight finish and are still yielded
        (they are paid for). ``results()`` then ends normally."""
        self.draining = True
        if self._stop_feeding is not None:
            self._stop_feeding()

    def backoff_delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter; a server's retry-after wins when
        longer, even beyond backoff_max_s (a long pause, not a failure)."""
        ceiling = min(
            self._limits.backoff_max_s, self._limits.backoff_base_s * 2.0 ** (attempt - 1)
        )
        delay = ceiling * (0.5 + 0.5 * self._rng.random())
        return max(delay, retry_after or 0.0)

    async def call(self, request: ChatRequest) -> RowResult:
        """One row, retried until it succeeds, fails for good, or runs out of attempts."""
        tokens = estimate_tokens(request.messages, self._model.max_tokens)
        attempt = 0
        while True:
            attempt += 1
            await self._limiter.acquire(tokens)
            self.stats.requests += 1
            started = time.perf_counter()
            try:
                completion = await self._transport.complete(request.messages)
            except Exception as exc:
                failure = classify(exc, model=self._model.name)
            else:
                return RowResult(
                    row_id=request.row_id,
                    status="ok",
                    response=completion.text,
                    latency_ms=(time.perf_counter() - started) * 1000.0,
                    attempts=attempt,
                    prompt_tokens=completion.prompt_tokens,
                    completion_tokens=completion.completion_tokens,
                    finish_reason=completion.finish_reason,
                    model=completion.model,
                )
            if failure.kind == "fatal":
                raise FatalAPIError(failure.reason)
            if failure.kind == "row" or attempt >= self._limits.max_attempts:
                reason = failure.reason
                if failure.kind == "retry":
                    reason = f"{reason} (gave up after {attempt} attempts; raise --max-attempts)"
                return RowResult(
                    row_id=request.row_id, status="error", error=reason, attempts=attempt
                )
            self.stats.retries += 1
            if failure.rate_limited:
                self.stats.rate_limited += 1
                self._limiter.pause_for(failure.retry_after or self.backoff_delay(attempt, None))
            await asyncio.sleep(self.backoff_delay(attempt, failure.retry_after))

    async def results(
        self, requests: AsyncIterable[ChatRequest]
    ) -> AsyncGenerator[RowResult, None]:
        """Results in completion order, with at most ``concurrency`` requests in flight."""
        concurrency = self._limits.concurrency
        todo: asyncio.Queue[ChatRequest | None] = asyncio.Queue(maxsize=concurrency)
        done: asyncio.Queue[RowResult | BaseException | None] = asyncio.Queue()

        async def feed() -> None:
            try:
                async for request in requests:
                    await todo.put(request)
            except Exception as exc:
                # The consumer sees it and cancels the workers.
                await done.put(exc)
                return
            for _ in range(concurrency):
                await todo.put(None)

        async def work() -> None:
            try:
                while (request := await todo.get()) is not None:
                    await done.put(await self.call(request))
            except Exception as exc:
                await done.put(exc)
            finally:
                await done.put(None)

        feeder = asyncio.create_task(feed())
        workers = [asyncio.create_task(work()) for _ in range(concurrency)]

        def stop_feeding() -> None:
            feeder.cancel()
            while not todo.empty():
                todo.get_nowait()
            for _ in range(concurrency):
                todo.put_nowait(None)

        self._stop_feeding = stop_feeding
        if self.draining:
            stop_feeding()
        finished = 0
        failure: BaseException | None = None
        try:
            while finished < concurrency:
                item = await done.get()
                if item is None:
                    finished += 1
                elif isinstance(item, BaseException):
                    failure = failure or item
                    # Stop sending; results already in the queue are still yielded.
                    feeder.cancel()
                    for worker in workers:
                        worker.cancel()
                else:
                    yield item
        finally:
            self._stop_feeding = None
            feeder.cancel()
            for worker in workers:
                worker.cancel()
            await asyncio.gather(feeder, *workers, return_exceptions=True)
        if failure is not None:
            raise failure
