"""``enrich estimate --route batch``: the cost online and through the Batch
API, and the batch files the job makes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner, Result

from pipeline.batch_files import FileLimits, LineTooLarge
from pipeline.cli import cli
from pipeline.costs import Estimate, PriceTable, cost, iter_prompt_tokens
from pipeline.costs import estimate as estimate_online
from pipeline.estimate import BatchFiles, FileCounter, estimate_routes, request_lines
from pipeline.plan import PreparedRun, prepare
from pipeline.simulate import Simulator, SimulatorConfig
from pipeline.simulate_batch import BatchConfig

from conftest import MODEL, answer_for, make_config, write_questions

PRICED = "gpt-4o-mini"


def prepared_for(tmp_path: Path, prompts: Sequence[str | None], model: str = PRICED) -> PreparedRun:
    path = write_questions(tmp_path / "in.csv", prompts)
    config = make_config(path, tmp_path / "out.parquet", "http://127.0.0.1:9/v1", **{
        "model.name": model,
        "model.max_tokens": 50,
    })  # fmt: skip
    return prepare(config, check_output=False)


def online_and_files(
    prepared: PreparedRun, chunk_size: int = 1000, limits: FileLimits | None = None
) -> tuple[Estimate, BatchFiles]:
    counter = FileCounter(prepared, chunk_size, limits)
    model = prepared.config.model.name
    price = PriceTable.load(None).price_for(model)
    online = estimate_online(
        counter.prompt_tokens(), model=model, price=price, max_tokens=50, concurrency=4
    )
    return online, counter.files()


def test_the_batch_route_costs_half_the_online_route_on_the_same_tokens(tmp_path: Path) -> None:
    prepared = prepared_for(tmp_path, [f"question {i}" for i in range(10)])
    online, files = online_and_files(prepared)
    routes = estimate_routes(online, files)
    price = PriceTable.load(None).price_for(PRICED)
    assert price is not None and online.cost is not None and routes.batch_cost is not None
    # gpt-4o-mini's table has no batch rate: the documented 50%.
    assert routes.batch_cost == pytest.approx(online.cost / 2)
    assert routes.batch_cost == pytest.approx(
        cost(online.prompt_tokens, online.completion_tokens, price.for_route("batch"))
    )
    found = routes.to_dict()
    assert found["cost_usd"] == round(online.cost, 6)
    assert found["batch"]["cost_usd"] == round(routes.batch_cost, 6)
    assert found["batch"]["saving_usd"] == pytest.approx(online.cost / 2, abs=1e-6)
    assert found["batch"]["files"] == 1
    text = routes.format()
    assert "cost online: $" in text and "cost batch: $" in text and "50% of online" in text


def test_counting_files_reads_the_same_prompt_tokens_as_the_online_estimate(
    tmp_path: Path,
) -> None:
    prompts: list[str | None] = [f"question number {i}" * (i % 4 + 1) for i in range(9)]
    prompts[3] = None
    prepared = prepared_for(tmp_path, prompts)
    counted = list(FileCounter(prepared, 2).prompt_tokens())
    assert counted == list(iter_prompt_tokens(prepared.source, prepared.spec, 2))


def test_batch_files_are_counted_by_requests_per_file_skipping_empty_prompts(
    tmp_path: Path,
) -> None:
    prompts: list[str | None] = [f"q{i}" for i in range(23)]
    prompts[5] = None
    prepared = prepared_for(tmp_path, prompts)
    online, files = online_and_files(prepared, chunk_size=4, limits=FileLimits(max_requests=5))
    assert online.rows == files.requests == 22
    assert files.files == math.ceil(22 / 5)
    assert files.largest_requests == 5
    lines = [line for _, line in request_lines(prepared, 4)]
    assert files.bytes == sum(len(line) for line in lines)
    assert files.largest_bytes == max(
        sum(len(line) for line in lines[start : start + 5]) for start in range(0, 22, 5)
    )


def test_batch_files_are_cut_by_bytes_too(tmp_path: Path) -> None:
    prepared = prepared_for(tmp_path, ["same size a", "same size b", "same size c"])
    one = len(next(request_lines(prepared, 1000))[1])
    _, files = online_and_files(prepared, limits=FileLimits(max_bytes=2 * one + 1))
    assert (files.files, files.largest_requests) == (2, 2)
    with pytest.raises(LineTooLarge, match="--batch-max-bytes"):
        online_and_files(prepared, limits=FileLimits(max_bytes=one - 1))


def test_a_model_without_a_price_has_no_batch_cost_but_its_files(tmp_path: Path) -> None:
    prepared = prepared_for(tmp_path, ["a", "b"], model="a-local-model")
    online, files = online_and_files(prepared)
    routes = estimate_routes(online, files)
    assert routes.batch_cost is None and routes.to_dict()["batch"]["cost_usd"] is None
    assert routes.files.files == 1
    assert "cost batch: unknown" in routes.format()


def estimate_cli(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["estimate", *map(str, args)])


def test_estimate_with_route_batch_shows_both_costs_and_the_batch_files(tmp_path: Path) -> None:
    path = write_questions(tmp_path / "in.csv", [f"question {i}" for i in range(7)])
    common = ("--input", path, "--column", "question", "--model", PRICED, "--max-tokens", "50")
    batch = estimate_cli(*common, "--route", "batch", "--batch-max-requests", "3", "--json")
    online = estimate_cli(*common, "--json")
    text = estimate_cli(*common, "--route", "batch")
    assert batch.exit_code == online.exit_code == text.exit_code == 0, batch.output
    found, plain = json.loads(batch.output), json.loads(online.output)
    assert "batch" not in plain
    assert found["cost_usd"] == plain["cost_usd"]
    assert found["batch"]["cost_usd"] == pytest.approx(plain["cost_usd"] / 2, abs=1e-6)
    assert (found["batch"]["files"], found["batch"]["largest_file_requests"]) == (3, 3)
    assert found["batch"]["max_requests_per_file"] == 3
    assert (
        "cost batch: $" in text.output
        and "batch files: 1 of at most 50,000 requests / 200 MiB" in text.output
    )


async def test_the_lines_counted_are_lines_the_batch_api_answers(tmp_path: Path) -> None:
    """The request lines the estimate counts, uploaded as a batch file to the
    simulator's Batch API: every row comes back answered, by custom_id."""
    prompts = [f"question {i}" for i in range(6)]
    prepared = prepared_for(tmp_path, prompts, model=MODEL)
    data = b"".join(line for _, line in request_lines(prepared, 1000))
    config = SimulatorConfig(batch=BatchConfig(turnaround_s=0))
    async with Simulator(config) as sim:
        c = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0)
        async with c:
            uploaded = await c.files.create(file=("rows.jsonl", data), purpose="batch")
            batch = await c.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            batch = await c.batches.retrieve(batch.id)
            assert batch.status == "completed" and batch.output_file_id is not None
            output = (await c.files.content(batch.output_file_id)).text
    answers = {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
        for line in map(json.loads, output.splitlines())
    }
    assert answers == {f"row-{i}": answer_for(prompt) for i, prompt in enumerate(prompts)}
