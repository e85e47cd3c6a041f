"""A deterministic discrete-event model of ``dp_size`` engine ranks behind one controller.

Each rank runs one iteration at a time, prefill first (SGLang's default scheduling):

* **Admission.** Waiting requests are admitted first come, first served. A request needs KV
  for its uncached prompt blocks plus its whole output (reserved up front, so a running
  request is never preempted); cached blocks that no running request uses are evicted LRU
  to make room. When the head of the queue does not fit, it and everyone behind it wait
  until a running request finishes. A request that could never fit (prompt + output larger
  than the rank's KV) is rejected by the engine.
* **Prefill** of one request takes ``uncached tokens / prefill_tokens_per_s`` (at least one
  token is computed); it ends with the first output token (TTFT).
* **Decode** runs continuous-batching steps of ``decode_step_s + decode_step_per_request_s ×
  running``; every step gives each running request one token. A run of steps is simulated as
  one event up to the next completion, cut at the next step boundary when a request arrives.
* **Prefix cache.** Per rank, blocks of the trace's ``hash_ids`` (512 tokens in Mooncake).
  The cached prefix is matched when a request is admitted. Blocks in use are pinned; when the
  last user finishes they become evictable, deepest block first (as a radix tree evicts
  leaves first).
* **Load reports** (including ``prefill_tokens``, what is left of the prefill in progress)
  are taken every ``report_interval_s`` (random phase per rank) or after
  ``report_steps`` decode steps, whichever comes first, and reach the controller
  ``report_delay_s`` later; they acknowledge the last dispatch the rank had received.

The controller side is a *router*: anything with ``select``, ``dispatched``, ``report``,
``first_token``, ``finished`` and ``last_decision``. Installed dpcore policies are driven
through :class:`PluginRouter`, i.e. the real :class:`~dpcore.manager.PolicyManager` and
:class:`~dpcore.ledger.LoadLedger` on the simulated clock; peer baselines
(:mod:`dpcore.sim.baselines`) implement the same interface. Every router sees the same
arrivals at the same simulated times.
"""

from __future__ import annotations

import heapq
import math
import random
import traceback
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from attrs import field, frozen

from dpcore.cacheindex import KvEventBatch
from dpcore.errors import PolicyFailedError, RequestRejected
from dpcore.manager import PolicyManager
from dpcore.model import Decision, LoadReport, Request
from dpcore.sim.config import EngineConfig
from dpcore.sim.kvcache import RankKV
from dpcore.sim.profiles import profile
from dpcore.sim.traces import Trace

# Event kinds (small ints: compared in the hot loop).
_PREFILL_DONE, _DECODE_DONE, _REPORT_TAKE, _REPORT_DELIVER = range(4)
_IDLE, _PREFILL, _DECODE = range(3)
#: Per-rank samples of the load for the "load over time" plot.
SERIES_POINTS = 400
_EPS = 1e-9


def policy_error_key(exc: RequestRejected) -> str | None:
    """One line per distinct policy failure: the exception and where it was raised, or the
    bad return value; ``None`` for a rejection that is not a policy failure."""
    if not isinstance(exc, PolicyFailedError):
        return None
    cause = exc.__cause__
    if cause is None:
        return str(exc)
    frames = traceback.extract_tb(cause.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(cause).__name__}: {cause}{where}"


class Dispatcher:
    """One arrival's way to a rank, the same in every engine: the router's choice, the
    sampled ``--explain`` record, and the count of requests refused and why."""

    def __init__(self, router: Router, explain_at: set[int]) -> None:
        self.router = router
        self.explain_at = explain_at
        self.explained: list[ExplainedDecision] = []
        self.rejected = 0
        self.reasons: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def route(self, i: int, req: Request, now: float) -> tuple[int, int] | None:
        """``(rank, dispatch seq)`` for request *i*, or ``None`` when the router rejected it."""
        router = self.router
        try:
            rank = router.select(req)
        except RequestRejected as exc:
            self.rejected += 1
            self.reasons[exc.code] += 1
            key = policy_error_key(exc)
            if key is not None:
                self.errors[key] += 1
            return None
        if i in self.explain_at:
            d = router.last_decision
            self.explained.append(
                ExplainedDecision(
                    rid=req.rid,
                    time_s=now,
                    rank=rank,
                    policy=d.policy,
                    reason=d.reason,
                    scores=dict(d.scores) if d.scores else None,
                )
            )
        return rank, router.dispatched(req, rank)

    def refuse(self, req: Request, rank: int, code: str) -> None:
        """The engine refused a dispatched request (e.g. ``engine_too_long``)."""
        self.rejected += 1
        self.reasons[code] += 1
        self.router.finished(req, rank)


