"""``round_robin``: send requests to the ranks in turn, skipping inactive ones."""

from __future__ import annotations

from dpcore import PolicyContext, Request, hookimpl

__all__ = ["RoundRobinPolicy"]


class RoundRobinPolicy:
    """A counter over ranks ``0..dp_size-1`` that skips inactive ranks.

    Only requests this policy places advance the counter: a router-assigned request
    (``routed_dp_rank``) is answered before any policy runs and leaves it alone.
    """

    name = "round_robin"

    def __init__(self, ctx: PolicyContext) -> None:
        self._next = 0

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        dp = ctx.dp_size
        if len(ctx.active_ranks) == dp:
            rank = self._next % dp
            self._next = rank + 1
            ctx.explain(self.name, "next")
            return rank
        # Walk forward from the counter to the next active rank (at most dp steps).
        i = self._next
        while not ctx.is_active(i % dp):
            i += 1
        rank = i % dp
        self._next = rank + 1
        ctx.explain(self.name, "skipped_inactive")
        return rank
