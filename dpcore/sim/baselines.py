"""Peer routing policies, re-implemented from their documented algorithms and defaults.

Each class follows one published version, cited in its docstring (facts from
the peers' own sources and documentation; no peer code is copied). They
implement the simulator's router interface (:class:`dpcore.sim.routing.Router`), so the engine
drives them exactly like a dpcore policy chain, with the same arrivals and the same load
reports. Unlike dpcore's controller, a router in front of the engine proxies the responses,
so it sees first tokens and completions (``first_token`` / ``finished``); the peers that use
router-side in-flight counts (SMG, Dynamo) rely on that.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from dpcore.model import Decision, LoadReport, Request

PREFIX = "peer:"
REF_PREFIX = "ref:"


class Baseline:
    """Common plumbing: dispatch sequence numbers and the decision record."""

    name = "peer:base"

    def __init__(self, dp_size: int, *, clock: Callable[[], float], seed: int = 0, **_: Any) -> None:
        self.dp_size = dp_size
        self.clock = clock
        self.last_decision = Decision()
        self._seq = [0] * dp_size

    def _explain(self, reason: str, scores: dict[str, Any] | None = None) -> None:
        d = self.last_decision
        d.policy = self.name
        d.reason = reason
        d.scores = scores

    def select(self, request: Request) -> int:
        raise NotImplementedError

    def dispatched(self, request: Request, rank: int) -> int:
        seq = self._seq[rank]
        self._seq[rank] = seq + 1
        self._on_dispatch(request, rank)
        return seq

    def _on_dispatch(self, request: Request, rank: int) -> None:
        pass

    def report(self, report: LoadReport) -> bool:
        return False

    def first_token(self, request: Request, rank: int) -> None:
        pass

    def finished(self, request: Request, rank: int) -> None:
        pass


class SGLangRoundRobin(Baseline):
    """SGLang DPC ``round_robin`` (after #16110, 2025-12-30): a counter over the ranks."""

    name = "peer:sglang_round_robin"

    def __init__(self, dp_size: int, **kw: Any) -> None:
        super().__init__(dp_size, **kw)
        self._counter = 0

    def select(self, request: Request) -> int:
        rank = self._counter % self.dp_size
        self._counter += 1
        self._explain("round_robin")
        return rank


class SGLangBudget(Baseline):
    """SGLang DPC ``total_requests`` / ``total_tokens`` as upstream has them.

    Follows ``DPBudget`` of #16258 (2026-01-11) with #22614 (2026-04-21, ``+len(input_ids)``
    on dispatch for ``total_tokens``) and the load-snapshot refresh of #26348 (v0.5.14):

    * a report overwrites the rank's budget: ``total_requests = running + waiting``,
      ``total_tokens = num_tokens`` (used KV + waiting prompts); no reconciliation with
      dispatches the report has not seen;
    * the snapshot is read at most once per 20 ms, before a dispatch;
    * choose ``total_requests.index(min(...))`` resp. ``min(key=(tokens, requests))``:
      ties go to the lowest index;
    * after choosing, ``total_requests += 1`` (and ``total_tokens += prompt tokens``).
    """

    REFRESH_INTERVAL_S = 0.020

    def __init__(self, dp_size: int, *, method: str, **kw: Any) -> None:
        super().__init__(dp_size, **kw)
        if method not in ("total_requests", "total_tokens"):
            raise ValueError(f"unknown DPBudget method {method!r}")
        self.method = method
        self.name = f"peer:sglang_{method}"
        self.total_requests = [0] * dp_size
        self.total_tokens = [0] * dp_size
        self._slots: dict[int, LoadReport] = {}  # latest unread snapshot per rank
        self._last_refresh = float("-inf")

    def report(self, report: LoadReport) -> bool:
        self._slots[report.rank] = report
        return True

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._last_refresh < self.REFRESH_INTERVAL_S:
            return
        self._last_refresh = now
        for r, rep in self._slots.items():
            self.total_requests[r] = rep.num_running + rep.num_waiting
            self.total_tokens[r] = rep.num_tokens
        self._slots.clear()

    def select(self, request: Request) -> int:
        self._refresh()
        reqs, toks = self.total_requests, self.total_tokens
        if self.method == "total_requests":
            rank = reqs.index(min(reqs))
            self._explain("least_requests", {"total_requests": list(reqs)})
        else:
            rank = min(range(self.dp_size), key=lambda i: (toks[i], reqs[i]))
            self._explain("least_tokens", {"total_tokens": list(toks)})
        return rank

    def _on_dispatch(self, request: Request, rank: int) -> None:
        self.total_requests[rank] += 1
        if self.method == "total_tokens":
            self.total_tokens[rank] += request.num_tokens


class VllmDPLB(Baseline):
    """vLLM's internal DP load balancer (``DPLBAsyncMPClient.get_core_engine_for_request``,
    ``vllm/v1/engine/core_client.py``, 2025–2026, before PR #47420 made the start rotate).

    One API server (``client_count = 1``, start index 0): scan the engines in order and take
    the first minimum of ``4 × waiting + running`` (strict ``<``, so ties go to the lowest
    index); then add ``client_count`` to the chosen engine's waiting count until the next
    stats update. The coordinator's stats overwrite ``[waiting, running]`` per engine.
    """

    name = "peer:vllm"
    CLIENT_COUNT = 1

    def __init__(self, dp_size: int, **kw: Any) -> None:
        super().__init__(dp_size, **kw)
        self.waiting = [0] * dp_size
        self.running = [0] * dp_size

    def report(self, report: LoadReport) -> bool:
        self.waiting[report.rank] = report.num_waiting
        self.running[report.rank] = report.num_running
        return True

    def select(self, request: Request) -> int:
        waiting, running = self.waiting, self.running
        best, best_score = 0, 4 * waiting[0] + running[0]
        for i in range(1, self.dp_size):
            score = 4 * waiting[i] + running[i]
            if score < best_score:
                best, best_score = i, score
        self._explain("least_score", {"score": [4 * w + r for w, r in zip(waiting, running)]})
        return best

    def _on_dispatch(self, request: Request, rank: int) -> None:
        self.waiting[rank] += self.CLIENT_COUNT


class SMGCacheAware(Baseline):
    """SMG ``cache_aware`` (SMG HEAD 2026-08-07, ``model_gateway/src/policies/cache_aware.rs``)
    with the ``smg launch`` defaults: ``cache_threshold`` 0.3, ``balance_abs_threshold`` 64,
    ``balance_rel_threshold`` 1.5, ``eviction_interval_secs`` 120, ``max_tree_size`` 2^26
    characters per worker, KV-usage triggers off, cache miss → min-load worker.

    * Load = the router's in-flight count per worker (+1 at dispatch, -1 when the response
      ends); ``processed`` counts selections. The min-load worker is the minimum of
      ``(load, processed, index)`` (SMG PR #1714).
    * Imbalanced iff ``max - min > 64`` and ``max > 1.5 × min`` → the min-load worker.
    * Otherwise match the approximate tree: ``match_rate = matched / prompt``; above 0.3 go to
      the tenant of the deepest matched node (its last inserter; not load-aware), else to
      the min-load worker. The chosen worker's prompt is inserted into the tree either way.

    Approximations: the tree is keyed by the trace's prompt blocks instead of characters
    (``match_rate`` in blocks), a block's size counts ≈4 characters per token against
    ``max_tree_size``, and the 1-in-8 LRU touch on match is left out (every dispatch
    re-stamps the chosen path anyway).
    """

    name = "peer:smg_cache_aware"
    CACHE_THRESHOLD = 0.3
    BALANCE_ABS = 64
    BALANCE_REL = 1.5
    EVICTION_INTERVAL_S = 120.0
    MAX_TREE_CHARS = 1 << 26
    CHARS_PER_TOKEN = 4

    def __init__(self, dp_size: int, *, block_size: int = 512, **kw: Any) -> None:
        super().__init__(dp_size, **kw)
        self.load = [0] * dp_size
        self.processed = [0] * dp_size
        self.block_chars = max(block_size, 1) * self.CHARS_PER_TOKEN
        # block -> {tenant: epoch}; dict order is insertion order, last key = last inserter.
        self._tree: dict[int, dict[int, int]] = {}
        self._lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(dp_size)]
        self._epoch = 0
        self._next_eviction = None

    def _min_load(self) -> int:
        load, processed = self.load, self.processed
        return min(range(self.dp_size), key=lambda i: (load[i], processed[i], i))

    def select(self, request: Request) -> int:
        load = self.load
        lo, hi = min(load), max(load)
        if hi - lo > self.BALANCE_ABS and hi > self.BALANCE_REL * lo:
            self._explain("imbalanced", {"min_load": lo, "max_load": hi})
            return self._min_load()
        hashes = request.block_hashes
        tree = self._tree
        depth = 0
        node = None
        for h in hashes:
            tenants = tree.get(h)
            if not tenants:
                break
            node = tenants
            depth += 1
        rate = depth / len(hashes) if hashes else 0.0
        if node is not None and rate > self.CACHE_THRESHOLD:
            tenant = next(reversed(node))
            self._explain("cache_hit", {"match_rate": round(rate, 3), "tenant": tenant})
            return tenant
        self._explain("cache_miss", {"match_rate": round(rate, 3), "load": list(load)})
        return self._min_load()

    def _on_dispatch(self, request: Request, rank: int) -> None:
        self.load[rank] += 1
        self.processed[rank] += 1
        now = self.clock()
        if self._next_eviction is None:
            self._next_eviction = now + self.EVICTION_INTERVAL_S
        elif now >= self._next_eviction:
            self._evict()
            self._next_eviction = now + self.EVICTION_INTERVAL_S
        tree, lru = self._tree, self._lru[rank]
        for h in reversed(request.block_hashes):  # leaf first: the root ends most recent
            self._epoch += 1
            tenants = tree.get(h)
            if tenants is None:
                tree[h] = {rank: self._epoch}
            else:
                tenants.pop(rank, None)
                tenants[rank] = self._epoch
            lru[h] = None
            lru.move_to_end(h)

    def _evict(self) -> None:
        budget = self.MAX_TREE_CHARS // self.block_chars
        for rank, lru in enumerate(self._lru):
            while len(lru) > budget:
                h, _ = lru.popitem(last=False)
                tenants = self._tree[h]
                del tenants[rank]
                if not tenants:
                    del self._tree[h]

    def finished(self, request: Request, rank: int) -> None:
        self.load[rank] -= 1


