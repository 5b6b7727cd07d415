"""What a run is given besides its config: how this invocation treats the
state an earlier run left (``RunOptions``) and what the caller plugs in
(``Wiring``)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from pipeline.events import EventSink, NullEventSink
from pipeline.progress import NoProgress, Progress

if TYPE_CHECKING:
    from pipeline.timeline import Timeline
    from pipeline.transport import Transport

# How long a graceful stop waits for requests in flight: they are paid for,
# but schedulers (Airflow, Kubernetes) send SIGKILL some 30 s after SIGTERM.
DRAIN_GRACE_S: Final = 10.0


@dataclass(frozen=True)
class RunOptions:
    """How this invocation treats existing state (not part of the job's config)."""

    restart: bool = False
    """Discard the checkpoint and start over."""
    retry_failed: bool = False
    """Send the rows whose status is error again."""
    force: bool = False
    """Redo the job even if the output is up to date (implies restart)."""


@dataclass(frozen=True)
class Wiring:
    """What the caller plugs in: where events and progress go, the transport
    (None: one made from the config), the graceful stop, and the timeline
    that records the run (None: one of its own; pass one to read its live
    totals while the run goes)."""

    events: EventSink
    progress: Progress
    transport: Transport | None = None
    stop: asyncio.Event | None = None
    timeline: Timeline | None = None

    @classmethod
    def of(
        cls,
        events: EventSink | None = None,
        progress: Progress | None = None,
        transport: Transport | None = None,
        stop: asyncio.Event | None = None,
        timeline: Timeline | None = None,
    ) -> Wiring:
        """Wiring with what the caller left out filled in: no events, no progress."""
        return cls(events or NullEventSink(), progress or NoProgress(), transport, stop, timeline)
