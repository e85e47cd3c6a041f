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

from dpcore import NoActiveRankError, PolicyContext, Request, hookimpl

__all__ = ["QUEUE_WEIGHT", "TotalRequestsPolicy", "TotalTokensPolicy"]

#: How many times queued work counts compared with held work (both policies' default).
QUEUE_WEIGHT = 16.0


def _no_rank(request: Request, ctx: PolicyContext) -> NoActiveRankError:
    msg = f"no active rank for request {request.rid!r}: all {ctx.dp_size} ranks are inactive"
    return NoActiveRankError(msg, rid=request.rid)


def _queue_weight(value: Any) -> float:
    weight = float(value)
    if not math.isfinite(weight) or weight < 0:
        msg = f"queue_weight must be a finite number >= 0, got {value!r}"
        raise ValueError(msg)
    return weight


class TotalRequestsPolicy:
    """Fewest requests (running + waiting + unacknowledged), queued work counting
    ``queue_weight`` times in average requests (queued prompt tokens / mean prompt), so a
    long waiting prompt counts as several short ones. Ties rotate.
    """

    name = "total_requests"

    def __init__(self, ctx: PolicyContext, queue_weight: float = QUEUE_WEIGHT) -> None:
        self.queue_weight = _queue_weight(queue_weight)
        self._turn = 0

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        n = len(ranks)
        if not n:
            raise _no_rank(request, ctx)
        ledger = ctx.ledger
        reqs = ledger.requests
        queued, since, rate, now = ledger.queued_tokens, ledger.queued_at, ledger.drain_rate, ledger.now()
        mean = ledger.mean_prompt_tokens
        w = self.queue_weight / mean if mean > 0 else 0.0
        loads: list[float | None] = [None] * ctx.dp_size
        # Start the scan at a rotating offset so ties do not always go to the lowest rank.
        start = self._turn % n
        self._turn = start + 1
        best, best_load = -1, math.inf
        for i in range(n):
            r = ranks[(start + i) % n]
            # ledger.queued(r, now), inlined: the queue drains at `rate` until empty.
            q = queued[r] - rate * (now - since[r])
            load = loads[r] = reqs[r] + w * q if q > 0.0 else reqs[r]
            if load < best_load:
                best, best_load = r, load
        ctx.explain(self.name, "least_requests", {"load": loads})
        return best


class TotalTokensPolicy:
    """Fewest tokens (held + waiting + unacknowledged prompts), queued prompt tokens
    counting ``queue_weight`` times. Ties by requests, then rotate.
    """

    name = "total_tokens"

    def __init__(self, ctx: PolicyContext, queue_weight: float = QUEUE_WEIGHT) -> None:
        self.queue_weight = _queue_weight(queue_weight)
        self._turn = 0

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        n = len(ranks)
        if not n:
            raise _no_rank(request, ctx)
        ledger = ctx.ledger
        toks = ledger.tokens
        reqs = ledger.requests
        queued, since, rate, now = ledger.queued_tokens, ledger.queued_at, ledger.drain_rate, ledger.now()
        w = self.queue_weight
        loads: list[float | None] = [None] * ctx.dp_size
        start = self._turn % n
        self._turn = start + 1
        best, best_load, best_reqs = -1, math.inf, 0
        for i in range(n):
            r = ranks[(start + i) % n]
            q = queued[r] - rate * (now - since[r])
            load = loads[r] = toks[r] + w * q if q > 0.0 else toks[r]
            if load < best_load or (load == best_load and reqs[r] < best_reqs):
                best, best_load, best_reqs = r, load, reqs[r]
        ctx.explain(self.name, "least_tokens", {"load": loads})
        return best
