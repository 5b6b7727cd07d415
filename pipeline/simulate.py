"""A local OpenAI-compatible chat server with latency, rate limits and faults.

``enrich demo``, rehearsals, the end-to-end tests and the benchmarks all talk to
this server instead of a paid API. Everything it does is reproducible: answers
are a pure function of the request (:func:`expected_answer`), and random faults
come from ``random.Random(seed)``.

Structured output: a request whose ``response_format`` is
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` is
answered with the JSON text of :func:`expected_structured_answer` (one value per
top-level property, derived from the last user message), which satisfies the
schema. With ``SimulatorConfig(structured=False)`` such a request gets the 400
that models without structured outputs give (``param`` ``response_format``).
Other ``response_format`` types (``text``, ``json_object``) are accepted and
change nothing.

Streaming: a request with ``"stream": true`` gets the same answer as
server-sent events of ``chat.completion.chunk`` objects, like OpenAI: a first
chunk with the role, the content in pieces of ``STREAM_CHUNK_CHARS``
characters, a chunk with the finish reason, with ``"stream_options":
{"include_usage": true}`` a last chunk with no choices and the usage, then
``data: [DONE]``. The latency is the time to the first chunk (headers and
first chunk go together); ``chunk_delay_ms`` spaces the chunks, so that a
long answer streams slowly. In a slot (``slots``) the answer streams as it
is generated: the first content chunk a ``latency_ms`` (the prompt's time)
and a ``token_ms`` after the slot was taken, each next chunk (a token) a
``token_ms`` later, as llama.cpp, vLLM and Ollama stream. With
``SimulatorConfig(streaming=False)`` a streaming request gets the 400 that
servers without streaming give (``param`` ``stream``). Directives and
structured output work the same when streaming.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /_stats``
(the :class:`SimulatorStats` as JSON, the batch counters under ``"batch"``), and
OpenAI's Files and Batches endpoints (``/v1/files``, ``/v1/batches``: see
:mod:`pipeline.simulate_batch`, set up by ``SimulatorConfig(batch=...)``).
Anything else answers 404 with an OpenAI-style JSON error.

A completion request goes through these steps, in this order; the first one
that fails answers:

1. auth: with ``api_key`` set, no ``Authorization: Bearer <api_key>`` -> 401
   ``invalid_api_key``;
2. a body that is not a chat request (or ``stream`` with ``streaming=False``)
   -> 400 ``invalid_request_error``;
3. model: with ``models`` set, any other model -> 404 ``model_not_found``;
   then ``response_format`` ``json_schema`` with ``structured=False`` -> 400
   ``invalid_request_error``, ``param`` ``response_format``;
4. ``insufficient_quota`` -> 429 with code ``insufficient_quota`` (no retry-after);
5. per-prompt directives (below);
6. random faults: drop, hang, 5xx, spurious 429, malformed body (a hang with
   ``hang_answers`` goes on to 7 and 8 once it is over);
7. rate limit (``rpm``/``tpm`` per sliding window of ``window_s``; the requests
   limit may change over time, ``rpm_schedule``) -> 429;
8. service: with ``slots`` unset, sleep the latency (``latency_ms`` +/-
   uniform ``jitter_ms``, plus ``token_ms`` per completion token); with
   ``slots`` N, wait in a queue for one of N slots and hold it that long
   (a self-hosted server: llama.cpp, vLLM, Ollama); then the answer, whole or
   streamed. The queue is served in the order requests came
   (``slot_order="fifo"``), or a freed slot goes to any request waiting
   (``"any"``: llama-cpp-python's server guards its model with a thread lock,
   which wakes its waiters in no set order).

The slot model: a request the client abandons (a timeout while queued or
computing) is still computed, as a real server does, and counted:
``computed`` every completion whose service time ran out, ``abandoned`` those
whose client had gone by then (work thrown away), ``queue_wait_s`` the time
requests spent waiting for a slot, ``max_queued`` the longest queue. With
``slots`` set, answers carry llama.cpp's ``timings`` object (``prompt_n``,
``prompt_ms``, ``predicted_n``, ``predicted_ms``: the slot's time, not the
queue's), in the last chunk when streamed; with ``timings="vllm"`` vLLM's
``metrics`` object instead (``time_to_first_token_ms``, ``generation_time_ms``,
``queue_time_ms``: its ``--enable-per-request-metrics``); with
``timings=None`` neither, as llama-cpp-python's server. ``warmup_ms`` makes
the first completion computed that much slower (a model's first request), or
the first ``warmup_answers`` of them (a server slow for a while).

Per-prompt directives make faults deterministic for tests. They are read from
the content of the LAST user message:

``[[fault:400]]``
    always answers 400 ``context_length_exceeded``.
``[[fault:<kind>:<n>]]``, kind one of ``500``, ``429``, ``drop``, ``malformed``,
``hang``, ``stall``, ``cut``, ``interrupt`` (and ``400``)
    the first ``n`` requests carrying exactly this content fail with that fault,
    later ones succeed. Without ``:<n>`` the fault is permanent.
``[[fault:badjson]]``, ``[[fault:badjson:<n>]]``
    a normal 200 completion whose content is ``not json {`` (for the first ``n``
    such answers delivered, or always without ``:<n>``); later ones get the
    normal answer.
``[[fault:invalid]]``, ``[[fault:invalid:<n>]]``
    likewise, but the content is a JSON object that fails the schema: the
    expected structured answer without its first ``required`` property
    (``{}`` without a schema or without ``required``).

``badjson`` and ``invalid`` shape the answer, not the transport: the request
still goes through random faults, the rate limit and the latency like any
other, and its ``n`` counts only answers actually delivered (a request refused
by the rate limit, failed by a random fault or abandoned by its client during
the latency does not use one up). Such answers are billed completions, so they
count in ``answered``, ``tokens`` and ``answered_by_content`` (a row retried
after one is a row paid twice) and NOT in ``faults``; they are also counted in
``bad_answers``.

Faults: ``drop`` closes the connection without a response; ``hang`` holds the
request for ``hang_s`` seconds (or until the server stops), sending nothing at
all, and then drops it, or with ``hang_answers`` answers it normally (a stuck
connection that answers after a while: latency, rate limit and answer as
usual); with ``hang_max_s`` each hang lasts a uniform draw between ``hang_s``
and ``hang_max_s``; ``malformed`` is a 200 whose JSON body is cut short;
``429`` is a spurious ``rate_limit_exceeded`` with retry headers. A streaming
request fails inside the stream instead, after its first chunk: ``drop``
closes the connection, ``malformed`` sends a chunk cut short. ``stall`` (a
directive only) is a hang that starts after the first chunk of a stream (for
a request that does not stream it is a ``hang``); it always drops. ``cut``
(a directive only) ends a stream after its first content chunk with
``[DONE]`` and no finish reason, as llama-cpp-python's server does to a
stream when another request comes (its ``interrupt_requests``); a request
that does not stream is answered as usual (and takes no count).
``interrupt`` (a directive only) is that server's cut as it reaches the
client under uvicorn: the content chunk and ``[DONE]``, then the connection
closed without the end of the body.

Stats: ``requests`` counts every completion request; ``answered`` the 200
completions delivered (bad ones included); ``faults`` drops, hangs, 5xx and
malformed bodies; ``hangs`` the requests held by ``hang`` or ``stall`` (also in
``faults``, and in ``answered`` too when ``hang_answers`` delivers them);
``streamed`` the answers delivered as a stream; ``rate_limited`` every 429
that is not ``insufficient_quota``.

A changing limit: ``rpm_schedule`` is a list of (seconds since the first
completion request, rpm) steps; ``rpm`` applies before the first (no limit if
unset). The window keeps what it counted when the limit changes, so a lower
limit refuses everything until the window has drained below it, as a
provider's would. An rpm of 0 refuses every request, with a retry-after until
the next step that admits requests (one window if none does): a quota used up
without the server saying so.

Rate-limit headers (none with ``rate_headers=False``, and none from
``rate_headers_until_s`` after the first request on): ``x-ratelimit-limit-*``
carry the per-minute figures (``rpm``/``tpm``, the scheduled rpm in force)
like OpenAI; ``x-ratelimit-remaining-*`` is what the current
window would still admit right now, and ``x-ratelimit-reset-*`` the time until
the window is empty again, in OpenAI's duration format (:func:`format_reset`).
A request larger than the whole token window is admitted into an empty window,
so that it cannot be refused forever.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, Self

from aiohttp import web

from pipeline.errors import ConfigError
from pipeline.simulate_batch import BatchConfig, BatchService, Outcome

__all__ = [
    "BAD_JSON",
    "BatchConfig",
    "Simulator",
    "SimulatorConfig",
    "SimulatorStats",
    "estimate_tokens",
    "expected_answer",
    "expected_structured_answer",
    "format_reset",
    "parse_rpm_schedule",
    "run_in_thread",
    "serve_forever",
]

DEFAULT_MODELS: Final = ("sim-1",)

# What a spurious or directive 429 asks the client to wait: short, so tests that
# retry through it stay fast, but non-zero so clients really do honour it.
SPURIOUS_RETRY_AFTER_S: Final = 0.1

# Requests still running when the server stops get this long before they are
# cancelled; tests stop servers all the time and must not wait on sleepers.
SHUTDOWN_TIMEOUT_S: Final = 0.5

# Long prompts are legitimate; aiohttp's 1 MiB default would reject them.
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024

_DIRECTIVE: Final = re.compile(
    r"\[\[fault:(400|500|429|drop|malformed|hang|stall|cut|interrupt|badjson|invalid)(?::(\d+))?\]\]"
)
# Directives that shape a 200 answer rather than fail the request.
_ANSWER_KINDS: Final = frozenset({"badjson", "invalid"})
BAD_JSON: Final = "not json {"
"""The content of a ``[[fault:badjson]]`` answer."""
_DIRECTIVE_MARK: Final = "[[fault:"

# Random faults in the order they are drawn; the config rates line up with these.
_RANDOM_KINDS: Final = ("drop", "hang", "5xx", "429", "malformed")

# Characters of the answer per streamed chunk: about one token, like real APIs.
STREAM_CHUNK_CHARS: Final = 4


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated API behaves. Every probability is per completion request."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    window_s: float = 60.0
    # The requests limit over time: (seconds since the first completion
    # request, rpm) steps, times increasing; ``rpm`` applies before the first.
    # An rpm of 0 refuses every request (see the module docstring).
    rpm_schedule: tuple[tuple[float, int], ...] = ()
    rate_headers: bool = True
    # Send no x-ratelimit-* headers from this many seconds after the first
    # completion request on (a server that stops reporting its limits).
    rate_headers_until_s: float | None = None
    retry_after: bool = True
    fail_rate_5xx: float = 0.0
    fail_rate_429: float = 0.0
    drop_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 30.0
    hang_max_s: float | None = None
    hang_answers: bool = False
    malformed_rate: float = 0.0
    api_key: str | None = None
    models: tuple[str, ...] = ()
    insufficient_quota: bool = False
    structured: bool = True
    streaming: bool = True
    chunk_delay_ms: float = 0.0
    # A self-hosted server: this many requests computed at once, the rest
    # queued, served in the order they came or in any (see the module
    # docstring, step 8); None: no limit. ``token_ms`` per completion token adds to
    # the latency, so long answers take long as on a real server.
    slots: int | None = None
    slot_order: Literal["fifo", "any"] = "fifo"
    token_ms: float = 0.0
    # With slots: the server's own times each answer carries: llama.cpp's
    # ``timings``, vLLM's ``metrics``, or none (llama-cpp-python's server);
    # and a time added to each of the first ``warmup_answers`` completions
    # computed (a model's first request: its warm-up; several: a server slow
    # for a while, then fast).
    timings: Literal["llama.cpp", "vllm"] | None = "llama.cpp"
    warmup_ms: float = 0.0
    warmup_answers: int = 1
    seed: int = 0
    # The Files and Batches endpoints (turnaround, expiry, failures, limits).
    batch: BatchConfig = field(default_factory=BatchConfig)

    def __post_init__(self) -> None:
        if self.slots is not None and self.slots < 1:
            raise ConfigError(
                f"simulator slots must be >= 1, got {self.slots}; leave it unset for no limit"
            )
        if self.slot_order not in ("fifo", "any"):
            raise ConfigError(
                f"simulator slot_order must be 'fifo' or 'any', got {self.slot_order!r}"
            )
        if self.warmup_answers < 0:
            raise ConfigError(f"simulator warmup_answers must be >= 0, got {self.warmup_answers}")
        for name in (
            "latency_ms",
            "jitter_ms",
            "hang_s",
            "chunk_delay_ms",
            "token_ms",
            "warmup_ms",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"simulator {name} must be >= 0, got {getattr(self, name)}")
        if self.hang_max_s is not None and self.hang_max_s < self.hang_s:
            raise ConfigError(
                f"simulator hang_max_s must be >= hang_s ({self.hang_s}), got {self.hang_max_s}"
            )
        if self.window_s <= 0:
            raise ConfigError(f"simulator window_s must be > 0, got {self.window_s}")
        if self.rate_headers_until_s is not None and self.rate_headers_until_s < 0:
            raise ConfigError(
                f"simulator rate_headers_until_s must be >= 0, got {self.rate_headers_until_s}"
            )
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(
                    f"simulator {name} must be >= 1, got {value}; leave it unset for no limit"
                )
        previous = -math.inf
        for at, rpm in self.rpm_schedule:
            if not math.isfinite(at) or at < 0 or at <= previous:
                raise ConfigError(
                    f"simulator rpm_schedule times must be >= 0 and increasing, got {at:g} "
                    f"after {previous:g}"
                )
            if rpm < 0:
                raise ConfigError(f"simulator rpm_schedule rpm must be >= 0, got {rpm}")
            previous = at
        total = 0.0
        for name in ("fail_rate_5xx", "fail_rate_429", "drop_rate", "hang_rate", "malformed_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"simulator {name} must be between 0 and 1, got {rate}")
            total += rate
        if total > 1.0 + 1e-9:
            raise ConfigError(
                f"simulator fault rates add up to {total:g}; lower them so the sum is at most 1"
            )


@dataclass
class SimulatorStats:
    """Counters of completion requests. Plain ints, so reading them from another
    thread is safe under the GIL."""

    requests: int = 0
    answered: int = 0
    rate_limited: int = 0
    faults: int = 0
    tokens: int = 0
    bad_answers: int = 0
    # Requests that passed the rate limits (or all, without limits) and were
    # counted against them, with their tokens and the server's clock at the
    # first and last: what a benchmark divides by the limit.
    admitted: int = 0
    admitted_tokens: int = 0
    first_admitted_at: float | None = None
    last_admitted_at: float | None = None
    answered_by_content: collections.Counter[str] = field(default_factory=collections.Counter)
    max_in_flight: int = 0
    hangs: int = 0
    streamed: int = 0
    # The service step (see the module docstring): completions computed, those
    # whose client was gone by then, and the time spent queued for a slot.
    computed: int = 0
    abandoned: int = 0
    queue_wait_s: float = 0.0
    max_queued: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "rate_limited": self.rate_limited,
            "faults": self.faults,
            "tokens": self.tokens,
            "bad_answers": self.bad_answers,
            "admitted": self.admitted,
            "admitted_tokens": self.admitted_tokens,
            "admitted_span_s": (
                self.last_admitted_at - self.first_admitted_at
                if self.first_admitted_at is not None and self.last_admitted_at is not None
                else 0.0
            ),
            # dict() of a Counter is one C-level copy: safe while the loop thread counts.
            "answered_by_content": dict(self.answered_by_content),
            "max_in_flight": self.max_in_flight,
            "hangs": self.hangs,
            "streamed": self.streamed,
            "computed": self.computed,
            "abandoned": self.abandoned,
            "queue_wait_s": self.queue_wait_s,
            "max_queued": self.max_queued,
        }


# ---------------------------------------------------------------------------
# Pure functions: what tests compute on their side to check every row.


def estimate_tokens(text: str) -> int:
    """About four bytes per token, at least one: cheap and good enough for limits."""
    return max(1, math.ceil(len(text.encode()) / 4))


def _text(content: Any) -> str:
    # Content may be a list of parts (vision-style requests) or null (tool calls).
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _last_user_text(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def expected_answer(messages: Sequence[Mapping[str, Any]], model: str) -> str:
    """The answer the simulator gives, before any ``max_tokens`` truncation.

    Readable in the demo (it echoes the last user message), yet it changes with
    every message: a conversation of more than a single user message carries a
    digest of all roles and contents, so a different system prompt gives a
    different answer.
    """
    answer = f"[{model}] answer to: {_last_user_text(messages)}"
    if len(messages) == 1 and messages[0].get("role") == "user":
        return answer
    canonical = json.dumps(
        [[m.get("role"), _text(m.get("content"))] for m in messages], ensure_ascii=False
    )
    return f"{answer} #{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def _branch(prop: Any) -> Any:
    """The schema a value is made for: ``anyOf``/``oneOf`` picks its first
    branch that is not ``null`` (how optional fields are usually written)."""
    while isinstance(prop, Mapping) and "type" not in prop and "enum" not in prop:
        branches = prop.get("anyOf", prop.get("oneOf"))
        if not isinstance(branches, list) or not branches:
            break
        rest = [b for b in branches if not (isinstance(b, Mapping) and b.get("type") == "null")]
        prop = rest[0] if rest else branches[0]
    return prop


def _type_of(prop: Mapping[str, Any]) -> str | None:
    declared = prop.get("type")
    if isinstance(declared, list):
        kinds = [t for t in declared if t != "null"]
        if kinds:
            return str(kinds[0])
        return "null" if declared else None
    return declared if isinstance(declared, str) else None


def _bounded(value: float, prop: Mapping[str, Any]) -> float:
    low, high = prop.get("minimum"), prop.get("maximum")
    if isinstance(low, int | float) and not isinstance(low, bool):
        value = max(value, low)
    if isinstance(high, int | float) and not isinstance(high, bool):
        value = min(value, high)
    return value


def _value(name: str, prop: Any, text: str) -> Any:
    prop = _branch(prop)
    if not isinstance(prop, Mapping):
        return f"{name}: {text}"
    if "const" in prop:
        return prop["const"]
    enum = prop.get("enum")
    if isinstance(enum, list) and enum:
        return enum[int(hashlib.sha256(text.encode()).hexdigest(), 16) % len(enum)]
    kind = _type_of(prop)
    if kind == "integer":
        return int(_bounded(len(text), prop))
    if kind == "number":
        return _bounded(len(text) / 10, prop)
    if kind == "boolean":
        return len(text) % 2 == 0
    if kind == "null":
        return None
    if kind == "array":
        return [_value(name, prop.get("items", {}), text)]
    if kind == "object":
        return _object(prop, text)
    value = f"{name}: {text}"
    limit = prop.get("maxLength")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        value = value[:limit]
    return value


def _object(schema: Mapping[str, Any], text: str) -> dict[str, Any]:
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return {}
    return {str(name): _value(str(name), prop, text) for name, prop in properties.items()}


def expected_structured_answer(
    messages: Sequence[Mapping[str, Any]], model: str, schema: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The JSON object the simulator answers to a request whose
    ``response_format`` carries ``schema``; its content is
    ``json.dumps(this, ensure_ascii=False)`` (before ``max_tokens`` truncation).

    One value per top-level property, in the schema's order, from the last user
    message ``t``: a string is ``"<property>: t"`` (cut to ``maxLength``); an
    ``enum`` (of any type) picks ``enum[sha256(t) % len(enum)]``; a ``const`` is
    itself; an integer is ``len(t)``, a number ``len(t) / 10`` (both kept
    within ``minimum``/``maximum``); a boolean ``len(t) % 2 == 0``; null is
    None; an array is a one-item list of its item's value; an object is ``{}``,
    or the same recipe applied to its ``properties`` when it has some. A type
    list such as ``["string", "null"]`` and ``anyOf``/``oneOf`` with ``null``
    use the first type that is not null. ``model`` is taken for symmetry with
    :func:`expected_answer` and does not change the answer.
    """
    del model
    if not isinstance(schema, Mapping):
        return {}
    return _object(schema, _last_user_text(messages))