def explain_sample(n: int, count: int, seed: int) -> set[int]:
    """Which requests ``--explain count`` records: a stream of its own, so that asking for
    explanations never changes the run."""
    if not count:
        return set()
    return set(random.Random(f"explain-{seed}").sample(range(n), min(count, n)))


class Router(Protocol):
    """What the engine needs from the controller side (a policy chain or a baseline)."""

    last_decision: Decision

    def select(self, request: Request) -> int: ...

    def dispatched(self, request: Request, rank: int) -> int: ...

    def report(self, report: LoadReport) -> bool: ...

    def first_token(self, request: Request, rank: int) -> None: ...

    def finished(self, request: Request, rank: int) -> None: ...


class PluginRouter:
    """Drives a dpcore policy chain exactly as the live controller does.

    ``select`` then ``dispatched`` per request, ``report`` per delivered load report; the
    controller never sees first tokens or completions (they bypass it), so those are no-ops.
    """

    def __init__(self, manager: PolicyManager) -> None:
        self.manager = manager
        self.select = manager.select
        self.dispatched = manager.dispatched
        self.report = manager.report

    @property
    def last_decision(self) -> Decision:
        return self.manager.last_decision

    def first_token(self, request: Request, rank: int) -> None:
        pass

    def finished(self, request: Request, rank: int) -> None:
        pass

    def kv_events(self, batch: KvEventBatch) -> bool:
        """A rank's KV event batch reached the controller: returns whether its cache index
        still knows that rank exactly (``False``: it lost track and wants a resync)."""
        index = self.manager.cache
        return index.apply(batch) or index.known(batch.rank)

    def rank_alive(self, rank: int, alive: bool) -> None:
        """The controller noticed *rank* stop (its reports and heartbeats ceased)."""
        self.manager.ledger.set_active(rank, alive)


@frozen
class ExplainedDecision:
    """One sampled decision, for ``--explain``."""

    rid: str
    time_s: float
    rank: int
    policy: str
    reason: str
    scores: dict[str, Any] | None


@frozen
class RunResult:
    """Raw outcome of one policy on one trace (metrics are computed in :mod:`report`).

    Per-request lists are aligned with the trace; ``nan`` marks requests that did not
    complete (rejected).
    """

    policy: str
    dp_size: int
    arrival: list[float]
    start: list[float]
    first_token: list[float]
    finish: list[float]
    rank: list[int]
    output_tokens: list[int]
    input_tokens_admitted: int
    hit_tokens: int
    served_tokens: list[int]
    completed: int
    rejected: int
    reject_reasons: dict[str, int]
    series: list[list[tuple[float, int, int]]]
    explained: list[ExplainedDecision] = field(factory=list)
    events: int = 0
    #: Requests lost to a rank fault after dispatch (reasons in ``fail_reasons``).
    failed: int = 0
    fail_reasons: dict[str, int] = field(factory=dict)
    #: Inter-token latencies as (seconds, tokens) pairs (lockstep engine only).
    itl: list[tuple[float, int]] = field(factory=list)
    #: Global steps run, and rank-seconds of own work, of waiting for the slowest rank
    #: (idle or padded), and in all (lockstep engine only).
    steps: int = 0
    busy_s: float = 0.0
    waste_s: float = 0.0
    rank_time_s: float = 0.0
    #: Distinct policy failures (exception and location, or bad return value) -> requests.
    errors: dict[str, int] = field(factory=dict)


class Job:
    """One dispatched request inside an engine (both engines use it)."""

    __slots__ = ("i", "req", "n_in", "n_out", "hashes", "left", "s_start")

    def __init__(self, i: int, req: Request, n_in: int, n_out: int, hashes: tuple[int, ...]) -> None:
        self.i = i
        self.req = req
        self.n_in = n_in
        self.n_out = n_out
        self.hashes = hashes
        self.left = 0  # prompt tokens still to compute (lockstep engine)
        self.s_start = 0  # the rank's decode step count when its decoding began


