"""Lockstep for mock ranks: the per-step all-gather of DP attention, as a small state machine.

With DP attention, SGLang 0.5.23's ranks run every forward pass together. Before each pass
every rank all-gathers its batch shape (``num_tokens``, ``can_cuda_graph``,
``is_extend_in_batch``...: ``prepare_mlp_sync_batch_raw`` in
``sglang/srt/managers/scheduler_components/dp_attn.py``); when any rank has tokens, a rank
with nothing to do runs an idle batch so the collective completes, and the MoE layers work on
the tokens of all ranks. A step therefore lasts as long as the slowest rank's part plus the
shared part over the gathered tokens: :class:`~dpcore.sim.stepmodel.StepModel`, the same
model ``dpcore simulate`` runs.

:class:`Lockstep` is that gather, for ranks that are separate processes. Each member posts
its planned :class:`StepWork` for the next *run* (a run is one step, or several identical
decode steps when every rank could repeat its batch unchanged). When every member has
posted and some rank has work, the run starts: its step time comes from the step-time
model, and it ends when the first rank's plan would change (a request finishes, a report is
due, a request arrives). The driver then tells every member how many steps ran, the
members apply them and post again.

Unlike SGLang, whose all-gather waits forever for a rank that died, a gather waits at most
``step_timeout_s``: the missing rank leaves the lockstep (counted in :attr:`Stats.dropped`),
the others go on, and it rejoins as soon as it posts again.

Times are model seconds; the drivers (:mod:`dpcore.mock.barrier`, and a standalone
``dpcore mock-worker``) map them to wall time. The state machine never reads a clock.
"""

from __future__ import annotations

import math
from attrs import define, field, frozen

from dpcore.sim.stepmodel import StepModel

#: ``max_steps`` of a plan that can repeat for ever (an idle rank).
UNBOUNDED = 1 << 30
_EPS = 1e-9


def _count(_inst: object, attr: object, value: int) -> None:
    if type(value) is not int or value < 0:
        raise ValueError(f"{attr.name} must be an integer >= 0, got {value!r}")  # type: ignore[attr-defined]


@frozen
class StepWork:
    """One rank's part of the next step: what the all-gather carries.

    :ivar num_tokens: Tokens this rank puts through the forward pass: the extend tokens of
        its prefill batch, or one per running request in decode; 0 when idle (0 and up).
    :ivar extend: The batch is a prefill (extend) batch. The step then runs without CUDA
        graphs on every rank (SGLang takes the min of the ranks' votes).
    :ivar max_steps: How many identical steps the rank can run before its batch changes
        (1 for an extend batch; :data:`UNBOUNDED` when idle; 1 and up).
    :ivar wake_at: Model time at which the rank wants the run to end (a report falls due,
        a request arrived): the run ends at the first step boundary at or after it.
    """

    num_tokens: int = field(default=0, validator=_count)
    extend: bool = False
    max_steps: int = UNBOUNDED
    wake_at: float = math.inf

    def __attrs_post_init__(self) -> None:
        if type(self.max_steps) is not int or self.max_steps < 1:
            raise ValueError(f"max_steps must be an integer >= 1, got {self.max_steps!r}")
        if not isinstance(self.wake_at, (int, float)) or math.isnan(self.wake_at):
            raise ValueError(f"wake_at must be a number or inf, got {self.wake_at!r}")

    @property
    def busy(self) -> bool:
        return self.num_tokens > 0


IDLE = StepWork()


@define
class Run:
    """A run of identical lockstep steps, from :attr:`start` for :attr:`steps` steps."""

    run: int
    start: float
    step_s: float
    steps: int
    #: Each member's plan version used for this run.
    versions: dict[int, int]
    work: dict[int, StepWork]
    #: Rank-seconds per step spent waiting for the slowest rank.
    waste_s: float = 0.0

    @property
    def end(self) -> float:
        return self.start + self.steps * self.step_s

    def cut(self, at: float) -> None:
        """End at the first step boundary at or after *at* (at least one step)."""
        k = max(1, math.ceil((at - self.start) / self.step_s - _EPS))
        if k < self.steps:
            self.steps = k


