"""One rank's side of the lockstep: post a plan for every run, apply what the group ran.

The protocol, whatever carries it (``dpcore mock-barrier`` over ZMQ, an in-process group of
one, or a test's virtual clock):

* after the lockstep says which run to post for (a *sync*), and after every run ends, the
  rank posts its plan for the next run, made for a step starting at the run's end: requests
  that arrived later wait for a later step, and the run ends at the first one's arrival;
* a request that arrives while the rank's posted plan has work asks for the run to end at
  the next step boundary (a *wake*): SGLang's scheduler takes new requests between steps;
* a request that arrives while the posted plan is idle gets a fresh plan at once (an idle
  plan commits nothing), ready at the request's arrival;
* when a run ends, the rank applies the plan version the group ran (version 0: none, the
  rank idled) for the steps it ran.
"""

from __future__ import annotations

from typing import Protocol

from dpcore.mock.engine import MockEngine, Step
from dpcore.mock.lockstep import IDLE, StepWork


class Poster(Protocol):
    """Where a rank's posts go (a barrier connection, or a test's group)."""

    def post(self, run: int, version: int, work: StepWork, at: float) -> None: ...

    def wake(self, run: int, at: float) -> None: ...


class Stepper:
    """The lockstep state of one rank around its :class:`~dpcore.mock.engine.MockEngine`.

    :param report_interval_s: Model seconds a run may last at most, so that load reports
        (sent after each run) are at most this far apart while the rank is busy.
    """

    def __init__(self, engine: MockEngine, poster: Poster, report_interval_s: float) -> None:
        self.engine = engine
        self.poster = poster
        self.report_interval_s = report_interval_s
        #: The run this rank posts for; ``None`` until the lockstep said.
        self.run_id: int | None = None
        self._version = 0
        self._posted: dict[int, StepWork] = {}
        self._posted_busy = False
        #: Model time the rank's last step ended (its plans start there).
        self._t = 0.0

    @property
    def waiting_for_the_group(self) -> bool:
        """The rank posted work and waits for the run to end."""
        return self._posted_busy

    def sync(self, run: int, chunk_tokens: int, now: float) -> None:
        """The lockstep (re)admitted this rank: post for *run* from now on."""
        self.run_id = run
        self.engine.chunk_tokens = chunk_tokens
        self._posted.clear()
        self._t = max(self._t, now)
        self._post(self._t)

    def arrived(self, now: float) -> None:
        """Requests were added to the engine at model time *now*."""
        if self.run_id is None:
            return  # the sync will post
        if self._posted_busy:
            self.poster.wake(self.run_id, now)
        else:
            self._post(now)

    def end(self, run: int, version: int, steps: int, end: float) -> tuple[Step, StepWork] | None:
        """Run *run* ended at *end* after *steps* steps of plan *version*: apply it, post
        for the next run. Returns what it produced and the work this rank did in it;
        ``None`` for a run this rank did not post for (a past life)."""
        if run != self.run_id:
            return None
        work = self._posted.get(version, IDLE)
        step = self.engine.apply(work, steps, end)
        self._t = end
        self.run_id = run + 1
        self._posted.clear()
        self._post(end)
        return step, work

    def _post(self, at: float) -> None:
        assert self.run_id is not None  # posts happen only after a sync
        e = self.engine
        at = max(at, self._t)
        work = e.plan(at, at + self.report_interval_s)
        if not work.busy and e.waiting:
            # Nothing to do before the first waiting request arrives (a hair after the run
            # ended): the rank's next step starts then, with it.
            at = max(at, e.waiting[0].arrived)
            work = e.plan(at, at + self.report_interval_s)
        # A batch formed earlier (a plan the group did not run yet) keeps its own readiness.
        at = max(at, e.batch_arrived)
        self._version += 1
        self._posted[self._version] = work
        self._posted_busy = work.busy
        self.poster.post(self.run_id, self._version, work, at)