def _invalid_answer(messages: Sequence[Mapping[str, Any]], schema: Mapping[str, Any] | None) -> str:
    """A ``[[fault:invalid]]`` answer: the structured answer without its first
    required property, so that it fails the schema."""
    if not isinstance(schema, Mapping):
        return "{}"
    required = schema.get("required")
    if not isinstance(required, list) or not required:
        return "{}"
    answer = _object(schema, _last_user_text(messages))
    first = required[0]
    if isinstance(first, str):
        answer.pop(first, None)
    return json.dumps(answer, ensure_ascii=False)


def format_reset(seconds: float) -> str:
    """A duration in OpenAI's ``x-ratelimit-reset-*`` format: ``12ms``, ``1.5s``, ``6m0s``.

    Rounded up to the millisecond: a client that waits this long must find the
    window free, never a millisecond short.
    """
    if seconds <= 0:
        return "0s"
    # round() first so that 0.012 s (12.000000000000002 ms) is not ceiled to 13 ms.
    total_ms = math.ceil(round(seconds * 1000, 6))
    if total_ms < 1000:
        return f"{total_ms}ms"
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# ---------------------------------------------------------------------------
# Rate limiting.


def parse_rpm_schedule(text: str) -> tuple[tuple[float, int], ...]:
    """``"10:600,25:6000"`` -> ``((10.0, 600), (25.0, 6000))``: seconds since
    the first request, and the requests/min from then on."""
    steps: list[tuple[float, int]] = []
    for part in text.split(","):
        at, sep, rpm = part.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            steps.append((float(at), int(rpm)))
        except ValueError:
            raise ConfigError(
                f"bad rpm schedule step {part.strip()!r}; write SECONDS:RPM steps separated "
                "by commas, e.g. 10:600,25:6000"
            ) from None
    return tuple(steps)


