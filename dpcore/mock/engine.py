"""The model of one engine rank behind ``dpcore mock-worker``: a scheduler on a clock.

It keeps what makes a DP rank's load interesting to a controller, and nothing else:

* **KV capacity.** A request is admitted (FIFO) only when its KV fits: its uncached prompt
  blocks, the partial tail, and its whole output (reserved up front, so nothing is ever
  retracted). Cached blocks share the same capacity and are evicted, least recently used
  first, when no running request holds them. A request that does not fit waits.
* **Prefix cache.** An LRU table over the request's block hashes; a request's cached tokens
  are its leading blocks found in the table. Blocks enter the table when their prefill ends.
* **Prefill** takes ``uncached tokens / prefill_tokens_per_s``, before any decoding (SGLang's
  default priority); one request at a time by default, or batches of up to
  ``max_prefill_tokens`` uncached tokens. The prefill produces the first output token.
* **Decode** steps take ``decode_step_s + decode_step_per_req_s × running`` and give every
  running request one token. Consecutive steps run as one *macro step* (up to the next
  finish, and at most ``report_every_steps`` steps or ``report_interval_s``), so the process
  wakes once per macro step instead of once per token; when new work arrives, the macro
  step ends after the step in progress, as a real scheduler takes new requests per step.

The model is pure: every method takes the current time (model seconds), so tests drive it
with a fake clock. :mod:`dpcore.mock.worker` runs it against wall time × speed-up.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from attrs import define, field, frozen

from dpcore.cacheindex import REMOVED, STORED
from dpcore.sim.config import EngineConfig, _non_negative, _positive


# One source for the pinned engine numbers (docs/reference/engine-model.md): the simulator's.
_SIM = EngineConfig()


@frozen
class EngineParams:
    """Per-rank engine numbers; the defaults are the simulator's pinned numbers.

    :ivar block_size: Tokens per block hash; must match the sender's (the client SDK
        hashes 64-token blocks by default, Mooncake trace ``hash_ids`` are 512-token blocks).
    :ivar max_prefill_tokens: Uncached tokens per prefill batch. A batch always takes at least
        one request, so the default 1 prefills one request at a time, as the simulator does.
    :ivar default_output_tokens: Output length when a request gives no ``max_new_tokens``.
    """

    prefill_tokens_per_s: float = field(default=_SIM.prefill_tokens_per_s, validator=_positive)
    decode_step_s: float = field(default=_SIM.decode_step_s, validator=_positive)
    decode_step_per_req_s: float = field(default=_SIM.decode_step_per_request_s, validator=_non_negative)
    kv_capacity: int = field(default=_SIM.kv_capacity_tokens, validator=_positive)
    block_size: int = field(default=64, validator=_positive)
    max_prefill_tokens: int = field(default=1, validator=_positive)
    default_output_tokens: int = field(default=128, validator=_non_negative)
    report_every_steps: int = field(default=_SIM.report_steps or 15, validator=_positive)
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
    #: Error text when the engine refused the job (it can never fit).
    error: str = ""

    @property
    def remaining(self) -> int:
        return self.output_tokens - self.generated


@frozen
class Step:
    """What one :meth:`MockEngine.advance` call produced.

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
    """The scheduler of one mock rank. Drive it with :meth:`add`, :meth:`interrupt` and
    :meth:`advance`; sleep until :attr:`busy_until` in between."""

    def __init__(self, params: EngineParams | None = None) -> None:
        self.params = params or EngineParams()
        self.cache = PrefixCache()
        self.waiting: deque[Job] = deque()
        self.decoding: list[Job] = []
        #: The iteration in progress: ``("prefill", jobs)`` or ``("decode", steps)``.
        self._phase: tuple[str, Any] | None = None
        self._phase_start = 0.0
        self._step_s = 0.0
        #: Model time the iteration in progress ends; ``None`` when idle.
        self.busy_until: float | None = None
        self._private_kv = 0
        self._waiting_tokens = 0
        self.decode_steps = 0
        self.prefill_batches = 0

    # ------------------------------------------------------------------ load

    @property
    def kv_used(self) -> int:
        """KV tokens held by admitted requests (evictable cached blocks not counted)."""
        return self._private_kv + self.cache.pinned * self.params.block_size

    @property
    def num_running(self) -> int:
        prefilling = len(self._phase[1]) if self._phase and self._phase[0] == "prefill" else 0
        return len(self.decoding) + prefilling

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_tokens(self) -> int:
        """KV in use plus the prompts of waiting requests (what ``total_tokens`` balances)."""
        return self.kv_used + self._waiting_tokens

    def prefill_tokens(self, now: float) -> int:
        """Uncached prompt tokens still to compute in the prefill in progress (0 if none)."""
        if self._phase is None or self._phase[0] != "prefill" or self.busy_until is None:
            return 0
        return max(0, round((self.busy_until - now) * self.params.prefill_tokens_per_s))

    @property
    def idle(self) -> bool:
        return self.busy_until is None and not self.waiting

    # ------------------------------------------------------------------ input

    def add(self, job: Job) -> Step:
        """Queue *job*. A job that could never fit in KV ends at once with an error."""
        p = self.params
        if job.output_tokens < 0 or job.num_tokens < 0:
            job.error = "negative token count"
        elif (need := self._kv_need(job, 0)) > p.kv_capacity:
            job.error = f"request needs {need} KV tokens, more than this rank's capacity {p.kv_capacity}"
        if job.error:
            job.finished_at = job.arrived
            return Step((job,), (job,))
        self.waiting.append(job)
        self._waiting_tokens += job.num_tokens
        return Step()

    def interrupt(self, now: float) -> None:
        """New work arrived: end the decode macro step after the step in progress."""
        if self._phase is None or self._phase[0] != "decode" or self.busy_until is None:
            return
        steps = self._phase[1]
        done = min(steps, math.floor((now - self._phase_start) / self._step_s) + 1)
        if done < steps:
            self._phase = ("decode", done)
            self.busy_until = self._phase_start + done * self._step_s

    # ------------------------------------------------------------------ time

    def advance(self, now: float) -> Step:
        """Finish every iteration due by *now*, start the next one, and say what happened."""
        progress: dict[int, Job] = {}
        finished: list[Job] = []
        while self.busy_until is not None and self.busy_until <= now:
            end = self.busy_until
            self._finish_phase(end, progress, finished)
            self._plan(end)
        if self.busy_until is None:
            self._plan(now)
        return Step(tuple(progress.values()), tuple(finished))

    def _finish_phase(self, end: float, progress: dict[int, Job], finished: list[Job]) -> None:
        assert self._phase is not None  # busy_until is set only together with a phase
        kind, what = self._phase
        self._phase = None
        self.busy_until = None
        if kind == "prefill":
            self.prefill_batches += 1
            bs = self.params.block_size
            for job in what:
                # The prompt's new blocks enter the shared table; their KV moves there.
                new = [b for b in job.blocks[job.matched_blocks :] if self.cache.pin(b)]
                events = self.cache.events
                if events is not None and new:
                    m = job.matched_blocks
                    events.append((STORED, job.blocks[m - 1] if m else None, tuple(new)))
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
            return
        steps = what
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

    def _plan(self, start: float) -> None:
        batch = self._admit(start)
        p = self.params
        if batch:
            uncached = sum(j.num_tokens - j.cached_tokens for j in batch)
            self._phase = ("prefill", batch)
            self._phase_start = start
            self.busy_until = start + uncached / p.prefill_tokens_per_s
            return
        if self.decoding:
            step = p.decode_step_s + p.decode_step_per_req_s * len(self.decoding)
            steps = min(
                min(j.remaining for j in self.decoding),
                p.report_every_steps,
                max(1, int(p.report_interval_s / step)),
            )
            self._phase = ("decode", steps)
            self._phase_start = start
            self._step_s = step
            self.busy_until = start + steps * step

    def _kv_need(self, job: Job, matched: int) -> int:
        bs = self.params.block_size
        tail = max(0, job.num_tokens - len(job.blocks) * bs)
        return (len(job.blocks) - matched) * bs + tail + job.output_tokens

    def _admit(self, start: float) -> list[Job]:
        """Move waiting jobs (FIFO) into a prefill batch while KV and the batch budget allow."""
        p = self.params
        bs = p.block_size
        cache = self.cache
        batch: list[Job] = []
        budget = p.max_prefill_tokens
        while self.waiting:
            job = self.waiting[0]
            if job.arrived > start:
                break
            matched = cache.match(job.blocks)
            # At least one prompt token is always computed (it yields the first output token).
            cached = min(matched * bs, max(job.num_tokens - 1, 0))
            uncached = job.num_tokens - cached
            if batch and uncached > budget:
                break
            need = self._kv_need(job, matched)
            # Hold the matched blocks first, so making room cannot evict them.
            for b in job.blocks[:matched]:
                cache.pin(b)
            while self._private_kv + len(cache) * bs + need > p.kv_capacity:
                if not cache.evict_one():
                    for b in job.blocks[:matched]:
                        cache.unpin(b)
                    return batch  # the head of the queue does not fit yet: it waits (FIFO)
            self.waiting.popleft()
            self._waiting_tokens -= job.num_tokens
            job.matched_blocks = matched
            job.cached_tokens = cached
            job.private_kv = need
            self._private_kv += need
            budget -= uncached
            batch.append(job)
        return batch
