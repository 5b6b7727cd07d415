"""What a failed attempt means: retry it, fail the row, or stop the run.

The one place that reads a transport's errors. Every transport raises enrich's
own types (``pipeline.transport_errors``, and ``StalledRequest`` from the stall
watchdog), so an SDK upgrade cannot change how a failure is classified.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from pipeline.ratelimit import LimitKind, exhausted_limit, retry_after_seconds
from pipeline.stall import StalledRequest
from pipeline.structured import unsupported_message
from pipeline.transport_errors import (
    APIConnectionFailed,
    APIStatus,
    APITimeout,
    UnparseableResponse,
)

# 429 error codes that no amount of waiting fixes: the account, not the rate.
NON_TRANSIENT_429_CODES: Final = frozenset(
    {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "access_terminated"}
)


FailureKind = Literal["retry", "row", "fatal"]


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    reason: str
    retry_after: float | None = None
    rate_limited: bool = False
    # Which limit a 429 names, if it says (see ratelimit.exhausted_limit).
    limit: LimitKind | None = None
    # Cut after the stall timeout without a byte (see pipeline.stall).
    stalled: bool = False
    # Cut by --timeout (see pipeline.transport).
    timed_out: bool = False
    # Timed out queued behind the run's own requests (see CallStage._failed).
    saturated: bool = False
    # The outage gate's verdict: the run's failure, not the row's (see
    # ``outage.Attempt.run_failure``).
    run_failure: bool = False
    # The request was the limiter's probe of a window (``Permit.probe``).
    probe: bool = False
    # The response's headers, for the limiter to learn from; not part of what
    # the failure *is* (transports differ in which other headers they keep).
    headers: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)


def _non_transient_429(exc: APIStatus) -> str | None:
    # OpenAI names the reason in `code`, and some servers only in `type`
    # ({"type": "insufficient_quota", "code": null}).
    for value in (exc.code, exc.type):
        if value in NON_TRANSIENT_429_CODES:
            return value
    return None


def _server_message(exc: APIStatus, limit: int = 160) -> str:
    # The server's message, else "Error code: <status>".
    text = exc.message or str(exc)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify(exc: BaseException, *, model: str) -> Failure:
    """Decide what a failed attempt means: retry it, fail the row, or stop the run.

    Only enrich's transport errors are classified (every transport raises
    them; see ``pipeline.transport_errors``); anything else is a bug and is
    raised again."""
    if isinstance(exc, StalledRequest):
        return Failure("retry", str(exc), stalled=True)
    if isinstance(exc, APITimeout):
        return Failure("retry", "request timed out", timed_out=True)
    if isinstance(exc, APIConnectionFailed):
        return Failure("retry", "connection error")
    if isinstance(exc, UnparseableResponse):
        return Failure("retry", str(exc))
    if isinstance(exc, APIStatus):
        status = exc.status_code
        if status == 429:
            code = _non_transient_429(exc)
            if code is not None:
                return Failure(
                    "fatal",
                    f"the API says the quota is exhausted (429 {code}); "
                    "add credit to the account or use another key",
                )
            return Failure(
                "retry",
                f"rate limited (429): {_server_message(exc)}",
                retry_after=retry_after_seconds(exc.headers),
                rate_limited=True,
                limit=exhausted_limit(exc.type, _server_message(exc, limit=1000), exc.headers),
                headers=exc.headers,
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
                retry_after=retry_after_seconds(exc.headers),
            )
        unsupported = unsupported_message(_server_message(exc, limit=400))
        if status in (400, 422) and unsupported is not None:
            # Every row would fail alike: stop the run with the fix.
            return Failure("fatal", unsupported)
        return Failure("row", f"request rejected ({status}): {_server_message(exc)}")
    raise exc
