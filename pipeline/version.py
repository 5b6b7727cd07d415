"""The distribution's name and version (what ``pip`` installs this as).

The import package is ``pipeline`` and the command ``enrich``; the distribution
is ``enrich-llm``, because ``enrich`` on the package index is another project
(a dependency of common lint tools) that installing this must never replace.
"""

from __future__ import annotations

import functools
from typing import Final

DISTRIBUTION: Final = "enrich-llm"


@functools.cache
def version() -> str:
    """This installation's version; "unknown" when run from a bare checkout."""
    # Here, not with the module: importlib.metadata costs `enrich --help`
    # (which names the distribution) about a fifth of its start.
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"
