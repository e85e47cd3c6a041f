"""``cache_aware``: send a request where its prefix is most likely cached, unless load is
imbalanced.

The policy keeps an approximate index of which rank was sent which prompt blocks (the
request's chained ``block_hashes``), bounded in entries and aged out after
``eviction_interval`` seconds without use. Per request:

1. If the active ranks' loads (requests, from the shared ledger) are imbalanced, i.e.
   ``max - min > balance_abs`` and ``max > balance_rel * min``, go to the least loaded rank.
2. Otherwise find the longest indexed prefix. If it covers more than ``cache_threshold`` of
   the prompt, go to the least loaded rank holding it; else to the least loaded rank.

Defaults are SMG's launcher defaults (0.3 / 64 / 1.5 / 120 s).
"""

from __future__ import annotations

from collections import OrderedDict

from dpcore import NoActiveRankError, PolicyContext, Request, hookimpl

__all__ = ["CacheAwarePolicy"]


class CacheAwarePolicy:
    """Longest cached prefix per rank, with a load-imbalance escape hatch."""

    name = "cache_aware"

    def __init__(
        self,
        ctx: PolicyContext,
        cache_threshold: float = 0.3,
        balance_abs: float = 64,
        balance_rel: float = 1.5,
        eviction_interval: float = 120.0,
        max_blocks: int = 1 << 18,
    ) -> None:
        self.cache_threshold = float(cache_threshold)
        self.balance_abs = float(balance_abs)
        self.balance_rel = float(balance_rel)
        self.eviction_interval = float(eviction_interval)
        self.max_blocks = int(max_blocks)
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {cache_threshold}")
        if self.max_blocks < 1 or self.eviction_interval <= 0:
            raise ValueError("max_blocks and eviction_interval must be positive")
        # block hash -> [bitmask of ranks, last use time]; LRU order = insertion order.
        self._index: OrderedDict[int, list] = OrderedDict()
        self._turn = 0

    def __len__(self) -> int:
        return len(self._index)

    def _least_loaded(self, ranks: tuple[int, ...], reqs: list[int]) -> int:
        n = len(ranks)
        start = self._turn % n
        self._turn = start + 1
        best = ranks[start]
        for i in range(1, n):
            r = ranks[(start + i) % n]
            if reqs[r] < reqs[best]:
                best = r
        return best

    def _match(self, hashes: tuple[int, ...], candidates: int) -> tuple[int, int]:
        """Longest indexed prefix among *candidates* (bitmask): (depth, ranks holding it)."""
        index = self._index
        mask = candidates
        depth = 0
        for h in hashes:
            entry = index.get(h)
            if entry is None:
                break
            m = mask & entry[0]
            if not m:
                break
            mask = m
            depth += 1
        return depth, mask

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        if not ranks:
            msg = f"no active rank for request {request.rid!r}: all {ctx.dp_size} ranks are inactive"
            raise NoActiveRankError(msg, rid=request.rid)
        reqs = ctx.ledger.requests
        loads = [reqs[r] for r in ranks]
        lo, hi = min(loads), max(loads)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            ctx.explain(self.name, "imbalanced", {"min_load": lo, "max_load": hi})
            return self._least_loaded(ranks, reqs)
        hashes = request.block_hashes
        if hashes:
            active_mask = 0
            for r in ranks:
                active_mask |= 1 << r
            depth, mask = self._match(hashes, active_mask)
            if depth and depth / len(hashes) > self.cache_threshold:
                holders = tuple(r for r in ranks if mask >> r & 1)
                ctx.explain(self.name, "prefix_hit", {"matched_blocks": depth, "blocks": len(hashes)})
                return self._least_loaded(holders, reqs)
        ctx.explain(self.name, "cache_miss", {"blocks": len(hashes)})
        return self._least_loaded(ranks, reqs)

    @hookimpl
    def on_dispatch(self, request: Request, rank: int, ctx: PolicyContext) -> None:
        if not request.block_hashes:
            return
        now = ctx.now()
        index = self._index
        bit = 1 << rank
        for h in request.block_hashes:
            entry = index.get(h)
            if entry is None:
                index[h] = [bit, now]
            else:
                entry[0] |= bit
                entry[1] = now
                index.move_to_end(h)
        self._evict(now)

    def _evict(self, now: float) -> None:
        index = self._index
        while len(index) > self.max_blocks:
            index.popitem(last=False)
        horizon = now - self.eviction_interval
        while index:
            h, entry = next(iter(index.items()))
            if entry[1] >= horizon:
                break
            del index[h]