class _Rank:
    __slots__ = (
        "idx", "waiting", "waiting_tokens", "decode", "s", "s_sum", "state", "cur", "version",
        "run_start", "tau", "run_steps", "kv", "last_seq", "rep_seq", "rep_gen", "s_rep", "next_sample", "series", "served",
        "prefill_end",
    )  # fmt: skip

    def __init__(self, idx: int, kv: RankKV) -> None:
        self.idx = idx
        self.waiting: deque[Job] = deque()
        self.waiting_tokens = 0
        self.decode: list[tuple[int, int, Job]] = []  # heap by finish step
        self.s = 0  # decode steps completed
        self.s_sum = 0  # sum of s_start over the decode set
        self.state = _IDLE
        self.cur: Job | None = None
        self.prefill_end = 0.0
        self.version = 0
        self.run_start = 0.0
        self.tau = 0.0
        self.run_steps = 0
        self.kv = kv
        self.last_seq = -1
        self.rep_seq = 0
        self.rep_gen = 0
        self.s_rep = 0
        self.next_sample = 0.0
        self.series: list[tuple[float, int, int]] = []
        self.served = 0


def build_requests(trace: Trace) -> list[Request]:
    """The :class:`~dpcore.model.Request` each policy sees, one per trace request."""
    return [
        Request(
            rid=f"r{r.index}",
            num_tokens=r.input_length,
            block_hashes=r.hash_ids,
            max_new_tokens=r.output_length,
        )
        for r in trace.requests
    ]


