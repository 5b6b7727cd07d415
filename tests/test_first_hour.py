"""The first hour of a new user: the commands, flags, help and messages they
meet first (issue 13, "Commands and messages"), and the one option table the
flags and config keys come from."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import msgspec
import polars as pl
import pytest
from click.testing import CliRunner, Result

from pipeline.cli import EXIT_CODE_HELP, cli, dataset_options, flag_overrides
from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError, ExitCode, MissingSetting
from pipeline.options import FLAG_FOR_KEY, OPTIONS

ROOT = Path(__file__).resolve().parent.parent
NOWHERE = "http://127.0.0.1:9/v1"
REQUIRED = object()


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, list(map(str, args)))


def enrich_process(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The real command, in its own process: argument errors happen before any
    of our code runs, so only a process shows what a user sees."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def section_fields(section: type[Any]) -> dict[str, msgspec.structs.FieldInfo]:
    """Each field of a config section by its config key."""
    return {field.encode_name: field for field in msgspec.structs.fields(section)}


def config_keys(section: type[Any] = RunConfig, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, field in section_fields(section).items():
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            keys |= config_keys(field.type, prefix + key + ".")
        else:
            keys.add(prefix + key)
    return keys


def model_default(key: str) -> Any:
    section: type[Any] = RunConfig
    *sections, leaf = key.split(".")
    for name in sections:
        section = section_fields(section)[name].type
    field = section_fields(section)[leaf]
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return REQUIRED if field.required else field.default


@pytest.fixture
def questions(tmp_path: Path) -> Path:
    path = tmp_path / "questions.csv"
    pl.DataFrame({"question": ["a?", "b?"]}).write_csv(path)
    return path


# -- one option table --------------------------------------------------------


def test_every_config_key_has_a_flag() -> None:
    assert config_keys() == set(FLAG_FOR_KEY)


def test_every_default_shown_in_help_is_the_configs_own() -> None:
    for option in OPTIONS:
        default = model_default(option.key)
        if option.default is None:
            unset: tuple[Any, ...] = (None, REQUIRED, {}, option.kind == "switch" and False)
            assert any(default is value or default == value for value in unset), option.key
        elif isinstance(default, bool):
            assert option.default == ("on" if default else "off"), option.key
        elif isinstance(default, int | float):
            assert float(option.default.split(":")[0]) == default, option.key
        elif isinstance(default, str) and default:
            assert option.default == default, option.key
        else:
            # Unset by default: the help says what happens then, in words.
            assert default in (None, ""), option.key
            assert not option.default[0].isdigit(), option.key


def test_every_flag_given_on_the_command_line_reaches_its_key(tmp_path: Path) -> None:
    # A flag that click accepts but the config never sees would be silently ignored.
    parsed: dict[str, Any] = {}

    @click.command()
    @dataset_options("run")
    def capture(config_file: Path | None, **flags: Any) -> None:
        parsed.update(flag_overrides(flags))

    values = {
        "path": str(tmp_path / "x"),
        "location": str(tmp_path / "x"),
        "str": "x",
        "int": "3",
        "float": "0.5",
    }
    for option in OPTIONS:
        if option.kind == "toggle":
            args: list[str] = [option.flag.split("/")[1]]
        elif option.kind == "switch":
            args = [option.flag]
        elif option.kind == "json":
            args = [option.flag, '{"presence_penalty": 0.5}']
        else:
            args = [option.flag, option.choices[-1] if option.choices else values[option.kind]]
        parsed.clear()
        result = CliRunner().invoke(capture, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        given = {key for key, value in parsed.items() if value is not None}
        assert given == {option.key}, option.flag


def test_example_config_sets_only_real_keys_and_names_every_key() -> None:
    text = (ROOT / "configs" / "example.toml").read_text()
    example = tomllib.loads(text)
    # Every key of the file is valid (paths made harmless: nothing is read).
    load_config(ROOT / "configs" / "example.toml")
    # Every key is shown, set or commented out, with its flag.
    for key in config_keys():
        leaf = key.rsplit(".", 1)[-1]
        assert f"{leaf} =" in text or f"# {leaf} =" in text, key
        assert FLAG_FOR_KEY[key].split("/")[0] in text, key
    assert example["input"]["path"]
    assert "cached" in text


def test_run_help_shows_defaults_and_exit_codes() -> None:
    shown = invoke("run", "--help").output
    assert "[default: 32]" in shown
    assert "Exit codes:" in shown
    for code in ExitCode:
        assert f" {int(code)}  " in shown, code


def test_exit_code_help_covers_every_code() -> None:
    assert set(EXIT_CODE_HELP) == set(ExitCode)


def test_estimate_and_status_help_list_only_their_own_flags() -> None:
    estimate = invoke("estimate", "--help").output
    status = invoke("status", "--help").output
    for run_only in ("--max-attempts", "--flush-every", "--restart", "--stall-timeout"):
        assert run_only not in estimate and run_only not in status
    assert "--rpm" in estimate and "--input" in estimate
    assert "--output" in status and "--rpm" not in status


def test_estimate_accepts_a_run_line_with_run_only_flags(questions: Path) -> None:
    result = invoke(
        "estimate", "--input", questions, "--column", "question", "--max-attempts", "3", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 2


def test_simulate_and_demo_options_all_have_a_description() -> None:
    for name in ("simulate", "demo"):
        command = cli.commands[name]
        for param in command.params:
            if param.param_type_name == "option":
                assert getattr(param, "help", None), f"{name} {param.opts}"


# -- messages ------------------------------------------------------------------


def test_estimate_needs_no_output(questions: Path) -> None:
    result = invoke(
        "estimate", "--input", questions, "--column", "question", "--model", "gpt-4o-mini", "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rows"] == 2


def test_run_without_arguments_names_the_flag_and_key_and_shows_usage() -> None:
    result = invoke("run")
    assert result.exit_code == 2
    first, usage = result.stderr.strip().splitlines()
    assert "--input" in first and "input.path" in first
    assert usage.startswith("usage: enrich run") and "--output" in usage


def test_run_without_output_names_the_output_flag(questions: Path) -> None:
    result = invoke("run", "--input", questions, "--column", "question")
    assert result.exit_code == 2
    assert "--output" in result.stderr and "output.path" in result.stderr
    assert "Traceback" not in result.output


def test_missing_setting_in_json_logs_is_one_event_with_the_usage() -> None:
    result = invoke("run", "--log-format", "json")
    event = json.loads(result.stderr)
    assert event["event"] == "error" and event["exit_code"] == 2
    assert "--input" in event["message"] and event["usage"].startswith("usage: enrich run")


@pytest.mark.parametrize(
    "args",
    [
        ["run", "--log-format", "json", "--concurency", "3"],
        ["run", "--log-format", "json", "--concurrency", "abc"],
        ["run", "--log-format=json", "--transport", "curl"],
        ["run", "--concurrency", "abc", "--log-format", "json"],
    ],
)
def test_argument_errors_are_one_json_event_with_json_logs(args: list[str]) -> None:
    result = enrich_process(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    event = json.loads(result.stderr)
    assert event["event"] == "error" and event["level"] == "error"
    assert event["exit_code"] == 2
    assert "enrich run --help" in event["message"]


def test_an_unreadable_config_path_is_one_json_event_with_json_logs(tmp_path: Path) -> None:
    result = invoke("run", tmp_path, "--log-format", "json")
    assert result.exit_code == 2
    event = json.loads(result.stderr)
    assert event["exit_code"] == 2 and "cannot be read" in event["message"]


def test_argument_errors_stay_clicks_usage_text_without_json_logs() -> None:
    result = enrich_process("run", "--concurrency", "abc")
    assert result.returncode == 2
    assert "Usage: enrich run" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://user:s3cret-pass@127.0.0.1:9/v1", "user name or password"),
        ("http://[::1/v1", "not a valid URL"),
        ("http://[zz::1]/v1", "not a valid URL"),
        ("http://127.0.0.1:99999/v1", "not a valid URL"),
        ("127.0.0.1:8000/v1", "http:// or https://"),
    ],
)
def test_a_bad_base_url_is_bad_usage_before_anything_is_written(
    questions: Path, tmp_path: Path, url: str, needle: str
) -> None:
    out = tmp_path / "out.parquet"
    result = invoke(
        "run", "--input", questions, "--column", "question", "--output", out, "--base-url", url
    )
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and "--base-url" in result.stderr
    assert "s3cret-pass" not in result.stderr
    assert list(tmp_path.iterdir()) == [questions]


def test_a_bad_base_url_from_the_environment_is_bad_usage_before_anything_is_written(
    questions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://user:s3cret-pass@127.0.0.1:9/v1")
    out = tmp_path / "out.parquet"
    result = invoke("run", "--input", questions, "--column", "question", "--output", out)
    assert result.exit_code == 2, result.output
    assert "$OPENAI_BASE_URL" in result.stderr and "s3cret-pass" not in result.stderr
    assert list(tmp_path.iterdir()) == [questions]


def test_extra_params_flag_must_be_a_json_object(questions: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.parquet"
    for bad, needle in (("{nope", "not valid JSON"), ("[1]", "JSON object")):
        result = invoke(
            "run", "--input", questions, "--column", "question", "--output", out,
            "--base-url", NOWHERE, "--extra-params", bad,
        )  # fmt: skip
        assert result.exit_code == 2 and needle in result.stderr


# -- the config from Python -------------------------------------------------------


def test_load_config_accepts_a_string_path() -> None:
    config = load_config(str(ROOT / "configs" / "example.toml"))
    assert config.model.name == "gpt-4o-mini"


def test_load_config_takes_settings_named_like_the_flags(tmp_path: Path) -> None:
    config = load_config(
        input=tmp_path / "a.csv", column="body", output=tmp_path / "o.parquet", rpm=500, cache=False
    )
    assert config.limits.rpm == 500 and config.input.column == "body"
    assert config.cache.enabled is False
    file_then_keyword = load_config(ROOT / "configs" / "example.toml", {"limits.rpm": 1}, rpm=2)
    assert file_then_keyword.limits.rpm == 2


def test_load_config_names_an_unknown_keyword_setting() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'rmp'"):
        load_config(ROOT / "configs" / "example.toml", rmp=5)


def test_missing_input_from_python_names_key_and_flag() -> None:
    with pytest.raises(MissingSetting, match=r"input\.path.*--input") as caught:
        load_config(output="o.parquet", column="q")
    assert caught.value.key == "input.path"
