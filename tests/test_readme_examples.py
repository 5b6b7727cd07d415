"""Every example in the README runs as written (a docs test, as sqlite-utils
has): each `enrich ...` line of its bash blocks and each Python block, in the
order a reader meets them, in a copy of the checkout's configs/ and data/,
against the simulator on 127.0.0.1 ($OPENAI_BASE_URL, as a reader with a
local server would set it). A line that cannot run here is skipped by name
below, with the reason."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.simulate import Simulator, SimulatorConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Lines that are not complete commands, or run forever.
NOT_RUN = {
    "enrich simulate": "serves until stopped (tests/test_simulate.py runs the server)",
}


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def enrich_lines() -> list[str]:
    lines: list[str] = []
    for block in blocks("bash"):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            # `cd /data && enrich ...` in crontab lines is for a server, not a checkout.
            stripped = line.strip()
            if stripped.startswith("enrich ") or " && enrich demo" in stripped:
                command = stripped[stripped.index("enrich ") :]
                lines.append(command.split("  #")[0].split(" #")[0].strip())
    return lines


def test_the_readme_has_examples_to_run() -> None:
    lines = enrich_lines()
    assert "enrich demo" in lines
    assert any(line.startswith("enrich run configs/example.toml") for line in lines)
    assert any(line.startswith("enrich estimate --input") for line in lines)
    assert blocks("python")


@pytest.mark.slow
def test_every_readme_example_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("configs", "data"):
        shutil.copytree(ROOT / folder, tmp_path / folder, symlinks=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme-example-key")
    with Simulator.run_in_thread(SimulatorConfig(latency_ms=1.0)) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        for line in enrich_lines():
            if any(line.startswith(prefix) for prefix in NOT_RUN):
                continue
            args = shlex.split(line)[1:]
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, f"{line}\n{result.output}\n{result.stderr}"
        for block in blocks("python"):
            exec(compile(block, "README.md", "exec"), {})
