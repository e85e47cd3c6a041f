"""The DP-attention engine model: ``dp_size`` ranks that run every forward step together.

What a step is, and what it costs, is :mod:`dpcore.sim.stepmodel` (with SGLang's source for
each mechanism). This module runs the steps over a trace:

* **A global step.** At a step's start each live rank builds its batch: an *extend* batch if
  it has a partly prefilled prompt or an admissible waiting request (the chunked prompt first,
  then waiting requests first come first served, admitted into KV as they join, until the
  per-rank budget ``chunked_prefill_size // dp`` is spent; the last one may be chunked),
  otherwise a *decode* batch of all its running requests, otherwise an idle batch. The step
  lasts :meth:`~dpcore.sim.stepmodel.StepModel.step`; every rank waits for it to end.
* **Tokens.** A prompt's first token comes at the end of the step that extends its last
  chunk; a decode step gives each request of a decoding rank one token. While a rank extends,
  its running requests get none.
* **Runs of identical decode steps** (no rank extends, nothing waits) are one event up to the
  next completion or load report by steps; an arrival or a fault cuts the run after the step
  in flight, as the scheduler sees a new request only between steps.
* **KV and prefix cache** per rank are :class:`~dpcore.sim.kvcache.RankKV`, as in the
  replicas engine; **load reports** are taken every ``report_interval_s`` (random phase per
  rank) and every ``report_steps`` steps, reach the controller ``report_delay_s`` later, and
  carry the fields of the chosen report profile (:mod:`dpcore.sim.profiles`).
* **Faults** (:class:`~dpcore.sim.faults.Fault`): a rank that goes down loses every request it
  holds (failed, with a reason) and its cache; the lockstep group carries on without it. The
  controller learns of it one report interval later (the reports stop); a request sent to it
  meanwhile fails. It comes back with an empty cache and a new epoch, and rejoins when its
  first report arrives.
"""

from __future__ import annotations

import math
import random
from typing import Any

from dpcore.cacheindex import CLEARED, STORED, KvEventBatch
from dpcore.sim.kvcache import RankKV
from dpcore.sim.replay import OWN_KINDS, REPORT_DELIVER, REPORT_TAKE, Job, RankState, Replay
from dpcore.sim.routing import Router

_STEP_END, _DOWN, _UP, _NOTICE, _KV_DELIVER = range(OWN_KINDS, OWN_KINDS + 5)
_EPS = 1e-9
#: A rank whose load has not changed still reports this often (SGLang's publisher heartbeat).
HEARTBEAT_S = 1.0


class _Rank(RankState):
    __slots__ = ("chunked", "batch", "groups", "last_counts", "last_sent", "kv_seq", "kv_resync")

    def __init__(self, idx: int, kv: RankKV) -> None:
        super().__init__(idx, kv)
        self.chunked: Job | None = None  # admitted, prompt partly extended
        self.batch: list[tuple[Job, int]] = []  # the extend batch of the step in flight
        self.groups: dict[float, int] = {}  # time of last token -> running requests (for ITL)
        self.last_counts: tuple[int, ...] = ()
        self.last_sent = -math.inf
        self.kv_seq = 0  # KV event batches taken in this life
        self.kv_resync = False  # the controller lost track of this rank's cache


