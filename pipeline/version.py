"""The distribution's name and version (what ``pip`` installs this as).

The import package is ``pipeline`` and the command ``enrich``; the distribution
is ``enrich-llm``, because ``enrich`` on the package index is another project
(a dependency of common lint tools) that installing this must never replace.
"""

from __future__ import annotations

from typing import Final

DISTRIBUTION: Final = "enrich-llm"

VERSION: Final = "0.1.0"
"""The one place the version is written: pyproject.toml reads it from here
(``[tool.setuptools.dynamic]``), so the installed metadata cannot disagree
with it, and the first request's User-Agent needs no ``importlib.metadata``
(its import and the search of every path entry cost 15-40 ms of start-up)."""


def version() -> str:
    """This installation's version."""
    return VERSION
