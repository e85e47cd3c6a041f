"""What both engines share: a request's way through a rank, the rank's state, and the result.

The replicas engine (:mod:`dpcore.sim.engine`) and the DP-attention lockstep engine
(:mod:`dpcore.sim.lockstep`) differ in how a rank runs its steps. Everything around the steps
is the same and lives here, in :class:`Replay`: routing an arrival and queueing it at its
rank, a prompt's first token and the start of its decoding, completions, taking a load report
and sending it, the load series for the plot, and the run's result (:mod:`dpcore.sim.result`).

Events go on one heap as ``(time, counter, kind, rank, payload)``; the counter breaks ties
in the order the events were pushed, so a run is deterministic.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from dpcore.model import LoadReport, Request
from dpcore.sim.config import EngineConfig
from dpcore.sim.faults import Fault
from dpcore.sim.kvcache import RankKV
from dpcore.sim.profiles import profile
from dpcore.sim.result import Outcome, RunResult
from dpcore.sim.routing import Dispatcher, Router, explain_sample
from dpcore.sim.traces import Trace

#: Event kinds both engines use; each engine numbers its own from ``OWN_KINDS``.
REPORT_TAKE, REPORT_DELIVER, OWN_KINDS = range(3)
#: Per-rank samples of the load for the "load over time" plot.
SERIES_POINTS = 400
_heappush = heapq.heappush


class Job:
    """One dispatched request inside an engine."""

    __slots__ = ("i", "req", "n_in", "n_out", "hashes", "left", "s_start")

    def __init__(self, i: int, req: Request, n_in: int, n_out: int, hashes: tuple[int, ...]) -> None:
        self.i = i
        self.req = req
        self.n_in = n_in
        self.n_out = n_out
        self.hashes = hashes
        self.left = 0  # prompt tokens still to compute (lockstep engine)
        self.s_start = 0  # the rank's decode step count when its decoding began


class RankState:
    """A rank's queue, decode set, cache and report state; each engine adds its step state."""

    __slots__ = (
        "idx", "kv", "alive", "epoch", "waiting", "waiting_tokens", "decode", "s", "s_sum",
        "last_seq", "rep_seq", "rep_gen", "s_rep", "next_sample", "series", "served",
    )  # fmt: skip

    def __init__(self, idx: int, kv: RankKV) -> None:
        self.idx = idx
        self.kv = kv
        self.alive = True
        self.epoch = 0
        self.waiting: deque[Job] = deque()  # dispatched, not admitted yet
        self.waiting_tokens = 0
        self.decode: list[tuple[int, int, Job]] = []  # heap by the decode step it finishes at
        self.s = 0  # decode steps this rank ran
        self.s_sum = 0  # sum of s_start over the decode set
        self.last_seq = -1  # the last dispatch the rank received
        self.rep_seq = 0
        self.rep_gen = 0  # bumped by every report: older report timers are stale
        self.s_rep = 0  # step count of the last report
        self.next_sample = 0.0
        self.series: list[tuple[float, int, int]] = []
        self.served = 0  # prompt tokens dispatched to it


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