class LockstepSimulation(Replay):
    """One replay of *trace* through a DP-attention group of ``dp_size`` ranks; call
    :meth:`run` once (arguments: :class:`~dpcore.sim.replay.Replay`)."""

    rank_class = _Rank

    def _configure(self) -> None:
        sm = self.config.step
        dp = self.dp_size
        self.budget = sm.chunk_budget(dp)
        # What one full extend step costs when every rank extends: the prefill pace the
        # clairvoyant reference plans with.
        self.extend_step_s = sm.step_time_s([self.budget] * dp, [0] * dp)

    @property
    def prefill_tokens_per_s(self) -> float:
        """One rank's prefill pace while every rank extends full chunks."""
        return self.budget / self.extend_step_s

    def running(self, rank: int) -> int:
        """Requests *rank* holds now, decoding or prefilling (a reference's view)."""
        r = self.ranks[rank]
        return len(r.decode) + (len(r.batch) or (1 if r.chunked is not None else 0))

    def queued_prefill_s(self, rank: int) -> float:
        """Seconds of extend steps *rank* has ahead of a new arrival: the rest of its
        prompts in flight plus each waiting prompt's uncached part, in full chunks.
        Exact knowledge no real router has; only the ``ref:`` references use it."""
        r = self.ranks[rank]
        if not r.alive:
            return math.inf
        tokens = sum(j.left for j, _ in r.batch) or (r.chunked.left if r.chunked else 0)
        for t in self._uncached(r):
            tokens += t
        return tokens / self.budget * self.extend_step_s

    # ------------------------------------------------------------------ the run

    def _event(self, kind: int, ri: int, payload: Any, t: float) -> bool:
        if kind == _STEP_END:
            if payload == self._version:
                self._end_step(t)
        elif kind == REPORT_TAKE:
            self._take_report(self.ranks[ri], t, payload)
        elif kind == REPORT_DELIVER:
            self._router.report(payload)
        elif kind == _KV_DELIVER:
            self._kv_deliver(payload)
        else:
            self._fault_event(kind, self.ranks[ri], t)
        return True

    def _idle(self) -> bool:
        return not self._outstanding and not self._active

    def _begin(self, router: Router) -> float:
        t_begin = super()._begin(router)
        self._notify = getattr(router, "rank_alive", None)
        self._version = 0
        self._active = False
        self._extending = False
        self._t0 = self._tau = 0.0
        self._k = 0
        self._work: list[float] = []
        for f in self.faults:
            self._push(t_begin + f.down_s, _DOWN, f.rank, 0)
            if f.up_s is not None:
                self._push(t_begin + f.up_s, _UP, f.rank, 0)
        # KV events (a profile with them, and a router that reads them: a dpcore chain).
        self._kv_apply = getattr(router, "kv_events", None) if self._profile.kv_events else None
        self._kv_rng = random.Random(self.seed ^ 0x6B76)  # which batches are lost
        self._kv_lost = self._kv_batches = 0
        for r in self.ranks:
            r.kv.events = [] if self._kv_apply is not None else None
        return t_begin

    # ------------------------------------------------------------------ arrivals

    def _arrive(self, i: int, now: float) -> bool:
        if self._queue(i, now) is not None:
            if not self._active:
                self._start_step(now)
            else:
                self._cut_run(now)
        return True

    def _cut_run(self, now: float) -> None:
        """End a run of identical decode steps after the step in flight at *now*."""
        if self._k <= 1:
            return
        done = int((now - self._t0) / self._tau - _EPS) + 1
        if done < self._k:
            self._k = max(done, 1)
            self._version += 1
            self._push(self._t0 + self._k * self._tau, _STEP_END, 0, self._version)

    # ------------------------------------------------------------------ steps

    def _plan_extend(self, r: _Rank, now: float) -> int:
        """Build *r*'s extend batch for a step starting at *now*; its token count."""
        budget = self.budget
        batch = r.batch
        tokens = 0
        job = r.chunked
        if job is not None:
            take = job.left if job.left < budget else budget
            batch.append((job, take))
            tokens = take
            budget -= take
        kv = r.kv
        waiting = r.waiting
        while budget > 0 and waiting:
            job = waiting[0]
            hit = kv.admit(job.hashes, job.n_in, job.n_out)
            if hit < 0:
                break  # first come, first served: the head waits for KV, and so does the queue
            waiting.popleft()
            r.waiting_tokens -= job.n_in
            self._admitted(job, hit, now)
            job.left = job.n_in - hit if job.n_in > hit else 1
            take = job.left if job.left < budget else budget
            batch.append((job, take))
            tokens += take
            budget -= take
            if take < job.left:
                r.chunked = job
        return tokens

    def _start_step(self, now: float) -> None:
        sm = self.config.step
        work = self._work
        work.clear()
        gathered = 0
        extending = False
        live = 0
        for r in self.ranks:
            if not r.alive:
                continue
            live += 1
            e = self._plan_extend(r, now) if (r.waiting or r.chunked is not None) else 0
            if e:
                extending = True
                gathered += e
                work.append(e * sm.extend_s_per_token)
            else:
                d = len(r.decode)
                gathered += d
                work.append(d * sm.decode_s_per_request)
        if not gathered:
            self._active = False
            return
        tau = sm.overhead_s + (sm.graph_loss_s if extending else 0.0) + max(work) + sm.moe_s_per_token * gathered / live
        k = 1
        if not extending:
            # Identical steps until the first completion or the next report by steps.
            k = min(r.decode[0][0] - r.s for r in self.ranks if r.decode)
            rep_steps = self.config.report_steps
            if rep_steps:
                due = min(r.s_rep + rep_steps for r in self.ranks if r.alive) - self._steps
                k = min(k, max(due, 1))
        self._active = True
        self._extending = extending
        self._t0 = now
        self._tau = tau
        self._k = k
        self._version += 1
        self._push(now + k * tau, _STEP_END, 0, self._version)

    def _end_step(self, t: float) -> None:
        k, tau = self._k, self._tau
        self._steps += k
        work = self._work
        top = max(work)
        self._out.busy_s += k * sum(work)
        self._out.waste_s += k * (top * len(work) - sum(work))
        self._out.rank_time_s += k * tau * len(work)
        first_end = self._t0 + tau
        for r in self.ranks:
            if not r.alive:
                continue
            if r.batch:
                self._extended(r, t)
            elif r.decode:
                self._decoded(r, t, k, first_end, tau)
        self._active = False
        rep_steps = self.config.report_steps
        if rep_steps:
            for r in self.ranks:
                if r.alive and self._steps - r.s_rep >= rep_steps:
                    self._take_report(r, t, -1)
        self._start_step(t)

    def _extended(self, r: _Rank, t: float) -> None:
        groups = r.groups
        for job, take in r.batch:
            job.left -= take
            if job.left:
                continue
            if r.chunked is job:
                r.chunked = None
            if self._first_token(r, job, t):
                groups[t] = groups.get(t, 0) + 1
        r.batch.clear()

    def _decoded(self, r: _Rank, t: float, k: int, first_end: float, tau: float) -> None:
        itl = self._out.itl
        b = 0
        for last, count in r.groups.items():
            itl.append((first_end - last, count))
            b += count
        if k > 1:
            itl.append((tau, b * (k - 1)))
        r.s += k
        done = self._finish_decodes(r, t)
        r.groups = {t: b - done} if b > done else {}

    # ------------------------------------------------------------------ reports

    def _take_report(self, r: _Rank, now: float, gen: int) -> None:
        cfg = self.config
        if gen >= 0 and gen != r.rep_gen:
            return  # a timer made stale by a later report: every report restarts the timer
        r.rep_gen += 1
        self._push(now + cfg.report_interval_s, REPORT_TAKE, r.idx, r.rep_gen)
        if not r.alive:
            return
        if self._kv_apply is not None:
            self._take_kv(r, now)
        s_now = r.s
        if self._active and not self._extending and r.decode:
            done = int((now - self._t0) / self._tau + _EPS)
            s_now += done if done < self._k else self._k
        k = len(r.decode)
        kv_used = r.kv.pinned_tokens + k * (s_now + 1) - r.s_sum
        prefilling = len(r.batch) or (1 if r.chunked is not None else 0)
        running = k + prefilling
        waiting = len(r.waiting)
        self._sample(r, now, running + waiting, kv_used + r.waiting_tokens)
        # SGLang publishes a snapshot only when its counts changed or a heartbeat is due
        # (load_publisher.py: publish_load_stat, LOAD_PUBLISH_HEARTBEAT_S = 1 s).
        counts = (running, waiting, kv_used, r.waiting_tokens, r.last_seq, r.epoch)
        if counts == r.last_counts and now - r.last_sent < HEARTBEAT_S:
            return
        r.last_counts = counts
        r.last_sent = now
        prefill_left = sum(j.left for j, _ in r.batch) or (r.chunked.left if r.chunked else 0)
        rep = self._load_report(r, running, waiting, kv_used, prefill_left)
        r.s_rep = self._steps
        self._send(rep, now)

    def _take_kv(self, r: _Rank, now: float) -> None:
        """The rank's cache changes since its last report, as one KV batch that travels with
        the report (and is lost with probability ``kv_event_loss``)."""
        events = r.kv.events
        if r.kv_resync:
            r.kv_resync = False
            events.clear()
            batch = ((CLEARED,), (STORED, None, tuple(r.kv.blocks())))
        elif events:
            batch = tuple(events)
            events.clear()
        else:
            return
        seq = r.kv_seq
        r.kv_seq += 1
        self._kv_batches += 1
        if self._kv_rng.random() < self.config.kv_event_loss:
            self._kv_lost += 1
            return
        # Capacity in blocks: a trace's last block of a prompt may be short, so the only sure
        # bound is one token per block.
        b = KvEventBatch(r.idx, r.epoch, seq, batch, self.config.kv_capacity_tokens)
        self._push(now + self.config.report_delay_s, _KV_DELIVER, r.idx, b)

    def _kv_deliver(self, batch: KvEventBatch) -> None:
        r = self.ranks[batch.rank]
        if batch.epoch != r.epoch:
            return  # from a life that ended: the controller ignores it
        if not self._kv_apply(batch):
            # The index lost track (a gap): the controller asks the rank for a resync, which
            # goes with the rank's next report.
            r.kv_resync = True

    # ------------------------------------------------------------------ faults

    def _fault_event(self, kind: int, r: _Rank, t: float) -> None:
        if kind == _DOWN:
            if r.alive:
                self._down(r, t)
        elif kind == _UP:
            if not r.alive:
                r.alive = True
                r.epoch += 1
                r.rep_seq = 0
                r.kv_seq = 0
                r.kv_resync = False
                r.s_rep = self._steps
        elif self._notify is not None and not r.alive:  # _NOTICE: its reports stopped
            self._notify(r.idx, False)

    def _down(self, r: _Rank, t: float) -> None:
        r.alive = False
        lost = [j for j, _ in r.batch]
        if r.chunked is not None and r.chunked not in lost:
            lost.append(r.chunked)
        lost.extend(r.waiting)
        lost.extend(e[2] for e in r.decode)
        for job in lost:
            self._out.failed += 1
            self._out.fail_reasons["rank_down"] += 1
            self._outstanding -= 1
            self._router.finished(job.req, r.idx)
        r.batch.clear()
        r.chunked = None
        r.waiting.clear()
        r.waiting_tokens = 0
        r.decode.clear()
        r.s_sum = 0
        r.groups = {}
        r.kv.clear()
        self._push(t + self.config.report_interval_s, _NOTICE, r.idx, 0)
        if self._active:
            self._cut_run(t)
