"""``total_requests`` and ``total_tokens``: the least loaded active rank.

A rank's load has two parts, both from the shared ledger:

* what it **holds**: its last report, force-set when it arrives, plus every dispatch it has
  not acknowledged yet (+1 request, +prompt tokens) — ``ledger.requests`` / ``ledger.tokens``;
* what is **queued** at it and not started: the ledger's estimate (``ledger.queued(rank)``),
  which keeps draining between reports, so a report that is seconds old still tells where
  work is waiting now.

The queued part counts ``queue_weight`` times on top (default 16): a waiting prompt delays
every request sent behind it, while one more running request barely slows a decode step
(vLLM weighs waiting 4× running for the same reason). The queued part keeps time to first
token low; the held part balances the long run.

Dispatches chosen by a router in front count too: the load they put on a rank is real.
(Upstream SGLang leaves its budget untouched for router-assigned requests; that is a
deliberate difference.) Ties rotate, never the lowest index.
"""

from __future__ import annotations

import math
from typing import Any

from dpcore import PolicyContext, Request, hookimpl

__all__ = ["QUEUE_WEIGHT", "TotalRequestsPolicy", "TotalTokensPolicy"]

#: How many times queued work counts compared with held work (both policies' default).
QUEUE_WEIGHT = 16.0


def _queue_weight(value: Any) -> float:
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        msg = f"queue_weight must be a finite number >= 0, got {value!r}"
        raise ValueError(msg)
    return weight


class _LeastLoaded:
    """The scan both policies share: the active rank with the least ``held + w * queued``,
    ties broken by fewer requests (when the policy says so), then by a rotating start."""

    name = ""
    #: ``ctx.explain`` reason.
    reason = ""
    #: What a rank holds is measured in tokens (else in requests), and so is a queued
    #: prompt; equal loads then go to the rank with fewer requests.
    by_tokens = False

    def __init__(self, ctx: PolicyContext, queue_weight: float = QUEUE_WEIGHT) -> None:
        self.queue_weight = _queue_weight(queue_weight)
        self._turn = 0

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        # Runs for every request: each ledger value is read once, nothing is called per rank.
        ledger = ctx.ledger
        ranks = ledger.active_ranks
        n = len(ranks)
        reqs = ledger.requests
        queued, since, rate, now = ledger.queued_tokens, ledger.queued_at, ledger.drain_rate, ledger.now()
        ties = self.by_tokens
        if ties:
            held = ledger.tokens
            w = self.queue_weight
        else:
            held = reqs
            # A queued prompt counts as queued tokens / mean prompt requests.
            mean = ledger.mean_prompt_tokens
            w = self.queue_weight / mean if mean > 0 else 0.0
        loads: list[float | None] = [None] * ctx.dp_size
        # Start the scan at a rotating offset so ties do not always go to the lowest rank.
        start = self._turn % n
        self._turn = start + 1
        best, best_load, best_reqs = -1, math.inf, 0
        for i in range(n):
            r = ranks[(start + i) % n]
            # ledger.queued(r, now), inlined: the queue drains at `rate` until empty.
            q = queued[r] - rate * (now - since[r])
            load = loads[r] = held[r] + w * q if q > 0.0 else held[r]
            if load < best_load or (ties and load == best_load and reqs[r] < best_reqs):
                best, best_load, best_reqs = r, load, reqs[r]
        ctx.explain(self.name, self.reason, {"load": loads})
        return best


class TotalRequestsPolicy(_LeastLoaded):
    """Fewest requests (running + waiting + unacknowledged), queued work counting
    ``queue_weight`` times in average requests (queued prompt tokens / mean prompt), so a
    long waiting prompt counts as several short ones. Ties rotate.

    :param queue_weight: How many times queued work counts compared with held work (>= 0).
    """

    name = "total_requests"
    reason = "least_requests"


class TotalTokensPolicy(_LeastLoaded):
    """Fewest tokens (held + waiting + unacknowledged prompts), queued prompt tokens
    counting ``queue_weight`` times. Ties by requests, then rotate.

    :param queue_weight: How many times queued work counts compared with held work (>= 0).
    """

    name = "total_tokens"
    reason = "least_tokens"
    by_tokens = True