class DynamoKV(Baseline):
    """NVIDIA Dynamo KV router, default selector with default knobs (``lib/kv-router``
    ``scheduling/selector/default.rs``, 2026; ``overlap_score_credit`` 1.0,
    ``prefill_load_scale`` 1.0, ``decode_active_request_weight`` 0, ``router_temperature`` 0).

    Per rank: ``cost = prefill_blocks + decode_blocks`` where ``prefill_blocks`` = (the
    rank's active prompt tokens not yet past their first token + this prompt's tokens not in
    the rank's cache) / block size, and ``decode_blocks`` = the rank's active blocks plus this
    request's blocks not already active there. Temperature 0 → argmin, ties broken uniformly
    at random. Overlaps come from the engine's KV events, modelled as the rank's actual cache
    contents (delivered instantly); active blocks and prompt tokens are the router's own
    bookkeeping (added at dispatch, prompt tokens removed at the first token, blocks at the
    end of the response; output blocks are not tracked).
    """

    name = "peer:dynamo"

    def __init__(
        self,
        dp_size: int,
        *,
        seed: int = 0,
        block_size: int = 512,
        cached_blocks: Callable[[int, Sequence[int]], int] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(dp_size, seed=seed, **kw)
        self.block_size = max(block_size, 1)
        self._cached = cached_blocks or (lambda rank, hashes: 0)
        self._rng = random.Random(seed)
        self.prefill_tokens = [0] * dp_size
        self.active_blocks = [0] * dp_size
        self._active: list[dict[int, int]] = [{} for _ in range(dp_size)]
        self._pending: dict[str, int] = {}  # rid -> prompt tokens still counted as prefill
        self._last_new: list[int] = [0] * dp_size

    def _blocks(self, request: Request) -> Sequence[int]:
        if request.block_hashes:
            return request.block_hashes
        # No prefix information: private blocks, sized by the prompt.
        return range(-(-request.num_tokens // self.block_size))

    def select(self, request: Request) -> int:
        bs = self.block_size
        hashes = request.block_hashes
        n_blocks = len(self._blocks(request))
        costs = []
        best: list[int] = []
        best_cost = float("inf")
        for r in range(self.dp_size):
            overlap = self._cached(r, hashes) if hashes else 0
            new_tokens = max(request.num_tokens - overlap * bs, 0)
            self._last_new[r] = new_tokens
            shared = 0
            if hashes:
                active = self._active[r]
                for h in hashes:
                    if h not in active:
                        break
                    shared += 1
            cost = (self.prefill_tokens[r] + new_tokens) / bs + self.active_blocks[r] + n_blocks - shared
            costs.append(round(cost, 2))
            if cost < best_cost:
                best, best_cost = [r], cost
            elif cost == best_cost:
                best.append(r)
        rank = best[0] if len(best) == 1 else self._rng.choice(best)
        self._explain("min_cost", {"cost": costs})
        return rank

    def _on_dispatch(self, request: Request, rank: int) -> None:
        new_tokens = self._last_new[rank]
        self.prefill_tokens[rank] += new_tokens
        self._pending[request.rid] = new_tokens
        active = self._active[rank]
        added = 0
        for h in self._blocks(request) if request.block_hashes else ():
            c = active.get(h, 0)
            active[h] = c + 1
            added += c == 0
        if not request.block_hashes:
            added = len(self._blocks(request))
        self.active_blocks[rank] += added

    def first_token(self, request: Request, rank: int) -> None:
        self.prefill_tokens[rank] -= self._pending.pop(request.rid, 0)

    def finished(self, request: Request, rank: int) -> None:
        self.first_token(request, rank)
        if not request.block_hashes:
            self.active_blocks[rank] -= len(self._blocks(request))
            return
        active = self._active[rank]
        for h in request.block_hashes:
            c = active[h] - 1
            if c:
                active[h] = c
            else:
                del active[h]
                self.active_blocks[rank] -= 1


class ClairvoyantRouter(Baseline):
    """Not a peer but a reference (``ref:clairvoyant``): it reads the simulated ranks' true
    queues and caches, which no real router can, and sends each request where its first token
    comes soonest. It shows how far placement alone can take TTFT on a trace: FCFS ranks
    cannot reorder a queue, so a long prompt that arrives while every rank is busy still waits.

    :param cached_blocks: ``(rank, hashes) -> blocks`` of the prefix the rank holds now.
    :param queued_prefill: ``rank -> seconds`` of prefill ahead of a new arrival now.
    :param running: ``rank -> requests`` the rank holds now (decoding or prefilling); among
        ranks with the same first-token time, the one with fewest goes first, since each
        running request adds to the rank's step (and, in lockstep, everyone's).
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
        running: Callable[[int], int] = lambda rank: 0,
        **kw: Any,
    ) -> None:
        super().__init__(dp_size, **kw)
        self.cached_blocks = cached_blocks
        self.queued_prefill = queued_prefill
        self.running = running
        self.block_size = block_size
        self.rate = prefill_tokens_per_s

    def select(self, request: Request) -> int:
        n = request.num_tokens
        hashes = request.block_hashes
        best, lowest = 0, (float("inf"), 0)
        for rank in range(self.dp_size):
            hit = min(self.cached_blocks(rank, hashes) * self.block_size, n) if hashes else 0
            # Rounded to 0.1 ms, so that equal waits tie and the lighter rank wins.
            key = (round(self.queued_prefill(rank) + max(n - hit, 1) / self.rate, 4), self.running(rank))
            if key < lowest:
                best, lowest = rank, key
        ttft = lowest[0]
        self._explain("least_true_ttft", {"expected_ttft_s": ttft})
        return best


def _budget(method: str) -> Callable[..., Baseline]:
    def make(dp_size: int, **kw: Any) -> Baseline:
        return SGLangBudget(dp_size, method=method, **kw)

    return make


#: Baseline name -> factory ``(dp_size, *, clock, seed, block_size, cached_blocks,
#: queued_prefill, prefill_tokens_per_s, running)``; ``ref:`` names are references, not peers.
BASELINES: dict[str, Callable[..., Any]] = {
    "peer:sglang_round_robin": SGLangRoundRobin,
    "peer:sglang_total_requests": _budget("total_requests"),
    "peer:sglang_total_tokens": _budget("total_tokens"),
    "peer:smg_cache_aware": SMGCacheAware,
    "peer:vllm": VllmDPLB,
    "peer:dynamo": DynamoKV,
    "ref:clairvoyant": ClairvoyantRouter,
}


def is_baseline(name: str) -> bool:
    return name.strip().lower().startswith((PREFIX, REF_PREFIX))
