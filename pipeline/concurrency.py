"""How many requests to keep in flight: the AIMD gate that 429s move, and the
latency limit that finds a self-hosted server's capacity.

A hosted API refuses what it cannot take (429); a self-hosted server
(llama.cpp, vLLM, Ollama) queues it instead: it computes a fixed number of
requests at once (its slots) and the rest wait, so past that number more
requests in flight only add latency. Two controls, the lower wins:

* ``ConcurrencyGate`` holds at most ``slots`` requests in flight, and moves
  its own ``limit`` by AIMD on 429s (additive increase while the limit holds
  requests back, multiplicative decrease on a 429).
* ``LatencyLimit`` sets the gate's ``cap`` from latency, as a Vegas or
  gradient limiter does (Netflix's concurrency-limits): by Little's law, with
  ``L`` requests in flight and latency ``ratio`` times the latency without a
  queue, the server works on about ``L / ratio`` of them; the rest are queued.
  It starts with a burst of 4 requests and multiplies by 4 each round trip
  while latency stays flat (or starts at ``--concurrency`` when it was
  given), comes down to the server's capacity plus one request kept queued
  when latency climbs, and probes one more when that request no longer waits.
  The latency without a queue is the server's own time where it says it
  (llama.cpp's ``timings``) plus the least network overhead seen, else the
  answer's own generation (a stream's first token to its last) plus the
  lowest mean lead (latency before the first token) a round showed beyond
  its own noise: a long answer is no queue. A request sent while none of
  the run's others was in flight (it waited behind none of them) re-bases
  that reference when it is far below it. A burst that comes back in waves,
  each a service time after the one before (a server queueing what its
  slots cannot take, in the order sent or in any), or streamed answers each
  begun as an earlier one ended, or whole answers each their own length's
  time after the one before (one slot), shows its slots: the size of the
  first wave; over a burst of 4, only if the same burst sent again shows the same
  (see ``LatencyLimit._queued_burst``).

``QueueClock`` tells a request that waits in the server's queue behind the
run's own earlier requests from one that is stuck: the stall timeout counts
only from the moment every earlier request is done, and not while the server
answers none of those sent after it (it is computing this one; see
``pipeline.call``). Once the server has answered a request sent after it,
a request waits in no queue of ours (a server computes in order): a hosted
API answering around a hung request passes it by, and its stall timeout
counts whatever is still in flight before it.

Time is the event loop's clock, so tests run it on a fake clock (``looptime``).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import math
from dataclasses import dataclass
from typing import Final, NamedTuple

__all__ = [
    "DECREASE_FACTOR",
    "FLAT_TOLERANCE",
    "ROUND_MIN",
    "START_CONCURRENCY",
    "ConcurrencyGate",
    "LatencyLimit",
    "QueueClock",
    "Sample",
]

# AIMD on the in-flight limit. Low enough a start for any provider tier; it
# doubles every round trip (slow start) until the first 429, then grows by one
# request per round trip.
START_CONCURRENCY: Final = 8
DECREASE_FACTOR: Final = 0.8

# Latency within this share of the latency without a queue is flat: network
# and event-loop noise, not a queue. Small enough to see one request queued
# behind 16 slots (latency x17/16); a server whose latencies vary more than
# that (jitter) widens it to NOISE_SE_MULTIPLE standard errors of a round's
# mean, as measured in rounds that were flat.
FLAT_TOLERANCE: Final = 0.05
NOISE_SE_MULTIPLE: Final = 3.0
NOISE_DECAY: Final = 0.8
# A flat round lowers the latency without a queue (the reference) to its mean
# plus this many standard errors of it: no lower than it shows for sure.
REFERENCE_SE_MULTIPLE: Final = 2.0
# Nor is a rise of less than this, in seconds per request, a server's queue:
# a queued request waits for part of an answer (tens of milliseconds at
# least on any LLM server); less is the network, or this process's own CPU
# when a fast local server answers in a few milliseconds.
QUEUE_FLOOR_S: Final = 0.05
# Fewest answers a round is judged on once past the start, so that one long
# answer does not read as a queue and a round's spread can be measured. While
# starting, a round is one round trip (ROUND_MIN_START: the first answer is
# only the reference).
ROUND_MIN: Final = 4
ROUND_MIN_START: Final = 1
# A cut is checked by the round after it: a queue drains when fewer requests
# are in flight, so latency must have fallen by at least this share of what
# the cut should have taken off. Else the rise was the server's (slower for
# everyone, a noisy spell), not a queue of ours: the cap goes back, and that
# latency becomes the reference.
CUT_CONFIRM_SHARE: Final = 0.25
# Rounds held at the capacity found before probing one request more; doubled
# each time the probe finds a queue (up to HOLD_MAX_ROUNDS), back to the
# start when one finds room.
HOLD_ROUNDS: Final = 2
# Requests kept queued in the server beyond its capacity: one, so that a slot
# that frees up starts on the next request at once instead of waiting for
# the client to see the answer and send another (at one slot, that turnaround
# costs a tenth of the throughput). A queue of this size is not cut.
QUEUE_KEPT: Final = 1
# Slow start multiplies the in-flight cap by this each round trip while
# latency stays flat: 4, 16, 32 reaches 16 slots in one round trip.
SLOW_START_FACTOR: Final = 4.0
# The first round is a burst of this many requests, not one alone: a server
# with many slots is not left idle for a round trip (at 16 slots, starting
# from one request cost two of them); queued, its answers come back in
# waves (see WAVE_RISE_SHARE), and the first, sent alone, is the reference;
# else the burst's answers are. Four queue at most three behind one slot.
START_REQUESTS: Final = 4.0
# A request sent alone whose latency is under every earlier answer's divided
# by this re-bases the reference: those answers had a queue in them (a slow
# first answer queued ahead, a spell of load), so against them a queue of
# ours looks flat. A jittery server's answers spread, but none comes in at
# half the fastest of those before it.
REBASE_FACTOR: Final = 2.0
HOLD_MAX_ROUNDS: Final = 16
# A burst queued by a server comes back in waves, each a service time after
# the one before (see LatencyLimit._queued_burst): in the order answered, a
# rise of at least this share of the first answer's latency (a service time
# and the network) starts a wave. Half: a wave's own answers differ by less
# (the same work, computed at once).
WAVE_RISE_SHARE: Final = 0.5
# A hosted API's jitter can rise in steps too, but not in steps of one
# service time each: each wave must start within this share of the first
# latency of a service time (that latency) after the wave before it, and a
# wave's answers must lie within it of each other. Not k service times from
# the start: the first answer may have waited for work ahead of it.
WAVE_REGULAR_SHARE: Final = 0.4
# Jitter still falls into such waves over a few answers now and then (a
# burst of 4 in about 50 at +/-35%), and the run then held the cap far under
# a hosted API's capacity: such a burst is sent again, and read as a queue
# only if it shows the same waves. Over this many answers jitter does not.
WAVES_SURE_ANSWERS: Final = 8
# Streamed answers of varying length come in no regular waves, but each
# queued one begins as an earlier one ends (see _chained_slots): within this
# share of the least lead (the prompt's time and the network, which differ
# from answer to answer by the prompt's length). At 40%, as for waves, a
# hosted API's jittery first tokens chained now and then (5 runs in 180).
CHAIN_SHARE: Final = 0.2
# Past slow start a queue kept on purpose never drains, so no request is sent
# alone again, and a reference taken while the server was slow (a warm-up, a
# spell of load) would stand for the rest of the run, the cap held far above
# the server's slots. After this many rounds judged with no answer sent
# alone, the run lets its queue drain once and sends the next request alone
# (BBR's ProbeRTT): its latency re-bases the reference if below it. Doubled
# after each drain (a drain idles the slots of a many-slot server while they
# empty: at most a round trip of them each time), up to DRAIN_MAX_ROUNDS. Not
# where the server says its own time: that reference has no queue in it; nor
# do rounds count that show the reference right (see _reference_shown).
DRAIN_ROUNDS: Final = 4
DRAIN_MAX_ROUNDS: Final = 64


class ConcurrencyGate:
    """At most ``slots`` holders at once: ``floor(min(limit, cap))``.
    ``limit`` moves by AIMD between 1 and ``ceiling``; ``cap`` is set by
    ``LatencyLimit`` (the ceiling without one).

    A 429 cuts the limit once per round trip, not once per 429: the answers to
    requests sent before the cut were decided by the old limit. Sequence
    numbers tell them apart, so the gate needs no clock.
    """

    def __init__(
        self,
        ceiling: int,
        start: float | None = None,
        *,
        adaptive: bool = True,
        decrease_factor: float = DECREASE_FACTOR,
    ) -> None:
        if ceiling < 1:
            raise ValueError(f"ceiling must be >= 1, got {ceiling}")
        self.ceiling = ceiling
        self.adaptive = adaptive
        initial = min(ceiling, START_CONCURRENCY) if start is None else start
        self.limit = float(max(1.0, min(ceiling, initial))) if adaptive else float(ceiling)
        self.cap = float(ceiling)
        self.decrease_factor = decrease_factor
        self.slow_start = adaptive
        self.in_flight = 0
        self._sent = 0
        # Places granted whose request has no number yet (it waits for the
        # rate buckets, or its worker has yet to run): decided by the limit
        # in force when granted, whenever they are numbered.
        self.unsent = 0
        self._cut_at = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        # Slow start sends each cap as one burst (see LatencyLimit): a place
        # its answers free is granted again at the next cap, not at once, so
        # that the next burst's first request goes out with none of the
        # run's requests ahead of it in the server's queue (its latency is
        # one without a queue of ours). Places left in the current burst:
        self.bursts = False
        self._burst_left = 0
        # Granting nothing until nothing is in flight, then one request, sent
        # alone, and on as before (LatencyLimit's re-measure).
        self.draining = False

    @property
    def effective(self) -> float:
        """The in-flight limit in force: the lower of the two controls."""
        return min(self.limit, self.cap)

    @property
    def slots(self) -> int:
        return max(1, math.floor(self.effective + 1e-9))

    def set_cap(self, cap: float) -> None:
        self.cap = max(1.0, min(float(self.ceiling), cap))
        self._burst_left = self.slots
        self._wake()

    def set_bursts(self, bursts: bool) -> None:
        self.bursts = bursts
        self._wake()

    @property
    def bursting(self) -> bool:
        """Each cap is sent as one burst. After a 429 (AIMD's slow start
        over) the rate limits set the pace, not bursts: rounds of answers
        would come too seldom to free their places."""
        return self.bursts and (self.slow_start or not self.adaptive)

    def next_burst(self) -> None:
        """Send the cap's worth again (a round judged, the cap unchanged)."""
        self._burst_left = self.slots
        self._wake()

    def drain(self) -> None:
        """Let the run's requests in flight all finish before the next is
        granted: that one goes alone."""
        self.draining = True

    def _may_grant(self) -> bool:
        if self.in_flight >= self.slots:
            return False
        if self.draining:
            return self.in_flight == 0
        # Nothing in flight: a burst whose round lost a request (an error,
        # retried) must not wait forever for its answer.
        return not self.bursting or self._burst_left > 0 or self.in_flight == 0

    def _grant(self) -> None:
        self.draining = False
        self.in_flight += 1
        self.unsent += 1
        self._burst_left = max(0, self._burst_left - 1)

    async def acquire(self) -> None:
        if self._may_grant() and not self._waiters:
            self._grant()
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # Granted a slot just as it was cancelled: hand the slot on.
                self.release(sent=False)
            elif waiter in self._waiters:
                # (A cancelled waiter may already have been skipped by _wake.)
                self._waiters.remove(waiter)
            raise

    def release(self, *, sent: bool = True) -> None:
        """A place given back; ``sent=False``: its request was never numbered."""
        self.in_flight -= 1
        if not sent:
            self.unsent -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._may_grant():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._grant()
                waiter.set_result(None)

    def sent(self) -> int:
        """Number a request as it is sent (for ``decrease``)."""
        self._sent += 1
        self.unsent = max(0, self.unsent - 1)
        return self._sent

    @property
    def sent_count(self) -> int:
        """The number of the latest request sent."""
        return self._sent

    def increase(self) -> None:
        """An answer to a request sent while the limit was what held requests
        back: one more slot per answer in slow start (doubling per round
        trip), else one per round trip."""
        if not self.adaptive:
            return
        step = 1.0 if self.slow_start else 1.0 / self.limit
        self.limit = min(float(self.ceiling), self.limit + step)
        self._wake()

    def decrease(self, sequence: int) -> bool:
        """A 429 for the request numbered ``sequence``; True if it cut the limit."""
        if not self.adaptive or sequence <= self._cut_at:
            return False
        self.slow_start = False
        # From the limit in force: a cap the latency set lower is where the
        # 429 was met.
        self.limit = max(1.0, self.effective * self.decrease_factor)
        self._cut_at = self._sent
        return True