@define
class Stats:
    """What the lockstep did (model seconds)."""

    runs: int = 0
    steps: int = 0
    extend_steps: int = 0
    #: Steps during which some rank prefilled while another decoded without its CUDA graph.
    graphless_steps: int = 0
    #: Rank-steps run as idle batches while another rank had work.
    idle_rank_steps: int = 0
    busy_s: float = 0.0
    #: Rank-seconds of steps (members × step time), and the part of it ranks spent idle or
    #: padded while the slowest rank finished its own work (the step model's waste).
    rank_s: float = 0.0
    waste_s: float = 0.0
    #: Model time every rank waited for a rank that missed a gather (until the step timeout).
    stall_s: float = 0.0
    #: How far a run's start lagged behind the clock when it started: the processes falling
    #: behind model time (results stay exact in model time; near 0 when the machine keeps up).
    lag_max_s: float = 0.0
    #: Ranks that missed a gather by ``step_timeout_s`` and were dropped from it.
    dropped: int = 0
    rejoined: int = 0
    stale_posts: int = 0


class Lockstep:
    """The gather of one DP group. Drive it with :meth:`join`, :meth:`post`, :meth:`wake`,
    :meth:`leave` and :meth:`tick`; call :meth:`tick` again at :meth:`due`.

    :param model: The step-time model (the simulator's).
    :param step_timeout_s: Longest wait for a member's post, in model seconds.
    """

    def __init__(self, model: StepModel, step_timeout_s: float, now: float = 0.0) -> None:
        if not step_timeout_s > 0:
            raise ValueError(f"step_timeout_s must be positive, got {step_timeout_s!r}")
        self.model = model
        self.step_timeout_s = step_timeout_s
        self.members: set[int] = set()
        self._seen: set[int] = set()
        #: The run being gathered (no :attr:`running`) or run (:attr:`running`).
        self.run_id = 0
        self.running: Run | None = None
        self._plans: dict[int, tuple[int, StepWork, float]] = {}
        self._early: dict[int, tuple[int, StepWork, float]] = {}
        self._wakes: dict[int, float] = {}
        self.last_end = now
        self._gather_since = now
        #: Whether the gather in progress follows a run without an idle gap.
        self._continuing = False
        self.stats = Stats()

    # ------------------------------------------------------------------ members

    def join(self, rank: int, now: float) -> int:
        """Add *rank* (new, restarted or dropped); returns the run it must post for."""
        if rank in self.members:
            # A restarted (or resynchronised) process: its old plans are void, and the run in
            # progress ends without telling it.
            self._plans.pop(rank, None)
            self._early.pop(rank, None)
            if self.running is not None:
                self.running.versions.pop(rank, None)
        elif rank in self._seen:
            self.stats.rejoined += 1
        self._seen.add(rank)
        if self.running is None:
            self._gather_since = now  # the gather now waits for this rank too
        self.members.add(rank)
        return self.run_id + 1 if self.running is not None else self.run_id

    def leave(self, rank: int, now: float) -> None:
        """*rank* stops (a clean exit): the gather no longer waits for it."""
        self.members.discard(rank)
        self._plans.pop(rank, None)
        self._early.pop(rank, None)
        self._wakes.pop(rank, None)
        self._try_start(now)

    # ------------------------------------------------------------------ posts

    def post(self, rank: int, run: int, version: int, work: StepWork, at: float, now: float) -> bool:
        """*rank*'s plan *version* (1 and up) for *run*, ready at model time *at* (its last
        step end, or the arrival of the newest request in it). ``False``: not a member, or a
        run that is over; the rank must :meth:`join` and post again."""
        if rank not in self.members:
            return False
        if self.running is not None and run == self.run_id:
            # A rank that posted an idle plan got work after the run started: end the run
            # at the next step boundary, so the rank can take it.
            self.running.cut(at)
            return True
        if self.running is not None and run == self.run_id + 1:
            self._early[rank] = (version, work, at)
            return True
        if self.running is None and run == self.run_id:
            self._plans[rank] = (version, work, at)
            self._try_start(now)
            return True
        self.stats.stale_posts += 1
        return False

    def wake(self, rank: int, run: int, at: float, now: float) -> None:
        """*rank* wants *run* to end at the first step boundary at or after *at*."""
        if rank not in self.members or run != self.run_id:
            return
        if self.running is not None:
            self.running.cut(at)
        else:
            self._wakes[rank] = min(at, self._wakes.get(rank, math.inf))

    # ------------------------------------------------------------------ time

    def due(self) -> float | None:
        """Model time of the next :meth:`tick`: the run's end, or the gather's deadline."""
        if self.running is not None:
            return self.running.end
        if self.members - self._plans.keys() and self.step_timeout_s < math.inf:
            return self._gather_since + self.step_timeout_s
        return None

    def tick(self, now: float) -> tuple[Run | None, list[int]]:
        """End the run if it is due; drop members that missed the gather's deadline.

        Returns the run that ended (the driver tells its members) and the dropped ranks.
        """
        ended: Run | None = None
        dropped: list[int] = []
        run = self.running
        if run is not None and now >= run.end - _EPS:
            ended = run
            self._account(run)
            self.running = None
            self.last_end = run.end
            self.run_id += 1
            self._plans, self._early = self._early, {}
            self._wakes = {}
            self._gather_since = now
            self._continuing = True
            self._try_start(now)
        elif run is None and now >= self._gather_since + self.step_timeout_s - _EPS:
            dropped = sorted(self.members - self._plans.keys())
            for rank in dropped:
                self.members.discard(rank)
            self.stats.dropped += len(dropped)
            # The others waited for the timeout, in model time too (SGLang's would still wait).
            self._try_start(now, not_before=now)
        return ended, dropped

    def _try_start(self, now: float, not_before: float = -math.inf) -> None:
        if self.running is not None or not self.members or self.members - self._plans.keys():
            return
        plans = {r: self._plans[r] for r in sorted(self.members)}
        ready = [at for _, w, at in plans.values() if w.busy]
        if not ready:
            # Everyone idle: no step runs (every SGLang rank returns no batch). The next run
            # starts when a rank gets work; that gap is idle time, not a stall.
            self._continuing = False
            return
        start = max(self.last_end, not_before, min(ready))
        if self._continuing:
            self.stats.stall_s += start - self.last_end
        self.stats.lag_max_s = max(self.stats.lag_max_s, now - start)
        versions: dict[int, int] = {}
        work: dict[int, StepWork] = {}
        cut = math.inf
        for r, (version, w, at) in plans.items():
            if at > start + _EPS:
                # Work that arrived after the step starts (model time) waits for the next
                # step boundary, as a scheduler sees new requests only between steps: the
                # rank idles now (version 0: its plan did not run) and the run ends there.
                version, w, cut = 0, IDLE, min(cut, at)
            versions[r] = version
            work[r] = w
            cut = min(cut, w.wake_at, self._wakes.get(r, math.inf))
        works = list(work.values())
        step = self.model.step([w.num_tokens if w.extend else 0 for w in works],
                               [0 if w.extend else w.num_tokens for w in works])  # fmt: skip
        steps = min(w.max_steps for w in works)
        run = Run(self.run_id, start, step.duration_s, steps, versions, work, step.waste_s)
        if cut < math.inf:
            run.cut(cut)
        self.running = run

    def _account(self, run: Run) -> None:
        s = self.stats
        works = run.work.values()
        s.runs += 1
        s.steps += run.steps
        s.busy_s += run.steps * run.step_s
        s.rank_s += run.steps * run.step_s * len(run.work)
        s.waste_s += run.steps * run.waste_s
        if any(w.extend for w in works):
            s.extend_steps += run.steps
            if any(w.busy and not w.extend for w in works):
                s.graphless_steps += run.steps
        s.idle_rank_steps += run.steps * sum(1 for w in works if not w.busy)
