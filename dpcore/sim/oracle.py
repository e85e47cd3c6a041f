"""Prefix-hit references for a trace, independent of any policy.

* **Ceiling**: one infinite cache. A request hits every prompt block some earlier request
  had (``hash_ids`` are chained, so a known block means a known whole prefix).
* **Equal-capacity oracle**: one LRU cache as large as the whole cluster's KV
  (``dp_size × kv_capacity_tokens``), replayed in arrival order. It is what perfect affinity
  could keep with the same memory; per-rank caches under any routing do not do better in
  practice (they also hold running requests' KV).

Hits are counted in tokens: a matched block counts its tokens (the last block of a prompt
may be partial), over all prompt tokens of the trace. Traces without prefixes score 0.
"""

from __future__ import annotations

from collections import OrderedDict

from dpcore.sim.traces import Trace


def _block_tokens(n_in: int, block_size: int, k: int) -> int:
    return min(block_size, n_in - k * block_size)


def infinite_cache_hits(trace: Trace) -> list[int]:
    """Per request, in arrival order: prompt tokens one infinite prefix cache would hold."""
    bs = trace.block_size
    if not bs:
        return [0] * len(trace.requests)
    seen: set[int] = set()
    hits = []
    for r in trace.requests:
        m = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            m += 1
        hits.append(min(m * bs, r.input_length))
        seen.update(r.hash_ids)
    return hits


def ceiling_hit_ratio(trace: Trace) -> float:
    """Token hit ratio of one infinite prefix cache over *trace*."""
    total = sum(r.input_length for r in trace.requests)
    if not trace.block_size or not total:
        return 0.0
    return sum(infinite_cache_hits(trace)) / total


def lru_hit_ratio(trace: Trace, capacity_tokens: int) -> float:
    """Token hit ratio of one LRU block cache of *capacity_tokens*, in arrival order.

    After its lookup each request's blocks become the most recent, the deepest first, so
    that (as in a radix tree) a prefix's leaves are evicted before its root.
    """
    bs = trace.block_size
    total = sum(r.input_length for r in trace.requests)
    if not bs or not total:
        return 0.0
    cache: OrderedDict[int, int] = OrderedDict()
    used = 0
    hit = 0
    for r in trace.requests:
        hashes = r.hash_ids
        m = 0
        for h in hashes:
            if h not in cache:
                break
            m += 1
        hit += min(m * bs, r.input_length)
        for k in range(len(hashes) - 1, -1, -1):
            h = hashes[k]
            tok = cache.pop(h, None)
            if tok is None:
                tok = _block_tokens(r.input_length, bs, k)
                used += tok
            cache[h] = tok
        while used > capacity_tokens:
            _, tok = cache.popitem(last=False)
            used -= tok
    return hit / total


def oracle_hit_ratio(trace: Trace, dp_size: int, kv_capacity_tokens: int) -> float:
    """The equal-capacity oracle: one LRU holding the cluster's total KV capacity."""
    return lru_hit_ratio(trace, dp_size * kv_capacity_tokens)