@dataclass(frozen=True, slots=True)
class Sample:
    """One answer: its latency, the mean number of requests in flight
    meanwhile (itself included), the server's own time for it if the
    server said, and how long its tokens took to come if streamed."""

    latency_s: float
    in_flight: float
    server_s: float | None = None
    # Sent while none of the run's other requests was in flight: it waited in
    # the server's queue behind none of them.
    alone: bool = False
    # A streamed answer: from its first token to its last, as the client saw
    # them come (the server generating: no queue in it); and the answer's
    # completion tokens, if the server said.
    generation_s: float | None = None
    completion_tokens: int | None = None


class _QueuedBurst(NamedTuple):
    """What a slow-start burst that came back queued shows (see
    ``LatencyLimit._queued_burst``)."""

    slots: int
    lead_s: float  # the lead without a queue (see LatencyLimit._lead)
    answers: int
    token_s: float | None = None  # a token's time, from whole answers


class LatencyLimit:
    """The in-flight cap that latency allows (see the module docstring).

    ``observe`` every answer with the sequence number the gate gave it; the
    cap moves once per round: a round is the answers to requests sent after
    the last change, as many as were in flight (``ROUND_MIN`` at least once
    past the start).
    """

    def __init__(self, gate: ConcurrencyGate, *, start_at_ceiling: bool = False) -> None:
        self.gate = gate
        self._slow_start = False
        self.slow_start = not start_at_ceiling
        self.reason = (
            f"the configured concurrency ({gate.ceiling})"
            if start_at_ceiling
            else "starting: 4 requests, 4 times more each round trip while latency stays flat"
        )
        # The capacity latency last showed (None: no queue seen yet).
        self.capacity: float | None = None
        self.cuts = 0
        # Cuts taken back: the latency rise was not a queue of ours.
        self.undone = 0
        self._changed_at = 0  # gate sequence of the last change
        self._changes = 0
        self._round: list[Sample] = []
        self._round_sent: list[int] = []  # each answer's gate sequence (send order)
        # The latency without a queue, less the answer's own generation
        # where known (see _lead): the lowest mean of a flat round's.
        self._round_min_s = math.inf
        self._overhead_s = math.inf  # least latency beyond the server's own time
        self._sample_min_s = math.inf
        # The least lead (see _lead) of the answers of rounds judged so far.
        self._judged_min_s = math.inf
        # Streams' time between tokens and count of those gaps (see
        # _generation); every answer's generation, summed (see service_s).
        self._token_gaps_s = self._generation_sum_s = 0.0
        self._token_gaps = self._answers = 0
        self._server_sum_s = 0.0
        self._server_count = 0
        self._noise = 0.0  # relative standard error of a flat round's mean
        self._spread = 0.0  # relative standard deviation of one answer in a flat round
        self._hold = 0
        self._hold_rounds = HOLD_ROUNDS
        self._probing = False
        # (cap, ratio, slow start) before a latency cut, until a round confirms it.
        self._unconfirmed: tuple[float, float, bool] | None = None
        # The round after a cut that ended slow start (see _judge).
        self._settling = False
        # Rounds judged since an answer sent alone, and the drain's schedule
        # (see DRAIN_ROUNDS); rounds since a drain was asked, until its
        # request sent alone is answered (None: no drain under way).
        self._unprobed = 0
        self._drain_rounds = DRAIN_ROUNDS
        self._drain_wait: int | None = None
        # The current burst: its first request's gate sequence, whether it
        # went out with none of the run's others in flight (the burst waited
        # behind nothing of ours), and the last sent before any of it was
        # answered (sent at once: a retry sent later is no part of its
        # waves). A burst that came back in waves only in the order
        # answered, and the size they showed: the next burst must show the
        # same (see WAVE_REGULAR_SHARE).
        self._burst_from = 1
        self._burst_alone = False
        self._burst_to = 0
        self._burst_answered = False
        self._waves_unconfirmed: int | None = None
        gate.set_cap(gate.ceiling if start_at_ceiling else START_REQUESTS)

    @property
    def cap(self) -> float:
        return self.gate.cap

    @property
    def slow_start(self) -> bool:
        """Multiplying the cap each round trip, each cap sent as one burst."""
        return self._slow_start

    @slow_start.setter
    def slow_start(self, value: bool) -> None:
        self._slow_start = value
        self.gate.set_bursts(value)

    @property
    def tolerance(self) -> float:
        return max(FLAT_TOLERANCE, NOISE_SE_MULTIPLE * self._noise)

    def sent(self, sequence: int, *, alone: bool) -> None:
        """Request ``sequence`` went out; ``alone``: with none of the run's
        others in flight."""
        if sequence == self._burst_from:
            self._burst_alone = alone
        if not self._burst_answered:
            self._burst_to = sequence

    def observe(self, sequence: int, sample: Sample) -> None:
        if not math.isfinite(sample.latency_s) or sample.latency_s <= 0:
            return
        self._sample_min_s = min(self._sample_min_s, sample.latency_s)
        if sample.server_s is not None:
            self._overhead_s = min(self._overhead_s, max(0.0, sample.latency_s - sample.server_s))
            self._server_sum_s += sample.server_s
            self._server_count += 1
        tokens = sample.completion_tokens
        if sample.generation_s is not None and tokens is not None and tokens > 1:
            self._token_gaps_s += sample.generation_s
            self._token_gaps += tokens - 1
        self._generation_sum_s += self._generation(sample)
        self._answers += 1
        if sequence >= self._burst_from:
            self._burst_answered = True
        if sequence <= self._changed_at:
            if sample.alone:
                self._drain_wait = None  # the drain's answer, judged by no round
            return  # sent before the change: decided by the old cap
        self._round.append(sample)
        self._round_sent.append(sequence)
        size = max(ROUND_MIN_START if self.slow_start else ROUND_MIN, math.ceil(self.cap - 1e-9))
        if self._probing:
            # A probe asks whether one request more waits. A server whose
            # slots are full answers in waves, and the request kept queued
            # waits once a wave: a round of `cap` answers spans one wave and
            # an answer, so whether it holds a wait is down to its phase.
            # Two waves hold one for sure.
            size *= 2
        if len(self._round) >= size:
            round_, self._round = self._round, []
            sent, self._round_sent = self._round_sent, []
            changes = self._changes
            self._judge(round_, sent)
            if changes == self._changes:
                self._next_burst()
                self.gate.next_burst()

    def finish(self) -> None:
        """The stage's rows are done (the run's; under Ray, a shard's): a
        burst cut short by the end of them (11 left for a cap of 16) never
        filled its round. The waves it had, if sure, are what the report
        says (a queue, the slots), not that the run was still starting;
        nothing else is judged on so few answers."""
        if not self.slow_start or len(self._round) < 2:
            return
        round_, sent = self._round, self._round_sent
        self._round, self._round_sent = [], []
        waves = self._burst_waves(round_, sent)
        if waves is None:
            return
        slots, lead = waves
        unqueued = sum(self._generation(s) + lead for s in round_)
        ratio = sum(s.latency_s for s in round_) / unqueued
        self._round_min_s = lead
        self._cut(ratio, sum(s.in_flight for s in round_) / len(round_), waves=slots)

    def _reference(self, round_: list[Sample]) -> tuple[float, bool]:
        """The latency without a queue to judge this round against (inf:
        none yet), and whether a request of the round sent alone re-based it.

        Such a request waited behind none of the run's own, so its latency
        had no queue of ours in it; when it is far below every answer
        before it, those all had a queue in them (a slow first answer, a
        spell of load), and so has a reference taken from them: against it
        a queue looks flat, and the cap climbs on a server already full.
        (The first round has nothing before it: it becomes the reference.)"""
        alone = [self._lead(s) for s in round_ if s.alone]
        if alone and min(alone) * REBASE_FACTOR < self._judged_min_s < math.inf:
            return min(alone), True
        # The drain's request was sent alone on purpose, to test the
        # reference: below it beyond one answer's noise (NOISE_SE_MULTIPLE
        # standard deviations of an answer of a flat round: a round's mean
        # varies sqrt(n) times less, and judged by that, a jittery server's
        # lucky answer re-based it a tenth low, and the cap went under the
        # slots), it re-bases it.
        drained = self._drain_wait is not None
        if drained and alone and self._below_reference(min(alone)):
            return min(alone), True
        return self._round_min_s, False

    def _below_reference(self, lead: float) -> bool:
        """``lead`` is below the reference beyond one answer's noise
        (NOISE_SE_MULTIPLE standard deviations of an answer of a flat
        round)."""
        spread = max(self.tolerance, NOISE_SE_MULTIPLE * self._spread)
        return lead * (1.0 + spread) < self._round_min_s < math.inf

    def _queued_burst(self, round_: list[Sample], sent: list[int]) -> _QueuedBurst | None:
        """A slow-start burst that came back as a server's queue shows it:
        the server's slots, the lead without a queue (see _lead), the
        number of answers read and, from whole answers served one at a
        time, the time a token took; or None.

        A server with slots (llama.cpp, Ollama) answers a burst sent at once
        in waves of its slots, each a service time later than the one
        before: latencies L, 2L, 3L, 4L on one slot, in the order sent, or
        in any (llama-cpp-python's server gives a freed slot to any request
        waiting). Taken as it is, such a round's mean (2.5 L) became the
        reference, and against it the next queue looked flat. Where its
        answers differ in length the waves are no longer regular, but a
        stream shows when each was begun: as an earlier one ended (see
        _chained_slots); whole answers served one at a time each took as
        long after the one before as their length says (see
        _one_at_a_time). Only the requests sent before the burst's first
        answer count (a retry sent after it is not part of its waves), and
        only if the first went out with nothing of ours in flight (it
        waited behind nothing of ours). A hosted API's answers vary by tens
        of percent; they rise in steps of one service time now and then
        over a burst of 4, which _burst_waves sends again to be sure."""
        burst = [
            sample
            for sequence, sample in zip(sent, round_, strict=True)
            if self._burst_from <= sequence <= self._burst_to
        ]
        if not (self.slow_start and self.gate.bursting and self._burst_alone) or len(burst) < 2:
            return None
        answered = sorted(sample.latency_s for sample in burst)
        slots = _wave_size(answered)
        if slots is not None:
            # Their first answer's latency (or a service time) less its own
            # generation.
            first = min(burst, key=lambda sample: sample.latency_s)
            lead = max(0.0, _unqueued_s(answered, slots) - self._generation(first))
            return _QueuedBurst(slots, lead, len(burst))
        if any(sample.generation_s is None for sample in burst):
            return self._one_slot(burst)
        leads = [(self._lead(sample), sample.latency_s) for sample in burst]
        slots = _chained_slots(leads)
        if slots is None:
            return None
        return _QueuedBurst(slots, min(lead for lead, _ in leads), len(burst))

    def _one_slot(self, burst: list[Sample]) -> _QueuedBurst | None:
        """Whole answers of a burst served one at a time (see
        _one_at_a_time): one slot, the first answer's lead at the time a
        token took, and that time."""
        answers = []
        for sample in sorted(burst, key=lambda sample: sample.latency_s):
            if sample.completion_tokens is None:
                return None
            answers.append((sample.completion_tokens, sample.latency_s))
        token_s = _one_at_a_time(answers)
        if token_s is None:
            return None
        tokens, latency = answers[0]
        return _QueuedBurst(1, max(0.0, latency - token_s * (tokens - 1)), len(burst), token_s)

    def _burst_waves(self, round_: list[Sample], sent: list[int]) -> tuple[int, float] | None:
        """``_queued_burst``'s slots and latency without a queue, once sure:
        waves over fewer than WAVES_SURE_ANSWERS answers may be a hosted
        API's jitter, and the same burst is sent again
        (``_waves_unconfirmed`` set: the size to see again)."""
        waves = self._queued_burst(round_, sent)
        if waves is not None and waves.slots + QUEUE_KEPT >= self.cap:
            # No queue beyond the one kept: nothing to cut, and a burst of 4
            # from a hosted API, its last answer slow, reads as waves of 3
            # (its first answer, low by luck, the reference: every later
            # round a queue, the cap cut to 2).
            waves = None
        unsure = (
            waves is not None
            and waves.answers < WAVES_SURE_ANSWERS
            and self._waves_unconfirmed != waves.slots
        )
        self._waves_unconfirmed = waves.slots if waves is not None and unsure else None
        if waves is None or unsure:
            return None
        if waves.token_s is not None and not self._token_gaps:
            # Whole answers' own generation from now on (see _generation),
            # as streams would have shown it.
            self._token_gaps_s, self._token_gaps = waves.token_s, 1
        return waves.slots, waves.lead_s

    def _unqueued(self, round_: list[Sample], reference: float) -> list[float] | None:
        """Each answer's latency without a queue: the server's own time plus
        the least overhead seen where the server says it, else its own
        generation plus the reference lead (None: there is none yet, and
        this round becomes it)."""
        if self._timed(round_):
            return [(s.server_s or 0.0) + self._overhead_s for s in round_]
        if not math.isfinite(reference):
            return None
        return [self._generation(s) + reference for s in round_]

    def _generation(self, sample: Sample) -> float:
        """The answer's own generation time as far as the client can tell: a
        stream's first token to its last; for an answer that came whole,
        its tokens at the rate streams showed; else 0 (unknown: a server
        that does not stream, judged on whole latencies)."""
        if sample.generation_s is not None:
            return sample.generation_s
        tokens = sample.completion_tokens
        if tokens is None or tokens < 2 or not self._token_gaps:
            return 0.0
        return self._token_gaps_s / self._token_gaps * (tokens - 1)

    def _lead(self, sample: Sample) -> float:
        """The answer's latency before its tokens came: the network, the
        prompt's time, and any queue. Answers of different lengths differ
        in their generation, not in this, so a server that says no time of
        its own is judged on it: a long answer is no queue."""
        return sample.latency_s - self._generation(sample)

    def _timed(self, round_: list[Sample]) -> bool:
        """Every answer says the server's own time: the latency without a
        queue is measured answer by answer."""
        return all(s.server_s is not None for s in round_) and math.isfinite(self._overhead_s)

    def _schedule_drain(self, round_: list[Sample]) -> None:
        """Count the rounds with no answer sent alone, and after
        ``_drain_rounds`` of them let the queue drain (see DRAIN_ROUNDS)."""
        if any(s.alone for s in round_):
            if self._drain_wait is not None:
                self._drain_wait = None
                self._drain_rounds = min(DRAIN_MAX_ROUNDS, 2 * self._drain_rounds)
            self._unprobed = 0
            return
        if self._drain_wait is not None:
            # Its request lost (an error, retried): the next drain is due.
            self._drain_wait += 1
            if self._drain_wait > 2:
                self._drain_wait = None
            return
        gate = self.gate
        if self.slow_start or self._timed(round_) or gate.cap >= min(gate.ceiling, gate.limit):
            return  # bursts send alone; or no queue is in the reference; or 429s pace the run
        if self._reference_shown(round_):
            return
        self._unprobed += 1
        if self._unprobed >= self._drain_rounds:
            self._unprobed = 0
            self._drain_wait = 0
            gate.drain()

    def _reference_shown(self, round_: list[Sample]) -> bool:
        """The round shows its reference holds no queue: some of its
        answers came in at it, others later (they waited for a slot: the
        queue kept), and those at it not under it on the whole (one answer
        may be, by its noise). A server of many slots answers so at its
        capacity: most answers wait for nothing. Where every answer waited
        alike (a server of one slot, or a queue taken for the latency
        without one), only a drain tells; and it idles a server's slots
        while they empty (16 slots: 94% of the best throughput)."""
        spread = max(self.tolerance, NOISE_SE_MULTIPLE * self._spread)
        reference = self._round_min_s
        leads = [self._lead(s) for s in round_]
        at = [lead for lead in leads if lead <= reference * (1.0 + spread)]
        if not at or self._below_reference(sum(at) / len(at)):
            return False
        return max(leads) > reference * (1.0 + spread) + QUEUE_FLOOR_S

    def _judge(self, round_: list[Sample], sent: list[int]) -> None:
        latencies = [s.latency_s for s in round_]
        leads = [self._lead(s) for s in round_]
        waves = self._burst_waves(round_, sent)
        if self._waves_unconfirmed is not None:
            self._judged_min_s = min(self._judged_min_s, *leads)
            return  # the same burst again (see _burst_waves)
        if waves:
            reference, rebased = waves[1], True
        else:
            reference, rebased = self._reference(round_)
        self._schedule_drain(round_)
        self._judged_min_s = min(self._judged_min_s, *leads)
        unqueued = self._unqueued(round_, reference)
        ratio = 1.0 if unqueued is None else sum(latencies) / sum(unqueued)
        in_flight = sum(s.in_flight for s in round_) / len(round_)
        mean_lead = sum(leads) / len(leads)
        if self._unconfirmed is not None and self._undo(ratio, mean_lead):
            return
        if self._settling:
            # The first round after a burst's cut started from an empty
            # server: its first answers waited for nothing, and it reads
            # less queue than the new cap keeps (16 into 4 slots, cut to 7:
            # x1.35 where 7 in flight keep x1.75). Cut on it, the cap came
            # down by one, and the round after read a rise: the cut undone,
            # and a queue taken for the latency without one.
            self._settling = False
            return
        queued_s = 0.0 if unqueued is None else (sum(latencies) - sum(unqueued)) / len(round_)
        # Little's law: the server computes in_flight / ratio, the rest waits.
        queued = in_flight * (1.0 - 1.0 / ratio)
        little = ratio > 1.0 + self.tolerance and queued_s > QUEUE_FLOOR_S
        if (little and queued > QUEUE_KEPT + 0.5) or (waves and waves[0] + QUEUE_KEPT < self.cap):
            if rebased:
                self._round_min_s = reference
            self._cut(ratio, in_flight, waves=waves[0] if waves else None)
            return
        # Flat: a reference for later rounds, and a measure of the noise
        # (from rounds without the queue kept on purpose: some of its
        # requests wait and some do not, which is no noise of the server's).
        # The reference is the best round seen, and of many rounds of a
        # jittery server (a hosted API's answers vary by tens of percent) the
        # best is low by luck: against it every later round reads as a queue,
        # and the cap is cut again and again. A round lowers it only by what
        # it shows beyond REFERENCE_SE_MULTIPLE of its own standard errors.
        upper = mean_lead + REFERENCE_SE_MULTIPLE * _standard_error(leads)
        self._round_min_s = min(reference if rebased else self._round_min_s, upper)
        if unqueued and len(round_) > 1 and queued < 0.5 and not self._keeps_queue(in_flight):
            self._measure_noise(latencies, unqueued)
        if self._probing:
            self._hold_rounds = HOLD_ROUNDS
            self._probing = False
        self._grow(in_flight, queued)

    def _grow(self, in_flight: float, queued: float) -> None:
        """A flat round: the next cap up, if the cap held requests back."""
        cap, ceiling = self.cap, self.gate.ceiling
        if cap >= ceiling:
            self.slow_start = False
            if self.capacity is None:
                self.reason = f"the configured concurrency ({ceiling}), latency flat"
            return
        # Grow only where the cap was what held requests back (a burst of
        # `cap` requests did: its places are not refilled, so the number in
        # flight falls as its answers come, and says nothing).
        if in_flight < cap - 0.5 and not self.gate.bursting:
            return
        if self.slow_start:
            self._set(min(float(ceiling), cap * SLOW_START_FACTOR))
            return
        if queued >= 0.5:
            # The queue kept on purpose is there: the server is busy at this
            # cap and no slot is idle, nothing to probe for. When it drains
            # (the server got faster, or another client left), probing resumes.
            return
        if self._hold > 0:
            self._hold -= 1
            return
        self._probing = True
        self._set(cap + 1.0)

    def _keeps_queue(self, in_flight: float) -> bool:
        """More in flight than the capacity found: some of the round's
        answers waited for a slot (the queue kept on purpose) and some did
        not, which is no noise of the server's. Against a reference too
        high (taken while the server was slow) such a round reads as flat."""
        return self.capacity is not None and in_flight > self.capacity + 0.5

    def _measure_noise(self, latencies: list[float], unqueued: list[float]) -> None:
        ratios = [lat / base for lat, base in zip(latencies, unqueued, strict=True)]
        average = sum(ratios) / len(ratios)
        # A noisy spell fades over a few flat rounds rather than widening
        # the tolerance for the rest of the run.
        self._noise = max(_standard_error(ratios) / average, self._noise * NOISE_DECAY)
        spread = _standard_error(ratios) * math.sqrt(len(ratios)) / average
        self._spread = max(spread, self._spread * NOISE_DECAY)

    def _cut(self, ratio: float, in_flight: float, *, waves: int | None = None) -> None:
        # Little's law: the server works on about in_flight / ratio at once.
        # Over a burst, whose requests in flight fall as they are answered,
        # it overstates that (16 sent into 4 slots read as 5.7); the waves
        # the burst came back in say the slots themselves.
        self.capacity = in_flight / ratio if waves is None else float(waves)
        if self._probing:
            self._hold_rounds = min(HOLD_MAX_ROUNDS, self._hold_rounds * 2)
        self._probing = False
        self._hold = self._hold_rounds
        target = max(1.0, math.floor(self.capacity + 0.5)) + QUEUE_KEPT
        if target >= self.cap:
            return
        if waves is None:
            # Waves a service time apart over 8 answers, or the same twice,
            # are no chance of jitter (see _burst_waves); and a queue of one
            # kept on purpose (two service times on one slot) would not read
            # as a fall from a burst of 4 anyway.
            self._unconfirmed = (self.cap, ratio, self.slow_start)
        self.cuts += 1
        self.reason = (
            f"latency x{ratio:.2f} at {in_flight:.1f} in flight: the server "
            f"computes about {self.capacity:.1f} at once and queues the rest"
            if waves is None
            else f"latency rose in waves of {waves} over a burst (x{ratio:.2f}): "
            f"the server computes {waves} at once and queues the rest"
        )
        self._set(target)
        self._settling = self.slow_start
        # Only now: ending the bursts wakes the requests waiting for a place,
        # and under the old cap a whole burst more would go into the queue.
        self.slow_start = False

    def _undo(self, ratio: float, mean_lead: float) -> bool:
        """The round after a cut: True if it shows the cut was for nothing
        (and takes it back)."""
        assert self._unconfirmed is not None
        before, cut_ratio, slow_start = self._unconfirmed
        self._unconfirmed = None
        expected = cut_ratio - max(1.0, cut_ratio * self.cap / before)
        if cut_ratio - ratio >= CUT_CONFIRM_SHARE * expected:
            return False
        self.undone += 1
        self.cuts -= 1
        self._round_min_s = mean_lead
        self.slow_start = slow_start
        self._hold = 0
        self.reason = (
            f"latency rose x{cut_ratio:.2f} but did not fall with fewer in flight: "
            "the server slowed down, no queue of ours"
        )
        if self.capacity is not None and self.cuts == 0:
            self.capacity = None
        self._set(before)
        return True

    def _next_sequence(self) -> int:
        """The gate sequence of the next place granted (places granted but
        not yet numbered come first)."""
        return self.gate.sent_count + self.gate.unsent + 1

    def _next_burst(self) -> None:
        self._burst_from = self._next_sequence()
        self._burst_to = self._burst_from - 1
        self._burst_alone = False
        self._burst_answered = False

    def _set(self, cap: float) -> None:
        # Places granted under the old cap are numbered later: they belong
        # to it, not to the round that judges the new one (those the new cap
        # grants, from set_cap on, do).
        self._changed_at = self._next_sequence() - 1
        self._next_burst()
        self._changes += 1
        self.gate.set_cap(cap)
        self._round = []
        self._round_sent = []

    def saturated(self, in_flight: int, capacity: float | None) -> None:
        """A request timed out while queued behind the run's own requests:
        the server had more than it could compute, whatever latency said.
        ``capacity`` is what the server's pace shows (answers a second times
        the time it takes over one), if known."""
        self._probing = False
        self._unconfirmed = None
        self._hold = self._hold_rounds = HOLD_MAX_ROUNDS
        if capacity is not None:
            self.capacity = capacity if self.capacity is None else min(self.capacity, capacity)
        target = max(1.0, math.floor(self.capacity + 0.5) if self.capacity else in_flight - 1.0)
        if target < self.cap:
            self.cuts += 1
            self.reason = (
                f"a request timed out queued behind {in_flight - 1} others: capped at {target:.0f}"
            )
            self._set(target)
        self.slow_start = False  # after the cut: see _cut

    def service_s(self) -> float | None:
        """How long the server takes over one request, as far as known: its
        own time where it says it, else the latency without a queue."""
        if self._server_count:
            return self._server_sum_s / self._server_count
        if math.isfinite(self._round_min_s):
            return self._round_min_s + self._generation_sum_s / max(1, self._answers)
        if math.isfinite(self._sample_min_s):
            return self._sample_min_s
        return None


