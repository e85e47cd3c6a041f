"""The scheduler of one mock DP-attention rank: what it puts into each lockstep step.

It keeps what makes a DP rank's load interesting to a controller, and nothing else:

* **KV capacity.** A request is admitted (FIFO) only when its KV fits: its uncached prompt
  blocks, the partial tail, and its whole output (reserved up front, so nothing is ever
  retracted). Cached blocks share the same capacity and are evicted, least recently used
  first, when no running request holds them. A request that does not fit waits.
* **Prefix cache.** An LRU table over the request's block hashes; a request's cached tokens
  are its leading blocks found in the table. Blocks enter the table when its prefill ends.
* **Chunked prefill, prefill first.** As SGLang's ``PrefillAdder``
  (``srt/managers/schedule_policy.py``): an extend batch takes the request whose prompt is
  being chunked first, then waiting requests in order, until the per-rank chunk budget is
  spent; the request that does not fit whole is cut at the budget and continues in the next
  step. A rank runs an extend batch whenever it can form one, and decodes otherwise (mixed
  chunks are off, SGLang's default). The last chunk of a prompt yields its first token.
* **Decode** gives every running request one token per step.

How long a step takes is not decided here: every rank's :class:`~dpcore.mock.lockstep.StepWork`
goes through the lockstep gather, and the step-time model sets the length of the step all
ranks run together. The engine is pure: :meth:`MockEngine.plan` says what the next step
would be, :meth:`MockEngine.apply` makes it happen at the step's end time, so tests drive it
without any clock.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from attrs import define, field, frozen

from dpcore.mock.lockstep import IDLE, StepWork
from dpcore.sim.config import EngineConfig, _non_negative, _positive
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
    cached_tokens: int = 0
    generated: int = 0
    #: Tokens reported to the caller so far (see :attr:`Step.progress`).
    emitted: int = 0
    first_token_at: float | None = None
    finished_at: float | None = None
    #: KV reserved for this job outside the shared block table.
    private_kv: int = 0
    #: Leading blocks found cached at admission.
    matched_blocks: int = 0
    #: Uncached prompt tokens already computed by extend steps.
    extended: int = 0
    #: Error text when the engine refused the job (it can never fit).
    error: str = ""

    @property
    def remaining(self) -> int:
        return self.output_tokens - self.generated

    @property
    def to_extend(self) -> int:
        """Prompt tokens still to compute (valid once admitted)."""
        return self.num_tokens - self.cached_tokens - self.extended


@frozen
class Step:
    """What one :meth:`MockEngine.apply` call produced.

    :ivar progress: Jobs that gained output tokens (each appears once), in order.
    :ivar finished: Jobs that ended (done or refused); also listed in ``progress``.
    """

    progress: tuple[Job, ...] = ()
    finished: tuple[Job, ...] = ()


class PrefixCache:
    """LRU table of cached block hashes with a pin count per block.

    A pinned block (held by a running request) is never evicted; an unpinned one stays
    cached until capacity is needed.
    """

    def __init__(self) -> None:
        self._refs: OrderedDict[int, int] = OrderedDict()
        self.pinned = 0
        #: When a list: every change, as KV events (``dpcore.cacheindex`` kinds), for a rank
        #: that publishes them; its owner empties it.
        self.events: list[tuple] | None = None

    def __len__(self) -> int:
        return len(self._refs)

    def __contains__(self, block: int) -> bool:
        return block in self._refs

    def match(self, blocks: Sequence[int]) -> int:
        """How many leading *blocks* are cached."""
        n = 0
        refs = self._refs
        for b in blocks:
            if b not in refs:
                break
            n += 1
        return n

    def pin(self, block: int) -> bool:
        """Hold *block* (inserting it if new, as most recently used); ``True`` if it was new."""
        refs = self._refs
        count = refs.get(block)
        if count is None:
            refs[block] = 1
            self.pinned += 1
            return True
        refs[block] = count + 1
        refs.move_to_end(block)
        if count == 0:
            self.pinned += 1
        return False

    def unpin(self, block: int) -> None:
        refs = self._refs
        count = refs[block] - 1
        refs[block] = count
        refs.move_to_end(block)  # just used: the last to be evicted
        if count == 0:
            self.pinned -= 1

    def evict_one(self) -> bool:
        """Drop the least recently used unpinned block; ``False`` when every block is pinned."""
        for block, count in self._refs.items():
            if count == 0:
                del self._refs[block]
                if self.events is not None:
                    self.events.append((REMOVED, (block,)))
                return True
        return False

    def chains(self) -> list[tuple[int | None, tuple[int, ...]]]:
        """Every cached block, as one-block chains from the root (a KV resync)."""
        return [(None, (b,)) for b in self._refs]


class MockEngine:
    """The scheduler of one mock rank: :meth:`add` requests, :meth:`plan` the next step,
    :meth:`apply` the steps the lockstep ran.

    :param chunk_tokens: Prompt tokens this rank extends per step: SGLang's
        ``--chunked-prefill-size`` divided by the DP size (the lockstep announces it).
    """

    def __init__(self, params: EngineParams | None = None, chunk_tokens: int | None = None) -> None:
        self.params = params or EngineParams()
        self.chunk_tokens = chunk_tokens or StepModel().chunk_budget(1)
        self.cache = PrefixCache()
        self.waiting: deque[Job] = deque()
        #: Admitted requests whose prompt is not fully computed, in batch order.
        self.prefilling: list[Job] = []
        self.decoding: list[Job] = []
        #: The extend batch formed for the next step: (job, tokens), until applied.
        self._batch: list[tuple[Job, int]] | None = None
        self._private_kv = 0
        self._waiting_tokens = 0
        self.decode_steps = 0
        self.extend_steps = 0

    # ------------------------------------------------------------------ load

    @property
    def kv_used(self) -> int:
        """KV tokens held by admitted requests (evictable cached blocks not counted)."""
        return self._private_kv + self.cache.pinned * self.params.block_size

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
        return sum(j.to_extend for j in self.prefilling)

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
        p = self.params
        if job.output_tokens < 0 or job.num_tokens < 0:
            job.error = "negative token count"
        elif (need := self._kv_need(job, 0)) > p.kv_capacity:
            job.error = f"request needs {need} KV tokens, more than this rank's capacity {p.kv_capacity}"
        if job.error:
            job.finished_at = job.arrived
            return (job,)
        self.waiting.append(job)
        self._waiting_tokens += job.num_tokens
        return ()

    # ------------------------------------------------------------------ steps

    def plan(self, wake_at: float = float("inf")) -> StepWork:
        """This rank's part of the next step. An extend batch, once formed, holds its
        requests until :meth:`apply` runs it (a plan the gather may still use)."""
        if self._batch is None:
            batch = self._form_batch()
            self._batch = batch or None
        if self._batch:
            # A prompt fully cached still computes one token (its first output token).
            tokens = max(1, sum(n for _, n in self._batch))
            return StepWork(tokens, extend=True, max_steps=1, wake_at=wake_at)
        if self.decoding:
            k = len(self.decoding)
            steps = min(min(j.remaining for j in self.decoding), self.params.report_every_steps)
            return StepWork(k, extend=False, max_steps=steps, wake_at=wake_at)
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
        bs = self.params.block_size
        for job, n in batch:
            job.extended += n
            if job.to_extend > 0:
                continue  # chunked: continues in the next extend batch
            self.prefilling.remove(job)
            # The prompt's new blocks enter the shared table; their KV moves there.
            for b in job.blocks[job.matched_blocks :]:
                self.cache.pin(b)
            moved = (len(job.blocks) - job.matched_blocks) * bs
            job.private_kv -= moved
            self._private_kv -= moved
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
        for b in job.blocks:
            self.cache.unpin(b)
        self._private_kv -= job.private_kv
        job.private_kv = 0
        finished.append(job)

    def _kv_need(self, job: Job, matched: int) -> int:
        bs = self.params.block_size
        tail = max(0, job.num_tokens - len(job.blocks) * bs)
        return (len(job.blocks) - matched) * bs + tail + job.output_tokens

    def _form_batch(self) -> list[tuple[Job, int]]:
        """The chunked prompt first, then waiting jobs (FIFO) while KV and the budget allow."""
        budget = self.chunk_tokens
        batch: list[tuple[Job, int]] = []
        for job in self.prefilling:  # admitted earlier, chunked: continue it
            n = min(job.to_extend, budget)
            batch.append((job, n))
            budget -= n
        while budget > 0 and self.waiting and self._admit(self.waiting[0]):
            job = self.waiting.popleft()
            self._waiting_tokens -= job.num_tokens
            self.prefilling.append(job)
            n = min(job.to_extend, budget)
            batch.append((job, n))
            budget -= n
        return batch

    def _admit(self, job: Job) -> bool:
        """Reserve *job*'s KV (evicting unused cached blocks); ``False`` if it does not fit yet."""
        p = self.params
        bs = p.block_size
        cache = self.cache
        matched = cache.match(job.blocks)
        need = self._kv_need(job, matched)
        # Hold the matched blocks first, so making room cannot evict them.
        for b in job.blocks[:matched]:
            cache.pin(b)
        while self._private_kv + len(cache) * bs + need > p.kv_capacity:
            if not cache.evict_one():
                for b in job.blocks[:matched]:
                    cache.unpin(b)
                return False  # the head of the queue does not fit yet: it waits (FIFO)
        job.matched_blocks = matched
        # At least one prompt token is always computed (it yields the first output token).
        job.cached_tokens = min(matched * bs, max(job.num_tokens - 1, 0))
        job.private_kv = need
        self._private_kv += need
        return True
