"""The controller side of a simulation: the router interface both engines call, the adapter
that drives an installed dpcore policy chain through it, and the per-arrival dispatch step
(the choice, the ``--explain`` sample, the count of refusals and why).

The controller side is a *router*: anything with ``select``, ``dispatched``, ``report``,
``first_token``, ``finished`` and ``last_decision``. Installed dpcore policies are driven
through :class:`PluginRouter`, i.e. the real :class:`~dpcore.manager.PolicyManager` and
:class:`~dpcore.ledger.LoadLedger` on the simulated clock; peer baselines
(:mod:`dpcore.sim.baselines`) implement the same interface. Every router sees the same
arrivals at the same simulated times.
"""

from __future__ import annotations

import random
import traceback
from collections import Counter
from typing import Any, Protocol

from attrs import frozen

from dpcore.cacheindex import KvEventBatch
from dpcore.errors import PolicyFailedError, RequestRejected
from dpcore.manager import PolicyManager
from dpcore.model import Decision, LoadReport, Request


def policy_error_key(exc: RequestRejected) -> str | None:
    """One line per distinct policy failure: the exception and where it was raised, or the
    bad return value; ``None`` for a rejection that is not a policy failure."""
    if not isinstance(exc, PolicyFailedError):
        return None
    cause = exc.__cause__
    if cause is None:
        return str(exc)
    frames = traceback.extract_tb(cause.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(cause).__name__}: {cause}{where}"

class Dispatcher:
    """One arrival's way to a rank, the same in every engine: the router's choice, the
    sampled ``--explain`` record, and the count of requests refused and why."""

    def __init__(self, router: Router, explain_at: set[int]) -> None:
        self.router = router
        self.explain_at = explain_at
        self.explained: list[ExplainedDecision] = []
        self.rejected = 0
        self.reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def route(self, i: int, req: Request, now: float) -> tuple[int, int] | None:
        """``(rank, dispatch seq)`` for request *i*, or ``None`` when the router rejected it."""
        router = self.router
        try:
            rank = router.select(req)
        except RequestRejected as exc:
            self.rejected += 1
            self.reasons[exc.code] += 1
            key = policy_error_key(exc)
            if key is not None:
                self.errors[key] += 1
            return None
        if i in self.explain_at:
            d = router.last_decision
            self.explained.append(
                ExplainedDecision(
                    rid=req.rid,
                    time_s=now,
                    rank=rank,
                    policy=d.policy,
                    reason=d.reason,
                    scores=dict(d.scores) if d.scores else None,
                )
            )
        return rank, router.dispatched(req, rank)

    def refuse(self, req: Request, rank: int, code: str) -> None:
        """The engine refused a dispatched request (e.g. ``engine_too_long``)."""
        self.rejected += 1
        self.reasons[code] += 1
        self.router.finished(req, rank)


def explain_sample(n: int, count: int, seed: int) -> set[int]:
    """Which requests ``--explain count`` records: a stream of its own, so that asking for
    explanations never changes the run."""
    if not count:
        return set()
    return set(random.Random(f"explain-{seed}").sample(range(n), min(count, n)))


class Router(Protocol):
    """What the engine needs from the controller side (a policy chain or a baseline)."""

    last_decision: Decision

    def select(self, request: Request) -> int: ...

    def dispatched(self, request: Request, rank: int) -> int: ...

    def report(self, report: LoadReport) -> bool: ...

    def first_token(self, request: Request, rank: int) -> None: ...

    def finished(self, request: Request, rank: int) -> None: ...


class PluginRouter:
    """Drives a dpcore policy chain exactly as the live controller does.

    ``select`` then ``dispatched`` per request, ``report`` per delivered load report; the
    controller never sees first tokens or completions (they bypass it), so those are no-ops.
    """

    def __init__(self, manager: PolicyManager) -> None:
        self.manager = manager
        self.select = manager.select
        self.dispatched = manager.dispatched
        self.report = manager.report

    @property
    def last_decision(self) -> Decision:
        return self.manager.last_decision

    def first_token(self, request: Request, rank: int) -> None:
        pass

    def finished(self, request: Request, rank: int) -> None:
        pass

    def kv_events(self, batch: KvEventBatch) -> bool:
        """A rank's KV event batch reached the controller: returns whether its cache index
        still knows that rank exactly (``False``: it lost track and wants a resync)."""
        index = self.manager.cache
        return index.apply(batch) or index.known(batch.rank)

    def rank_alive(self, rank: int, alive: bool) -> None:
        """The controller noticed *rank* stop (its reports and heartbeats ceased)."""
        self.manager.ledger.set_active(rank, alive)


@frozen
class ExplainedDecision:
    """One sampled decision, for ``--explain``."""

    rid: str
    time_s: float
    rank: int
    policy: str
    reason: str
    scores: dict[str, Any] | None
