"""The config's own checks (``pipeline.config``, msgspec underneath): each
bad setting is one line naming the key, the value and the flag that fixes it;
values convert as documented; sections built in Python are checked the same
way."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    LimitsConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    load_config,
    section_from,
)
from pipeline.errors import ConfigError, MissingSetting

BASE: dict[str, Any] = {"input.path": "in.csv", "input.column": "q", "output.path": "out.parquet"}


def error_for(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {**BASE, **{key.replace("__", "."): v for key, v in overrides.items()}})
    return caught.value.message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("limits.rpm", 0, "Expected `int` >= 1 (got 0); fix --rpm"),
        ("limits.concurrency", 20_000, "Expected `int` <= 10000 (got 20000)"),
        ("max_error_rate", -1, "Expected `float` >= 0.0 (got -1)"),
        ("model.name", "", "Expected `str` of length >= 1 (got '')"),
    ],
)
def test_a_value_out_of_bounds_names_its_key_value_and_flag(
    key: str, value: Any, message: str
) -> None:
    said = error_for(**{key.replace(".", "__"): value})
    assert said.startswith(f"bad value for '{key}': ")
    assert message in said


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("limits.rpm", "fast", "Expected `int | null` (got 'fast'); fix --rpm"),
        ("limits.rpm", 1.5, "Expected `int | null` (got 1.5)"),
        ("limits.rpm", True, "Expected `int | null` (got True)"),
        ("model.temperature", "hot", "Expected `float | null` (got 'hot')"),
        ("cache.enabled", "maybe", "Expected `bool | null` (got 'maybe')"),
        (
            "model.transport",
            "curl",
            "Expected 'h11' or 'aiohttp' or 'openai' (got 'curl'); fix --transport",
        ),
        ("checkpoint.on_input_change", 1, "Expected 'restart' or 'refuse' (got 1)"),
        ("model.extra_params", [1], "Expected `object` (got [1])"),
        ("structured.schema", 5, "Expected `str | object | null` (got 5); fix --schema"),
        ("output.path", 5, "Expected `str` (a path) (got 5); fix --output"),
    ],
)
def test_a_value_of_the_wrong_type_names_what_was_expected(
    key: str, value: Any, message: str
) -> None:
    said = error_for(**{key.replace(".", "__"): value})
    assert said.startswith(f"bad value for '{key}': ")
    assert message in said and "\n" not in said


def test_values_convert_as_a_toml_file_or_a_caller_may_write_them() -> None:
    config = load_config(
        None,
        {**BASE, "limits.rpm": "600", "limits.tpm": 5e4, "model.top_p": 1, "cache.enabled": "true"},
    )
    assert config.limits.rpm == 600 and config.limits.tpm == 50_000
    assert config.model.top_p == 1.0 and isinstance(config.model.top_p, float)
    assert config.cache.enabled is True
    assert config.input.path == Path("in.csv") and config.output.path == Path("out.parquet")


def test_an_unknown_key_in_a_file_is_named_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(
        '[input]\npath = "in.csv"\ncolumn = "q"\n[output]\npath = "o.parquet"\n[limits]\nrmp = 5\n'
    )
    with pytest.raises(ConfigError, match=rf"unknown config key 'limits.rmp' in {path}"):
        load_config(path)


def test_a_section_that_is_not_a_table_is_bad_usage(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text('input = "in.csv"\n[output]\npath = "o.parquet"\n')
    with pytest.raises(ConfigError, match=r"'input': Expected `object` \(got 'in.csv'\)"):
        load_config(path)


def test_the_first_missing_setting_is_the_first_a_newcomer_needs() -> None:
    with pytest.raises(MissingSetting) as caught:
        load_config(None, {})
    assert caught.value.key == "input.path"
    assert "pass --input" in caught.value.message
    with pytest.raises(MissingSetting, match="pass --output"):
        load_config(None, {"input.path": "in.csv", "input.column": "q"})


def test_a_bad_batch_duration_or_route_names_its_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--finish-online-after wants a duration like 20h"):
        load_config(None, {**BASE, "batch.finish_online_after": "soon"})
    assert (
        load_config(None, {**BASE, "batch.finish_online_after": "90m"}).batch.finish_online_after_s
        == 5400
    )
    said = error_for(route="carrier")
    assert "Expected 'online' or 'batch' (got 'carrier'); fix --route" in said


def test_both_or_neither_prompt_source_is_one_line_naming_both_flags() -> None:
    with pytest.raises(ConfigError, match=r"exactly one of --column or --template"):
        load_config(None, {**BASE, "input.template": "{q}"})


def test_sections_built_in_python_are_checked_the_same_way() -> None:
    with pytest.raises(
        ConfigError, match=r"'limits\.concurrency': Expected `int` >= 1 .* --concurrency"
    ):
        LimitsConfig(concurrency=0)
    with pytest.raises(ConfigError, match="is not an http:// or https:// URL"):
        ModelConfig(base_url="ftp://example.com")
    with pytest.raises(ConfigError, match=r"unknown config key 'limits\.rmp'"):
        LimitsConfig(rmp=5)  # type: ignore[call-arg]
    assert ModelConfig(timeout_s=5).timeout_s == 5.0
    assert isinstance(ModelConfig(timeout_s=5).timeout_s, float)
    built = RunConfig(input={"path": "in.csv", "column": "q"}, output=OutputConfig(path="o.pq"))  # type: ignore[arg-type]
    assert built.input.path == Path("in.csv") and built.output.path == Path("o.pq")


def test_a_concurrency_the_user_gave_is_told_from_the_default() -> None:
    # The limiter starts at a concurrency the user set; the default is only a ceiling.
    given = load_config(None, {**BASE, "limits.concurrency": 32})
    default = load_config(None, BASE)
    assert given.limits == default.limits
    assert "concurrency" in given.limits.fields_set
    assert "concurrency" not in default.limits.fields_set
    assert "concurrency" in LimitsConfig(concurrency=8).fields_set


def test_the_settings_are_json_values_under_their_field_names() -> None:
    config = load_config(None, {**BASE, "structured.schema": {"type": "object"}, "limits.rpm": 60})
    settings = config.to_dict()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["input"]["path"] == "in.csv"
    assert settings["structured"]["json_schema"] == {"type": "object"}
    assert settings["limits"]["rpm"] == 60


def test_a_config_is_frozen() -> None:
    config = load_config(None, BASE)
    with pytest.raises(AttributeError):
        config.max_cost = 5  # type: ignore[misc]


def test_the_output_section_alone_is_read_for_status() -> None:
    output = section_from(OutputConfig, {"path": "out.parquet"})
    assert output.resolved_run_dir == Path("out.parquet.enrich")
    with pytest.raises(ConfigError, match=r"unknown config key 'output\.colour'"):
        section_from(OutputConfig, {"path": "out.parquet", "colour": "red"})
    assert isinstance(load_config(None, BASE), RunConfig)


def test_a_changed_or_pickled_section_keeps_the_fields_the_user_gave() -> None:
    # Ray pickles the config to its workers; the limiter there starts where the user said.
    limits = load_config(None, {**BASE, "limits.concurrency": 8}).limits
    assert "concurrency" in pickle.loads(pickle.dumps(limits)).fields_set
    assert "concurrency" in copy.deepcopy(limits).fields_set
    changed = limits.replace(rpm=60)
    assert changed.rpm == 60 and changed.fields_set == {"concurrency", "rpm"}
    # Derived in code and not checked, as pydantic's model_copy: the Ray driver
    # holds all its workers' concurrency, above one process's bound.
    assert limits.replace(concurrency=20_000).concurrency == 20_000


def test_a_boolean_may_be_written_as_a_string() -> None:
    for text, value in (("true", True), ("False", False), ("1", True), ("0", False)):
        assert load_config(None, {**BASE, "cache.enabled": text}).cache.enabled is value
