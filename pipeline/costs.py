"""Money: a price table, cost arithmetic, an offline estimate and a spend cap.

Prices are USD per million tokens, input and output, per model, read from
``configs/prices.toml`` (shipped) and optionally a user's price file on top
(``--price-file``). Providers change prices; the shipped table is a starting
point, not an invoice.

Token counts before a run are estimates made offline (no tokenizer download:
about 4 bytes a token plus per-message overhead, the same rule the rate
limiter uses, see ``pipeline.prompt.estimate_prompt_tokens``); after a request they
are the API's own ``usage`` numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pipeline import prompt
from pipeline.errors import ConfigError, EnrichError, ExitCode
from pipeline.events import EventSink, ThrottledWarning
from pipeline.prompt import DEFAULT_COMPLETION_ESTIMATE, estimate_prompt_tokens
from pipeline.results import RowResult
from pipeline.transport import Messages

if TYPE_CHECKING:
    import polars as pl

    from pipeline.read import InputSource

# Package data, so a wheel install knows the prices too (configs/prices.toml
# in a checkout is a link to it).
DEFAULT_PRICE_FILE: Final = Path(__file__).resolve().parent / "prices.toml"

# Assumed time for one request when estimating a run's duration: a short
# answer from a hosted model. Only matters when concurrency is the bottleneck.
DEFAULT_LATENCY_S: Final = 2.0

MILLION: Final = 1_000_000

Route = Literal["online", "batch"]

# A batch request's share of the online price, where the price file names no
# batch rate: the providers' documented batch discount (50%).
BATCH_DISCOUNT: Final = 0.5


@dataclass(frozen=True)
class Price:
    """USD per million tokens for one model."""

    model: str
    input_per_million: float
    output_per_million: float
    source: str = ""
    batch_input_per_million: float | None = None
    """The Batch API's rate; None: ``BATCH_DISCOUNT`` of the online one."""
    batch_output_per_million: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_per_million_usd": self.input_per_million,
            "output_per_million_usd": self.output_per_million,
            "source": self.source,
        }

    def for_route(self, route: Route) -> Price:
        """The price a request sent by ``route`` pays: online as it is; batch
        at the file's batch rates, else at ``BATCH_DISCOUNT`` of online (what
        OpenAI, Anthropic and Google document for their batch APIs). What the
        run's cost, its cap and ``estimate`` all count with."""
        if route == "online":
            return self
        return Price(
            model=self.model,
            input_per_million=_or(self.batch_input_per_million, self.input_per_million),
            output_per_million=_or(self.batch_output_per_million, self.output_per_million),
            source=f"{self.source} (batch)" if self.source else "batch",
        )


def _or(batch_rate: float | None, online_rate: float) -> float:
    return online_rate * BATCH_DISCOUNT if batch_rate is None else batch_rate


def cost(prompt_tokens: int, completion_tokens: int, price: Price) -> float:
    """USD for these token counts at this price."""
    return (
        prompt_tokens * price.input_per_million + completion_tokens * price.output_per_million
    ) / MILLION


def _price_value(table: Mapping[str, Any], name: str, model: str, path: Path) -> float:
    value = table.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(
            f"price file {path}: model '{model}' needs a number for '{name}' "
            f"(USD per million tokens), got {value!r}; fix the file"
        )
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"price file {path}: '{name}' of model '{model}' must be a number >= 0, "
            f"got {value}; fix the file"
        )
    return float(value)


_PRICE_KEYS: Final = ("input", "output", "batch_input", "batch_output")


def _optional_price(table: Mapping[str, Any], name: str, model: str, path: Path) -> float | None:
    return _price_value(table, name, model, path) if name in table else None


