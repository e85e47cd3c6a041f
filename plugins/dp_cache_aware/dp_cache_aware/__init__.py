"""``cache_aware``: send each request where it will get its first token soonest, without
giving up the prefix affinity that keeps the cluster's caches useful.

For each active rank the policy estimates, in seconds::

    cost(r) = prefill backlog(r) + work_weight * uncached prompt tokens(r) / prefill rate

* **Uncached tokens** come from an approximate per-rank prefix index over the request's
  chained ``block_hashes``, kept per rank in LRU order (deepest block first, so prefixes
  outlive their tails, as in a radix cache). A block touched within the rank's unpinned KV
  (``kv_capacity - kv_used`` from its reports) counts as cached; older blocks, remembered up
  to ``memory_factor`` × ``kv_capacity``, count less and less. Matches shorter than
  ``min_match`` of the prompt (a system prompt every rank holds) do not steer at all.
* Where a rank publishes **KV events** (``ctx.cache`` knows it exactly), its cached depth
  comes from there instead, with no uncertainty, extended over the blocks of requests sent
  to it that it has not started yet (it will have stored them when this one runs); the
  explanation's ``cache`` score says which was used for the chosen rank (``exact`` or
  ``estimate``).
* **Backlog** is the prefill queued on the rank: each dispatch adds its expected uncached
  work, time drains it at the prefill rate, and every load report reconciles it with what
  the rank says is waiting, what it has not acknowledged, and (when the engine reports
  ``prefill_tokens``) what is left of the prefill in progress.
* ``work_weight`` > 1 charges prefill work more than waiting: work sent to a rank also
  delays everyone who arrives there after it, so breaking a conversation's affinity to save
  this request a short wait costs the cluster more than it saves.
* Those older blocks are **uncertain**: the engine may have evicted them. Saving work is
  only worth ``work_weight`` × its time while the cluster is queueing (then work delays
  others); on an idle cluster it is worth just the request's own time. So the saving on
  uncertain blocks is weighed ``1 + uncertain_gain`` × (mean queued prefill ÷ mean request's
  prefill), at most ``work_weight``: a request does not wait seconds on a busy holder for a
  prefix that is probably gone when there are idle ranks, yet conversations keep their
  affinity when work is what the cluster is short of.

**KV room**: a prompt whose uncached tokens plus expected output do not fit in what the
rank's last report left free of running requests (``kv_capacity - kv_used``) waits at the
head of its queue until decodes free the rest; that shortfall is added at ``kv_wait`` ×
its prefill time (the rank frees KV about as fast as it fills it).

**Bounded load**: a rank whose prompt tokens over the last ``load_window`` seconds exceed
``load_bound`` × the mean (plus this request) is passed over while another is not, so a hot
shared prefix (an agent's tool prompt) is replicated on more ranks instead of piling up on
the one that cached it first. Below a tenth of what a rank can prefill in the window the
bound does not apply (a lone conversation on a quiet cluster keeps its rank).

Ranks within ``tolerance`` seconds of the cheapest are near-ties: the one that has
prefilled least over the last ``duty_window`` seconds wins (its decodes stall least), then
the one with fewer requests, then rotation. As a last-resort guard, when request counts are
imbalanced past ``balance_abs`` and ``balance_rel`` (sgl-model-gateway's launcher
thresholds), the least loaded rank is chosen.
"""

from __future__ import annotations

import math
from collections import deque
from itertools import repeat

from dpcore import NEEDS_BLOCK_HASHES, LoadReport, PolicyContext, Request, hookimpl

from dp_cache_aware.estimate import PrefixEstimate

__all__ = ["CacheAwarePolicy"]

#: Duty (decayed prefill seconds) closer than this counts as equal; fewer requests breaks the tie.
DUTY_TIE_S = 1e-9
#: The bounded-load weights grow as exp(elapsed / load_window); past exp(MAX_EXPONENT) they
#: are rebased to 1, long before a float could overflow (exp(709)).
MAX_EXPONENT = 30.0

