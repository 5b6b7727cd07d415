"""Choosing the engine: a missing Ray is a usage error that names the extra,
never a traceback (the Ray engine itself is tests/test_engine_ray.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_startup import run_args

from conftest import write_questions

# Runs the CLI with the ray package hidden, as on an install without the extra.
WITHOUT_RAY = "import sys; sys.modules['ray'] = None; from pipeline.cli import main; main()"


@pytest.mark.slow
def test_engine_ray_without_ray_installed_exits_2_naming_the_extra(tmp_path: Path) -> None:
    source = write_questions(tmp_path / "in.csv", ["a", "b"])
    output = tmp_path / "out.parquet"
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            WITHOUT_RAY,
            *run_args(source, output, "http://127.0.0.1:9/v1", "--engine", "ray"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert run.returncode == 2, run.stderr
    assert "pip install 'enrich-llm[ray]'" in run.stderr
    assert "Traceback" not in run.stderr
    assert not output.exists()
