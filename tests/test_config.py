"""The config's own checks (``pipeline.config``): each bad setting is one
line naming the key, the value and the flag that fixes it; values convert
as documented; sections built in Python are checked the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import (
    InvalidSetting,
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
        ("limits.rpm", 0, "Input should be greater than 0 (got 0); fix --rpm"),
        ("limits.concurrency", 20_000, "Input should be less than or equal to 10000"),
        ("max_error_rate", -1, "Input should be greater than or equal to 0 (got -1)"),
        ("model.name", "", "String should have at least 1 character (got '')"),
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
        ("limits.rpm", "fast", "Input should be a valid integer, unable to parse string"),
        ("limits.rpm", 1.5, "got a number with a fractional part"),
        ("limits.rpm", True, "Input should be a valid integer (got True)"),
        ("model.temperature", "hot", "Input should be a valid number"),
        ("cache.enabled", "maybe", "Input should be a valid boolean"),
        ("model.transport", "curl", "Input should be 'aiohttp' or 'openai' (got 'curl')"),
        ("model.extra_params", [1], "Input should be a valid dictionary"),
        ("structured.schema", 5, "Input should be a valid string (got 5); fix --schema"),
    ],
)
def test_a_value_of_the_wrong_type_names_what_was_expected(
    key: str, value: Any, message: str
) -> None:
    assert message in error_for(**{key.replace(".", "__"): value})


def test_values_convert_as_a_toml_file_or_a_caller_may_write_them() -> None:
    config = load_config(
        None,
        {**BASE, "limits.rpm": "600", "limits.tpm": 5e4, "model.top_p": 1, "cache.enabled": "yes"},
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
    with pytest.raises(ConfigError, match="'input': Input should be a valid dictionary"):
        load_config(path)


def test_the_first_missing_setting_is_the_first_a_newcomer_needs() -> None:
    with pytest.raises(MissingSetting) as caught:
        load_config(None, {})
    assert caught.value.key == "input.path"
    assert "pass --input" in caught.value.message
    with pytest.raises(MissingSetting, match="pass --output"):
        load_config(None, {"input.path": "in.csv", "input.column": "q"})


def test_both_or_neither_prompt_source_is_one_line_naming_both_flags() -> None:
    with pytest.raises(ConfigError, match=r"exactly one of --column or --template"):
        load_config(None, {**BASE, "input.template": "{q}"})


def test_sections_built_in_python_are_checked_the_same_way() -> None:
    with pytest.raises(InvalidSetting, match="concurrency: Input should be greater than 0"):
        LimitsConfig(concurrency=0)
    with pytest.raises(InvalidSetting, match="is not an http:// or https:// URL"):
        ModelConfig(base_url="ftp://example.com")
    assert ModelConfig(timeout_s=5).timeout_s == 5.0


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
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        section_from(OutputConfig, {"path": "out.parquet", "colour": "red"})
    assert isinstance(load_config(None, BASE), RunConfig)
