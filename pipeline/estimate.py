"""``enrich estimate``: what a job sends, costs and takes online, and with
``--route batch`` what it costs through the provider's Batch API and the batch
input files it makes.

One source for each fact: the files are cut by the batch route's own pieces
(``batch_files.request_line`` with ``transport.body_params``, the same lines
the run uploads, and ``batch_files.FileSplitter`` within the same
``FileLimits``), and the batch price is ``Price.for_route("batch")``, the one
the run's cost and its spend cap count with. Tokens, rows and the online cost
are the online estimate's (``costs.estimate``), so both routes are priced on
the same token counts.

One pass over the input: ``FileCounter.prompt_tokens`` feeds the online
estimate and cuts the files on the way. Memory follows one batch file (the
splitter holds only the file being filled), not the input.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import prompt
from pipeline.batch_files import FileLimits, FileSplitter, request_line
from pipeline.costs import Estimate, Price, PriceTable, cost, format_estimate, iter_prompt_tokens
from pipeline.costs import estimate as estimate_online
from pipeline.prompt import estimate_prompt_tokens
from pipeline.transport import Messages, body_params

if TYPE_CHECKING:
    from pipeline.plan import PreparedRun

__all__ = [
    "BatchFiles",
    "FileCounter",
    "RouteEstimate",
    "estimate_job",
    "estimate_routes",
    "request_lines",
]


@dataclass(frozen=True)
class BatchFiles:
    """The batch input files a job makes (before the response cache and the
    per-file dedup, which can only make them fewer)."""

    files: int
    requests: int
    bytes: int
    largest_requests: int
    largest_bytes: int
    limits: FileLimits

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "requests": self.requests,
            "bytes": self.bytes,
            "largest_file_requests": self.largest_requests,
            "largest_file_bytes": self.largest_bytes,
            "max_requests_per_file": self.limits.max_requests,
            "max_bytes_per_file": self.limits.max_bytes,
        }


def _body_params(prepared: PreparedRun) -> dict[str, Any]:
    response_format = prepared.response_format
    extra = {"response_format": response_format} if response_format is not None else None
    return body_params(prepared.config.model, extra)


def request_lines(prepared: PreparedRun, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """``(row_id, line)`` of every row with a prompt, as the batch route writes them."""
    counter = FileCounter(prepared, chunk_size)
    model, params = prepared.config.model.name, _body_params(prepared)
    for row_id, messages in counter.rows():
        if messages is not None:
            yield row_id, request_line(row_id, model, messages, params)


class FileCounter:
    """Counts the batch files of a job while the online estimate reads its
    prompts: one pass over the input, one file held at a time."""

    def __init__(
        self, prepared: PreparedRun, chunk_size: int, limits: FileLimits | None = None
    ) -> None:
        """``limits``: the run's (``--batch-max-requests``, ``--batch-max-bytes``) if None."""
        if limits is None:
            batch = prepared.config.batch
            limits = FileLimits(batch.max_requests, batch.max_bytes)
        self._prepared = prepared
        self._chunk_size = chunk_size
        self._splitter = FileSplitter(limits)
        self._limits = limits
        self._sizes: list[tuple[int, int]] = []  # (requests, bytes) per file

    def rows(self) -> Iterator[tuple[int, Messages | None]]:
        spec = self._prepared.spec
        for chunk in self._prepared.source.chunks(self._chunk_size):
            for index, text in enumerate(prompt.render(spec, chunk.table)):
                messages = None if text is None else prompt.messages(spec, text)
                yield chunk.offset + index, messages

    def prompt_tokens(self) -> Iterator[int | None]:
        """What ``costs.iter_prompt_tokens`` yields (None for a skipped row),
        cutting each row's request line into files on the way; raises
        ``LineTooLarge`` as the run would."""
        model, params = self._prepared.config.model.name, _body_params(self._prepared)
        for row_id, messages in self.rows():
            if messages is None:
                yield None
                continue
            done = self._splitter.add(row_id, request_line(row_id, model, messages, params))
            if done is not None:
                self._sizes.append((len(done.rows), done.size))
            yield estimate_prompt_tokens(messages)

    def files(self) -> BatchFiles:
        """The files, once ``prompt_tokens`` has been read to the end."""
        last = self._splitter.finish()
        if last is not None:
            self._sizes.append((len(last.rows), last.size))
        requests = [n for n, _ in self._sizes]
        sizes = [size for _, size in self._sizes]
        return BatchFiles(
            files=len(self._sizes),
            requests=sum(requests),
            bytes=sum(sizes),
            largest_requests=max(requests, default=0),
            largest_bytes=max(sizes, default=0),
            limits=self._limits,
        )