#: Recent dispatches remembered per rank for reconciliation with reports.
_RECENT = 4096
#: Pending-block entries per rank past which those of released requests are dropped.
_STALE_PENDING = 1 << 16
#: Smoothing of the mean request's prefill time (about the last 50 dispatches).
_JOB_ALPHA = 0.02
#: Load-bound floor, as a fraction of the tokens a rank can prefill in ``load_window``.
_BOUND_FLOOR = 0.1
#: Added to the cost of a rank past the load bound: it wins only if every rank is past it.
_OVER_BOUND = 1e9


class CacheAwarePolicy:
    """Least expected time to first token, from a prefix index and a reconciled backlog."""

    name = "cache_aware"
    capabilities = frozenset({NEEDS_BLOCK_HASHES})

    def __init__(
        self,
        ctx: PolicyContext,
        prefill_tokens_per_s: float = 12_000.0,
        balance_abs: float = 64,
        balance_rel: float = 1.5,
        memory_factor: float = 3.0,
        max_blocks: int = 1 << 20,
        eviction_interval: float = 600.0,
        work_weight: float = 8.0,
        tolerance: float = 0.1,
        min_match: float = 0.3,
        duty_window: float = 30.0,
        uncertain_gain: float = 3.0,
        load_bound: float = 1.2,
        load_window: float = 60.0,
        kv_wait: float = 1.0,
    ) -> None:
        self.work_weight = float(work_weight)
        self.uncertain_gain = float(uncertain_gain)
        self.load_bound = float(load_bound)
        self.load_window = float(load_window)
        self.kv_wait = float(kv_wait)
        self.tolerance = float(tolerance)
        self.min_match = float(min_match)
        self.duty_window = float(duty_window)
        self.rate = float(prefill_tokens_per_s)
        self.balance_abs = float(balance_abs)
        self.balance_rel = float(balance_rel)
        self.memory_factor = float(memory_factor)
        if self.memory_factor < 1.0:
            raise ValueError(f"memory_factor must be >= 1, got {memory_factor}")
        self.max_blocks = int(max_blocks)
        self.eviction_interval = float(eviction_interval)
        if self.rate <= 0:
            raise ValueError(f"prefill_tokens_per_s must be positive, got {prefill_tokens_per_s}")
        if self.work_weight < 1.0 or self.tolerance < 0 or not 0.0 <= self.min_match <= 1.0:
            raise ValueError("need work_weight >= 1, tolerance >= 0 and min_match in [0, 1]")
        if self.duty_window <= 0 or self.load_window <= 0:
            raise ValueError("duty_window and load_window must be positive")
        if self.uncertain_gain < 0 or self.kv_wait < 0:
            raise ValueError("uncertain_gain and kv_wait must be >= 0")
        if self.load_bound != 0 and self.load_bound < 1.0:
            raise ValueError(f"load_bound must be >= 1 (or 0: off), got {load_bound}")
        if self.max_blocks < 1 or self.eviction_interval <= 0:
            raise ValueError("max_blocks and eviction_interval must be positive")
        dp = ctx.dp_size
        # Per rank: the blocks sent there, in LRU order, with touch stamps (tokens touched so
        # far on the rank when touched: a block's age is the rank's count now minus it).
        self._est = PrefixEstimate(dp)
        self._capacity = [float("inf")] * dp
        self._pinned = [0.0] * dp
        # Block hash -> bitmask of ranks holding it (the union of the per-rank LRUs).
        self._holders = self._est.holders
        self._busy_until = [0.0] * dp
        # Per rank: exponentially decayed prefill seconds dispatched, and when last decayed.
        self._duty = [0.0] * dp
        self._duty_t = [0.0] * dp
        # Per rank: exponentially decayed prompt tokens dispatched (the bounded-load measure),
        # kept scaled by exp((t - _served_t0) / load_window) so that one factor ages them all.
        self._served = [0.0] * dp
        self._served_t0: float | None = None
        # Moving average of one request's expected prefill seconds (scales the queue).
        self._job_s = 0.0
        # Uncertain cached tokens of the last _uncached() call.
        self._uncertain = 0.0
        self._costs = [0.0] * dp
        # select_rank's uncached tokens per rank, reused by on_dispatch for the same request.
        self._last_work = [0.0] * dp
        self._recent: list[deque[tuple[int, float]]] = [deque(maxlen=_RECENT) for _ in range(dp)]
        # Ranks that publish KV events: the requests sent there and not started yet, as
        # (dispatch seq, ticket, block hashes), oldest first (the rank stores their blocks once
        # it prefills them; FIFO, so before a later request runs). Tickets count up per rank.
        self._pending: list[deque[tuple[int, int, tuple[int, ...]]]] = [deque() for _ in range(dp)]
        # Per rank: block hash -> ticket of the newest pending request with it. Requests leave
        # in ticket order, so a block is pending iff its ticket >= the oldest pending one's:
        # holding is one C-level dict update, releasing is one popleft.
        self._pending_blocks: list[dict[int, int]] = [{} for _ in range(dp)]
        self._stale_limit = [_STALE_PENDING] * dp
        self._ticket = 0
        self._turn = 0
        # A lower bound on every entry's last use (while the clock never goes back), so that
        # _age need not look at each rank's oldest entry on every dispatch.
        self._oldest_use = math.inf
        self._last_use = -math.inf
        self._clock_steady = True
        # Each rotation of the active ranks (ctx.active_ranks, kept while liveness stands).
        self._orders: list[tuple[int, ...]] = []
        self._orders_of: tuple[int, ...] | None = None
        # The request select_rank last scored (its uncached tokens are in _last_work).
        self._last_rid: str | None = None

    def __len__(self) -> int:
        """Indexed (rank, block) pairs; bounded by ``max_blocks``."""
        return len(self._est)

    # ------------------------------------------------------------------ estimates

    def _depths(self, hashes: tuple[int, ...], active_mask: int) -> dict[int, int]:
        """Per rank, how many leading blocks of *hashes* it holds (ranks with 0 omitted)."""
        return self._est.depths(hashes, active_mask)

    def _cached(self, rank: int, hashes: tuple[int, ...], depth: int, block_tokens: float) -> float:
        """Expected cached tokens of the first *depth* blocks on *rank*.

        A block touched within the last ``capacity`` tokens is taken as cached; older ones
        (kept up to ``memory_factor`` × capacity for affinity) count less and less, and their
        part of the total is left in ``self._uncertain``.
        """
        cap = self._capacity[rank]
        horizon = cap * self.memory_factor
        # Running requests pin their KV, and some were admitted before the blocks we ask
        # about: only the unpinned part of the cache is sure to hold them.
        cap -= self._pinned[rank]
        total, uncertain = self._est.cached(rank, hashes, depth, block_tokens, cap, horizon)
        self._uncertain = uncertain
        return total + uncertain

    def _steers(self, depth: int, blocks: int) -> bool:
        # A match on a few leading blocks (a system prompt every rank soon holds) is not
        # worth steering for; below min_match the ranks compete on load alone.
        return depth > 0 and depth >= self.min_match * blocks

    def _uncached(self, request: Request, rank: int, depth: int) -> float:
        n = request.num_tokens
        blocks = len(request.block_hashes)
        if not self._steers(depth, blocks):
            self._uncertain = 0.0
            return float(n)
        left = n - self._cached(rank, request.block_hashes, depth, n / blocks)
        return left if left > 1.0 else 1.0

    def _add_pending(self, depth: dict[int, int], hashes: tuple[int, ...], exact: int) -> None:
        """Extend each exact rank's depth over blocks it will hold before this request runs."""
        n = len(hashes)
        queues, held = self._pending, self._pending_blocks
        while exact:
            low = exact & -exact
            exact ^= low
            r = low.bit_length() - 1
            pending = queues[r]
            if not pending:
                continue
            d = depth.get(r, 0)
            if d == n:
                continue
            oldest = pending[0][1]
            get = held[r].get
            while d < n and get(hashes[d], -1) >= oldest:
                d += 1
            if d:
                depth[r] = d

    def _hold_pending(self, rank: int, seq: int, hashes: tuple[int, ...]) -> None:
        pending = self._pending[rank]
        if len(pending) >= _RECENT:  # a rank that never reports: keep the newest only
            pending.popleft()
        held = self._pending_blocks[rank]
        if not pending:
            held.clear()  # nothing pending: every entry is stale
        elif len(held) > self._stale_limit[rank]:
            # A rank that always has a request waiting: drop the entries of released ones
            # (amortized: the next sweep waits until as many entries again were added).
            oldest = pending[0][1]
            self._pending_blocks[rank] = held = {h: t for h, t in held.items() if t >= oldest}
            self._stale_limit[rank] = max(_STALE_PENDING, 2 * len(held))
        self._ticket = ticket = self._ticket + 1
        pending.append((seq, ticket, hashes))
        held.update(zip(hashes, repeat(ticket)))

    def _exact_uncached(self, request: Request, depth: int) -> float:
        """Uncached tokens on a rank that publishes KV events and holds *depth* leading blocks."""
        n = request.num_tokens
        blocks = len(request.block_hashes)
        if not self._steers(depth, blocks):
            return float(n)
        left = n - depth * n / blocks
        return left if left > 1.0 else 1.0

    def _decayed(self, rank: int, now: float) -> float:
        dt = now - self._duty_t[rank]
        d = self._duty[rank]
        return d * math.exp(-dt / self.duty_window) if dt > 0 else d

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        ranks = ctx.active_ranks
        n = len(ranks)
        reqs = ctx.ledger.requests
        start = self._turn % n
        self._turn = start + 1
        every = n == len(reqs)  # every rank active (ranks are distinct and in range)
        if every:
            lo, hi = min(reqs), max(reqs)
        else:
            lo = hi = reqs[ranks[0]]
            for r in ranks:
                v = reqs[r]
                if v < lo:
                    lo = v
                elif v > hi:
                    hi = v
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            best = ranks[start]
            for i in range(1, n):
                r = ranks[(start + i) % n]
                if reqs[r] < reqs[best]:
                    best = r
            ctx.explain(self.name, "imbalanced", {"min_requests": lo, "max_requests": hi})
            self._last_rid = None
            return best

        hashes = request.block_hashes
        # Ranks that publish KV events: their cached depth is known exactly (ctx.cache).
        exact = ctx.cache.known_mask
        if hashes:
            if every:
                mask = (1 << n) - 1
            else:
                mask = 0
                for r in ranks:
                    mask |= 1 << r
            guess = mask & ~exact
            # self._depths (no rank to ask it of when every active rank publishes KV events)
            depth = self._est.depths(hashes, guess) if guess else {}
            exact &= mask
            if exact:
                known = ctx.cache.depths(hashes, exact)
                if guess:
                    depth.update(known)
                else:
                    depth = known
                self._add_pending(depth, hashes, exact)
        else:
            depth = {}
        self._last_rid = request.rid
        now = ctx.now()
        busy = self._busy_until
        weight = self.work_weight
        rate = self.rate / weight
        full = float(request.num_tokens)
        out = request.max_new_tokens or 0
        pinned, capacity = self._pinned, self._capacity
        kv_wait = self.kv_wait / self.rate
        costs = self._costs
        work = self._last_work
        # (_exact_uncached and _uncached, inlined: this loop runs for every rank.)
        tokens = request.num_tokens
        blocks = len(hashes)
        steers = self.min_match * blocks  # the least depth that steers (see _steers)
        block_tokens = tokens / blocks if blocks else 0.0
        horizon_factor = self.memory_factor
        est_cached = self._est.cached
        # One pass over the ranks, in rank order: the prefill queued on them (for the weight
        # of uncertain savings), and the cost of every rank but its uncertain saving, which
        # that weight prices. A rank without a prefix that steers has none: its cost is final
        # here (adding 0.0 × a finite discount changes no cost; see below for the other case).
        full_cost = full / rate
        queued = 0.0
        steering = []
        for r in ranks:
            wait = busy[r] - now
            if wait > 0.0:
                queued += wait
            d = depth.get(r, 0) if depth else 0
            if not d or not d >= steers:
                work[r] = full
                cost = (wait if wait > 0.0 else 0.0) + full_cost
                # No room in the rank's KV now: its head of line waits for decodes to free some.
                over = pinned[r] + full + out - capacity[r]
                if over > 0.0:
                    cost += over * kv_wait
                costs[r] = cost
                continue
            uncertain = 0.0
            if exact >> r & 1:
                left = tokens - d * tokens / blocks
            else:
                cap = capacity[r]
                sure, uncertain = est_cached(r, hashes, d, block_tokens, cap - pinned[r], cap * horizon_factor)
                left = tokens - (sure + uncertain)
            work[r] = new = left if left > 1.0 else 1.0
            steering.append((r, (wait if wait > 0.0 else 0.0) + new / rate, uncertain, pinned[r] + new + out - capacity[r]))
        # How much an uncertain block's saving is worth: the request's own time on an idle
        # cluster, more as the queue (in requests) grows, at most what a sure block is worth.
        job = self._job_s
        uncertain_weight = 1.0 + self.uncertain_gain * queued / (n * job) if job > 0.0 else 1.0
        if uncertain_weight > weight:
            uncertain_weight = weight
        discount = (weight - uncertain_weight) / self.rate
        no_saving = 0.0 * discount
        if no_saving != 0.0:  # (NaN: an infinite work_weight) as adding it makes those costs
            for r in ranks:
                costs[r] += no_saving
        for r, cost, uncertain, over in steering:
            cost += uncertain * discount
            if over > 0.0:
                cost += over * kv_wait
            costs[r] = cost
        # The cheapest, the first of them from this decision's turn on (ties go to the
        # earliest in that order; NaN costs never win).
        if ranks is not self._orders_of:  # liveness changed: the rotations of the new ranks
            self._orders = [ranks[i:] + ranks[:i] for i in range(n)]
            self._orders_of = ranks if type(ranks) is tuple else None  # (a list could change)
        order = self._orders[start]
        lowest = min(costs) if every else math.nan
        if lowest == lowest:  # (min of them all, costs[0] not NaN: the least non-NaN cost)
            try:
                cheapest = costs.index(lowest, start)
            except ValueError:
                cheapest = costs.index(lowest)
        else:
            lowest = math.inf
            cheapest = ranks[start]
            for r in order:
                if costs[r] < lowest:
                    lowest = costs[r]
                    cheapest = r
        if self.load_bound:
            # self._bound_load(ranks, now, full), with its usual path inlined: when no rank
            # is past the bound, no cost changes and the lowest stays the one found above.
            t0 = self._served_t0
            x = (now - t0) / self.load_window if t0 is not None else math.nan
            if x <= MAX_EXPONENT:
                scale = math.exp(x)
                served = self._served if every else [self._served[r] for r in ranks]
                total = 0.0
                for v in served:
                    total += v
                cap = self.load_bound * total / n + full * scale
                floor = _BOUND_FLOOR * self.rate * self.load_window * scale
                if cap < floor:
                    cap = floor
                if any(map(cap.__lt__, served)):  # (served[r] > cap)
                    lowest = self._over_bound(ranks, cap)
            else:
                lowest = self._bound_load(ranks, now, full)
        # The cheapest rank was passed over for the load bound: say so.
        bounded = costs[cheapest] >= _OVER_BOUND
        # Near-ties go to the rank that has prefilled least lately: its decodes stall least.
        limit = lowest + self.tolerance
        best = -1
        best_duty = best_reqs = 0.0
        duties, duty_t, duty_window, exp = self._duty, self._duty_t, self.duty_window, math.exp
        for r in order:
            if costs[r] > limit:
                continue
            # self._decayed(r, now), inlined
            dt = now - duty_t[r]
            duty = duties[r] * exp(-dt / duty_window) if dt > 0 else duties[r]
            if best < 0 or duty < best_duty - DUTY_TIE_S or (duty <= best_duty + DUTY_TIE_S and reqs[r] < best_reqs):
                best, best_duty, best_reqs = r, duty, reqs[r]
        best_cost = costs[best]
        d = depth.get(best, 0)
        short = pinned[best] + work[best] + out - capacity[best]
        ctx.explain(
            self.name,
            "load_bound" if bounded else "prefix_hit" if d and d >= steers else "least_backlog",
            {
                "expected_ttft_s": round(best_cost, 4),
                "matched_blocks": d,
                "blocks": blocks,
                "kv_short_tokens": round(short) if short > 0.0 else 0,
                "cache": "exact" if exact >> best & 1 else "estimate",
            },
        )
        return best

    def _served_scale(self, now: float) -> float:
        """exp((now - t0) / load_window), rebasing the stored values before it grows large."""
        t0 = self._served_t0
        if t0 is None:
            t0 = self._served_t0 = now
        x = (now - t0) / self.load_window
        if x > MAX_EXPONENT:
            shrink = math.exp(-x)
            self._served = [v * shrink for v in self._served]
            self._served_t0 = now
            return 1.0
        return math.exp(x)

    def _bound_load(self, ranks: list[int], now: float, tokens: float) -> float:
        """Price ranks past the load bound out of the choice; the new lowest cost."""
        scale = self._served_scale(now)  # (may rebase: read _served after it)
        served = self._served
        total = 0.0
        for r in ranks:
            total += served[r]
        cap = self.load_bound * total / len(ranks) + tokens * scale
        # Below a tenth of what a rank can prefill in the window, imbalance costs nothing: a
        # lone conversation on a quiet cluster keeps its rank.
        floor = _BOUND_FLOOR * self.rate * self.load_window * scale
        if cap < floor:
            cap = floor
        return self._over_bound(ranks, cap)

    def _over_bound(self, ranks: list[int], cap: float) -> float:
        served = self._served
        costs = self._costs
        lowest = math.inf
        for r in ranks:
            if served[r] > cap:
                costs[r] += _OVER_BOUND
            if costs[r] < lowest:
                lowest = costs[r]
        return lowest

    @hookimpl
    def on_dispatch(self, request: Request, rank: int, seq: int, ctx: PolicyContext) -> None:
        now = ctx.now()
        hashes = request.block_hashes
        known = ctx.cache.known_mask >> rank & 1
        if self._last_rid == request.rid:
            uncached = self._last_work[rank]
        elif known:  # placed elsewhere; the rank says what it holds
            d = ctx.cache.match(rank, hashes) or 0
            uncached = self._exact_uncached(request, d) if d else float(request.num_tokens)
        else:  # placed by a router, or by the imbalance guard: work it out for this rank
            d = self._depths(hashes, 1 << rank).get(rank, 0) if hashes else 0
            uncached = self._uncached(request, rank, d)
        self._last_rid = None
        # (This runs for every request: the helpers it shares with other hooks are inlined,
        # each computing exactly what the helper does.)
        work = uncached / self.rate
        job = self._job_s
        self._job_s = job + _JOB_ALPHA * (work - job) if job > 0.0 else work
        busy = self._busy_until
        b = busy[rank]
        busy[rank] = (b if b > now else now) + work
        duties = self._duty
        dt = now - self._duty_t[rank]  # self._decayed(rank, now)
        d = duties[rank]
        duties[rank] = (d * math.exp(-dt / self.duty_window) if dt > 0 else d) + work
        self._duty_t[rank] = now
        if self.load_bound:
            t0 = self._served_t0
            x = (now - t0) / self.load_window if t0 is not None else math.nan
            scale = math.exp(x) if x <= MAX_EXPONENT else self._served_scale(now)
            self._served[rank] += request.num_tokens * scale
        self._recent[rank].append((seq, work))
        if hashes:
            if known:
                self._hold_pending(rank, seq, hashes)
            # self._remember(rank, hashes, request.num_tokens / len(hashes), now)
            est = self._est
            est.touch(rank, hashes, request.num_tokens / len(hashes), now)
            if now < self._last_use or not self._clock_steady:
                self._track_use(now)
            else:  # self._track_use(now), its usual path
                self._last_use = now
                if now < self._oldest_use:
                    self._oldest_use = now
            est.trim(rank, est.touched[rank] - self._capacity[rank] * self.memory_factor)  # self._trim(rank)
            if est.size > self.max_blocks or not self._oldest_use >= now - self.eviction_interval:
                self._age(now)  # (its own early return, tested first)

    @hookimpl
    def on_load_report(self, report: LoadReport, ctx: PolicyContext) -> None:
        # Reconcile: the prefill still ahead on the rank is the work of the requests it says
        # are waiting (the newest acknowledged ones, FIFO), plus what it has not acknowledged,
        # plus what is left of the one it may be prefilling now (the last admitted): exact
        # when the engine reports prefill_tokens, else at most its whole expected work.
        r = report.rank
        recent = self._recent[r]
        first_waiting = report.acked_seq - report.num_waiting
        pending = self._pending[r]
        while pending and pending[0][0] < first_waiting:
            pending.popleft()
        while recent and recent[0][0] < first_waiting:
            recent.popleft()
        current = ahead = 0.0
        for seq, work in recent:
            if seq == first_waiting:
                current = work
            else:
                ahead += work
        now = ctx.now()
        lo = now + ahead
        if report.prefill_tokens >= 0:
            # The rank says how much of the prefill in progress is left: no guessing.
            self._busy_until[r] = lo + report.prefill_tokens / self.rate
        else:
            hi = lo + current
            b = self._busy_until[r]
            self._busy_until[r] = lo if b < lo else hi if b > hi else b
        if report.kv_capacity:
            self._capacity[r] = float(report.kv_capacity)
            self._pinned[r] = float(min(report.kv_used, report.kv_capacity))
            self._trim(r)

    @hookimpl
    def on_rank_state(self, rank: int, ctx: PolicyContext) -> None:
        # Gone, back, or restarted: what the rank cached or queued may be gone (a restart
        # empties it), so forget it all; no decision may claim a hit on blocks it held before.
        self._est.forget(rank)
        self._recent[rank].clear()
        self._pending[rank].clear()
        self._pending_blocks[rank].clear()
        self._busy_until[rank] = self._duty[rank] = self._served[rank] = self._pinned[rank] = 0.0

    # ------------------------------------------------------------------ prefix index

    def _remember(self, rank: int, hashes: tuple[int, ...], block_tokens: float, now: float) -> None:
        # Deepest block first, so that a prefix is always at least as recent as what
        # extends it: evicting from the LRU end then cuts prompts from their tails, as a
        # radix-tree cache does, and a shared root outlives the conversations under it.
        self._est.touch(rank, hashes, block_tokens, now)
        self._track_use(now)
        self._trim(rank)
        self._age(now)

    def _track_use(self, now: float) -> None:
        """Keep ``_oldest_use`` a lower bound on every entry's last use (see ``_age``)."""
        if now < self._last_use:
            # A clock that went back: use order is no longer time order; always look.
            self._clock_steady = False
            self._oldest_use = -math.inf
        elif self._clock_steady:
            self._last_use = now
            if now < self._oldest_use:
                self._oldest_use = now

    def _trim(self, rank: int) -> None:
        """Forget blocks older than the memory horizon (they cannot still be cached)."""
        self._est.trim(rank, self._est.touched[rank] - self._capacity[rank] * self.memory_factor)

    def _age(self, now: float) -> None:
        """Bound memory: drop entries unused for ``eviction_interval`` or past ``max_blocks``."""
        horizon = now - self.eviction_interval
        if self._est.size <= self.max_blocks and self._oldest_use >= horizon:
            return  # nothing is old enough: no need to look at each rank's oldest entry
        self._est.age(horizon, self.max_blocks)
        if self._clock_steady:
            # Entries are in order of use, so each rank's first is its oldest.
            self._oldest_use = self._est.oldest_use()