def _wave_size(answered: list[float]) -> int | None:
    """The size of the first wave when the latencies of requests sent at
    once, in the order answered, come in waves of one size, each starting
    about a service time after the one before (see WAVE_RISE_SHARE and
    WAVE_REGULAR_SHARE: a server queueing what its slots cannot take); the
    last wave may be short. None if they do not, or all came in one wave
    (no queue)."""
    first = answered[0]
    step = max(WAVE_RISE_SHARE * first, QUEUE_FLOOR_S)
    regular_s = WAVE_REGULAR_SHARE * first
    sizes = [1]
    low = high = first
    for latency in answered[1:]:
        if latency - high >= step:
            if abs(latency - low - first) > regular_s:
                return None
            sizes.append(1)
            low = high = latency
        elif max(high, latency) - min(low, latency) < min(step, regular_s):
            sizes[-1] += 1
            low, high = min(low, latency), max(high, latency)
        else:
            return None  # neither in this wave nor a service time after it
    if len(sizes) < 2 or sizes[-1] > sizes[0] or len(set(sizes[:-1])) > 1:
        return None
    return sizes[0]


def _chained_slots(answers: list[tuple[float, float]]) -> int | None:
    """The slots that a burst sent at once into an idle server shows when
    its answers differ in length, from each answer's (lead, latency): the
    first wave began at once (leads within CHAIN_SHARE of the least), and
    each later answer began (its lead less the least) as an earlier one
    ended (its latency): a slot freed and went to it, in whatever order. A
    hosted API's answers do not chain so. None if one does not, or none
    waited."""
    answers = sorted(answers)
    least = answers[0][0]
    tolerance = max(QUEUE_FLOOR_S, CHAIN_SHARE * least)
    slots = sum(1 for lead, _ in answers if lead - least <= tolerance)
    if slots == len(answers):
        return None
    ends = [latency for _, latency in answers[:slots]]
    for lead, latency in answers[slots:]:
        begun = lead - least
        nearest = min(ends, key=lambda end: abs(end - begun), default=math.inf)
        if abs(nearest - begun) > tolerance:
            return None
        ends.remove(nearest)
        ends.append(latency)
    return slots


