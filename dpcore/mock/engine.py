"""The scheduler of one mock DP-attention rank: what it puts into each lockstep step.

It keeps what makes a DP rank's load interesting to a controller, and is the simulator's
model of a rank (``dpcore simulate --engine lockstep``), run live:

* **KV capacity and prefix cache**: :class:`~dpcore.sim.kvcache.RankKV`, the simulator's own.
  A request is admitted (first come, first served) only when its uncached prompt blocks and
  its whole output fit; cached blocks no running request uses are evicted LRU to make room;
  a request that does not fit waits, and everyone behind it too.
* **Chunked prefill, prefill first.** As SGLang's ``PrefillAdder``
  (``srt/managers/schedule_policy.py``): an extend batch takes the request whose prompt is
  being chunked first, then waiting requests in order, until the per-rank chunk budget is
  spent; the request that does not fit whole is cut at the budget and continues in the next
  step. A rank runs an extend batch whenever it can form one, and decodes otherwise (mixed
  chunks are off, SGLang's default). The last chunk of a prompt yields its first token; a
  prompt found whole in the cache still computes one token.
* **Decode** gives every running request one token per step.

How long a step takes is not decided here: every rank's :class:`~dpcore.mock.lockstep.StepWork`
goes through the lockstep gather, and the step-time model sets the length of the step all
ranks run together. The engine is pure: :meth:`MockEngine.plan` says what the next step
would be, :meth:`MockEngine.apply` makes it happen at the step's end time, so tests drive it
without any clock.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from attrs import define, field, frozen

from dpcore.mock.lockstep import IDLE, StepWork
from dpcore.sim.config import EngineConfig, _non_negative, _positive
from dpcore.sim.kvcache import RankKV
from dpcore.sim.stepmodel import StepModel


# One source for the pinned engine numbers (docs/reference/engine-model.md): the simulator's.
_SIM = EngineConfig()


def _positive_int(_inst: object, attr: object, value: int) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{attr.name} must be an integer >= 1, got {value!r}")  # type: ignore[attr-defined]


@frozen
class EngineParams:
    """Per-rank scheduler numbers.

    :ivar kv_capacity: KV cache tokens of the rank (1 and up).
    :ivar block_size: Tokens per block hash; must match the sender's (the client SDK
        hashes 64-token blocks by default, Mooncake trace ``hash_ids`` are 512-token blocks).
    :ivar default_output_tokens: Output length when a request gives no ``max_new_tokens``.
    :ivar report_every_steps: Decode steps between load reports at most (1 and up).
    :ivar report_interval_s: Model seconds between load reports at most, while busy.
    """

    kv_capacity: int = field(default=_SIM.kv_capacity_tokens, validator=_positive_int)
    block_size: int = field(default=64, validator=_positive_int)
    default_output_tokens: int = field(default=128, validator=_non_negative)
    report_every_steps: int = field(default=_SIM.report_steps or 15, validator=_positive_int)
    report_interval_s: float = field(default=_SIM.report_interval_s, validator=_positive)


@define(eq=False)
class Job:
    """One request inside the engine. ``tag`` is the caller's handle (the SDK's work item)."""

    tag: Any
    rid: str
    num_tokens: int
    blocks: tuple[int, ...]
    output_tokens: int
    arrived: float
    #: Prompt tokens found in the prefix cache at admission.
    cached_tokens: int = 0
    #: Prompt tokens still to compute once admitted (the uncached part, at least 1).
    left: int = 0
    generated: int = 0
    #: Tokens reported to the caller so far (see :attr:`Step.progress`).
    emitted: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    #: Error text when the engine refused the job (it can never fit).
    error: str = ""

    @property
    def remaining(self) -> int:
        return self.output_tokens - self.generated


@frozen
class Step:
    """What one :meth:`MockEngine.apply` call produced.

    :ivar progress: Jobs that gained output tokens (each appears once), in order.
    :ivar finished: Jobs that ended (done or refused); also listed in ``progress``.
    """

    progress: tuple[Job, ...] = ()
    finished: tuple[Job, ...] = ()


class MockEngine:
    """The scheduler of one mock rank: :meth:`add` requests, :meth:`plan` the next step,
    :meth:`apply` the steps the lockstep ran.

    :param chunk_tokens: Prompt tokens this rank extends per step: SGLang's
        ``--chunked-prefill-size`` divided by the DP size (the lockstep announces it).
    """

    def __init__(self, params: EngineParams | None = None, chunk_tokens: int | None = None) -> None:
        self.params = params or EngineParams()
        self.chunk_tokens = chunk_tokens or StepModel().chunk_budget(1)
        self.kv = RankKV(self.params.kv_capacity, self.params.block_size)
        self.waiting: deque[Job] = deque()
        #: Admitted requests whose prompt is not fully computed, in batch order.
        self.prefilling: list[Job] = []
        self.decoding: list[Job] = []
        #: The extend batch formed for the next step: (job, tokens), until applied.
        self._batch: list[tuple[Job, int]] | None = None
        self._waiting_tokens = 0
        self.decode_steps = 0
        self.extend_steps = 0

    # ------------------------------------------------------------------ load

    @property
    def kv_used(self) -> int:
        """KV tokens held by admitted requests: their prompts and the tokens generated so
        far (evictable cached blocks not counted), as the simulator reports it."""
        return self.kv.pinned_tokens + sum(j.generated for j in self.decoding)

    @property
    def num_running(self) -> int:
        return len(self.decoding) + len(self.prefilling)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_tokens(self) -> int:
        """KV in use plus the prompts of waiting requests (what ``total_tokens`` balances)."""
        return self.kv_used + self._waiting_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens admitted and not yet computed (the prefill in progress)."""
        return sum(j.left for j in self.prefilling)

    @property
    def batch_arrived(self) -> float:
        """When the newest request of the formed extend batch arrived (0 without a batch)."""
        return max((j.arrived for j, _ in self._batch), default=0.0) if self._batch else 0.0

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding)

    # ------------------------------------------------------------------ input

    def add(self, job: Job) -> tuple[Job, ...]:
        """Queue *job*. A job that could never fit in KV ends at once with an error, and
        is returned (the caller answers it); otherwise ``()``."""
        cap = self.params.kv_capacity
        if job.output_tokens < 0 or job.num_tokens < 0:
            job.error = "negative token count"
        elif job.num_tokens + job.output_tokens > cap:
            need = job.num_tokens + job.output_tokens
            job.error = f"request needs {need} KV tokens, more than this rank's capacity {cap}"
        if job.error:
            job.finished_at = job.arrived
            return (job,)
        self.waiting.append(job)
        self._waiting_tokens += job.num_tokens
        return ()

    def abort(self, job: Job, now: float) -> bool:
        """Stop *job* (its caller went away): a waiting or decoding job leaves at once and
        frees its KV; one whose prompt is being computed ends when that prefill does (its KV
        was reserved for the batch). ``False`` if it had already ended."""
        if job.finished_at is not None:
            return False
        if job in self.waiting:
            self.waiting.remove(job)
            self._waiting_tokens -= job.num_tokens
            job.finished_at = now
        elif job in self.decoding:
            self.decoding.remove(job)
            self._end(job, now, [])
        return True

    # ------------------------------------------------------------------ steps

    def plan(self, at: float = math.inf, wake_at: float = math.inf) -> StepWork:
        """This rank's part of a step starting at model time *at*: requests that arrive
        later wait for a later step (the run ends at the first one's arrival). An extend
        batch, once formed, holds its requests until :meth:`apply` runs it (a plan the
        gather may still use)."""
        if self._batch is None:
            self._batch = self._form_batch(at) or None
        if self.waiting and self.waiting[-1].arrived > at:
            wake_at = min(wake_at, next(j.arrived for j in self.waiting if j.arrived > at))
        if self._batch:
            tokens = sum(n for _, n in self._batch)
            return StepWork(tokens, extend=True, max_steps=1, wake_at=wake_at)
        if self.decoding:
            steps = min(min(j.remaining for j in self.decoding), self.params.report_every_steps)
            return StepWork(len(self.decoding), extend=False, max_steps=steps, wake_at=wake_at)
        return IDLE

    def apply(self, work: StepWork, steps: int, end: float) -> Step:
        """Run *steps* steps of *work* (a plan this engine made), ending at model time *end*."""
        progress: dict[int, Job] = {}
        finished: list[Job] = []
        if work.extend:
            self._extend(end, progress, finished)
        elif work.busy:
            self._decode(steps, end, progress, finished)
        return Step(tuple(progress.values()), tuple(finished))

    def _extend(self, end: float, progress: dict[int, Job], finished: list[Job]) -> None:
        assert self._batch is not None  # an extend plan is made only with a batch
        batch, self._batch = self._batch, None
        self.extend_steps += 1
        for job, n in batch:
            job.left -= n
            if job.left:
                continue  # chunked: continues first in the next extend batch
            self.prefilling.remove(job)
            job.first_token_at = end
            job.generated = min(1, job.output_tokens)
            progress[id(job)] = job
            if job.remaining <= 0:
                self._end(job, end, finished)
            else:
                self.decoding.append(job)

    def _decode(self, steps: int, end: float, progress: dict[int, Job], finished: list[Job]) -> None:
        self.decode_steps += steps
        still = []
        for job in self.decoding:
            job.generated += steps
            progress[id(job)] = job
            if job.remaining <= 0:
                self._end(job, end, finished)
            else:
                still.append(job)
        self.decoding = still

    def _end(self, job: Job, at: float, finished: list[Job]) -> None:
        job.finished_at = at
        self.kv.release(job.blocks, job.num_tokens, job.output_tokens)
        finished.append(job)

    def _form_batch(self, at: float) -> list[tuple[Job, int]]:
        """The chunked prompt first, then jobs waiting since *at* or earlier (first come,
        first served) while KV and the chunk budget allow."""
        budget = self.chunk_tokens
        batch: list[tuple[Job, int]] = []
        for job in self.prefilling:  # admitted earlier, chunked: continue it
            n = min(job.left, budget)
            batch.append((job, n))
            budget -= n
        waiting = self.waiting
        while budget > 0 and waiting and waiting[0].arrived <= at:
            job = waiting[0]
            hit = self.kv.admit(job.blocks, job.num_tokens, job.output_tokens)
            if hit < 0:
                break  # the head of the queue does not fit yet: it waits, and so does the queue
            waiting.popleft()
            self._waiting_tokens -= job.num_tokens
            job.cached_tokens = hit
            job.left = max(job.num_tokens - hit, 1)
            self.prefilling.append(job)
            n = min(job.left, budget)
            batch.append((job, n))
            budget -= n
        return batch
