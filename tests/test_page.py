"""The report page of a real run: a local server with latency, 429s and 5xx
faults, a run stopped by the spend cap and resumed, its page drawn at the
end. The page shows every chart, and every number it shows is the report's.
The real runs take seconds: those tests are marked slow."""

from __future__ import annotations

import asyncio
import base64
import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner

from pipeline import RunConfig, enrich
from pipeline.cli import cli
from pipeline.errors import ExitCode
from pipeline.page import CHARTS, render_page
from pipeline.report import page_path_for, read_report, report_path_for
from pipeline.timeline import SERIES

from conftest import MODEL, StartServer, make_config, report_value, write_questions

ROWS = 240


def price_file(tmp_path: Path) -> Path:
    # Dear enough that a small cap stops the first run halfway.
    path = tmp_path / "prices.toml"
    path.write_text(f'[models."{MODEL}"]\ninput = 1000.0\noutput = 2000.0\n')
    return path


def with_cap(config: RunConfig, cap: float) -> RunConfig:
    return config.replace(max_cost=cap)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A job stopped by its spend cap, then resumed to the end; its report
    and the page written beside it."""
    from pipeline.simulate import Simulator, SimulatorConfig

    tmp_path = tmp_path_factory.mktemp("page")
    source = write_questions(
        tmp_path / "in.csv", [None if i % 40 == 7 else f"page question {i}" for i in range(ROWS)]
    )
    output = tmp_path / "out.parquet"
    simulated = SimulatorConfig(
        latency_ms=20, jitter_ms=20, fail_rate_5xx=0.2, fail_rate_429=0.05, seed=3
    )
    # Module-scoped, so set up before each test's isolated cache: a cache of
    # its own, or answers left in the user's cache by other runs could be
    # reused for free, and the cap would never be reached.
    with (
        pytest.MonkeyPatch.context() as patch,
        Simulator.run_in_thread(simulated) as server,
    ):
        patch.setenv("ENRICH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        config = make_config(
            source,
            output,
            server.base_url,
            **{
                "output.page": True,
                "price_file": price_file(tmp_path),
                "limits.concurrency": 8,
                "limits.max_attempts": 2,
                # A small completion budget: the cap's reservations stay small.
                "model.max_tokens": 20,
                "max_error_rate": 1.0,
            },
        )
        with pytest.raises(Exception) as stopped:
            enrich(with_cap(config, 2.0))
        assert getattr(stopped.value, "exit_code", None) == ExitCode.SPEND_CAP
        first = read_report(report_path_for(output))
        assert first is not None and first["exit_code"] == ExitCode.SPEND_CAP
        enrich(with_cap(config, 100.0))
    report = read_report(report_path_for(output))
    assert report is not None
    return output, report


def shown_numbers(page: str) -> dict[str, Any]:
    return {
        html.unescape(key): json.loads(html.unescape(value))
        for key, value in re.findall(r'data-key="([^"]+)" data-value="([^"]*)"', page)
    }


@pytest.mark.slow
def test_the_report_keeps_one_segment_per_run_of_the_job(
    resumed_run: tuple[Path, dict[str, Any]],
) -> None:
    _, report = resumed_run
    timeline = report["timeline"]
    outcomes = [segment["outcome"] for segment in timeline["segments"]]
    assert outcomes == ["stopped_by_spend_cap", "done"]
    last = timeline["segments"][-1]
    # The intervals add up to the run's totals, which are the report's.
    for name in ("sent", "ok", "error", "rate_limited", "retries", "prompt_tokens"):
        assert sum(last["series"][name]) == last["totals"][name], name
    assert last["totals"]["sent"] == report["requests"]["sent"]
    assert last["totals"]["retries"] == report["requests"]["retries"]
    assert last["totals"]["rate_limited"] == report["requests"]["rate_limited_429"]
    assert last["totals"]["cost_usd"] == pytest.approx(report["cost"]["this_run"], abs=1e-6)
    assert set(last["series"]) == set(SERIES)
    assert sum(s["totals"]["rate_limited"] for s in timeline["segments"]) > 0
    assert sum(s["totals"]["paused_s"] for s in timeline["segments"]) > 0
    # Every answered request's latency, over both runs.
    assert sum(timeline["latency"]["counts"]) == sum(
        s["totals"]["ok"] - s["totals"]["cache_hits"] - s["totals"]["deduplicated"]
        for s in timeline["segments"]
    )
    assert report["cost"]["estimate_before_run"]["rows"] == ROWS - ROWS // 40


@pytest.mark.slow
def test_the_page_shows_every_chart_and_the_reports_numbers(
    resumed_run: tuple[Path, dict[str, Any]],
) -> None:
    output, report = resumed_run
    page = page_path_for(report_path_for(output)).read_text()
    for chart in CHARTS:
        assert re.search(rf"<figure id='chart-{chart}'><svg", page), chart
    shown = shown_numbers(page)
    for key in (
        "counts.ok",
        "counts.error",
        "counts.pending",
        "counts.skipped",
        "counts.resumed_rows",
        "requests.sent",
        "requests.retries",
        "requests.rate_limited_429",
        "tokens.prompt",
        "cost.this_run",
        "cost.max_cost",
        "cost.estimate_before_run.cost_usd",
        "timing.latency_ms.p50",
        "timing.latency_ms.p90",
        "timing.latency_ms.p99",
        "input.sha256",
        "output.path",
        "fingerprint",
    ):
        assert key in shown, key
    for key, value in shown.items():
        assert value == report_value(report, key), key
    assert report["counts"]["resumed_rows"] > 10
    assert report["timeline"]["errors"], "no row failed: the page's error table is untested"
    for kind, entry in report["timeline"]["errors"].items():
        assert shown[f"timeline.errors.{kind}.count"] == entry["count"]
        assert html.escape(kind) in page
    assert page.count("<tr><td>") >= len(report["timeline"]["segments"])
    for segment in report["timeline"]["segments"]:
        assert html.escape(segment["outcome"]) in page
    if report["counts"]["pending"]:
        assert "run the same command again" in page
    # The settings, without the key.
    assert '"concurrency": 8' in html.unescape(page)


@pytest.mark.slow
def test_the_page_needs_no_script_and_no_network(
    resumed_run: tuple[Path, dict[str, Any]],
) -> None:
    output, _ = resumed_run
    page = page_path_for(report_path_for(output)).read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""\b(src|href)\s*=\s*["']?(https?:|//)""", page, re.IGNORECASE)
    # Only references within the page (an SVG's clip paths: url(#id)).
    assert re.findall(r"url\((?!#)", page) == []
    assert "@import" not in page
    assert "default-src 'none'" in page


