"""``power_of_two``: the less loaded of two random active ranks."""

from __future__ import annotations

import random

from dpcore import PolicyContext, Request, hookimpl

__all__ = ["PowerOfTwoPolicy"]


class PowerOfTwoPolicy:
    name = "power_of_two"

    def __init__(self, ctx: PolicyContext, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        if len(ranks) == 1:
            return ranks[0]
        a, b = self._rng.sample(ranks, 2)
        tokens = ctx.ledger.tokens
        return a if tokens[a] <= tokens[b] else b
