"""What the package declares matches what its code does: every third-party
module the code imports comes from a declared dependency (an undeclared one
works only while something else happens to install it), and the package
says it is typed (PEP 561)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.version import DISTRIBUTION, VERSION, version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Our own top-level names: the package, and modules and packages beside the
# scripts (the tests' conftest, the benchmarks' harness and sections).
FIRST_PARTY = {
    "pipeline",
    *(path.stem for folder in ("tests", "benchmarks") for path in (ROOT / folder).glob("*.py")),
    *(path.parent.name for path in (ROOT / "benchmarks").glob("*/__init__.py")),
}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: Iterable[str]) -> set[str]:
    return {normalized(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0]) for line in requirements}


def imported_modules(paths: Iterable[Path]) -> dict[str, set[str]]:
    """Top-level module -> files importing it (anywhere: functions and
    TYPE_CHECKING blocks count, they run in someone's process)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    return {
        name: files
        for name, files in modules.items()
        if name not in sys.stdlib_module_names and name not in FIRST_PARTY
    }


def undeclared(modules: dict[str, set[str]], declared: set[str]) -> dict[str, set[str]]:
    """Modules whose distribution is not declared (or that no installed distribution provides)."""
    providers = metadata.packages_distributions()
    missing = {}
    for name, files in modules.items():
        distributions = {normalized(dist) for dist in providers.get(name, [])}
        if not distributions & declared:
            missing[f"{name} (from {', '.join(sorted(distributions)) or 'nothing installed'})"] = (
                files
            )
    return missing


def test_every_third_party_import_of_the_package_is_a_declared_dependency() -> None:
    # A user-facing extra (not dev) declares what only its feature imports.
    extras = PYPROJECT["project"]["optional-dependencies"]
    declared = requirement_names(
        [
            *PYPROJECT["project"]["dependencies"],
            *(line for name, lines in extras.items() if name != "dev" for line in lines),
        ]
    )
    modules = third_party(imported_modules((ROOT / "pipeline").rglob("*.py")))
    assert {"openai", "aiohttp", "polars", "pyarrow", "pydantic"} <= set(modules)
    assert undeclared(modules, declared) == {}


def test_every_third_party_import_of_the_tests_and_benchmarks_is_declared() -> None:
    project = PYPROJECT["project"]
    declared = requirement_names(
        [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    )
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]
    assert undeclared(third_party(imported_modules(files)), declared) == {}


def test_the_package_ships_py_typed() -> None:
    assert (ROOT / "pipeline" / "py.typed").is_file()
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["pipeline"]


def test_the_installed_version_is_the_one_the_code_reports() -> None:
    # pyproject.toml reads it from pipeline/version.py: one place, no drift.
    assert metadata.version(DISTRIBUTION) == VERSION == version()
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"]["attr"] == "pipeline.version.VERSION"
