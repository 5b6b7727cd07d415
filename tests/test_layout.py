"""The package's shape, checked with ``ast``: short functions, and modules
that each lean on a few others (the README's layout section lists them)."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).parents[1]
PACKAGE: Final = ROOT / "pipeline"

MAX_FUNCTION_LINES: Final = 60
MAX_IMPORTED_MODULES: Final = 8

# The CLI is where the commands meet (run, estimate, status, cache, simulate,
# demo, report, cancel): each imports its own part of the package, lazily, so
# that `enrich --help` stays light. It may import more than the others: `run`
# brings its timeline and metrics endpoint, `report` the report and its page,
# `cancel` the batch route.
IMPORTS_ALLOWED: Final = {"cli.py": 18}

# A function may be longer when the line above its definition says why.
LONG_BECAUSE: Final = re.compile(r"#\s*long because\b", re.IGNORECASE)


def modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [
        node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def explained(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return first >= 2 and LONG_BECAUSE.search(lines[first - 2]) is not None


def runtime_imports(tree: ast.Module, module: str) -> set[str]:
    """The package's modules this one imports to run: imports under ``if
    TYPE_CHECKING:`` only name types for the checker and are left out."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom) and child.module is not None:
                if child.module == "pipeline":
                    found.update(f"pipeline.{alias.name}" for alias in child.names)
                elif child.module.startswith("pipeline."):
                    found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("pipeline."))
            visit(child)

    visit(tree)
    return found - {module}


def test_no_function_is_longer_than_60_lines_unless_a_comment_says_why() -> None:
    too_long = []
    for path in modules():
        text = path.read_text()
        lines = text.splitlines()
        for node in functions(ast.parse(text)):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES and not explained(lines, node):
                too_long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert too_long == []


def test_no_module_imports_more_than_8_others_to_run() -> None:
    crowded = {}
    for path in modules():
        imported = runtime_imports(ast.parse(path.read_text()), f"pipeline.{path.stem}")
        if len(imported) > IMPORTS_ALLOWED.get(path.name, MAX_IMPORTED_MODULES):
            crowded[path.name] = sorted(imported)
    assert crowded == {}


def test_the_layout_check_sees_long_functions_and_crowded_imports() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def f():\n{body}\n")
    (node,) = functions(tree)
    assert node.end_lineno == MAX_FUNCTION_LINES + 1
    assert not explained(["def f():"], node)
    why = f"# Long because the steps read best in one place.\ndef f():\n{body}\n"
    (node,) = functions(ast.parse(why))
    assert explained(why.splitlines(), node)
    source = (
        "from typing import TYPE_CHECKING\n"
        "from pipeline import prompt, write\n"
        "from pipeline.read import open_input\n"
        "import pipeline.cache\n"
        "if TYPE_CHECKING:\n"
        "    from pipeline.config import RunConfig\n"
        "def later():\n"
        "    from pipeline.status import run_status\n"
    )
    assert runtime_imports(ast.parse(source), "pipeline.write") == {
        "pipeline.prompt",
        "pipeline.read",
        "pipeline.cache",
        "pipeline.status",
    }


def test_the_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    listed = set(re.findall(r"^  ([a-z0-9_]+\.py)\b", layout, flags=re.MULTILINE))
    present = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert listed == present
