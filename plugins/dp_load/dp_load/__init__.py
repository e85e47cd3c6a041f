"""``total_requests`` and ``total_tokens``: the least loaded active rank.

Loads come from the shared ledger: each rank's last report, force-set when it arrives, plus
every dispatch the rank has not acknowledged yet (+1 request, +prompt tokens). Dispatches
chosen by a router in front count too: the load they put on a rank is real. (Upstream SGLang
leaves its budget untouched for router-assigned requests; that is a deliberate difference.)
"""

from __future__ import annotations

from dpcore import NoActiveRankError, PolicyContext, Request, hookimpl

__all__ = ["TotalRequestsPolicy", "TotalTokensPolicy"]


def _no_rank(request: Request, ctx: PolicyContext) -> NoActiveRankError:
    msg = f"no active rank for request {request.rid!r}: all {ctx.dp_size} ranks are inactive"
    return NoActiveRankError(msg, rid=request.rid)


class TotalRequestsPolicy:
    """Fewest requests (running + waiting + unacknowledged); ties rotate."""

    name = "total_requests"

    def __init__(self, ctx: PolicyContext) -> None:
        self._turn = 0

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        n = len(ranks)
        if not n:
            raise _no_rank(request, ctx)
        reqs = ctx.ledger.requests
        # Start the scan at a rotating offset so ties do not always go to the lowest rank.
        start = self._turn % n
        self._turn = start + 1
        best = ranks[start]
        best_key = reqs[best]
        for i in range(1, n):
            r = ranks[(start + i) % n]
            k = reqs[r]
            if k < best_key:
                best, best_key = r, k
        ctx.explain(self.name, "least_requests")
        return best


class TotalTokensPolicy:
    """Fewest tokens (held + waiting + unacknowledged prompts); ties by requests, then rotate."""

    name = "total_tokens"

    def __init__(self, ctx: PolicyContext) -> None:
        self._turn = 0

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        n = len(ranks)
        if not n:
            raise _no_rank(request, ctx)
        toks = ctx.ledger.tokens
        reqs = ctx.ledger.requests
        start = self._turn % n
        self._turn = start + 1
        best = ranks[start]
        best_t, best_r = toks[best], reqs[best]
        for i in range(1, n):
            r = ranks[(start + i) % n]
            t = toks[r]
            if t < best_t or (t == best_t and reqs[r] < best_r):
                best, best_t, best_r = r, t, reqs[r]
        ctx.explain(self.name, "least_tokens")
        return best