def read_price_file(path: Path) -> dict[str, Price]:
    """Prices from one TOML file: ``[models."NAME"]`` tables with ``input``
    and ``output`` in USD per million tokens. Raises ConfigError naming the
    file and the fix."""
    try:
        with path.open("rb") as handle:
            tree = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(
            f"price file {path} not found; check the path given to --price-file"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"price file {path} is not valid TOML ({exc}); fix the file") from None
    except OSError as exc:
        raise ConfigError(f"price file {path} cannot be read ({exc.strerror})") from None
    unknown = sorted(set(tree) - {"models"})
    if unknown:
        raise ConfigError(
            f"price file {path}: unknown top-level key '{unknown[0]}'; prices go in "
            '[models."MODEL-NAME"] tables (see configs/prices.toml)'
        )
    models = tree.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f'price file {path}: "models" must be a table; see configs/prices.toml')
    prices: dict[str, Price] = {}
    for model, entry in models.items():
        if not isinstance(entry, dict):
            raise ConfigError(
                f'price file {path}: [models."{model}"] must be a table with input and output'
            )
        extra = sorted(set(entry) - set(_PRICE_KEYS))
        if extra:
            raise ConfigError(
                f"price file {path}: unknown key '{extra[0]}' for model '{model}'; "
                f"only {', '.join(_PRICE_KEYS)} (USD per million tokens) are read"
            )
        prices[model] = Price(
            model=model,
            input_per_million=_price_value(entry, "input", model, path),
            output_per_million=_price_value(entry, "output", model, path),
            source=str(path),
            batch_input_per_million=_optional_price(entry, "batch_input", model, path),
            batch_output_per_million=_optional_price(entry, "batch_output", model, path),
        )
    return prices


class PriceTable:
    """Model name -> Price. Later files override earlier ones model by model."""

    def __init__(self, prices: Mapping[str, Price] | None = None) -> None:
        self.prices: dict[str, Price] = dict(prices or {})

    @classmethod
    def load(
        cls,
        user_file: Path | None = None,
        *,
        default_file: Path | None = DEFAULT_PRICE_FILE,
    ) -> PriceTable:
        """The shipped table (if present) with ``user_file`` on top."""
        prices: dict[str, Price] = {}
        if default_file is not None and default_file.exists():
            prices.update(read_price_file(default_file))
        if user_file is not None:
            prices.update(read_price_file(user_file))
        return cls(prices)

    def price_for(self, model: str) -> Price | None:
        """The exact name, else the longest known name that prefixes it at a
        "-" (dated snapshots: ``gpt-4o-mini-2024-07-18`` -> ``gpt-4o-mini``),
        else the same after dropping a router's ``provider/`` prefix
        (``openai/gpt-4o``). None when nothing matches."""
        for name in _candidates(model):
            if name in self.prices:
                return self.prices[name]
            prefixes = [known for known in self.prices if name.startswith(known + "-")]
            if prefixes:
                return self.prices[max(prefixes, key=len)]
        return None

    def require(self, model: str, purpose: str) -> Price:
        """The price, or a ConfigError (exit 2, nothing sent) for a feature
        that cannot work without one (``purpose``, e.g. "--max-cost")."""
        price = self.price_for(model)
        if price is None:
            raise ConfigError(f"{purpose} needs a price: {unknown_price_message(model)}")
        return price


def _candidates(model: str) -> Iterator[str]:
    yield model
    if "/" in model:
        yield model.rsplit("/", 1)[1]


def unknown_price_message(model: str) -> str:
    return (
        f"no price known for model '{model}'; add it to a price file "
        f'([models."{model}"] input = ..., output = ..., USD per million tokens) '
        "and pass it with --price-file"
    )


# -- spend cap ---------------------------------------------------------------


class SpendCapReached(EnrichError):
    """The run stopped before passing ``--max-cost``; the checkpoint is kept."""

    exit_code = ExitCode.SPEND_CAP

    def __init__(self, max_cost: float, spent: float, earlier: float, run_dir: Path | None) -> None:
        saved = f"finished rows are saved in {run_dir}" if run_dir else "finished rows are saved"
        by_earlier = f", ${earlier:.4f} of it by earlier runs" if earlier > 0 else ""
        super().__init__(
            f"stopped by the spend cap: the next requests could pass --max-cost "
            f"${max_cost:.2f} (spent ${spent:.4f} so far{by_earlier}); {saved}; "
            "rerun with a higher --max-cost to continue (finished rows are not sent again)"
        )
        self.max_cost = max_cost
        self.spent = spent