def _size(size: int) -> str:
    """Bytes in binary units, as the providers' file limits are written (200 MB = 200 MiB)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}".replace(".0 ", " ")
    return f"{size:,} B"


@dataclass(frozen=True)
class RouteEstimate:
    """The online estimate, and the same job through the Batch API."""

    online: Estimate
    batch_price: Price | None
    batch_cost: float | None
    files: BatchFiles

    def to_dict(self) -> dict[str, Any]:
        found = self.online.to_dict()
        online_cost = self.online.cost
        saving = None
        if online_cost is not None and self.batch_cost is not None:
            saving = round(online_cost - self.batch_cost, 6)
        found["route"] = "batch"
        found["batch"] = {
            "cost_usd": None if self.batch_cost is None else round(self.batch_cost, 6),
            "price": None if self.batch_price is None else self.batch_price.to_dict(),
            "saving_usd": saving,
            **self.files.to_dict(),
        }
        return found

    def format(self) -> str:
        """Human lines: the online estimate, then the batch route's."""
        files = self.files
        lines = [format_estimate(self.online).replace("cost: ", "cost online: ", 1)]
        price, online_cost = self.batch_price, self.online.cost
        if price is not None and self.batch_cost is not None and online_cost is not None:
            share = self.batch_cost / online_cost if online_cost else 1.0
            lines.append(
                f"cost batch: ${self.batch_cost:,.4f} at ${price.input_per_million:g} in / "
                f"${price.output_per_million:g} out per 1M tokens ({share:.0%} of online, "
                f"saving ${online_cost - self.batch_cost:,.4f})"
            )
        else:
            lines.append(f"cost batch: unknown: {self.online.message}")
        lines.append(
            f"batch files: {files.files:,} of at most {files.limits.max_requests:,} requests / "
            f"{_size(files.limits.max_bytes)} (largest: {files.largest_requests:,} requests, "
            f"{_size(files.largest_bytes)}; {_size(files.bytes)} in all)"
        )
        lines.append(
            "batch time: within the provider's 24 h completion window (the time above is online)"
        )
        return "\n".join(lines)


def estimate_routes(online: Estimate, files: BatchFiles) -> RouteEstimate:
    """The batch route beside ``online``, the online estimate of the same job."""
    price = online.price.for_route("batch") if online.price is not None else None
    batch_cost = (
        cost(online.prompt_tokens, online.completion_tokens, price) if price is not None else None
    )
    return RouteEstimate(online, price, batch_cost, files)


def estimate_job(prepared: PreparedRun, latency_s: float) -> tuple[dict[str, Any], str]:
    """The estimate of a prepared job, as JSON and as human lines: online,
    and the batch route beside it with ``route = "batch"``."""
    config = prepared.config
    chunk_size = config.input.chunk_size
    prompt_tokens = iter_prompt_tokens(prepared.source, prepared.spec, chunk_size)
    counter = None
    if config.route == "batch":
        counter = FileCounter(prepared, chunk_size)
        prompt_tokens = counter.prompt_tokens()
    online = estimate_online(
        prompt_tokens,
        model=config.model.name,
        price=PriceTable.load(config.price_file).price_for(config.model.name),
        max_tokens=config.model.max_tokens,
        concurrency=config.limits.concurrency,
        rpm=config.limits.rpm,
        tpm=config.limits.tpm,
        latency_s=latency_s,
    )
    if counter is None:
        return online.to_dict(), format_estimate(online)
    routes = estimate_routes(online, counter.files())
    return routes.to_dict(), routes.format()
