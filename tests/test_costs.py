"""Prices, cost arithmetic, the offline estimate and the spend cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.costs import (
    DEFAULT_PRICE_FILE,
    CostMeter,
    Price,
    PriceTable,
    SpendCap,
    SpendCapReached,
    cost,
    estimate,
    format_duration,
    format_estimate,
    iter_prompt_tokens,
    read_price_file,
)
from pipeline.errors import ConfigError
from pipeline.prompt import DEFAULT_COMPLETION_ESTIMATE, PromptSpec, estimate_prompt_tokens
from pipeline.read import open_input

from conftest import write_questions

# One dollar per token in and out: cap arithmetic reads as token counts.
DOLLAR_A_TOKEN = Price("test-model", 1_000_000.0, 1_000_000.0)


@pytest.fixture(scope="module")
def table() -> PriceTable:
    return PriceTable.load()


def test_the_shipped_table_has_the_common_models(table: PriceTable) -> None:
    assert DEFAULT_PRICE_FILE.exists()
    for model in ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini"):
        price = table.price_for(model)
        assert price is not None and price.model == model
        assert price.output_per_million >= price.input_per_million > 0
    sim = table.price_for("sim-1")
    assert sim is not None and (sim.input_per_million, sim.output_per_million) == (0, 0)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4omni", None),  # a prefix only counts at a "-"
        ("my-azure-deployment", None),
        ("llama3.1:8b", None),
    ],
)
def test_price_lookup_exact_then_longest_prefix(
    table: PriceTable, model: str, expected: str | None
) -> None:
    price = table.price_for(model)
    assert (price.model if price else None) == expected


def test_a_user_price_file_adds_and_overrides(tmp_path: Path) -> None:
    user = tmp_path / "prices.toml"
    user.write_text(
        '[models."gpt-4o-mini"]\ninput = 1.0\noutput = 2\n\n'
        '[models."my-deployment"]\ninput = 0.5\noutput = 1.5\n'
    )
    table = PriceTable.load(user)
    overridden = table.price_for("gpt-4o-mini-2024-07-18")
    assert overridden == Price("gpt-4o-mini", 1.0, 2.0, str(user))
    assert table.price_for("my-deployment") == Price("my-deployment", 0.5, 1.5, str(user))
    assert table.price_for("gpt-4o") is not None  # the shipped ones are still there
    alone = PriceTable.load(user, default_file=None)
    assert alone.price_for("gpt-4o") is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[models."m"]\ninput = -1\noutput = 1\n', ">= 0"),
        ('[models."m"]\ninput = "cheap"\noutput = 1\n', "needs a number for 'input'"),
        ('[models."m"]\ninput = 1\n', "needs a number for 'output'"),
        ('[models."m"]\ninput = 1\noutput = 1\ncached = 0.1\n', "unknown key 'cached'"),
        ('[prices."m"]\ninput = 1\noutput = 1\n', "unknown top-level key 'prices'"),
        ("[models\n", "not valid TOML"),
    ],
)
def test_bad_price_files_are_usage_errors(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_price_file(path)
    assert caught.value.exit_code == 2
    assert fragment in caught.value.message and str(path) in caught.value.message


def test_features_that_need_a_price_say_so(table: PriceTable) -> None:
    assert table.require("gpt-4o-mini-2024-07-18", "--max-cost").model == "gpt-4o-mini"
    with pytest.raises(ConfigError) as caught:
        table.require("my-deployment", "--max-cost")
    assert caught.value.exit_code == 2
    assert caught.value.message.startswith("--max-cost needs a price: no price known")
    assert "--price-file" in caught.value.message


def test_a_missing_price_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--price-file"):
        PriceTable.load(tmp_path / "nope.toml")


def test_cost_is_per_million_tokens() -> None:
    price = Price("m", 0.15, 0.60)
    assert cost(1_000_000, 1_000_000, price) == pytest.approx(0.75)
    assert cost(2_000, 500, price) == pytest.approx(0.0003 + 0.0003)
    assert cost(0, 0, price) == 0


def test_the_offline_estimate_is_a_quarter_of_the_bytes_plus_message_overhead() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "x" * 400},
    ]
    # 9 // 4 + 4 + 400 // 4 + 4 + 3
    assert estimate_prompt_tokens(messages) == 2 + 4 + 100 + 4 + 3


def test_estimate_with_known_token_counts() -> None:
    price = Price("m", 2.0, 8.0)
    result = estimate(
        [100, None, 300, 200, None],
        model="m",
        price=price,
        max_tokens=50,
        concurrency=2,
        rpm=60,
        tpm=6_000,
        latency_s=1.0,
    )
    assert (result.rows, result.skipped) == (3, 2)
    assert (result.prompt_tokens, result.completion_tokens) == (600, 150)
    assert result.cost == pytest.approx((600 * 2.0 + 150 * 8.0) / 1e6)
    # rpm: 3 rows at 60/min = 3 s; tpm: (600 + 3 * 50) at 6,000/min = 7.5 s;
    # concurrency: 3 rows x 1 s / 2 = 1.5 s. The slowest limit wins.
    assert result.seconds == pytest.approx(7.5)
    assert result.bound_by == "tpm"
    assert result.message is None
    lines = format_estimate(result)
    assert "3 to send, 2 skipped" in lines and "$0.0024" in lines and "tpm" in lines


def test_estimate_bounds_and_defaults() -> None:
    by_rpm = estimate([10] * 100, model="m", price=None, max_tokens=None, concurrency=100, rpm=10)
    assert by_rpm.bound_by == "rpm" and by_rpm.seconds == pytest.approx(600)
    assert by_rpm.completion_tokens == 100 * DEFAULT_COMPLETION_ESTIMATE
    assert by_rpm.cost is None
    assert by_rpm.message is not None and "--price-file" in by_rpm.message
    assert "'m'" in by_rpm.message

    by_latency = estimate([10] * 8, model="m", price=None, max_tokens=10, concurrency=4)
    assert by_latency.bound_by == "concurrency" and by_latency.seconds == pytest.approx(4.0)

    assumed = estimate(
        [10], model="m", price=DOLLAR_A_TOKEN, max_tokens=500, concurrency=1,
        completion_tokens_per_row=20,
    )  # fmt: skip
    assert assumed.completion_tokens == 20 and assumed.cost == pytest.approx(30)

    nothing = estimate([None, None], model="m", price=None, max_tokens=None, concurrency=1)
    assert (nothing.rows, nothing.skipped, nothing.seconds, nothing.bound_by) == (0, 2, 0, "none")


def test_iter_prompt_tokens_reads_the_real_input(tmp_path: Path) -> None:
    source = write_questions(tmp_path / "in.csv", ["abcd" * 10, None, "  ", "hello"])
    spec = PromptSpec(column="question", system_prompt="Be brief.")
    counts = list(iter_prompt_tokens(open_input(source), spec, chunk_size=2))
    system = len("Be brief.") // 4 + 4
    assert counts == [system + 10 + 4 + 3, None, None, system + 1 + 4 + 3]


def test_format_duration() -> None:
    assert format_duration(12.4) == "12 s"
    assert format_duration(245) == "4 min 05 s"
    assert format_duration(3 * 3600 + 12 * 60 + 5) == "3 h 12 min"


def test_spend_cap_reserves_settles_and_stops_before_the_cap() -> None:
    cap = SpendCap(10.0, DOLLAR_A_TOKEN)
    assert cap.reserve("a", 3, 2)  # 5 reserved
    assert cap.reserve("b", 3, 2)  # 10 reserved: at the cap, not past it
    assert cap.would_exceed(1, 0)
    assert not cap.reserve("c", 1, 0)
    assert cap.reached
    # Real usage replaces the worst case.
    assert cap.settle("a", 2, 1) == pytest.approx(3)
    assert cap.spent == pytest.approx(3)
    assert cap.reserved == pytest.approx(5)
    # Once reached, the run is stopping: no more requests, even small ones.
    assert not cap.reserve("d", 0, 0)
    cap.settle("b", 3, 2)
    assert cap.spent == pytest.approx(8) and cap.reserved == 0
    assert cap.spent <= cap.max_cost


def test_spend_cap_counts_what_earlier_runs_spent() -> None:
    cap = SpendCap(10.0, DOLLAR_A_TOKEN, already_spent=8.0)
    assert cap.reserve(1, 1, 1)
    assert not cap.reserve(2, 1, 0)
    cap.settle(1, 1, None)  # a failed row reports no completion tokens
    assert cap.spent_this_run == pytest.approx(1)
    error = cap.error(Path("out.parquet.enrich"))
    assert isinstance(error, SpendCapReached)
    assert error.exit_code == 5
    assert "--max-cost $10.00" in error.message
    assert "spent $9.0000 so far, $8.0000 of it by earlier runs" in error.message
    assert "out.parquet.enrich" in error.message
    assert "rerun with a higher --max-cost" in error.message


def test_spend_cap_rejects_a_bad_cap() -> None:
    with pytest.raises(ConfigError, match="--max-cost"):
        SpendCap(-1, DOLLAR_A_TOKEN)


def test_cost_meter_without_price_counts_nothing() -> None:
    meter = CostMeter(None)
    assert meter.settle(1, 100, 100) == 0 and meter.spent_this_run is None
    priced = CostMeter(DOLLAR_A_TOKEN, already_spent=2)
    priced.settle(1, 1, 2)
    assert priced.spent == 5 and priced.spent_this_run == 3


def test_batch_prices_default_to_half_the_online_price(table: PriceTable) -> None:
    price = table.price_for("gpt-4o-mini")
    assert price is not None
    batch = price.for_route("batch")
    assert (batch.input_per_million, batch.output_per_million) == (0.075, 0.30)
    assert price.for_route("online") is price


def test_a_price_file_can_set_batch_prices(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(
        '[models."m"]\ninput = 1.0\noutput = 4.0\nbatch_input = 0.8\nbatch_output = 3.0\n'
    )
    price = read_price_file(path)["m"]
    assert price.for_route("batch").input_per_million == 0.8
    assert price.for_route("batch").output_per_million == 3.0
    assert price.for_route("online").input_per_million == 1.0


def test_a_bad_batch_price_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('[models."m"]\ninput = 1.0\noutput = 4.0\nbatch_output = "cheap"\n')
    with pytest.raises(ConfigError, match="batch_output"):
        read_price_file(path)
