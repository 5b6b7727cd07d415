"""Named instants where the crash tests kill the process.

Durability claims are about instants ("a kill between the output rename and
the report leaves a state the same command finishes"); the only honest test
of such a claim kills a real process at exactly that instant. With
``ENRICH_CRASH_AT=<name>`` in its environment, a run SIGKILLs itself when it
reaches ``crash_point(<name>)``: no handler runs, nothing is flushed, as when
the OOM killer or a scheduler strikes. Unset (always, outside tests), a crash
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Final

ENV: Final = "ENRICH_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