def _one_at_a_time(answers: list[tuple[int, float]]) -> float | None:
    """The time a token took, when whole answers of a burst sent at once,
    as (completion tokens, latency) in the order answered, were served one
    at a time (one slot; llama-cpp-python's server, which streams no burst):
    the first took its latency, and each later one its time after the one
    before; those times a + b x tokens (least squares, a > 0 and b >= 0),
    each within CHAIN_SHARE of it (each later answer waited out the one
    before). A hosted API answers a burst at once, its answers' times after
    the one before a fraction of the first's. b, or None. Answers of one length are waves
    (see _wave_size)."""
    if len(answers) < 4:
        return None  # a line fits any two points, and nearly any three
    tokens = [float(count) for count, _ in answers]
    services = [answers[0][1]] + [
        latency - before for (_, before), (_, latency) in itertools.pairwise(answers)
    ]
    mean_tokens = sum(tokens) / len(tokens)
    mean_service = sum(services) / len(services)
    spread = sum((count - mean_tokens) ** 2 for count in tokens)
    if spread == 0:
        return None
    token_s = (
        sum((c - mean_tokens) * (t - mean_service) for c, t in zip(tokens, services, strict=True))
        / spread
    )
    fixed_s = mean_service - token_s * mean_tokens
    if token_s < 0 or fixed_s <= 0:
        return None
    for count, service in zip(tokens, services, strict=True):
        fitted = fixed_s + token_s * count
        if abs(service - fitted) > max(QUEUE_FLOOR_S, CHAIN_SHARE * fitted):
            return None
    return token_s