@pytest.mark.slow
def test_enrich_report_draws_the_same_page_again(
    resumed_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    output, _ = resumed_run
    target = tmp_path / "again.html"
    result = CliRunner().invoke(cli, ["report", str(output), "--html", str(target)])
    assert result.exit_code == 0, result.output
    assert str(target) in result.output
    assert target.read_text() == page_path_for(report_path_for(output)).read_text()


def test_enrich_report_without_a_report_says_how_to_get_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "none.parquet")])
    assert result.exit_code == ExitCode.USAGE
    assert "no readable run report" in result.output
    assert "enrich run" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_a_page_draws_from_a_report_without_a_timeline() -> None:
    # A report of an older enrich, or of a run that stopped before sending.
    page = render_page({"outcome": "done", "exit_code": 0, "counts": {"ok": 3}})
    for chart in CHARTS:
        assert f"id='chart-{chart}'" in page
    assert shown_numbers(page)["counts.ok"] == 3


@pytest.mark.slow
def test_without_matplotlib_enrich_report_says_which_extra_to_install(tmp_path: Path) -> None:
    report = tmp_path / "out.parquet.report.json"
    report.write_text(json.dumps({"outcome": "done", "exit_code": 0}))
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pipeline.cli import main; sys.argv = ['enrich', 'report', sys.argv[1]]; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out.parquet")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ},
    )
    assert done.returncode == ExitCode.USAGE
    assert "pip install 'enrich-llm[page]'" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out.parquet.report.html").exists()


