"""``enrich estimate --route batch``: what a job costs online and through the
provider's Batch API, and the batch input files it makes.

One source for each fact: the files are cut by the batch route's own pieces
(``batch_files.request_line`` with ``transport.body_params``, the same lines
the run uploads, and ``batch_files.split_lines`` within the same
``FileLimits``), and the batch price is ``Price.for_route("batch")``, the one
the run's cost and its spend cap count with. Tokens, rows and the online cost
are the online estimate's (``costs.estimate``), so both routes are priced on
the same token counts.

Memory follows one batch file (``split_lines`` holds only the file being
filled), not the input. The input is read twice: once for the online estimate,
once for the files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import prompt
from pipeline.batch_files import FileLimits, request_line, split_lines
from pipeline.costs import Estimate, Price, cost, format_estimate
from pipeline.transport import body_params

if TYPE_CHECKING:
    from pipeline.plan import PreparedRun

__all__ = ["BatchFiles", "RouteEstimate", "count_batch_files", "estimate_routes", "request_lines"]


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


def request_lines(prepared: PreparedRun, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """``(row_id, line)`` of every row with a prompt, as the batch route writes them."""
    config = prepared.config
    response_format = prepared.response_format
    extra = {"response_format": response_format} if response_format is not None else None
    params = body_params(config.model, extra)
    model, spec = config.model.name, prepared.spec
    for chunk in prepared.source.chunks(chunk_size):
        for index, text in enumerate(prompt.render(spec, chunk.table)):
            if text is not None:
                row_id = chunk.offset + index
                yield row_id, request_line(row_id, model, prompt.messages(spec, text), params)


def count_batch_files(prepared: PreparedRun, chunk_size: int, limits: FileLimits) -> BatchFiles:
    """Cut the job's request lines into files as the batch route does, and
    count them; raises ``LineTooLarge`` as the run would."""
    files = requests = size = largest_requests = largest_bytes = 0
    for content in split_lines(request_lines(prepared, chunk_size), limits):
        files += 1
        requests += len(content.rows)
        size += content.size
        largest_requests = max(largest_requests, len(content.rows))
        largest_bytes = max(largest_bytes, content.size)
    return BatchFiles(files, requests, size, largest_requests, largest_bytes, limits)


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
            f"{files.limits.max_bytes / 1e6:,.1f} MB (largest: {files.largest_requests:,} "
            f"requests, {files.largest_bytes / 1e6:,.1f} MB; {files.bytes / 1e6:,.1f} MB in all)"
        )
        lines.append(
            "batch time: within the provider's 24 h completion window (the time above is online)"
        )
        return "\n".join(lines)


def estimate_routes(
    online: Estimate, prepared: PreparedRun, chunk_size: int, limits: FileLimits
) -> RouteEstimate:
    """The batch route beside ``online`` (the online estimate of the same job)."""
    files = count_batch_files(prepared, chunk_size, limits)
    price = online.price.for_route("batch") if online.price is not None else None
    batch_cost = (
        cost(online.prompt_tokens, online.completion_tokens, price) if price is not None else None
    )
    return RouteEstimate(online, price, batch_cost, files)