def _unqueued_s(answered: list[float], slots: int) -> float:
    """The latency without a queue that a burst's waves show: its first
    answer's, or a service time (the waves' period: each wave waited for the
    one before it) if that was shorter beyond the noise: the first answer
    may have waited for work ahead of it (llama-cpp-python computes a
    stream trial it cuts short: 1.75 s where an answer took 1.3 s, and a
    queue of 3 on one slot read as 1.5 slots)."""
    waves = (len(answered) - 1) // slots
    period = (answered[waves * slots] - answered[0]) / waves
    return min(answered[0], period * (1.0 + FLAT_TOLERANCE))


def _standard_error(values: list[float]) -> float:
    """The standard error of the mean of ``values`` (0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    average = sum(values) / len(values)
    spread = math.sqrt(sum((v - average) ** 2 for v in values) / (len(values) - 1))
    return spread / math.sqrt(len(values))


class QueueClock:
    """How long a request has waited behind the run's own earlier requests.

    A server computes requests in the order they came (llama.cpp's slots,
    vLLM's scheduler), so a request sent while earlier ones are in flight may
    sit in its queue, silent, until they are done: that silence is queueing,
    not a stuck request. Entries record when the oldest request in flight
    moved on: at ``times[i]`` every request numbered below ``heads[i]`` was
    done.
    """

    def __init__(self) -> None:
        self._in_flight: dict[int, float] = {}
        self._heads: list[int] = []
        self._times: list[float] = []
        # Since when the oldest request in flight has been the oldest with
        # another behind it: see head_s.
        self._head_since = math.inf
        # Each time an answer came for a request sent later than every one
        # answered before it: ``_answered_at[i]`` is when the first of ours
        # numbered up to ``_answered[i]`` was answered (see passed_at).
        self._answered: list[int] = []
        self._answered_at: list[float] = []

    def sent(self, sequence: int, now: float) -> None:
        if not self._in_flight:
            # Alone: the credit starts when another is sent behind it.
            self._head_since = math.inf
        elif self._head_since == math.inf:
            self._head_since = now
        self._in_flight[sequence] = now

    def done(self, sequence: int, now: float, *, stuck: bool = False) -> None:
        """Request ``sequence`` is over; ``stuck``: it was cut for silence,
        stuck, not computed, so nothing ever waited behind it."""
        oldest = next(iter(self._in_flight), None)
        sent_at = self._in_flight.pop(sequence, now)
        if not stuck and (not self._answered or sequence > self._answered[-1]):
            self._answered.append(sequence)
            self._answered_at.append(now)
        if sequence != oldest:
            return
        head = next(iter(self._in_flight), None)
        if head is None:
            return
        self._head_since = max(self._in_flight[head], sent_at if stuck else now)
        if len(self._in_flight) < 2:
            # Alone: the credit starts when another is sent behind it.
            self._head_since = math.inf
        self._heads.append(head)
        self._times.append(sent_at if stuck else now)
        if len(self._heads) > 2 * len(self._in_flight) + 64:
            # Entries below the oldest request in flight answer no one.
            keep = bisect.bisect_left(self._heads, head)
            del self._heads[:keep], self._times[:keep]
        if len(self._answered) > 2 * len(self._in_flight) + 64:
            # Answers up to the oldest request in flight passed none in flight.
            keep = bisect.bisect_right(self._answered, head)
            del self._answered[:keep], self._answered_at[:keep]

    def passed_at(self, sequence: int) -> float:
        """When the server first answered a request of ours sent after
        ``sequence`` (inf: not yet). A server computes in order, so from
        then on ``sequence`` waits in no queue of ours: it is being computed
        beside others, or it is stuck."""
        index = bisect.bisect_right(self._answered, sequence)
        return self._answered_at[index] if index < len(self._answered) else math.inf

    def head_s(self, sequence: int, now: float) -> float:
        """Seconds request ``sequence`` has spent as the oldest in flight with
        later ones waiting behind it, while the server answered none of them.

        A server computes in order: such a request is the one it is working
        on (a slow answer: a long one, a machine under load), not a stuck
        one, which a server passes by, answering those sent after it. Alone
        in flight, nothing tells the two apart: no credit."""
        if next(iter(self._in_flight), None) != sequence:
            return 0.0
        end = self.passed_at(sequence)
        if end == math.inf:
            if len(self._in_flight) < 2:
                return 0.0
            end = now
        return max(0.0, end - self._head_since)

    def ahead(self, sequence: int) -> int:
        """Requests in flight that were sent before ``sequence``."""
        return sum(1 for other in self._in_flight if other < sequence)

    def behind_s(self, sequence: int, now: float) -> float:
        """Seconds request ``sequence`` has spent with an earlier one in
        flight, until the server answered one sent after it."""
        sent_at = self._in_flight.get(sequence)
        if sent_at is None:
            return 0.0
        oldest = next(iter(self._in_flight))
        if oldest < sequence:
            end = now
        else:
            index = bisect.bisect_left(self._heads, sequence)
            if index == len(self._heads):
                return 0.0
            end = self._times[index]
        return max(0.0, min(end, self.passed_at(sequence)) - sent_at)
