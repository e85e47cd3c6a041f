"""What a simulation run gives: the raw per-request times and totals of one policy on one
trace (:class:`RunResult`; the metrics are computed in :mod:`dpcore.sim.report`), and the
record an engine keeps while it runs (:class:`Outcome`)."""

from __future__ import annotations

import math
from collections import Counter

from attrs import field, frozen

from dpcore.sim.routing import ExplainedDecision


@frozen
class RunResult:
    """Raw outcome of one policy on one trace (metrics are computed in :mod:`report`).

    Per-request lists are aligned with the trace; ``nan`` marks requests that did not
    complete (rejected).
    """

    policy: str
    dp_size: int
    arrival: list[float]
    start: list[float]
    first_token: list[float]
    finish: list[float]
    rank: list[int]
    output_tokens: list[int]
    input_tokens_admitted: int
    hit_tokens: int
    served_tokens: list[int]
    completed: int
    rejected: int
    reject_reasons: dict[str, int]
    series: list[list[tuple[float, int, int]]]
    explained: list[ExplainedDecision] = field(factory=list)
    events: int = 0
    #: Requests lost to a rank fault after dispatch (reasons in ``fail_reasons``).
    failed: int = 0
    fail_reasons: dict[str, int] = field(factory=dict)
    #: Inter-token latencies as (seconds, tokens) pairs (lockstep engine only).
    itl: list[tuple[float, int]] = field(factory=list)
    #: Global steps run, and rank-seconds of own work, of waiting for the slowest rank
    #: (idle or padded), and in all (lockstep engine only).
    steps: int = 0
    busy_s: float = 0.0
    waste_s: float = 0.0
    rank_time_s: float = 0.0
    #: Distinct policy failures (exception and location, or bad return value) -> requests.
    errors: dict[str, int] = field(factory=dict)


class Outcome:
    """What a run records per request and in total, for its :class:`RunResult`."""

    __slots__ = (
        "start", "first", "finish", "rank_of", "out_tokens", "completed", "failed", "fail_reasons",
        "itl", "busy_s", "waste_s", "rank_time_s", "admitted_in", "hit_total",
    )  # fmt: skip

    def __init__(self, n: int) -> None:
        nan = math.nan
        self.start = [nan] * n  # admitted
        self.first = [nan] * n  # first token
        self.finish = [nan] * n
        self.rank_of = [-1] * n
        self.out_tokens = [0] * n
        self.completed = self.failed = 0
        self.fail_reasons: Counter[str] = Counter()
        self.itl: list[tuple[float, int]] = []  # (gap between two tokens, how many tokens)
        self.busy_s = self.waste_s = self.rank_time_s = 0.0  # rank-seconds
        self.admitted_in = self.hit_total = 0  # prompt tokens admitted, and of them cached