class Replay:
    """One replay of *trace* through ``dp_size`` ranks; an engine subclasses it with its
    step model and its ``run``.

    :param trace: The arrivals.
    :param dp_size: Number of ranks.
    :param config: Engine parameters.
    :param seed: Seeds report phases and ``--explain`` sampling (and, through the caller,
        any randomness of the router).
    :param explain: How many decisions to sample for ``--explain``.
    :param progress: Called with the fraction of arrivals processed, now and then.
    :param faults: Ranks that go down and come back (engines that model faults).
    """

    #: The engine's rank state.
    rank_class: ClassVar[type[RankState]] = RankState

    def __init__(
        self,
        trace: Trace,
        dp_size: int,
        config: EngineConfig | None = None,
        *,
        seed: int = 0,
        explain: int = 0,
        progress: Callable[[float], None] | None = None,
        faults: Sequence[Fault] = (),
    ) -> None:
        self.trace = trace
        self.dp_size = dp_size
        self.config = config or EngineConfig()
        self.seed = seed
        self.now = trace.requests[0].arrival if trace.requests else 0.0
        self.block_size = trace.block_size or 1
        cap = self.config.kv_capacity_tokens
        self.ranks: list[Any] = [self.rank_class(i, RankKV(cap, self.block_size)) for i in range(dp_size)]
        self.requests = build_requests(trace)
        self._explain = explain
        self._progress = progress
        self.faults = tuple(faults)
        for f in self.faults:
            f.check(dp_size)
        self._configure()

    def _configure(self) -> None:
        """The engine's own set-up, once the common one is done."""

    def clock(self) -> float:
        """Simulated time in seconds; the ledger and every baseline read it."""
        return self.now

    def cached_blocks(self, rank: int, hashes: Sequence[int]) -> int:
        """Blocks of *hashes*' prefix that *rank*'s cache holds now (a KV-event view)."""
        return self.ranks[rank].kv.cached_blocks(hashes)

    def _uncached(self, r: RankState) -> Iterator[int]:
        """Each waiting prompt's tokens to compute, as the cache stands now (at least one)."""
        bs = self.block_size
        for job in r.waiting:
            hit = min(r.kv.cached_blocks(job.hashes) * bs, job.n_in) if job.hashes else 0
            yield max(job.n_in - hit, 1)

    # ------------------------------------------------------------------ a run

    def run(self, router: Router, name: str = "") -> RunResult:
        """Replay every arrival and every event in time order through *router*."""
        self._begin(router)
        n = len(self.requests)
        arrivals = self._arrivals
        heap = self._heap
        pop = heapq.heappop
        progress = self._progress
        every = max(n // 50, 1)
        event, arrive = self._event, self._arrive
        ai = 0
        while True:
            next_arrival = arrivals[ai] if ai < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, kind, ri, payload = pop(heap)
                self.now = t
                self._events += 1
                if not event(kind, ri, payload, t):
                    continue
            elif ai < n:
                self.now = next_arrival
                ended = arrive(ai, next_arrival)
                ai += 1
                if progress is not None and ai % every == 0:
                    progress(ai / n)
                if not ended:
                    continue
            else:
                break
            if ai >= n and self._idle():
                break
        if progress is not None:
            progress(1.0)
        return self._result(name)

    def _event(self, kind: int, rank: int, payload: Any, t: float) -> bool:
        """Handle one event; returns whether the run may have ended with it."""
        raise NotImplementedError

    def _arrive(self, i: int, t: float) -> bool:
        """Arrival *i* at *t*; returns whether the run may have ended with it."""
        raise NotImplementedError

    def _idle(self) -> bool:
        """Nothing is left to run (after the last arrival)."""
        return not self._outstanding

    def _begin(self, router: Router) -> float:
        """Fresh run state for *router*, and every rank's first report timer; returns the
        time of the first arrival."""
        cfg = self.config
        n = len(self.requests)
        self._router = router
        self._profile = profile(cfg.report_profile)
        self._arrivals = [r.arrival for r in self.trace.requests]
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._counter = 0
        self._outstanding = 0
        self._events = 0
        self._steps = 0
        self._out = Outcome(n)
        t_begin = self._arrivals[0] if n else 0.0
        span = (self._arrivals[-1] - t_begin) if n else 0.0
        self._sample_dt = max(span, 1.0) / SERIES_POINTS
        rng = random.Random(self.seed)
        for r in self.ranks:
            # Ranks are not synchronized in their reports: each timer gets its own phase.
            self._push(t_begin + rng.random() * cfg.report_interval_s, REPORT_TAKE, r.idx, 0)
            r.next_sample = t_begin
        self._disp = Dispatcher(router, explain_sample(n, self._explain, self.seed))
        return t_begin

    def _push(self, t: float, kind: int, rank: int, payload: Any) -> None:
        self._counter = c = self._counter + 1
        _heappush(self._heap, (t, c, kind, rank, payload))

    def _queue(self, i: int, now: float) -> RankState | None:
        """Route arrival *i* and queue it at its rank; the rank, or ``None`` when the request
        ended here (rejected by the router, refused by the engine, or sent to a dead rank)."""
        req = self.requests[i]
        routed = self._disp.route(i, req, now)
        if routed is None:
            return None
        rank, seq = routed
        r = self.ranks[rank]
        r.last_seq = seq
        self._out.rank_of[i] = rank
        tr = self.trace.requests[i]
        n_out = tr.output_length if tr.output_length > 0 else 1
        if not r.alive:
            self._out.failed += 1
            self._out.fail_reasons["rank_down"] += 1
            self._router.finished(req, rank)
            return None
        if tr.input_length + n_out > self.config.kv_capacity_tokens:
            # The engine refuses a request that could never fit in its KV cache.
            self._disp.refuse(req, rank, "engine_too_long")
            return None
        job = Job(i, req, tr.input_length, n_out, tr.hash_ids)
        self._out.out_tokens[i] = n_out
        r.served += tr.input_length
        r.waiting.append(job)
        r.waiting_tokens += tr.input_length
        self._outstanding += 1
        return r

    def _admitted(self, job: Job, hit: int, now: float) -> None:
        """*job* left the queue into KV at *now*, *hit* of its prompt tokens cached."""
        self._out.start[job.i] = now
        self._out.admitted_in += job.n_in
        self._out.hit_total += hit

    def _first_token(self, r: RankState, job: Job, t: float) -> bool:
        """*job*'s prompt is done at *t*: its first token. Returns whether it goes on decoding."""
        self._out.first[job.i] = t
        self._router.first_token(job.req, r.idx)
        if job.n_out <= 1:
            self._release(r, job, t)
            return False
        job.s_start = r.s
        r.s_sum += r.s
        heapq.heappush(r.decode, (r.s + job.n_out - 1, job.i, job))
        return True

    def _finish_decodes(self, r: RankState, t: float) -> int:
        """Release every request whose last token came by *r*'s step count; how many."""
        dec = r.decode
        done = 0
        while dec and dec[0][0] <= r.s:
            job = heapq.heappop(dec)[2]
            r.s_sum -= job.s_start
            self._release(r, job, t)
            done += 1
        return done

    def _release(self, r: RankState, job: Job, t: float) -> None:
        self._out.finish[job.i] = t
        self._out.completed += 1
        self._outstanding -= 1
        r.kv.release(job.hashes, job.n_in, job.n_out)
        self._router.finished(job.req, r.idx)

    # ------------------------------------------------------------------ reports

    def _sample(self, r: RankState, now: float, requests: int, tokens: int) -> None:
        """A point of the load-over-time series, at most one per ``sample_dt``."""
        if now >= r.next_sample:
            r.series.append((now, requests, tokens))
            r.next_sample = now + self._sample_dt

    def _load_report(self, r: RankState, running: int, waiting: int, kv_used: int, prefill_left: int) -> LoadReport:
        """The rank's next report, with the fields of the run's report profile."""
        rep = LoadReport(
            rank=r.idx,
            epoch=r.epoch,
            seq=r.rep_seq,
            acked_seq=r.last_seq,
            num_running=running,
            num_waiting=waiting,
            num_tokens=kv_used + r.waiting_tokens,
            kv_used=kv_used,
            kv_capacity=self.config.kv_capacity_tokens,
            prefill_tokens=self._profile.prefill_tokens(prefill_left),
        )
        r.rep_seq += 1
        return rep

    def _send(self, rep: LoadReport, now: float) -> None:
        """The report reaches the controller ``report_delay_s`` after *now*."""
        delay = self.config.report_delay_s
        if delay > 0:
            self._push(now + delay, REPORT_DELIVER, rep.rank, rep)
        else:
            self._router.report(rep)

    def _result(self, name: str) -> RunResult:
        out = self._out
        return RunResult(
            policy=name,
            dp_size=self.dp_size,
            arrival=self._arrivals,
            start=out.start,
            first_token=out.first,
            finish=out.finish,
            rank=out.rank_of,
            output_tokens=out.out_tokens,
            input_tokens_admitted=out.admitted_in,
            hit_tokens=out.hit_total,
            served_tokens=[r.served for r in self.ranks],
            completed=out.completed,
            rejected=self._disp.rejected,
            reject_reasons=dict(self._disp.reasons),
            series=[r.series for r in self.ranks],
            explained=self._disp.explained,
            events=self._events,
            failed=out.failed,
            fail_reasons=dict(out.fail_reasons),
            itl=out.itl,
            steps=self._steps,
            busy_s=out.busy_s,
            waste_s=out.waste_s,
            rank_time_s=out.rank_time_s,
            errors=dict(self._disp.errors),
        )
