"""The controller's books: every counter, and the two identities they must satisfy.

The loop thread is the only writer. Readers on other threads (the status server, the
Prometheus collector) take a :meth:`Controller.snapshot
<dpcore.runtime.controller.Controller.snapshot>` on the loop thread instead of reading
these fields while the loop changes them.

Accounting, exact at any moment between two messages::

    received   = dispatched - redispatched + rejected + parked
    dispatched = completed + failed + redispatched + in_flight      (per rank, and in total)

Aborts are counted by the reason their sender gave and by what became of them (one of
:data:`ABORT_OUTCOMES`); both label sets are small and fixed.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from dpcore.model import Decision

#: Decision latency histogram bucket upper bounds, in seconds.
LATENCY_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2)
#: Distinct (policy, reason) label pairs kept; further ones count as (policy, "other").
MAX_REASONS = 64
#: Occurrences of a repeated problem that are logged before only every
#: :data:`LOG_EVERY`-th one is (a flood of bad frames must not flood the log).
LOG_FIRST = (1, 10, 100)
LOG_EVERY = 1000

#: What became of an abort: sent to the one rank holding its request; ended its request
#: while it waited for its prefill rank (PD decode; answered ``rej`` ``aborted``); named no
#: request the controller holds (finished already, or never seen); named a request whose
#: rank was already sent an abort for it (not sent again).
ABORT_FORWARDED = "forwarded"
ABORT_PARKED_ENDED = "parked_ended"
ABORT_UNKNOWN = "unknown"
ABORT_REPEATED = "repeated"
ABORT_OUTCOMES = (ABORT_FORWARDED, ABORT_PARKED_ENDED, ABORT_UNKNOWN, ABORT_REPEATED)


def rate_limited(n: int) -> bool:
    """Log the 1st, 10th, 100th... occurrence of a repeated problem, not every one."""
    return n in LOG_FIRST or n % LOG_EVERY == 0


class Books:
    """Counters of one controller (plain ints: the hot path pays no metric call)."""

    __slots__ = (
        "dp_size",
        "received",
        "bad_frames",
        "bad_reports",
        "stale_reports",
        "kv_stale_batches",
        "kv_resyncs",
        "unknown_done",
        "undeliverable",
        "reports",
        "controls",
        "internal_errors",
        "loop_stalls",
        "policy_overruns",
        "unconnected_reports",
        "unproven_restarts",
        "dispatched",
        "completed",
        "failed",
        "redispatched",
        "rejected",
        "rejected_unranked",
        "rejected_by_code",
        "failed_by_code",
        "decision_reasons",
        "aborts",
        "latency_counts",
        "latency_sum",
    )

    def __init__(self, dp_size: int) -> None:
        n = self.dp_size = dp_size
        self.received = 0
        self.bad_frames = 0
        self.bad_reports = 0
        self.stale_reports = 0
        # KV events: batches from another life than the current one; resyncs asked.
        self.kv_stale_batches = 0
        self.kv_resyncs = 0
        self.unknown_done = 0
        self.undeliverable = 0
        self.reports = 0
        self.controls = 0
        self.internal_errors = 0
        # Liveness checks that ran late because the loop itself was held up (not counted
        # against the ranks); policy calls over their time budget.
        self.loop_stalls = 0
        self.policy_overruns = 0
        # Reports for a rank nobody is connected as; new epochs for a live rank without a
        # reconnection on its dispatch socket (both dropped: see runtime.lifecycle).
        self.unconnected_reports = 0
        self.unproven_restarts = 0
        self.dispatched = [0] * n
        self.completed = [0] * n
        self.failed = [0] * n
        self.redispatched = [0] * n
        self.rejected = [0] * n
        self.rejected_unranked = 0
        self.rejected_by_code: dict[str, int] = {}
        self.failed_by_code: dict[str, int] = {}
        self.decision_reasons: dict[tuple[str, str], int] = {}
        # (reason, outcome) -> count; reasons are dpcore.wire's fixed set, outcomes ABORT_OUTCOMES.
        self.aborts: dict[tuple[str, str], int] = {}
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

    def reject(self, code: str, rank: int | None) -> None:
        if rank is None:
            self.rejected_unranked += 1
        else:
            self.rejected[rank] += 1
        self.rejected_by_code[code] = self.rejected_by_code.get(code, 0) + 1

    def fail(self, code: str, rank: int) -> None:
        self.failed[rank] += 1
        self.failed_by_code[code] = self.failed_by_code.get(code, 0) + 1

    def aborted(self, reason: str, outcome: str) -> None:
        key = (reason, outcome)
        self.aborts[key] = self.aborts.get(key, 0) + 1

    def abort_stats(self) -> dict[str, Any]:
        """Aborts in total, by reason and by outcome."""
        by_reason: dict[str, int] = {}
        by_outcome: dict[str, int] = {}
        for (reason, outcome), n in self.aborts.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
            by_outcome[outcome] = by_outcome.get(outcome, 0) + n
        return {"total": sum(by_reason.values()), "by_reason": by_reason, "by_outcome": by_outcome}

    def decided(self, seconds: float, decision: Decision) -> None:
        """Count one policy decision: its latency and its (policy, reason) label."""
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds
        key = (decision.policy, decision.reason)
        reasons = self.decision_reasons
        if key in reasons:
            reasons[key] += 1
        elif len(reasons) < MAX_REASONS:
            reasons[key] = 1
        else:
            key = (decision.policy, "other")
            reasons[key] = reasons.get(key, 0) + 1

    def stats(
        self,
        in_flight: Sequence[int],
        backlog: Sequence[int],
        parked: int,
        active: Sequence[bool],
        kv_index: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Totals, per-rank counts and whether both identities hold (module docstring).

        *kv_index*: the cache index's own counters, reported with the KV event counters.
        """
        dispatched = sum(self.dispatched)
        redisp = sum(self.redispatched)
        rejected = sum(self.rejected) + self.rejected_unranked
        completed = sum(self.completed)
        failed = sum(self.failed)
        return {
            "received": self.received,
            "dispatched": dispatched,
            "redispatched": redisp,
            "rejected": rejected,
            "parked": parked,
            "completed": completed,
            "failed": failed,
            "in_flight": sum(in_flight),
            "bad_frames": self.bad_frames,
            "reports": self.reports,
            "bad_reports": self.bad_reports,
            "stale_reports": self.stale_reports,
            "kv_events": {**kv_index, "stale_lives": self.kv_stale_batches, "resyncs_asked": self.kv_resyncs},
            "unknown_done": self.unknown_done,
            "undeliverable_replies": self.undeliverable,
            "controls": self.controls,
            "internal_errors": self.internal_errors,
            "loop_stalls": self.loop_stalls,
            "policy_overruns": self.policy_overruns,
            "unconnected_reports": self.unconnected_reports,
            "unproven_restarts": self.unproven_restarts,
            "rejected_by_code": dict(self.rejected_by_code),
            "failed_by_code": dict(self.failed_by_code),
            "aborts": self.abort_stats(),
            "active_ranks": [r for r, a in enumerate(active) if a],
            "per_rank": [
                {
                    "rank": r,
                    "dispatched": self.dispatched[r],
                    "completed": self.completed[r],
                    "failed": self.failed[r],
                    "redispatched": self.redispatched[r],
                    "rejected": self.rejected[r],
                    "in_flight": in_flight[r],
                    "backlog": backlog[r],
                    "active": active[r],
                }
                for r in range(self.dp_size)
            ],
            "balanced": {
                "received": self.received == dispatched - redisp + rejected + parked,
                "dispatched": dispatched == completed + failed + redisp + sum(in_flight),
            },
        }

    def metrics(self) -> dict[str, Any]:
        """Copies of what the Prometheus collector exports beyond :meth:`stats`."""
        return {
            "decision_reasons": dict(self.decision_reasons),
            "aborts_by_reason_outcome": dict(self.aborts),
            "latency_counts": list(self.latency_counts),
            "latency_sum": self.latency_sum,
        }