class Simulation:
    """One replay of *trace* through ``dp_size`` ranks; call :meth:`run` once.

    :param trace: The arrivals.
    :param dp_size: Number of ranks.
    :param config: Engine parameters.
    :param seed: Seeds report phases and ``--explain`` sampling (and, through the caller,
        any randomness of the router).
    :param explain: How many decisions to sample for ``--explain``.
    :param progress: Called with the fraction of arrivals processed, now and then.
    """

    def __init__(
        self,
        trace: Trace,
        dp_size: int,
        config: EngineConfig | None = None,
        *,
        seed: int = 0,
        explain: int = 0,
        progress: Callable[[float], None] | None = None,
    ) -> None:
        self.trace = trace
        self.dp_size = dp_size
        self.config = config or EngineConfig()
        self.seed = seed
        self.now = trace.requests[0].arrival if trace.requests else 0.0
        self.block_size = trace.block_size or 1
        self.ranks = [_Rank(i, RankKV(self.config.kv_capacity_tokens, self.block_size)) for i in range(dp_size)]
        self.requests = build_requests(trace)
        self._explain = explain
        self._progress = progress

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.config.prefill_tokens_per_s

    def clock(self) -> float:
        """Simulated time in seconds; the ledger and every baseline read it."""
        return self.now

    def cached_blocks(self, rank: int, hashes: Sequence[int]) -> int:
        """Blocks of *hashes*' prefix that *rank*'s cache holds now (a KV-event view)."""
        return self.ranks[rank].kv.cached_blocks(hashes)

    def running(self, rank: int) -> int:
        """Requests *rank* holds now, decoding or prefilling (a reference's view)."""
        r = self.ranks[rank]
        return len(r.decode) + (1 if r.state == _PREFILL else 0)

    def queued_prefill_s(self, rank: int) -> float:
        """Seconds of prefill *rank* has ahead of a new arrival now: the rest of the prompt
        in prefill plus each waiting prompt's uncached part (as the cache stands now).

        Exact knowledge no real router has; only the ``ref:`` references use it.
        """
        r = self.ranks[rank]
        rate = self.config.prefill_tokens_per_s
        bs = self.block_size
        left = r.prefill_end - self.now if r.state == _PREFILL and r.prefill_end > self.now else 0.0
        for job in r.waiting:
            hit = min(self.cached_blocks(rank, job.hashes) * bs, job.n_in) if job.hashes else 0
            left += max(job.n_in - hit, 1) / rate
        return left

    # ------------------------------------------------------------------ the loop

    def run(self, router: Router, name: str = "") -> RunResult:  # noqa: C901 - one hot loop
        cfg = self.config
        trace = self.trace
        dp = self.dp_size
        ranks = self.ranks
        reqs = self.requests
        n = len(reqs)
        cap = cfg.kv_capacity_tokens
        prefill_rate = cfg.prefill_tokens_per_s
        step_base, step_per = cfg.decode_step_s, cfg.decode_step_per_request_s
        interval, delay, rep_steps = cfg.report_interval_s, cfg.report_delay_s, cfg.report_steps
        report_profile = profile(cfg.report_profile)
        rng = random.Random(self.seed)
        heap: list[tuple[float, int, int, int, Any]] = []
        push, pop = heapq.heappush, heapq.heappop
        counter = 0

        arrivals = [r.arrival for r in trace.requests]
        t_begin = arrivals[0] if n else 0.0
        span = (arrivals[-1] - t_begin) if n else 0.0
        sample_dt = max(span, 1.0) / SERIES_POINTS
        disp = Dispatcher(router, explain_sample(n, self._explain, self.seed))

        nan = math.nan
        start = [nan] * n
        first = [nan] * n
        finish = [nan] * n
        rank_of = [-1] * n
        out_tokens = [0] * n
        completed = outstanding = 0
        admitted_in = hit_total = 0
        events = 0

        for r in ranks:
            # Ranks are not synchronized: each report timer gets its own phase.
            counter += 1
            push(heap, (t_begin + rng.random() * interval, counter, _REPORT_TAKE, r.idx, 0))
            r.next_sample = t_begin

        # -------------------------------------------------------------- helpers

        def start_next(r: _Rank, now: float) -> None:
            nonlocal counter, admitted_in, hit_total
            if r.waiting:
                job = r.waiting[0]
                hit = r.kv.admit(job.hashes, job.n_in, job.n_out)
                if hit >= 0:
                    n_in = job.n_in
                    r.waiting.popleft()
                    r.waiting_tokens -= n_in
                    start[job.i] = now
                    admitted_in += n_in
                    hit_total += hit
                    r.state = _PREFILL
                    r.cur = job
                    r.version += 1
                    counter += 1
                    compute = n_in - hit if n_in > hit else 1
                    r.prefill_end = now + compute / prefill_rate
                    push(heap, (r.prefill_end, counter, _PREFILL_DONE, r.idx, r.version))
                    return
            if r.decode:
                k = len(r.decode)
                tau = step_base + step_per * k
                steps = r.decode[0][0] - r.s
                r.state = _DECODE
                r.run_start = now
                r.tau = tau
                r.run_steps = steps
                r.version += 1
                counter += 1
                push(heap, (now + steps * tau, counter, _DECODE_DONE, r.idx, r.version))
                if rep_steps:
                    need = r.s_rep + rep_steps - r.s
                    if need <= steps:
                        counter += 1
                        push(heap, (now + max(need, 0) * tau, counter, _REPORT_TAKE, r.idx, -1))
                return
            r.state = _IDLE

        def release(r: _Rank, job: Job, now: float) -> None:
            nonlocal completed, outstanding
            finish[job.i] = now
            completed += 1
            outstanding -= 1
            r.kv.release(job.hashes, job.n_in, job.n_out)
            router.finished(job.req, r.idx)

        def steps_now(r: _Rank, now: float) -> int:
            if r.state != _DECODE:
                return r.s
            done = int((now - r.run_start) / r.tau + _EPS)
            return r.s + (done if done < r.run_steps else r.run_steps)

        # -------------------------------------------------------------- events

        ai = 0
        progress = self._progress
        progress_every = max(n // 50, 1)
        inf = math.inf
        while True:
            next_arrival = arrivals[ai] if ai < n else inf
            if heap and heap[0][0] <= next_arrival:
                now, _, kind, ri, payload = pop(heap)
                self.now = now
                events += 1
                r = ranks[ri]
                if kind == _REPORT_TAKE:
                    if payload >= 0:
                        if payload != r.rep_gen:
                            continue
                    elif steps_now(r, now) - r.s_rep < rep_steps:
                        continue  # a step trigger made stale by an earlier report
                    s_now = steps_now(r, now)
                    k = len(r.decode)
                    kv_used = r.kv.pinned_tokens + k * (s_now + 1) - r.s_sum
                    running = k + (1 if r.state == _PREFILL else 0)
                    waiting = len(r.waiting)
                    rep = LoadReport(
                        rank=ri,
                        epoch=0,
                        seq=r.rep_seq,
                        acked_seq=r.last_seq,
                        num_running=running,
                        num_waiting=waiting,
                        num_tokens=kv_used + r.waiting_tokens,
                        kv_used=kv_used,
                        kv_capacity=cap,
                        prefill_tokens=report_profile.prefill_tokens(
                            round((r.prefill_end - now) * prefill_rate) if r.state == _PREFILL else 0
                        ),
                    )
                    r.rep_seq += 1
                    r.rep_gen += 1
                    r.s_rep = s_now
                    if now >= r.next_sample:
                        r.series.append((now, running + waiting, kv_used + r.waiting_tokens))
                        r.next_sample = now + sample_dt
                    counter += 1
                    push(heap, (now + interval, counter, _REPORT_TAKE, ri, r.rep_gen))
                    if rep_steps and r.state == _DECODE and s_now + rep_steps <= r.s + r.run_steps:
                        counter += 1
                        at = r.run_start + (s_now + rep_steps - r.s) * r.tau
                        push(heap, (at, counter, _REPORT_TAKE, ri, -1))
                    if delay > 0:
                        counter += 1
                        push(heap, (now + delay, counter, _REPORT_DELIVER, ri, rep))
                    else:
                        router.report(rep)
                elif kind == _REPORT_DELIVER:
                    router.report(payload)
                elif payload != r.version:
                    continue  # an iteration end that was rescheduled
                elif kind == _PREFILL_DONE:
                    job = r.cur
                    r.cur = None
                    first[job.i] = now
                    router.first_token(job.req, ri)
                    if job.n_out <= 1:
                        release(r, job, now)
                    else:
                        job.s_start = r.s
                        r.s_sum += r.s
                        heapq.heappush(r.decode, (r.s + job.n_out - 1, job.i, job))
                    start_next(r, now)
                else:  # _DECODE_DONE
                    r.s += r.run_steps
                    dec = r.decode
                    while dec and dec[0][0] <= r.s:
                        job = heapq.heappop(dec)[2]
                        r.s_sum -= job.s_start
                        release(r, job, now)
                    start_next(r, now)
                if ai >= n and not outstanding:
                    break
                continue
            if ai >= n:
                break
            # ---------------------------------------------------------- arrival
            now = next_arrival
            self.now = now
            i = ai
            ai += 1
            if progress is not None and ai % progress_every == 0:
                progress(ai / n)
            req = reqs[i]
            routed = disp.route(i, req, now)
            if routed is None:
                continue
            rank, seq = routed
            r = ranks[rank]
            r.last_seq = seq
            tr = trace.requests[i]
            n_out = tr.output_length if tr.output_length > 0 else 1
            rank_of[i] = rank
            if tr.input_length + n_out > cap:
                # The engine refuses a request that could never fit in its KV cache.
                disp.refuse(req, rank, "engine_too_long")
                continue
            job = Job(i, req, tr.input_length, n_out, tr.hash_ids)
            out_tokens[i] = n_out
            r.served += tr.input_length
            r.waiting.append(job)
            r.waiting_tokens += tr.input_length
            outstanding += 1
            if r.state == _IDLE:
                start_next(r, now)
            elif r.state == _DECODE and len(r.waiting) == 1:
                # The next iteration (after the step in flight) will prefill it.
                done = math.ceil((now - r.run_start) / r.tau - _EPS)
                if done < r.run_steps:
                    r.run_steps = max(done, 0)
                    r.version += 1
                    counter += 1
                    push(heap, (r.run_start + r.run_steps * r.tau, counter, _DECODE_DONE, rank, r.version))

        if progress is not None:
            progress(1.0)
        return RunResult(
            policy=name,
            dp_size=dp,
            arrival=arrivals,
            start=start,
            first_token=first,
            finish=finish,
            rank=rank_of,
            output_tokens=out_tokens,
            input_tokens_admitted=admitted_in,
            hit_tokens=hit_total,
            served_tokens=[r.served for r in ranks],
            completed=completed,
            rejected=disp.rejected,
            reject_reasons=dict(disp.reasons),
            series=[r.series for r in ranks],
            explained=disp.explained,
            events=events,
            errors=dict(disp.errors),
        )