@pytest.mark.slow
def test_a_run_without_matplotlib_writes_its_report_and_warns(
    tmp_path: Path, start_server: StartServer
) -> None:
    server = start_server()
    source = write_questions(tmp_path / "in.csv", ["a", "b", "c"])
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from pipeline.cli import main; sys.argv = ['enrich', *sys.argv[1:]]; main()"
    )
    argv = ["run", "--input", str(source), "--column", "question", "--model", MODEL]
    argv += ["--output", str(tmp_path / "out.parquet"), "--base-url", server.base_url]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv, "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OPENAI_API_KEY": "sk-page-test"},
    )
    assert done.returncode == 0, done.stderr
    warnings = [
        json.loads(line) for line in done.stderr.splitlines() if '"page_not_written"' in line
    ]
    assert len(warnings) == 1
    assert "enrich-llm[page]" in warnings[0]["message"]
    assert (tmp_path / "out.parquet.report.json").exists()
    assert not (tmp_path / "out.parquet.report.html").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """The Chrome DevTools Protocol over one page's websocket: commands by
    id, events kept in order."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self._socket:
            body = json.loads(message.data)
            if "id" in body:
                self._waiting.pop(body["id"]).set_result(body)
            else:
                self.events.append(body)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        future = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        await self._socket.send_json({"id": self._next_id, "method": method, "params": params})
        answer = await asyncio.wait_for(future, 30)
        assert "error" not in answer, answer
        result: dict[str, Any] = answer["result"]
        return result

    async def until(self, method: str) -> None:
        for _ in range(300):
            if any(event["method"] == method for event in self.events):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {method} within 30 s")

    def named(self, *methods: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["method"] in methods]

    def close(self) -> None:
        self._reader.cancel()


async def devtools_port(process: asyncio.subprocess.Process) -> int:
    assert process.stderr is not None
    while line := await asyncio.wait_for(process.stderr.readline(), 30):
        found = re.search(rb"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise AssertionError("chromium did not open its DevTools port")


@pytest.mark.slow
# Skipped only where no chromium is installed locally; CI (.ci/run installs it) must run it.
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="no chromium here (.ci/run installs it)"
)
async def test_the_page_renders_in_a_headless_browser_without_errors_or_requests(
    resumed_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    output, _ = resumed_run
    page_url = page_path_for(report_path_for(output)).resolve().as_uri()
    assert CHROMIUM is not None, "chromium is missing: .ci/run installs Debian's package"
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        "--window-size=1200,900",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    drain: asyncio.Task[bytes] | None = None
    try:
        port = await devtools_port(process)
        assert process.stderr is not None
        # Chromium logs on; an unread pipe would block it.
        drain = asyncio.create_task(process.stderr.read())
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as answer:
                targets = await answer.json()
            socket_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(socket_url, max_msg_size=0) as socket:
                tools = DevTools(socket)
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await tools.call(f"{domain}.enable")
                await tools.call("Page.navigate", url=page_url)
                await tools.until("Page.loadEventFired")
                drawn = await tools.call(
                    "Runtime.evaluate",
                    expression="[document.querySelectorAll('figure > svg').length, "
                    "document.scripts.length, document.body.scrollHeight]",
                    returnByValue=True,
                )
                shot = await tools.call(
                    "Page.captureScreenshot", format="png", captureBeyondViewport=True
                )
                tools.close()
    finally:
        if process.returncode is None:
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)
        if drain is not None:
            await drain
    charts, scripts, height = drawn["result"]["value"]
    assert charts == len(CHARTS)
    assert scripts == 0
    assert height > 2000
    requested = [e["params"]["request"]["url"] for e in tools.named("Network.requestWillBeSent")]
    assert requested == [page_url]
    assert tools.named("Runtime.exceptionThrown") == []
    problems = [
        e
        for e in tools.named("Log.entryAdded", "Runtime.consoleAPICalled")
        if e["params"].get("entry", e["params"]).get("level", e["params"].get("type"))
        in ("error", "warning")
    ]
    assert problems == []
    screenshot = tmp_path / "report-page.png"
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    assert screenshot.stat().st_size > 20_000


@pytest.mark.slow
def test_a_cli_run_writes_the_page_beside_its_report_and_names_it(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-page-cli-test")
    source = write_questions(tmp_path / "in.csv", ["one", "two", "three"])
    output = tmp_path / "out.parquet"
    argv = ["run", "--input", str(source), "--column", "question", "--model", MODEL]
    argv += ["--base-url", server.base_url]
    result = CliRunner().invoke(cli, [*argv, "--output", str(output)])
    assert result.exit_code == 0, result.output
    page = tmp_path / "out.parquet.report.html"
    assert f"report page {page.resolve().as_uri()}" in result.output
    assert shown_numbers(page.read_text())["counts.ok"] == 3
    assert "sk-page-cli-test" not in page.read_text()

    again = tmp_path / "again.parquet"
    result = CliRunner().invoke(cli, [*argv, "--output", str(again), "--no-page"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.parquet.report.json").exists()
    assert not (tmp_path / "again.parquet.report.html").exists()
    assert "report page" not in result.output
