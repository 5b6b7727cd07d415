"""The async LLM stage: rows in, results out, under limits and retries.

Self-contained on purpose: it takes its settings and an async stream of
requests and yields one ``RowResult`` per request. It knows nothing about the
CLI, files or checkpoints, so the runner, an Airflow task or a Ray actor can
drive it the same way. *How* a request is sent lives in a ``Transport``; *what*
a row's result is lives in ``pipeline.results``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import random
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from pipeline.classify import Failure, classify
from pipeline.errors import FatalAPIError
from pipeline.events import NullEventSink, ThrottledWarning
from pipeline.outage import Attempt, OutageGate
from pipeline.prompt import DEFAULT_COMPLETION_ESTIMATE, estimate_prompt_tokens
from pipeline.ratelimit import Permit, RateLimiter
from pipeline.results import RowResult
from pipeline.stall import Patience, StallTimeout

if TYPE_CHECKING:
    from pipeline.config import LimitsConfig, ModelConfig
    from pipeline.events import EventSink
    from pipeline.transport import Completion, Messages, Transport

# What a 429 costs a row against --max-attempts. Being paced is the run's
# business, not the row's: when 429s cluster (a server window that is full
# for everyone), one row can be refused several times in a row while the run
# goes on. A quarter keeps such rows alive for 4x max_attempts 429s, and
# still ends a row that a server refuses forever ("request too large").
RATE_LIMITED_ATTEMPT_COST: Final = 0.25

# A request that timed out is taken for queued (see CallStage._failed) when
# it spent at least this share of its time behind the run's own earlier
# requests; a stuck one is cut while the requests around it come and go.
QUEUED_SHARE: Final = 0.5


@dataclass(frozen=True, slots=True)
class ChatRequest:
    row_id: int
    messages: Messages


class TokenReservation:
    """Tokens to reserve per request in the tokens/min bucket, corrected by
    the usage each answer reports.

    The bucket takes a guess when a request is sent and is settled with the
    real usage a latency later. A guess that is high on average gives back,
    in the next window, tokens the server never counted in this one: the two
    windows together see more than the limit, and the server answers 429. A
    guess low on average does the same the other way round. So the guess
    aims at the mean, not the maximum: the offline prompt estimate scaled by
    how the real prompt counts compared with it (four bytes a token is off
    for other languages and tokenizers), plus the mean of recent completions
    (``DEFAULT_COMPLETION_ESTIMATE`` until a few answers have shown it).

    With ``max_tokens`` set, the completion part is ``max_tokens``: the most a
    request can cost, settled afterwards like any reservation.
    """

    def __init__(self, max_tokens: int | None, *, recent: int = 64, warmup: int = 2) -> None:
        self.max_tokens = max_tokens
        self._warmup = warmup
        self._completions: collections.deque[int] = collections.deque(maxlen=recent)
        # (estimated, reported) prompt tokens of recent answers.
        self._prompts: collections.deque[tuple[int, int]] = collections.deque(maxlen=recent)
        self._estimated_sum = 0
        self._reported_sum = 0

    @property
    def prompt_scale(self) -> float:
        """Reported prompt tokens per estimated one (1.0 until known)."""
        if len(self._prompts) < self._warmup or self._estimated_sum <= 0:
            return 1.0
        # Bounded: a few odd answers must not swing reservations wildly.
        return min(4.0, max(0.25, self._reported_sum / self._estimated_sum))

    def completion(self) -> int:
        if self.max_tokens:
            return self.max_tokens
        if len(self._completions) < self._warmup:
            return DEFAULT_COMPLETION_ESTIMATE
        return max(1, round(sum(self._completions) / len(self._completions)))

    def reserve(self, prompt_estimate: int) -> int:
        return max(1, round(prompt_estimate * self.prompt_scale)) + self.completion()

    def observe(
        self, prompt_estimate: int, prompt_tokens: int | None, completion_tokens: int | None
    ) -> None:
        if completion_tokens is not None and completion_tokens >= 0:
            self._completions.append(completion_tokens)
        if prompt_tokens is not None and prompt_tokens > 0 and prompt_estimate > 0:
            if len(self._prompts) == self._prompts.maxlen:
                old_estimate, old_reported = self._prompts[0]
                self._estimated_sum -= old_estimate
                self._reported_sum -= old_reported
            self._prompts.append((prompt_estimate, prompt_tokens))
            self._estimated_sum += prompt_estimate
            self._reported_sum += prompt_tokens


@dataclass(frozen=True)
class CallStats:
    """What the stage did and what its limiter settled on, read once when
    wanted (the run's summary and report), never copied per attempt."""

    requests: int = 0
    retries: int = 0
    # Answers that failed the structured-output check (each was a paid request).
    bad_answers: int = 0
    # Attempts answered 429 (rate limits, not the fatal quota 429s).
    rate_limited: int = 0
    # What the limiter settled on: the in-flight limit AIMD reached (the
    # configured concurrency when not adaptive), the limits the server
    # reported in x-ratelimit-* headers (None if it sent none), the
    # requests/min learned from 429s when it reported none, and the time the
    # whole run spent paused by retry-after.
    concurrency_limit: float = 0.0
    learned_rpm: int | None = None
    learned_tpm: int | None = None
    estimated_rpm: float | None = None
    paused_s: float = 0.0
    # Outages (see pipeline.outage): how many, and how long they held the run.
    outages: int = 0
    outage_s: float = 0.0
    # Requests cut because no byte came for the stall timeout (each retried,
    # each counted in `requests`); the stall timeout the run ended with, and
    # whether answers were streamed (None: no answer yet).
    stalled: int = 0
    stall_timeout_s: float | None = None
    streamed: bool | None = None
    # Requests given up on (stall or total timeout; a server may compute them
    # all the same), and of those, the ones that timed out queued behind the
    # run's own requests: charged to the concurrency, not to the row.
    abandoned: int = 0
    saturated: int = 0
    # Why the in-flight limit is where it is (see pipeline.concurrency).
    concurrency_reason: str | None = None
    # Over the answers: seconds to the first bytes, and, where the server
    # said its own time (llama.cpp's timings), that time and the rest of
    # the latency (waiting: queue and network), summed, with their counts.
    first_byte_s_sum: float = 0.0
    first_byte_count: int = 0
    server_s_sum: float = 0.0
    waiting_s_sum: float = 0.0
    server_count: int = 0

    def server_report(self) -> dict[str, Any]:
        """What the server did, for the run report: the in-flight limit the
        run settled at and why, the requests given up on, and where the
        latency went (means, in seconds; None where unknown)."""

        def mean(total: float, count: int) -> float | None:
            return round(total / count, 4) if count else None

        return {
            "concurrency": round(self.concurrency_limit, 2),
            "concurrency_reason": self.concurrency_reason,
            "abandoned": self.abandoned,
            "saturated_timeouts": self.saturated,
            "first_byte_s_mean": mean(self.first_byte_s_sum, self.first_byte_count),
            "server_s_mean": mean(self.server_s_sum, self.server_count),
            "waiting_s_mean": mean(self.waiting_s_sum, self.server_count),
            "answers_with_server_timings": self.server_count,
        }


@dataclass(slots=True)
class _Counts:
    """The stage's own counters, bumped as attempts happen."""

    requests: int = 0
    retries: int = 0
    bad_answers: int = 0
    rate_limited: int = 0
    stalled: int = 0
    abandoned: int = 0
    saturated: int = 0
    first_byte_s_sum: float = 0.0
    first_byte_count: int = 0
    server_s_sum: float = 0.0
    waiting_s_sum: float = 0.0
    server_count: int = 0


@dataclass(slots=True)
class _Row:
    """One row's attempts so far."""

    request: ChatRequest
    prompt_tokens: int
    attempt: int = 0
    spent: float = 0.0  # attempts used up: a 429 counts RATE_LIMITED_ATTEMPT_COST
    bad_answers: int = 0
    stalls: int = 0  # requests cut as stalled: each doubles the next one's patience


class CallStage:
    """Sends requests concurrently under limits, retrying what is transient.

    A run-level failure (bad key, unknown model, no quota, every answer a
    429 for longer than ``limits.max_refusal_s``) raises ``FatalAPIError``
    out of ``results()`` after every finished result has been yielded, so
    nothing already paid for is dropped. An outage (the API
    failing transiently across rows) holds every worker while one probe at a
    time tests the API (see ``pipeline.outage``); one longer than
    ``limits.max_outage_s`` raises ``APIUnreachable`` the same way.
    ``events`` hears when an outage starts and ends.

    ``limits.concurrency`` is the number of workers and the ceiling of the
    in-flight limit; with ``limits.adaptive`` the limiter learns the server's
    limits and moves the in-flight limit below that ceiling by AIMD.
    """

    def __init__(
        self,
        model: ModelConfig,
        limits: LimitsConfig,
        transport: Transport,
        *,
        rng: random.Random | None = None,
        check_answer: Callable[[Completion], str | None] | None = None,
        answer_attempts: int = 1,
        events: EventSink | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self._model = model
        self._limits = limits
        self._transport = transport
        # Structured output: says what is wrong with an answer (None: fine).
        # Such an answer is asked again up to answer_attempts answers in all,
        # through the limiter like any request.
        self._check_answer = check_answer
        self._answer_attempts = answer_attempts
        # A limiter given (a worker's share of a cluster's limit, see
        # pipeline.lease) replaces the one made from the limits.
        self.limiter = limiter or RateLimiter(
            limits.rpm,
            limits.tpm,
            concurrency=limits.concurrency,
            adaptive=limits.adaptive,
            latency=True,
            # A concurrency the user gave is where the run starts; the
            # default is only a ceiling, and the latency limit probes up to it.
            start_at_ceiling="concurrency" in limits.fields_set,
        )
        self._reservation = TokenReservation(model.max_tokens)
        # How long a request may go without a byte (see pipeline.stall).
        self.stall = StallTimeout(model.stall_timeout_s, model.timeout_s)
        self._events = events
        self.events: EventSink = events or NullEventSink()
        # What the run waits for, said at most every 30 s: a pause of an hour
        # or a minute of retries must not look like a hung process.
        self._paused_warning = ThrottledWarning(self.events, "rate_limit_pause")
        self._retry_warning = ThrottledWarning(self.events, "retrying")
        self._backing_off = 0
        self._said_not_streaming = False
        self._rng = rng or random.Random()
        self.outage = OutageGate(limits.max_outage_s, events=events, rng=self._rng)
        self._counts = _Counts()
        self.draining = False
        self._stop_feeding: Callable[[], None] | None = None
        # When the current run of 429s began (None: the last answer was not one).
        self._refused_since: float | None = None

    @property
    def stats(self) -> CallStats:
        limiter, counts = self.limiter, self._counts
        return CallStats(
            requests=counts.requests,
            retries=counts.retries,
            bad_answers=counts.bad_answers,
            rate_limited=counts.rate_limited,
            concurrency_limit=limiter.gate.effective,
            learned_rpm=limiter.learned_rpm,
            learned_tpm=limiter.learned_tpm,
            estimated_rpm=limiter.estimated_rpm,
            paused_s=limiter.stats.paused_s,
            outages=self.outage.outages,
            outage_s=self.outage.outage_s,
            stalled=self._counts.stalled,
            stall_timeout_s=self.stall.value() if self._counts.requests else None,
            streamed=self.stall.streamed,
            abandoned=counts.abandoned,
            saturated=counts.saturated,
            concurrency_reason=self._concurrency_reason(),
            first_byte_s_sum=counts.first_byte_s_sum,
            first_byte_count=counts.first_byte_count,
            server_s_sum=counts.server_s_sum,
            waiting_s_sum=counts.waiting_s_sum,
            server_count=counts.server_count,
        )

    def _concurrency_reason(self) -> str:
        limiter = self.limiter
        if limiter.latency is not None and limiter.gate.cap <= limiter.gate.limit:
            return limiter.latency.reason
        if limiter.stats.decreases:
            return f"429s (rate limited) cut it {limiter.stats.decreases} times"
        return "the configured concurrency"

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
        row = _Row(request, estimate_prompt_tokens(request.messages))
        while True:
            row.attempt += 1
            outcome = await self._attempt(row)
            if isinstance(outcome, RowResult):
                return outcome
            if outcome is None:
                continue  # a bad structured answer, asked again
            result = await self._after_failure(row, outcome)
            if result is not None:
                return result

    async def _attempt(self, row: _Row) -> RowResult | Failure | None:
        """One request: its result, its failure, or None for an answer that
        failed the structured-output check and is to be asked again."""
        reserve = functools.partial(self._reservation.reserve, row.prompt_tokens)
        # The outage gate first: a worker held by an outage must not hold
        # a place in flight or a token reservation while it waits.
        async with self.outage.attempt() as passage, self.limiter.request(reserve) as permit:
            self._counts.requests += 1
            # The loop's clock, as the transport's times are (first token...).
            started = self._loop_time()
            try:
                # A function: a request sent before the stall timeout is
                # learned (or while it falls) gets the current one; and the
                # time it waits behind the run's own requests counts against
                # neither timeout.
                completion = await self._transport.complete(
                    row.request.messages, stall_s=self._stall_limit(permit, row.stalls)
                )
            except Exception as exc:
                return self._failed(row, exc, passage, permit)
            self.outage.answered(passage)
            self._refused_since = None
            used = None
            if completion.prompt_tokens is not None:
                used = completion.prompt_tokens + (completion.completion_tokens or 0)
            self.limiter.succeeded(
                permit,
                used,
                completion.headers,
                server_s=completion.server_s,
                generation_s=completion.token_span_s,
                completion_tokens=completion.completion_tokens,
            )
            self._observe_timings(completion, self._loop_time() - permit.sent_at)
            self._reservation.observe(
                row.prompt_tokens, completion.prompt_tokens, completion.completion_tokens
            )
            self._observe_silence(completion)
            problem = self._check_answer(completion) if self._check_answer else None
            if problem is not None:
                row.bad_answers += 1
                self._counts.bad_answers += 1
                if row.bad_answers < self._answer_attempts:
                    return None
            return _answered(row, completion, problem, (self._loop_time() - started) * 1000.0)

    def _failed(self, row: _Row, exc: Exception, passage: Attempt, permit: Permit) -> Failure:
        failure = classify(exc, model=self._model.name)
        saturated = self._queued_out(failure, permit)
        if saturated:
            # Queued, not stuck: fewer in flight is the cure. The server is
            # up, and the row is not at fault.
            self._counts.saturated += 1
            self.limiter.saturated(permit)
            failure = replace(failure, saturated=True)
        elif failure.stalled:
            row.stalls += 1
            self._counts.stalled += 1
            # Whatever was sent after it waited for nothing.
            permit.stuck = True
        if saturated:
            self.outage.answered(passage)
        elif failure.kind == "retry" and not failure.rate_limited:
            if self.outage.failed(passage, row.request.row_id, failure.reason):
                failure = replace(failure, run_failure=True)
        else:
            # A 429 or a 4xx: whatever it says, the server is up.
            self.outage.answered(passage)
        if failure.rate_limited:
            self._counts.rate_limited += 1
            # Without a retry-after the run still pauses, for as long as this
            # row's own backoff would have been.
            pause = failure.retry_after
            if pause is None:
                pause = self.backoff_delay(row.attempt, None)
            self.limiter.rate_limited(
                permit,
                pause,
                failure.headers,
                failure.limit,
                retry_after=failure.retry_after is not None,
            )
            # A 429 to a probe (sent alone to test whether a window with no
            # retry-after has room) is the run's business: it costs the row nothing.
            failure = replace(
                self._check_refusal(self._check_pause(failure, pause)), probe=permit.probe
            )
            if failure.kind == "retry":
                self._say_paused(pause, failure.reason)
        elif failure.kind == "row":
            # The server took the request (and refused its content).
            self._refused_since = None
        return failure

    def _queued_out(self, failure: Failure, permit: Permit) -> bool:
        """A request given up on (stall or timeout) that spent most of its
        wait behind the run's own earlier requests: queued, not stuck."""
        if not (failure.stalled or failure.timed_out):
            return False
        self._counts.abandoned += 1
        waited = self._loop_time() - permit.sent_at
        return self.limiter.behind_s(permit) >= QUEUED_SHARE * waited

    @staticmethod
    def _loop_time() -> float:
        return asyncio.get_running_loop().time()

    def _stall_limit(self, permit: Permit, stalls: int) -> Patience:
        return Patience(
            functools.partial(self.stall.for_attempt, stalls),
            functools.partial(self.limiter.behind_s, permit),
            functools.partial(self.limiter.head_s, permit),
        )

    def _observe_timings(self, completion: Completion, latency_s: float) -> None:
        counts = self._counts
        if completion.first_byte_s is not None:
            counts.first_byte_s_sum += completion.first_byte_s
            counts.first_byte_count += 1
        if completion.server_s is not None:
            counts.server_s_sum += completion.server_s
            counts.waiting_s_sum += max(0.0, latency_s - completion.server_s)
            counts.server_count += 1

    async def _after_failure(self, row: _Row, failure: Failure) -> RowResult | None:
        """The row's error when it is out of attempts (or its failure is its
        own), else None once it may go again."""
        if failure.kind == "fatal":
            raise FatalAPIError(failure.reason)
        if failure.saturated:
            # Its place stays taken while the server computes what was
            # abandoned (see RateLimiter.saturated): no backoff, no cost.
            self._counts.retries += 1
            return None
        if failure.run_failure:
            # The API is down for everyone: being unable to reach it is the
            # run's business, not the row's (the reasoning of the 429 quarter
            # attempt). The gate decides when the row goes again.
            self._counts.retries += 1
            return None
        if not (failure.rate_limited and failure.probe):
            row.spent += RATE_LIMITED_ATTEMPT_COST if failure.rate_limited else 1.0
        if failure.kind == "row" or row.spent >= self._limits.max_attempts - 1e-9:
            reason = failure.reason
            if failure.kind == "retry":
                reason = f"{reason} (gave up after {row.attempt} attempts; raise --max-attempts)"
            return RowResult(
                row_id=row.request.row_id,
                status="error",
                error=reason,
                attempts=row.attempt,
                # Worth sending again on a later run (not the row's fault).
                transient=failure.kind == "retry",
            )
        self._counts.retries += 1
        if not failure.rate_limited:
            # A 429 already paused the whole run, this row included.
            delay = self.backoff_delay(row.attempt, failure.retry_after)
            self._backing_off += 1
            try:
                self._say_retrying(delay, failure.reason)
                await asyncio.sleep(delay)
            finally:
                self._backing_off -= 1
        return None

    def _say_paused(self, pause_s: float, reason: str) -> None:
        until = datetime.now(UTC) + timedelta(seconds=pause_s)
        shown = until.isoformat(timespec="seconds").replace("+00:00", "Z")
        self._paused_warning.hit(
            f"paused until {shown} ({pause_s:,.1f} s) by a 429 from the API: no request is "
            f"sent meanwhile ({reason})",
            waiting=f"paused by a 429 until {until:%H:%M:%S} UTC",
            paused_until=shown,
            pause_s=round(pause_s, 3),
        )

    def _say_retrying(self, delay_s: float, reason: str) -> None:
        rows = self._backing_off
        self._retry_warning.hit(
            f"retrying {rows:,} row{'s' if rows != 1 else ''} after transient failures "
            f"(last: {reason}); next attempt in {delay_s:,.1f} s",
            waiting=f"retrying {rows:,} row{'s' if rows != 1 else ''} ({_short(reason)})",
            rows=rows,
            delay_s=round(delay_s, 3),
            last_error=reason,
        )

    def _observe_silence(self, completion: Completion) -> None:
        self.stall.observe(completion.silence_s, streamed=completion.streamed)
        if completion.streamed or self._said_not_streaming:
            return
        # The transport says why it stopped streaming (a fake transport never does).
        reason = getattr(self._transport, "stream_fallback", None)
        if reason is not None and self._events is not None:
            self._said_not_streaming = True
            self._events.emit(
                "warning",
                level="warning",
                kind="no_streaming",
                message=f"answers are not streamed ({reason}): requests go without "
                "streaming for the rest of the run, and a stuck one is cut after a "
                "timeout learned from recent latencies",
            )

    def _check_pause(self, failure: Failure, pause_s: float) -> Failure:
        """A pause longer than ``limits.max_pause_s`` (a daily limit, say) ends
        the run instead: a scheduled job should not sit on its lock for hours."""
        max_pause = self._limits.max_pause_s
        if max_pause is None or pause_s <= max_pause:
            return failure
        return Failure(
            "fatal",
            f"the API asks to wait {pause_s:,.0f} s before more requests (429 retry-after), "
            f"more than --max-pause {max_pause:g} s; rerun later to resume from the "
            "checkpoint, or raise --max-pause",
        )

    def _check_refusal(self, failure: Failure) -> Failure:
        """Every answer a 429 for longer than ``limits.max_refusal_s`` (a quota
        exhausted without saying so, a key with no limit left) ends the run
        instead of grinding through retries. Counted from the first 429 since
        the last request the server admitted, and checked when a 429 comes:
        a long retry-after is waited out, and the answer after it decides."""
        if failure.kind == "fatal":
            return failure
        now = asyncio.get_running_loop().time()
        if self._refused_since is None:
            self._refused_since = now
            return failure
        max_refusal = self._limits.max_refusal_s
        refused_for = now - self._refused_since
        if refused_for <= max_refusal:
            return failure
        return Failure(
            "fatal",
            f"the API has answered every request with 429 (rate limited) for "
            f"{refused_for:,.0f} s, longer than --max-refusal {max_refusal:g} s: a sustained "
            "refusal, as when the account's quota or the key's limit is used up; the "
            "checkpoint is kept: rerun later to resume, check the account's quota and "
            "limits, or raise --max-refusal",
        )

    async def results(
        self, requests: AsyncIterable[ChatRequest]
    ) -> AsyncGenerator[RowResult, None]:
        """Results in completion order, with at most ``concurrency`` requests in flight."""
        crew = _Crew(self, requests)
        self._stop_feeding = crew.stop_feeding
        if self.draining:
            crew.stop_feeding()
        failure: BaseException | None = None
        try:
            while crew.finished < crew.size:
                item = await crew.done.get()
                if item is None:
                    crew.finished += 1
                elif isinstance(item, BaseException):
                    failure = failure or item
                    # Stop sending; results already in the queue are still yielded.
                    crew.stop_sending()
                else:
                    yield item
            if self.limiter.latency is not None:
                self.limiter.latency.finish()
        finally:
            self._stop_feeding = None
            await crew.close()
            self.outage.close()
        if failure is not None:
            raise failure


class _Crew:
    """The tasks behind ``CallStage.results``: a feeder filling a queue of
    at most ``concurrency`` requests, that many workers, and a watcher that
    ends the run when an outage outlasts its bound. Results, exceptions and
    each worker's end (None) arrive on ``done``."""

    def __init__(self, stage: CallStage, requests: AsyncIterable[ChatRequest]) -> None:
        self.size = stage._limits.concurrency
        self.finished = 0
        self.todo: asyncio.Queue[ChatRequest | None] = asyncio.Queue(maxsize=self.size)
        self.done: asyncio.Queue[RowResult | BaseException | None] = asyncio.Queue()
        self._stage = stage
        self.feeder = asyncio.create_task(self._feed(requests))
        self.workers = [asyncio.create_task(self._work()) for _ in range(self.size)]
        self.watcher = asyncio.create_task(self._watch_outage())

    async def _feed(self, requests: AsyncIterable[ChatRequest]) -> None:
        try:
            async for request in requests:
                await self.todo.put(request)
        except Exception as exc:
            # The consumer sees it and cancels the workers.
            await self.done.put(exc)
            return
        for _ in range(self.size):
            await self.todo.put(None)

    async def _watch_outage(self) -> None:
        # Workers waiting on the gate fail by themselves at the bound; this
        # also stops a run whose only request in flight is a hanging probe.
        await self.done.put(await self._stage.outage.unreachable())

    async def _work(self) -> None:
        try:
            while (request := await self.todo.get()) is not None:
                await self.done.put(await self._stage.call(request))
        except Exception as exc:
            await self.done.put(exc)
        finally:
            await self.done.put(None)

    def stop_feeding(self) -> None:
        """Drain: no new request; the workers finish what they hold."""
        self.feeder.cancel()
        while not self.todo.empty():
            self.todo.get_nowait()
        for _ in range(self.size):
            self.todo.put_nowait(None)

    def stop_sending(self) -> None:
        self.feeder.cancel()
        for worker in self.workers:
            worker.cancel()

    async def close(self) -> None:
        self.feeder.cancel()
        self.watcher.cancel()
        for worker in self.workers:
            worker.cancel()
        await asyncio.gather(self.feeder, self.watcher, *self.workers, return_exceptions=True)


def _answered(
    row: _Row, completion: Completion, problem: str | None, latency_ms: float
) -> RowResult:
    """The row's result from an answer (``problem``: it failed the
    structured-output check as often as allowed)."""
    return RowResult(
        row_id=row.request.row_id,
        status="ok" if problem is None else "error",
        error=None
        if problem is None
        else f"invalid structured answer: {problem} (gave up after "
        f"{row.bad_answers} answers; raise --schema-attempts)",
        response=completion.text,
        latency_ms=latency_ms,
        attempts=row.attempt,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason,
        model=completion.model,
        first_token_ms=_ms(completion.first_token_s),
        generation_ms=_ms(completion.generation_s),
        server_ms=_ms(completion.server_s),
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _short(reason: str) -> str:
    # A progress bar's description has room for the gist only.
    return reason if len(reason) <= 40 else reason[:39] + "…"
