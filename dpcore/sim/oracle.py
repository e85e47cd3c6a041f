"""References for a trace, independent of any policy: prefix-hit bounds and a clairvoyant router.

* **Ceiling**: one infinite cache. A request hits every prompt block some earlier request
  had (``hash_ids`` are chained, so a known block means a known whole prefix).
* **Equal-capacity oracle**: one LRU cache as large as the whole cluster's KV
  (``dp_size × kv_capacity_tokens``), replayed in arrival order. It is what perfect affinity
  could keep with the same memory; per-rank caches under any routing do not do better in
  practice (they also hold running requests' KV).

Hits are counted in tokens: a matched block counts its tokens (the last block of a prompt
may be partial), over all prompt tokens of the trace. Traces without prefixes score 0.

* **Clairvoyant router** (``--policy ref:clairvoyant``): reads the simulated ranks' true
  queues and caches, which no real router can, and sends each request to the rank where it
  gets its first token soonest. It shows how far placement alone can take TTFT on a trace:
  with FCFS ranks it cannot reorder a queue, so a long prompt that arrives while every rank
  is busy still waits.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from dpcore.model import Decision, LoadReport, Request
from dpcore.sim.traces import Trace


def _block_tokens(n_in: int, block_size: int, k: int) -> int:
    return min(block_size, n_in - k * block_size)


def ceiling_hit_ratio(trace: Trace) -> float:
    """Token hit ratio of one infinite prefix cache over *trace*."""
    bs = trace.block_size
    total = sum(r.input_length for r in trace.requests)
    if not bs or not total:
        return 0.0
    seen: set[int] = set()
    hit = 0
    for r in trace.requests:
        m = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            m += 1
        hit += min(m * bs, r.input_length)
        seen.update(r.hash_ids)
    return hit / total


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


class ClairvoyantRouter:
    """Least true time to first token: exact queued prefill plus exact uncached prompt.

    :param cached_blocks: ``(rank, hashes) -> blocks`` of the prefix the rank holds now.
    :param queued_prefill: ``rank -> seconds`` of prefill ahead of a new arrival now.
    """

    name = "ref:clairvoyant"

    def __init__(
        self,
        dp_size: int,
        *,
        cached_blocks: Callable[[int, Sequence[int]], int],
        queued_prefill: Callable[[int], float],
        block_size: int,
        prefill_tokens_per_s: float,
        **_: Any,
    ) -> None:
        self.dp_size = dp_size
        self.cached_blocks = cached_blocks
        self.queued_prefill = queued_prefill
        self.block_size = block_size
        self.rate = prefill_tokens_per_s
        self.last_decision = Decision(policy=self.name, reason="least_true_ttft")
        self._seq = [0] * dp_size

    def select(self, request: Request) -> int:
        n = request.num_tokens
        hashes = request.block_hashes
        best, lowest = 0, float("inf")
        for rank in range(self.dp_size):
            hit = min(self.cached_blocks(rank, hashes) * self.block_size, n) if hashes else 0
            ttft = self.queued_prefill(rank) + max(n - hit, 1) / self.rate
            if ttft < lowest:
                best, lowest = rank, ttft
        self.last_decision.scores = {"expected_ttft_s": round(lowest, 4)}
        return best

    def dispatched(self, request: Request, rank: int) -> int:
        seq = self._seq[rank]
        self._seq[rank] = seq + 1
        return seq

    def report(self, report: LoadReport) -> bool:
        return False

    def first_token(self, request: Request, rank: int) -> None:
        pass

    def finished(self, request: Request, rank: int) -> None:
        pass