def _per_window(per_minute: int, window_s: float) -> int:
    # round() before floor() so that 100 rpm over 0.6 s is 1, not 0.9999999999999999.
    return max(1, math.floor(round(per_minute * window_s / 60.0, 9)))


class _SlidingWindow:
    """A sliding log of (time, amount): exact, so retry hints are exact too."""

    __slots__ = ("_log", "capacity", "used", "window_s")

    def __init__(self, capacity: int | None, window_s: float) -> None:
        # None: no limit for now (requests are still logged, for when one starts).
        self.capacity = capacity
        self.window_s = window_s
        self.used = 0
        self._log: collections.deque[tuple[float, int]] = collections.deque()

    def expire(self, now: float) -> None:
        log = self._log
        horizon = now - self.window_s
        while log and log[0][0] <= horizon:
            self.used -= log.popleft()[1]

    def wait(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` fits; 0 if it fits now. Call ``expire`` first."""
        if self.capacity is None:
            return 0.0
        # An oversized request only has to wait for an empty window: it must be
        # able to pass eventually, or a client would retry it forever.
        excess = min(self.used + amount - self.capacity, self.used)
        if excess <= 0:
            return 0.0
        freed = 0
        for stamp, n in self._log:
            freed += n
            if freed >= excess:
                # Never 0: the client must not retry into the same instant.
                return max(stamp + self.window_s - now, 0.001)
        return self.window_s  # pragma: no cover - used == sum of the log

    def add(self, amount: int, now: float) -> None:
        self._log.append((now, amount))
        self.used += amount

    def remaining(self) -> int:
        return 0 if self.capacity is None else max(0, self.capacity - self.used)

    def reset_in(self, now: float) -> float:
        return self._log[-1][0] + self.window_s - now if self._log else 0.0


# ---------------------------------------------------------------------------
# Responses.


def _json(status: int, payload: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload).encode(),
        content_type="application/json",
        headers=headers,
    )


def _error(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return _json(status, _error_payload(message, type_, code, param), headers)


def _error_payload(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body: what a 4xx/5xx carries, and a batch's error file too."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _context_length_error() -> dict[str, Any]:
    return _error_payload(
        "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in more tokens (simulated). Please reduce the length of the messages.",
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )


def _event(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def _bad_request(message: str, param: str | None = None) -> web.Response:
    return _error(400, message, "invalid_request_error", None, param)


_SERVER_ERRORS: Final = {
    500: "The server had an error while processing your request. Sorry about that!",
    502: "Bad gateway. The upstream server returned an invalid response (simulated).",
    503: "The server is overloaded or not ready yet (simulated).",
}


@dataclass(frozen=True)
class _Chat:
    """A chat completion request that passed step 2."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    max_tokens: int | None
    # The schema of a json_schema response_format; None for a plain answer.
    schema: dict[str, Any] | None
    # The last user message: what directives and answers are read from.
    content: str


@dataclass(frozen=True)
class _Shaped:
    """How a directive shapes an admitted answer (``badjson``/``invalid``),
    and whether the directive has a count to take."""

    kind: str | None = None
    counted: bool = False


@dataclass(frozen=True)
class _Answer:
    text: str
    finish_reason: str
    usage: dict[str, int]


def _parse_chat(raw: bytes, streaming: bool) -> _Chat | web.Response:
    """Step 2: the request as a chat completion, or its 400."""
    try:
        body = json.loads(raw)
    except ValueError:
        return _bad_request(
            "We could not parse the JSON body of your request. The simulator expects "
            "a JSON chat completion request."
        )
    return _chat_of(body, streaming)


def _chat_of(body: Any, streaming: bool) -> _Chat | web.Response:
    """A parsed request body as a chat completion, or its 400."""
    if not isinstance(body, dict):
        return _bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _bad_request("You must provide a model parameter.", "model")
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        return _bad_request("'messages' must be a non-empty array of objects.", "messages")
    stream = _parse_stream(body, streaming)
    if isinstance(stream, web.Response):
        return stream
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
    ):
        return _bad_request("max_tokens must be a positive integer.", "max_tokens")
    schema = _parse_schema(body.get("response_format"))
    if isinstance(schema, web.Response):
        return schema
    return _Chat(
        model, messages, stream[0], stream[1], max_tokens, schema, _last_user_text(messages)
    )


def _parse_stream(body: Mapping[str, Any], streaming: bool) -> tuple[bool, bool] | web.Response:
    """Whether the request streams, and with its usage; or its 400."""
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        return _bad_request("'stream' must be a boolean.", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            return _bad_request(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        if not isinstance(options, dict):
            return _bad_request("'stream_options' must be an object.", "stream_options")
    if stream and not streaming:
        return _bad_request("The simulator does not support stream=true.", "stream")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage


def _parse_schema(response_format: Any) -> dict[str, Any] | web.Response | None:
    """The schema of a json_schema response_format (None for a plain answer), or its 400."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        return _bad_request(
            "'response_format' must be an object with a string 'type'.", "response_format"
        )
    if response_format["type"] != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        return _bad_request(
            "Missing required parameter: 'response_format.json_schema.name'.",
            "response_format.json_schema.name",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        return _bad_request(
            "Invalid type for 'response_format.json_schema.schema': expected an object.",
            "response_format.json_schema.schema",
        )
    return schema


def _prompt_tokens(messages: Sequence[Mapping[str, Any]]) -> int:
    return sum(estimate_tokens(_text(m.get("content"))) + 4 for m in messages)


def _compose_answer(chat: _Chat, shaped: str | None) -> _Answer:
    """The answer the request gets (shaped by a directive, structured, or
    plain), cut at ``max_tokens``, and its usage."""
    if shaped == "badjson":
        text = BAD_JSON
    elif shaped == "invalid":
        text = _invalid_answer(chat.messages, chat.schema)
    elif chat.schema is not None:
        structured = expected_structured_answer(chat.messages, chat.model, chat.schema)
        text = json.dumps(structured, ensure_ascii=False)
    else:
        text = expected_answer(chat.messages, chat.model)
    finish_reason = "stop"
    if chat.max_tokens is not None and estimate_tokens(text) > chat.max_tokens:
        # Cut on a character boundary: "ignore" drops a split multi-byte tail.
        text = text.encode()[: chat.max_tokens * 4].decode("utf-8", "ignore")
        finish_reason = "length"
    prompt_tokens = _prompt_tokens(chat.messages)
    completion_tokens = estimate_tokens(text)
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    return _Answer(text, finish_reason, usage)


@dataclass(frozen=True, slots=True)
class _Service:
    """A completion being computed: the server's own times its answer
    carries, and, in a slot, whether a streamed answer comes as its tokens
    are generated (``paced``): the first ``prompt_s`` after the slot was
    taken, the last ``generation_s`` after the first, as a real server's."""

    timings: dict[str, dict[str, float]] | None
    paced: bool = False
    prompt_s: float = 0.0
    generation_s: float = 0.0


class _Slots:
    """``count`` slots; a request waits for one. A freed slot goes to the
    request that has waited longest, or with ``order`` to one drawn from
    it (any request waiting)."""

    def __init__(self, count: int, order: random.Random | None) -> None:
        self._free = count
        self._order = order
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # given a slot as it was cancelled: pass it on
            elif waiter in self._waiters:  # (release may have dropped it already)
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            index = 0 if self._order is None else self._order.randrange(len(self._waiters))
            waiter = self._waiters.pop(index)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class Simulator:
    """The server. Use ``async with Simulator(config) as sim`` in async code, or
    :func:`run_in_thread` when the client runs elsewhere (a subprocess, sync code)."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (seconds) times the batches only: a test moves it by hand."""
        self.config = config if config is not None else SimulatorConfig()
        self.host = host
        self.port = port
        self.stats = SimulatorStats()
        cfg = self.config
        self.batches = BatchService(
            cfg.batch, self, api_key=cfg.api_key, models=cfg.models, seed=cfg.seed, clock=clock
        )
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._in_flight = 0
        self._next_id = 0
        self._rng = random.Random(self.config.seed)
        self._directive_counts: collections.Counter[str] = collections.Counter()
        # Created on start(): its waiters belong to the loop that serves.
        self._slots: _Slots | None = None
        self._queued = 0
        self._warming = self.config.warmup_answers

        cfg = self.config
        self._auth = f"Bearer {cfg.api_key}" if cfg.api_key is not None else None
        self._models = frozenset(cfg.models)
        # In the order of _RANDOM_KINDS. Cumulative thresholds: one draw per
        # request decides among all faults, so the rates are exact and exclusive.
        rates = (
            cfg.drop_rate,
            cfg.hang_rate,
            cfg.fail_rate_5xx,
            cfg.fail_rate_429,
            cfg.malformed_rate,
        )
        self._random_faults = sum(rates) > 0
        self._thresholds = tuple(itertools.accumulate(rates))
        self._requests = (
            _SlidingWindow(
                None if cfg.rpm is None else _per_window(cfg.rpm, cfg.window_s), cfg.window_s
            )
            if cfg.rpm is not None or cfg.rpm_schedule
            else None
        )
        # The server's clock at the first completion request: rpm_schedule's origin.
        self._started_at: float | None = None
        self._tokens = (
            _SlidingWindow(_per_window(cfg.tpm, cfg.window_s), cfg.window_s)
            if cfg.tpm is not None
            else None
        )

    # -- lifecycle ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port/v1``, what an OpenAI client takes as ``base_url``."""
        if self._runner is None:
            raise RuntimeError("Simulator.base_url is only known once start() has returned")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("Simulator is already running")
        self._closing = asyncio.Event()
        if self.config.slots is not None:
            order = None if self.config.slot_order == "fifo" else random.Random(self.config.seed)
            self._slots = _Slots(self.config.slots, order)
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.router.add_post("/v1/chat/completions", self._completions)
        app.router.add_get("/v1/models", self._list_models)
        app.router.add_get("/_stats", self._stats)
        self.batches.mount(app.router)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        # access_log=None: logging every request would cost more than answering it.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        # A large backlog: benchmarks open hundreds of connections at once.
        site = web.TCPSite(runner, self.host, self.port, backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.port = int(runner.addresses[0][1])
        self._runner = runner

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            # Wake hanging requests so shutdown is not held up by them.
            self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def reset_stats(self) -> None:
        """Zero the counters in place (holders of ``stats`` see the reset). Fault
        directive counts and the rate-limit window are server state and are kept."""
        stats = self.stats
        stats.requests = stats.answered = stats.rate_limited = stats.faults = stats.tokens = 0
        stats.bad_answers = stats.admitted = stats.admitted_tokens = 0
        stats.hangs = stats.streamed = stats.computed = stats.abandoned = stats.max_queued = 0
        stats.queue_wait_s = 0.0
        stats.first_admitted_at = stats.last_admitted_at = None
        stats.answered_by_content = collections.Counter()
        stats.max_in_flight = self._in_flight
        self.batches.reset_stats()

    @classmethod
    @contextlib.contextmanager
    def run_in_thread(
        cls, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
    ) -> Iterator[Simulator]:
        """Same as the module-level :func:`run_in_thread`."""
        with run_in_thread(config, host, port) as sim:
            yield sim

    # -- handlers ----------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        if self._started_at is None:
            self._started_at = time.monotonic()
        self._in_flight += 1
        if self._in_flight > stats.max_in_flight:
            stats.max_in_flight = self._in_flight
        try:
            return await self._complete(request)
        finally:
            self._in_flight -= 1

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        """The steps of the module docstring, in order; the first that fails answers."""
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return self._unauthorized()  # 1
        chat = _parse_chat(await request.read(), self.config.streaming)  # 2
        if isinstance(chat, web.Response):
            return chat
        refused = self._refuse_model(chat) or self._refuse_quota()  # 3, 4
        if refused is not None:
            return refused
        shaped = await self._directives_and_faults(chat, request)  # 5, 6
        if isinstance(shaped, web.StreamResponse):
            return shaped
        answer = _compose_answer(chat, shaped.kind)
        headers: dict[str, str] | None = None
        if self._requests is not None or self._tokens is not None:  # 7
            now = time.monotonic()
            refused = self._admit(answer.usage["total_tokens"], now, chat.model)
            if refused is not None:
                return refused
            headers = self._rate_headers(now)
        self._count_admitted(answer.usage["total_tokens"])
        # Nothing was awaited since the directive was read, so concurrent requests
        # with the same content cannot both take the last count.
        if shaped.counted:
            self._directive_counts[chat.content] += 1
        return await self._answer(request, chat, answer, shaped, headers)  # 8

    # -- a request of a batch (pipeline.simulate_batch calls these) ---------

    def batch_answer(self, body: Any) -> Outcome:
        """One request of a batch, answered as step 2, 3, 5 and the answer of
        the module docstring would: no latency, limit nor transport fault (a
        batch has none); a directive's 400 stays a 400, its other faults are a
        500 (what a provider's batch reports for its own failures)."""
        chat = _chat_of(body, streaming=False)
        refused = chat if isinstance(chat, web.Response) else self._refuse_model(chat)
        if refused is not None:
            assert isinstance(refused.body, bytes)
            content = "" if isinstance(chat, web.Response) else chat.content
            return Outcome(refused.status, json.loads(refused.body), content)
        assert isinstance(chat, _Chat)
        shaped: str | None = None
        directed = self._directive(chat.content) if _DIRECTIVE_MARK in chat.content else None
        if directed is not None:
            kind, counted = directed
            if counted:
                self._directive_counts[chat.content] += 1
            if kind == "400":
                return Outcome(400, _context_length_error(), chat.content)
            if kind not in _ANSWER_KINDS:
                payload = _error_payload(_SERVER_ERRORS[500], "server_error")
                return Outcome(500, payload, chat.content)
            shaped = kind
        answer = _compose_answer(chat, shaped)
        completion = self._completion(chat.model, answer.text, answer.finish_reason, answer.usage)
        return Outcome(200, completion, chat.content)

    def batch_prompt_tokens(self, body: Any) -> int:
        """What a request counts against the enqueued-token limit: its prompt tokens."""
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list):
            return 0
        return _prompt_tokens([m for m in messages if isinstance(m, dict)])

    def _refuse_model(self, chat: _Chat) -> web.Response | None:
        if self._models and chat.model not in self._models:
            return _error(
                404,
                f"The model `{chat.model}` does not exist or you do not have access to it.",
                "invalid_request_error",
                "model_not_found",
            )
        if chat.schema is not None and not self.config.structured:
            return _bad_request(
                "Invalid parameter: 'response_format' of type 'json_schema' is not supported "
                "with this model.",
                "response_format",
            )
        return None

    def _refuse_quota(self) -> web.Response | None:
        if not self.config.insufficient_quota:
            return None
        return _error(
            429,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
            headers=self._rate_headers(time.monotonic()),
        )

    async def _directives_and_faults(
        self, chat: _Chat, request: web.Request
    ) -> _Shaped | web.StreamResponse:
        """Steps 5 and 6: a directive's or a random fault's answer, or how the
        answer is to be shaped (badjson/invalid), with its count taken only
        once the answer is admitted."""
        shaped = _Shaped()
        if _DIRECTIVE_MARK in chat.content:
            directed = self._directive(chat.content)
            if directed is not None:
                kind, counted = directed
                if kind in _ANSWER_KINDS:
                    shaped = _Shaped(kind, counted)
                elif kind in ("cut", "interrupt") and not chat.stream:
                    pass  # only a stream is cut short
                else:
                    if counted:
                        self._directive_counts[chat.content] += 1
                    failed = await self._fail(kind, request, chat.model, chat.stream)
                    if failed is not None:
                        return failed
        if self._random_faults:
            draw = self._rng.random()
            for kind, threshold in zip(_RANDOM_KINDS, self._thresholds, strict=True):
                if draw < threshold:
                    if kind == "5xx":
                        kind = str(self._rng.choice((500, 502, 503)))
                    failed = await self._fail(kind, request, chat.model, chat.stream)
                    if failed is not None:
                        return failed
                    break
        if shaped.counted and self._directive(chat.content) is None:
            # A hang that answered (hang_answers) waited: another request with
            # this content may have had the last bad answer meanwhile.
            return _Shaped()
        return shaped

    async def _answer(
        self,
        request: web.Request,
        chat: _Chat,
        answer: _Answer,
        shaped: _Shaped,
        headers: dict[str, str] | None,
    ) -> web.StreamResponse:
        """Step 8: the service (latency, or a slot), then the answer, counted
        only if delivered."""
        response: web.StreamResponse
        async with self._service(
            answer.usage["completion_tokens"], answer.usage["prompt_tokens"], request
        ) as service:
            if chat.stream:
                usage = answer.usage if chat.include_usage else None
                # Written to the end: a client that went away mid-stream fails a
                # write. (One that closes once it has read [DONE] is answered,
                # though its transport may be closing by the time we look.)
                response, delivered = await self._stream_answer(
                    request, chat.model, answer.text, answer.finish_reason, usage, headers, service
                )
        if not chat.stream:
            response = self._whole_answer(
                chat.model,
                answer.text,
                answer.finish_reason,
                answer.usage,
                headers,
                service.timings,
            )
            # A client that gave up during the latency never gets this answer:
            # counting it would make "answered exactly once" checks lie.
            transport = request.transport
            delivered = transport is not None and not transport.is_closing()
        if delivered:
            stats = self.stats
            stats.answered += 1
            stats.tokens += answer.usage["total_tokens"]
            stats.answered_by_content[chat.content] += 1
            stats.streamed += chat.stream
            if shaped.kind is not None:
                stats.bad_answers += 1
        elif shaped.counted:
            # Not delivered: the next request with this content gets the bad answer.
            self._directive_counts[chat.content] -= 1
        return response

    def _whole_answer(
        self,
        model: str,
        answer: str,
        finish_reason: str,
        usage: Mapping[str, int],
        headers: Mapping[str, str] | None,
        timings: Mapping[str, Mapping[str, float]] | None = None,
    ) -> web.Response:
        return _json(200, self._completion(model, answer, finish_reason, usage, timings), headers)

    def _completion(
        self,
        model: str,
        answer: str,
        finish_reason: str,
        usage: Mapping[str, int],
        timings: Mapping[str, Mapping[str, float]] | None = None,
    ) -> dict[str, Any]:
        """A ``chat.completion`` object, with a new id."""
        self._next_id += 1
        payload: dict[str, Any] = {
            "id": f"chatcmpl-{self._next_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage,
        }
        if timings is not None:
            payload.update(timings)
        return payload

    def _chunk(
        self,
        model: str,
        delta: Mapping[str, str],
        finish_reason: str | None = None,
        timings: Mapping[str, Mapping[str, float]] | None = None,
    ) -> bytes:
        """One server-sent event of a ``chat.completion.chunk`` (the id is the stream's)."""
        chunk: dict[str, Any] = {
            "id": f"chatcmpl-{self._next_id}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if timings is not None:
            chunk.update(timings)
        return _event(chunk)

    async def _open_stream(
        self, request: web.Request, model: str, headers: Mapping[str, str] | None = None
    ) -> web.StreamResponse:
        """Headers of a 200 event stream, sent with its first chunk (the role).
        Take a new ``_next_id`` first: it is the stream's id."""
        first = self._chunk(model, {"role": "assistant", "content": ""})  # before any await
        response = web.StreamResponse(status=200, headers=headers)
        response.content_type = "text/event-stream"
        await response.prepare(request)
        await response.write(first)
        return response

    async def _stream_answer(
        self,
        request: web.Request,
        model: str,
        answer: str,
        finish_reason: str,
        usage: Mapping[str, int] | None,
        headers: Mapping[str, str] | None,
        service: _Service,
    ) -> tuple[web.StreamResponse, bool]:
        """The answer as server-sent events; whether the whole stream was
        written (False: the client went away). In a slot, its tokens as they
        are generated (the first after the prompt's time, the rest a
        token's time apart), else all at once or ``chunk_delay_ms`` apart."""
        self._next_id += 1
        events = [
            self._chunk(model, {"content": answer[start : start + STREAM_CHUNK_CHARS]})
            for start in range(0, len(answer), STREAM_CHUNK_CHARS)
        ]
        # Events written a token's time apart: each content chunk (the
        # finish reason with the last), or the finish alone for no content.
        paced = max(1, len(events)) if service.paced else 0
        # llama.cpp sends its timings with the finish reason (and so, here, vLLM).
        events.append(self._chunk(model, {}, finish_reason, service.timings))
        if usage is not None:
            last = {
                "id": f"chatcmpl-{self._next_id}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [],
                "usage": usage,
            }
            events.append(_event(last))
        events.append(b"data: [DONE]\n\n")
        delay = self.config.chunk_delay_ms / 1000.0
        response = web.StreamResponse()
        try:
            if paced:
                await asyncio.sleep(service.prompt_s)
            response = await self._open_stream(request, model, headers)
            if paced:
                token_s = service.generation_s / paced
                for event in events[: paced - 1]:
                    await asyncio.sleep(token_s)
                    await response.write(event)
                await asyncio.sleep(token_s)
                await response.write(b"".join(events[paced - 1 :]))
            elif delay > 0:
                for event in events:
                    await asyncio.sleep(delay)
                    await response.write(event)
            else:
                await response.write(b"".join(events))
            await response.write_eof()
        except ConnectionError:  # the client went away (aiohttp's ClientConnectionResetError)
            return response, False
        return response, True

    @contextlib.asynccontextmanager
    async def _service(
        self, completion_tokens: int, prompt_tokens: int, request: web.Request
    ) -> AsyncIterator[_Service]:
        """The service step: the latency, then the body writes the answer.
        With ``slots``, in one of them (queued for one), held until the
        service time is over and the body done; the body may stream the
        answer meanwhile (``_Service.paced``). Computed even if the client
        goes away, and counted."""
        cfg = self.config
        delay = cfg.latency_ms + cfg.token_ms * completion_tokens
        if cfg.jitter_ms:
            delay = max(0.0, delay + self._rng.uniform(-cfg.jitter_ms, cfg.jitter_ms))
        stats = self.stats
        if self._slots is None:
            if delay > 0:
                await asyncio.sleep(delay / 1000.0)
            stats.computed += 1
            yield _Service(timings=None)
            return
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        self._queued += 1
        stats.max_queued = max(stats.max_queued, self._queued)
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        if self._warming > 0:
            self._warming -= 1
            delay += cfg.warmup_ms
        started = loop.time()
        queue_ms = (started - queued_at) * 1000.0
        stats.queue_wait_s += queue_ms / 1000.0
        prompt_ms = min(delay, cfg.latency_ms)
        service = _Service(
            self._timings(delay, prompt_ms, queue_ms, completion_tokens, prompt_tokens),
            paced=True,
            prompt_s=prompt_ms / 1000.0,
            generation_s=(delay - prompt_ms) / 1000.0,
        )
        try:
            yield service
            # What the body did not spend of the service time (all of it
            # for a whole answer, the rest of a stream cut short).
            await asyncio.sleep(max(0.0, started + delay / 1000.0 - loop.time()))
        finally:
            self._slots.release()
        stats.computed += 1
        transport = request.transport
        if transport is None or transport.is_closing():
            stats.abandoned += 1

    def _timings(
        self,
        delay_ms: float,
        prompt_ms: float,
        queue_ms: float,
        completion_tokens: int,
        prompt_tokens: int,
    ) -> dict[str, dict[str, float]] | None:
        """The server's own times as an answer carries them (``{"timings":
        ...}`` or ``{"metrics": ...}``), or None (see ``timings``)."""
        timings = self.config.timings
        if timings == "vllm":
            metrics = {
                "time_to_first_token_ms": prompt_ms,
                "generation_time_ms": delay_ms - prompt_ms,
                "queue_time_ms": queue_ms,
            }
            return {"metrics": metrics}
        if timings is None:
            return None
        return {
            "timings": {
                "prompt_n": prompt_tokens,
                "prompt_ms": prompt_ms,
                "predicted_n": completion_tokens,
                "predicted_ms": delay_ms - prompt_ms,
            }
        }

    def _count_admitted(self, tokens: int) -> None:
        stats = self.stats
        now = time.monotonic()
        stats.admitted += 1
        stats.admitted_tokens += tokens
        if stats.first_admitted_at is None:
            stats.first_admitted_at = now
        stats.last_admitted_at = now

    def _directive(self, content: str) -> tuple[str, bool] | None:
        """The directive in ``content`` if it still applies, and whether it has
        a count (the caller takes one when the directive is acted on)."""
        match = _DIRECTIVE.search(content)
        if match is None:
            return None
        kind, count = match.group(1), match.group(2)
        if count is not None and self._directive_counts[content] >= int(count):
            return None
        return kind, count is not None

    async def _fail(
        self, kind: str, request: web.Request, model: str, stream: bool
    ) -> web.StreamResponse | None:
        """The response of a fault; None when a hang ends in an answer
        (``hang_answers``), which the caller then gives as usual."""
        if kind == "hang" and self.config.hang_answers:
            self.stats.faults += 1
            if await self._hold():
                return self._drop(request)  # the server is stopping
            return None
        return await self._fault(kind, request, model, stream)

    async def _hold(self) -> bool:
        """Hold a request for the hang time, sending nothing. True if the
        server began to stop meanwhile."""
        cfg = self.config
        self.stats.hangs += 1
        hang_s = cfg.hang_s
        if cfg.hang_max_s is not None:
            hang_s = self._rng.uniform(cfg.hang_s, cfg.hang_max_s)
        assert self._closing is not None
        try:
            await asyncio.wait_for(self._closing.wait(), hang_s)
        except TimeoutError:
            return False
        return True

    def _drop(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.close()
        # aiohttp fails to write this to the closed transport and drops it quietly.
        return web.Response(status=500)

    async def _broken_stream(
        self, kind: str, request: web.Request, model: str
    ) -> web.StreamResponse:
        """A stream that fails after its first chunk: ``malformed`` sends a
        chunk cut short, ``drop`` closes the connection, ``stall`` holds it
        silent for the hang time first, ``cut`` ends it after one content
        chunk without a finish reason, ``interrupt`` also, then drops it
        without ending the body."""
        self._next_id += 1
        response = web.StreamResponse()
        with contextlib.suppress(ConnectionError):
            response = await self._open_stream(request, model)
            if kind in ("cut", "interrupt"):
                await response.write(self._chunk(model, {"content": "partial"}))
                await response.write(b"data: [DONE]\n\n")
                if kind == "cut":
                    await response.write_eof()
                    return response
            if kind == "malformed":
                await response.write(
                    f'data: {{"id": "chatcmpl-{self._next_id}", "object": "chat.completion.chunk", '
                    '"choi\n\n'.encode()
                )
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            if kind == "stall":
                await self._hold()
        self._drop(request)
        return response

    async def _fault(
        self, kind: str, request: web.Request, model: str, stream: bool = False
    ) -> web.StreamResponse:
        stats = self.stats
        if kind == "400":
            return _json(400, _context_length_error())
        if kind == "429":
            stats.rate_limited += 1
            headers = self._rate_headers(time.monotonic())
            headers.update(self._retry_headers(SPURIOUS_RETRY_AFTER_S))
            return _error(
                429,
                f"Rate limit reached for requests on {model} (simulated spurious 429). "
                f"Please try again in {format_reset(SPURIOUS_RETRY_AFTER_S)}.",
                "requests",
                "rate_limit_exceeded",
                headers=headers,
            )
        stats.faults += 1
        if stream and kind in ("malformed", "drop", "stall", "cut", "interrupt"):
            return await self._broken_stream(kind, request, model)
        if kind == "malformed":
            self._next_id += 1
            # Valid start, cut short: exactly what a proxy that drops mid-body yields.
            body = f'{{"id": "chatcmpl-{self._next_id}", "object": "chat.completion", "choi'
            return web.Response(status=200, body=body.encode(), content_type="application/json")
        if kind in ("drop", "hang", "stall"):
            if kind != "drop":
                await self._hold()
            return self._drop(request)
        status = int(kind)
        return _error(status, _SERVER_ERRORS[status], "server_error")

    def rpm_at(self, now: float) -> int | None:
        """The requests limit in force at ``now`` (server clock): the last
        ``rpm_schedule`` step reached, else ``rpm``; None for no limit."""
        rpm = self.config.rpm
        if self._started_at is not None:
            for at, scheduled in self.config.rpm_schedule:
                if now - self._started_at < at:
                    break
                rpm = scheduled
        return rpm

    def _refused_for(self, now: float) -> float:
        """How long an rpm of 0 lasts from ``now``: until the next step that
        admits requests, else one window."""
        assert self._started_at is not None
        for at, scheduled in self.config.rpm_schedule:
            if at > now - self._started_at and scheduled > 0:
                return self._started_at + at - now
        return self.config.window_s

    def _admit(self, tokens: int, now: float, model: str) -> web.Response | None:
        """None if the request fits the limits (and then it is counted), else its 429."""
        requests, token_window = self._requests, self._tokens
        wait_requests = wait_tokens = 0.0
        rpm = self.rpm_at(now)
        if requests is not None:
            requests.expire(now)
            if rpm is None:
                requests.capacity = None
            elif rpm == 0:
                wait_requests = self._refused_for(now)
            else:
                requests.capacity = _per_window(rpm, self.config.window_s)
                wait_requests = requests.wait(1, now)
        if token_window is not None:
            token_window.expire(now)
            wait_tokens = token_window.wait(tokens, now)
        if wait_requests == 0.0 and wait_tokens == 0.0:
            if requests is not None:
                requests.add(1, now)
            if token_window is not None:
                token_window.add(tokens, now)
            return None

        self.stats.rate_limited += 1
        # Wait for both limits: retrying when only one has freed would be refused again.
        wait = max(wait_requests, wait_tokens)
        if wait_requests > 0.0:
            assert requests is not None
            kind, limit, used, asked = "requests", rpm, requests.used, 1
            unit = "requests per min (RPM)"
        else:
            assert token_window is not None
            kind, limit, used, asked = "tokens", self.config.tpm, token_window.used, tokens
            unit = "tokens per min (TPM)"
        headers = self._rate_headers(now)
        headers.update(self._retry_headers(wait))
        return _error(
            429,
            f"Rate limit reached for {kind} on {model}: {unit}: Limit {limit}, "
            f"Used {used} in the last {self.config.window_s:g}s, Requested {asked}. "
            f"Please try again in {format_reset(wait)}.",
            kind,
            "rate_limit_exceeded",
            headers=headers,
        )

    def _retry_headers(self, wait: float) -> dict[str, str]:
        if not self.config.retry_after:
            return {}
        return {
            "retry-after": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(max(1, math.ceil(round(wait * 1000, 6)))),
        }

    def _rate_headers(self, now: float) -> dict[str, str]:
        cfg = self.config
        headers: dict[str, str] = {}
        if not cfg.rate_headers:
            return headers
        until = cfg.rate_headers_until_s
        if until is not None and self._started_at is not None and now - self._started_at >= until:
            return headers
        rpm = self.rpm_at(now)
        if self._requests is not None and rpm is not None:
            self._requests.expire(now)
            headers["x-ratelimit-limit-requests"] = str(rpm)
            remaining = self._requests.remaining() if rpm else 0
            headers["x-ratelimit-remaining-requests"] = str(remaining)
            headers["x-ratelimit-reset-requests"] = format_reset(self._requests.reset_in(now))
        if self._tokens is not None:
            self._tokens.expire(now)
            headers["x-ratelimit-limit-tokens"] = str(cfg.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(self._tokens.remaining())
            headers["x-ratelimit-reset-tokens"] = format_reset(self._tokens.reset_in(now))
        return headers

    def _unauthorized(self) -> web.Response:
        # The key sent is never echoed, not even masked: it must not end up in logs.
        return _error(
            401,
            "Incorrect API key provided. Set the key the simulator was started with.",
            "invalid_request_error",
            "invalid_api_key",
        )

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            return self._unauthorized()
        models = self.config.models or DEFAULT_MODELS
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "simulator"} for m in models]
        return _json(200, {"object": "list", "data": data})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        payload = self.stats.as_dict()
        payload["in_flight"] = self._in_flight
        payload["batch"] = self.batches.stats.as_dict()
        return _json(200, payload)

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return _error(
            404,
            f"Unknown request URL: {request.method} {request.path}.",
            "invalid_request_error",
            "unknown_url",
        )


# ---------------------------------------------------------------------------
# Running outside an event loop.


@contextlib.contextmanager
def run_in_thread(
    config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> Iterator[Simulator]:
    """Serve from a daemon thread with its own event loop; yields once listening.

    For clients that are not coroutines in the caller's loop: subprocesses,
    synchronous code, ``enrich demo``.
    """
    sim = Simulator(config, host, port)
    ready = threading.Event()
    failure: list[BaseException] = []
    loop_box: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            await sim.start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        loop_box.append((asyncio.get_running_loop(), stop))
        ready.set()
        try:
            await stop.wait()
        finally:
            await sim.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="enrich-simulator")
    thread.daemon = True
    thread.start()
    ready.wait()
    if failure:
        thread.join()
        raise failure[0]
    loop, stop = loop_box[0]
    try:
        yield sim
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=10)


def serve_forever(
    config: SimulatorConfig,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop cleanly and return normally.

    ``ready`` is called with the base URL once the server listens (the CLI
    prints it; this module never prints).
    """

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        installed: list[signal.Signals] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Only the main thread may install handlers; elsewhere the caller stops us.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
        try:
            async with Simulator(config, host, port) as sim:
                if ready is not None:
                    ready(sim.base_url)
                await stop.wait()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    # A Ctrl-C that lands before the handlers are installed is still a clean stop.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