class SpendCap:
    """Keeps the money a job spends at or under ``max_cost``.

    The cap covers the whole job, checkpoint included: ``already_spent`` is
    what earlier (interrupted) runs paid for the rows this run resumes, so a
    nightly job restarted after a crash does not get a second budget.

    Before each request the runner calls ``reserve(key, prompt, completion)``
    with the *estimated* tokens (completion: ``max_tokens``, the most a request
    can cost); False means the request could pass the cap and must not be
    sent: the runner stops feeding, lets requests in flight finish, and raises
    ``error()``. When a result arrives, ``settle(key, ...)`` replaces the
    reservation with what the API reported.

    Not thread-safe: call it from the event loop only (the runner does).
    """

    def __init__(self, max_cost: float, price: Price, *, already_spent: float = 0.0) -> None:
        if not math.isfinite(max_cost) or max_cost < 0:
            raise ConfigError(f"--max-cost must be a number >= 0, got {max_cost}")
        self.max_cost = max_cost
        self.price = price
        self.already_spent = already_spent
        self.spent = already_spent
        self._reserved: dict[Any, float] = {}
        self.reached = False
        self._settled = asyncio.Event()

    @property
    def reserved(self) -> float:
        return sum(self._reserved.values())

    @property
    def spent_this_run(self) -> float:
        return self.spent - self.already_spent

    def would_exceed(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Could one more request of this size pass the cap, counting what is
        spent and what requests in flight may still cost?"""
        upcoming = cost(prompt_tokens, completion_tokens, self.price)
        return self.spent + self.reserved + upcoming > self.max_cost

    def reserve(self, key: Any, prompt_tokens: int, completion_tokens: int) -> bool:
        """Book a request's worst-case cost under ``key`` (e.g. the row id).
        False (and ``reached`` set) when it could pass the cap: do not send it."""
        if self.reached or self.would_exceed(prompt_tokens, completion_tokens):
            self.reached = True
            return False
        self._reserved[key] = self._reserved.get(key, 0.0) + cost(
            prompt_tokens, completion_tokens, self.price
        )
        return True

    async def admit(self, key: Any, prompt_tokens: int, completion_tokens: int) -> bool:
        """``reserve``, waiting instead of stopping while requests in flight
        hold worst-case reservations: they mostly settle far below their
        worst case, so stopping at the first refusal would end a run at a
        fraction of a small cap (32 requests x 256 completion tokens held
        back). False only when nothing is in flight and the request still
        could pass the cap: then the cap is reached, never passed."""
        while self.would_exceed(prompt_tokens, completion_tokens):
            if self.reached or not self._reserved:
                self.reached = True
                return False
            self._settled.clear()
            await self._settled.wait()
        return self.reserve(key, prompt_tokens, completion_tokens)

    def settle(self, key: Any, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        """The request under ``key`` finished: drop its reservation and add what
        it really cost (the API's usage; None counts as 0, e.g. a failed row).
        Returns that cost."""
        self._reserved.pop(key, None)
        self._settled.set()
        actual = cost(prompt_tokens or 0, completion_tokens or 0, self.price)
        self.spent += actual
        return actual

    def error(self, run_dir: Path | None = None) -> SpendCapReached:
        return SpendCapReached(self.max_cost, self.spent, self.already_spent, run_dir)


def checkpoint_spend(results: pl.DataFrame, price: Price) -> float:
    """What the rows of a checkpoint cost: their reported tokens, at the price
    of the route that answered each (``route``), except rows answered without
    a request (the response cache or in-run dedup, the ``cached`` column),
    whose tokens are the original request's and were paid by someone else,
    or not at all."""
    import polars as pl

    if "cached" in results.columns:
        results = results.filter(~pl.col("cached").fill_null(False))
    by_batch = pl.col("route") == "batch" if "route" in results.columns else pl.lit(False)
    total = 0.0
    for rows, route_price in (
        (results.filter(~by_batch.fill_null(False)), price),
        (results.filter(by_batch.fill_null(False)), price.for_route("batch")),
    ):
        prompt_tokens = int(rows["prompt_tokens"].sum() or 0)
        completion_tokens = int(rows["completion_tokens"].sum() or 0)
        total += cost(prompt_tokens, completion_tokens, route_price)
    return total


class CostMeter:
    """Running cost of a run without a cap (for progress lines and the
    report): the same settle() as SpendCap, so the runner can treat both alike."""

    def __init__(self, price: Price | None, *, already_spent: float = 0.0) -> None:
        self.price = price
        self.already_spent = already_spent
        self.spent = already_spent

    def settle(self, key: Any, prompt_tokens: int | None, completion_tokens: int | None) -> float:
        if self.price is None:
            return 0.0
        actual = cost(prompt_tokens or 0, completion_tokens or 0, self.price)
        self.spent += actual
        return actual

    @property
    def spent_this_run(self) -> float | None:
        return None if self.price is None else self.spent - self.already_spent


# -- estimate ----------------------------------------------------------------


class PromptBound:
    """``--max-prompt-tokens``: a row whose prompt is estimated above the bound
    is an error at once, never a request (a 10 MB cell would be a request that
    fails, or one that is paid for), with a ``warning`` event (``kind``
    ``prompt_too_long``, one line per 30 s however many rows)."""

    def __init__(self, max_tokens: int | None, events: EventSink) -> None:
        self._max = max_tokens
        self._warning = ThrottledWarning(events, "prompt_too_long")

    def refused(self, row_id: int, messages: Messages) -> RowResult | None:
        """The row's error result when its prompt is over the bound, else None."""
        if self._max is None:
            return None
        tokens = estimate_prompt_tokens(messages)
        if tokens <= self._max:
            return None
        error = (
            f"prompt too long: about {tokens:,} tokens, above --max-prompt-tokens "
            f"{self._max:,}; not sent"
        )
        self._warning.hit(f"row {row_id}: {error}", row=row_id, prompt_tokens=tokens)
        return RowResult(row_id=row_id, status="error", error=error)


def iter_prompt_tokens(
    source: InputSource, spec: prompt.PromptSpec, chunk_size: int = 1000
) -> Iterator[int | None]:
    """Estimated prompt tokens of every input row, in order; None for a row
    that would be skipped (null or blank prompt). Reads the input in chunks:
    memory follows the chunk size."""
    for chunk in source.chunks(chunk_size):
        for text in prompt.render(spec, chunk.table):
            yield None if text is None else estimate_prompt_tokens(prompt.messages(spec, text))


Bound = Literal["rpm", "tpm", "concurrency", "none"]


@dataclass(frozen=True)
class Estimate:
    """What a run would send and cost, before sending anything."""

    rows: int
    """Rows that would be sent."""
    skipped: int
    """Rows with nothing to ask (null or blank prompt)."""
    prompt_tokens: int
    completion_tokens: int
    """Assumed: ``max_tokens`` per row (the most it can be), else a default."""
    completion_tokens_per_row: int
    cost: float | None
    """USD; None when the model has no known price (see ``message``)."""
    price: Price | None
    seconds: float
    """Time at the configured limits: the slowest of rpm, tpm and concurrency x latency."""
    bound_by: Bound
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "skipped": self.skipped,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "completion_tokens_per_row": self.completion_tokens_per_row,
            "cost_usd": None if self.cost is None else round(self.cost, 6),
            "price": None if self.price is None else self.price.to_dict(),
            "seconds": round(self.seconds, 1),
            "bound_by": self.bound_by,
            "message": self.message,
        }


def estimate(
    prompt_tokens: Iterable[int | None],
    *,
    model: str,
    price: Price | None,
    max_tokens: int | None,
    concurrency: int,
    rpm: int | None = None,
    tpm: int | None = None,
    latency_s: float = DEFAULT_LATENCY_S,
    completion_tokens_per_row: int | None = None,
) -> Estimate:
    """Rows, tokens, cost and duration of a run, from per-row prompt token
    estimates (None = a skipped row). Pure: sends nothing, reads nothing.

    Completions are assumed to use ``completion_tokens_per_row`` if given,
    else ``max_tokens``, else the limiter's default budget: with max_tokens
    set the cost is an upper bound. The time is the slowest of the three
    limits, since each one alone would take that long: rows/rpm, (prompt +
    completion budget)/tpm (what the token bucket charges), and
    rows x latency / concurrency.
    """
    rows = skipped = total_prompt = 0
    for tokens in prompt_tokens:
        if tokens is None:
            skipped += 1
        else:
            rows += 1
            total_prompt += tokens
    per_row = completion_tokens_per_row
    if per_row is None:
        per_row = max_tokens or DEFAULT_COMPLETION_ESTIMATE
    total_completion = rows * per_row
    # The token bucket charges the completion *budget* (max_tokens), whatever
    # the assumption for cost.
    bucket_tokens = total_prompt + rows * (max_tokens or DEFAULT_COMPLETION_ESTIMATE)
    bounds: dict[Bound, float] = {"concurrency": rows * latency_s / concurrency}
    if rpm:
        bounds["rpm"] = rows / rpm * 60.0
    if tpm:
        bounds["tpm"] = bucket_tokens / tpm * 60.0
    bound_by: Bound = max(bounds, key=lambda name: bounds[name]) if rows else "none"
    return Estimate(
        rows=rows,
        skipped=skipped,
        prompt_tokens=total_prompt,
        completion_tokens=total_completion,
        completion_tokens_per_row=per_row,
        cost=None if price is None else cost(total_prompt, total_completion, price),
        price=price,
        seconds=bounds[bound_by] if rows else 0.0,
        bound_by=bound_by,
        message=None if price is not None else unknown_price_message(model),
    )


# Rows read to estimate a run before it starts: the estimate scales their
# mean up to the whole input, so a run never reads its input twice.
ESTIMATE_SAMPLE_ROWS: Final = 1000


def estimate_from_sample(
    source: InputSource,
    spec: prompt.PromptSpec,
    total_rows: int,
    *,
    model: str,
    price: Price | None,
    max_tokens: int | None,
    concurrency: int,
    rpm: int | None = None,
    tpm: int | None = None,
    sample_rows: int = ESTIMATE_SAMPLE_ROWS,
) -> Estimate:
    """``estimate`` from the first ``sample_rows`` rows, scaled to
    ``total_rows``: what a run records as its estimate before it starts
    (``enrich estimate`` reads every row instead)."""
    sample = list(itertools.islice(iter_prompt_tokens(source, spec, sample_rows), sample_rows))
    found = estimate(
        sample,
        model=model,
        price=price,
        max_tokens=max_tokens,
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
    )
    if not sample or len(sample) >= total_rows:
        return found
    scale = total_rows / len(sample)
    return dataclasses.replace(
        found,
        rows=round(found.rows * scale),
        skipped=round(found.skipped * scale),
        prompt_tokens=round(found.prompt_tokens * scale),
        completion_tokens=round(found.completion_tokens * scale),
        cost=None if found.cost is None else found.cost * scale,
        seconds=found.seconds * scale,
    )


def format_duration(seconds: float) -> str:
    """``3 h 12 min``, ``4 min 05 s``, ``12 s``: for the estimate and progress lines."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    if minutes:
        return f"{minutes} min {secs:02d} s"
    return f"{secs} s"


def format_estimate(result: Estimate) -> str:
    """Human lines for ``enrich estimate`` (the CLI prints them)."""
    if result.cost is not None and result.price is not None:
        money = (
            f"${result.cost:,.4f} at ${result.price.input_per_million:g} in / "
            f"${result.price.output_per_million:g} out per 1M tokens ({result.price.model})"
        )
    else:
        money = f"unknown: {result.message}"
    return "\n".join(
        [
            f"rows: {result.rows:,} to send, {result.skipped:,} skipped (empty prompt)",
            f"tokens: ~{result.prompt_tokens:,} in / {result.completion_tokens:,} out "
            f"({result.completion_tokens_per_row:,} per row assumed)",
            f"cost: {money}",
            f"time: ~{format_duration(result.seconds)} at the configured limits "
            f"(bound by {result.bound_by})",
        ]
    )
