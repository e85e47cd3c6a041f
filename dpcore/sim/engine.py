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

The controller side is a router (:mod:`dpcore.sim.routing`); what both engines share is
:mod:`dpcore.sim.replay`.
"""

from __future__ import annotations

import math
from typing import Any

from dpcore.errors import ConfigError
from dpcore.sim.kvcache import RankKV
from dpcore.sim.replay import OWN_KINDS, REPORT_DELIVER, REPORT_TAKE, Job, RankState, Replay

# Event kinds (small ints: compared in the hot loop).
_PREFILL_DONE, _DECODE_DONE = range(OWN_KINDS, OWN_KINDS + 2)
_IDLE, _PREFILL, _DECODE = range(3)
_EPS = 1e-9


class _Rank(RankState):
    __slots__ = ("state", "cur", "version", "run_start", "tau", "run_steps", "prefill_end")

    def __init__(self, idx: int, kv: RankKV) -> None:
        super().__init__(idx, kv)
        self.state = _IDLE
        self.cur: Job | None = None  # the request in prefill
        self.prefill_end = 0.0
        self.version = 0  # bumped when an iteration is rescheduled: older ends are stale
        self.run_start = 0.0  # a run of decode steps: its start, step time and length
        self.tau = 0.0
        self.run_steps = 0


class Simulation(Replay):
    """One replay of *trace* through ``dp_size`` independent ranks; call :meth:`run` once
    (arguments: :class:`~dpcore.sim.replay.Replay`)."""

    rank_class = _Rank

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.config.prefill_tokens_per_s

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
        left = r.prefill_end - self.now if r.state == _PREFILL and r.prefill_end > self.now else 0.0
        for tokens in self._uncached(r):
            left += tokens / rate
        return left

    # ------------------------------------------------------------------ the loop

    def _configure(self) -> None:
        if self.faults:
            raise ConfigError("rank faults (--faults) need the lockstep engine")

    def _event(self, kind: int, ri: int, payload: Any, now: float) -> bool:
        r = self.ranks[ri]
        if kind == REPORT_TAKE:
            return self._take_report(r, now, payload)
        if kind == REPORT_DELIVER:
            self._router.report(payload)
        elif payload != r.version:
            return False  # an iteration end that was rescheduled
        elif kind == _PREFILL_DONE:
            job = r.cur
            r.cur = None
            self._first_token(r, job, now)
            self._start_next(r, now)
        else:  # _DECODE_DONE
            r.s += r.run_steps
            self._finish_decodes(r, now)
            self._start_next(r, now)
        return True

    def _arrive(self, i: int, now: float) -> bool:
        r = self._queue(i, now)
        if r is not None:
            self._wake(r, now)
        return False  # the end is noticed at the next event

    def _wake(self, r: _Rank, now: float) -> None:
        """A request joined *r*'s queue at *now*."""
        if r.state == _IDLE:
            self._start_next(r, now)
        elif r.state == _DECODE and len(r.waiting) == 1:
            # The next iteration (after the step in flight) will prefill it.
            done = math.ceil((now - r.run_start) / r.tau - _EPS)
            if done < r.run_steps:
                r.run_steps = max(done, 0)
                r.version += 1
                self._push(r.run_start + r.run_steps * r.tau, _DECODE_DONE, r.idx, r.version)

    def _start_next(self, r: _Rank, now: float) -> None:
        """*r*'s next iteration: prefill the head of the queue if it fits, else a run of
        decode steps up to the next completion, else idle."""
        cfg = self.config
        if r.waiting:
            job = r.waiting[0]
            hit = r.kv.admit(job.hashes, job.n_in, job.n_out)
            if hit >= 0:
                n_in = job.n_in
                r.waiting.popleft()
                r.waiting_tokens -= n_in
                self._admitted(job, hit, now)
                r.state = _PREFILL
                r.cur = job
                r.version += 1
                compute = n_in - hit if n_in > hit else 1
                r.prefill_end = now + compute / cfg.prefill_tokens_per_s
                self._push(r.prefill_end, _PREFILL_DONE, r.idx, r.version)
                return
        if r.decode:
            tau = cfg.decode_step_s + cfg.decode_step_per_request_s * len(r.decode)
            steps = r.decode[0][0] - r.s
            r.state = _DECODE
            r.run_start = now
            r.tau = tau
            r.run_steps = steps
            r.version += 1
            self._push(now + steps * tau, _DECODE_DONE, r.idx, r.version)
            rep_steps = cfg.report_steps
            if rep_steps:
                need = r.s_rep + rep_steps - r.s
                if need <= steps:
                    self._push(now + max(need, 0) * tau, REPORT_TAKE, r.idx, -1)
            return
        r.state = _IDLE

    def _steps_now(self, r: _Rank, now: float) -> int:
        if r.state != _DECODE:
            return r.s
        done = int((now - r.run_start) / r.tau + _EPS)
        return r.s + (done if done < r.run_steps else r.run_steps)

    def _take_report(self, r: _Rank, now: float, gen: int) -> bool:
        """A report timer (*gen* >= 0) or a report-by-steps trigger (-1) fired; returns
        ``False`` when it was stale."""
        cfg = self.config
        rep_steps = cfg.report_steps
        if gen >= 0:
            if gen != r.rep_gen:
                return False
        elif self._steps_now(r, now) - r.s_rep < rep_steps:
            return False  # a step trigger made stale by an earlier report
        s_now = self._steps_now(r, now)
        k = len(r.decode)
        kv_used = r.kv.pinned_tokens + k * (s_now + 1) - r.s_sum
        prefilling = r.state == _PREFILL
        running = k + (1 if prefilling else 0)
        waiting = len(r.waiting)
        prefill_left = round((r.prefill_end - now) * cfg.prefill_tokens_per_s) if prefilling else 0
        rep = self._load_report(r, running, waiting, kv_used, prefill_left)
        r.rep_gen += 1
        r.s_rep = s_now
        self._sample(r, now, running + waiting, kv_used + r.waiting_tokens)
        self._push(now + cfg.report_interval_s, REPORT_TAKE, r.idx, r.rep_gen)
        if rep_steps and r.state == _DECODE and s_now + rep_steps <= r.s + r.run_steps:
            self._push(r.run_start + (s_now + rep_steps - r.s) * r.tau, REPORT_TAKE, r.idx, -1)
        self._send(rep, now)
        return True
