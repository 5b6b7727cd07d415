"""Live metrics for schedulers: the run's counters in the Prometheus text
format, served over HTTP while the run goes (``enrich run --metrics-port``).

The numbers are read from the run's ``Timeline`` at each scrape (the same
totals its progress events carry and its report keeps), through the official
client library's custom-collector interface: nothing is counted twice, and a
scrape between two ticks still sees the current values. prometheus_client is
imported only when metrics are asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Final

from pipeline.errors import UsageError

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from pipeline.timeline import Timeline

DEFAULT_METRICS_HOST: Final = "127.0.0.1"

# Metric names without the client's "_total" suffix (it adds it to counters).
PREFIX: Final = "enrich"


class _TimelineCollector:
    """Reads the timeline at each scrape (called from the server's thread:
    plain int and float reads, safe under the GIL)."""

    def __init__(self, timeline: Timeline) -> None:
        self._timeline = timeline

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        live = self._timeline.totals()

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", text, value=value)

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", text, value=value)

        yield counter("requests", "Requests sent to the API (retries included).", live.sent)
        yield counter("retries", "Requests sent again after a failed attempt.", live.retries)
        yield counter("rate_limited", "Attempts answered 429 (rate limited).", live.rate_limited)
        rows = CounterMetricFamily(
            f"{PREFIX}_rows", "Rows finished by this run, by status.", labels=["status"]
        )
        for status, value in (("ok", live.ok), ("error", live.error), ("skipped", live.skipped)):
            rows.add_metric([status], value)
        yield rows
        reused = CounterMetricFamily(
            f"{PREFIX}_rows_reused",
            "Rows answered without a request of their own.",
            labels=["source"],
        )
        reused.add_metric(["cache"], live.cache_hits)
        reused.add_metric(["dedup"], live.deduplicated)
        yield reused
        errors = CounterMetricFamily(
            f"{PREFIX}_row_errors", "Failed rows by reason.", labels=["reason"]
        )
        for reason, entry in list(self._timeline.errors.items()):
            errors.add_metric([reason], entry["count"])
        yield errors
        tokens = CounterMetricFamily(
            f"{PREFIX}_tokens", "Tokens the API reported, by kind.", labels=["kind"]
        )
        tokens.add_metric(["prompt"], live.prompt_tokens)
        tokens.add_metric(["completion"], live.completion_tokens)
        yield tokens
        if live.cost_usd is not None:
            yield counter("cost_usd", "Estimated spend of this run in USD.", live.cost_usd)
        yield counter("paused_seconds", "Time the run was paused by 429s.", live.paused_s)
        yield counter("outage_seconds", "Time the run waited out API outages.", live.outage_s)
        yield gauge("requests_in_flight", "Requests in flight now.", live.in_flight)
        yield gauge(
            "concurrency_limit", "The in-flight limit in force (adaptive).", live.concurrency_limit
        )
        if live.limit_rpm is not None:
            yield gauge(
                "rate_limit_rpm",
                "Requests/min in force: configured, reported by the server, or learned.",
                live.limit_rpm,
            )


@contextlib.contextmanager
def serving(timeline: Timeline, port: int, host: str = DEFAULT_METRICS_HOST) -> Iterator[int]:
    """Serve ``timeline``'s metrics on ``host:port`` for the duration of the
    block; yields the port (useful with port 0: one the system picks)."""
    from prometheus_client import start_http_server
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_TimelineCollector(timeline))
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(
            f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
            "choose a free port with --metrics-port"
        ) from None
    try:
        yield int(server.server_port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
