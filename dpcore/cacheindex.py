"""What each rank's prefix cache holds, exactly, from the KV events the ranks publish.

A rank that publishes KV events (:mod:`dpcore.wire` ``kv`` messages, sent with
:meth:`dpcore.sdk.Worker.kv_events`, or translated from SGLang's own publisher by the SGLang
adapter) tells the controller every block it stores, every block it evicts, and when it
clears its cache. :class:`CacheIndex` replays those events per rank; policies read it
through ``ctx.cache`` (a :class:`CacheView`) and never write it.

Each rank is in one of two states:

* **exact**: the index holds exactly the blocks the rank said it holds, every batch of its
  current life applied in order. ``match`` answers how many leading blocks of a prompt are
  cached there, 0 included ("empty and trusted").
* **unknown**: the rank never published, a batch of its sequence went missing, it restarted
  mid-stream, it went inactive, or it claimed more blocks than its capacity. ``match``
  answers ``None``; a policy falls back to its own estimate. A rank becomes exact again when
  a new life starts at sequence 0, or when it sends a resync batch (one that begins by
  clearing everything, then stores what it holds).

Block keys are dpcore's chained block hashes (:mod:`dpcore.hashing`): a key names a whole
prefix, so a prompt's cached depth on a rank is the number of its leading keys the rank
holds. Memory is bounded: a rank's blocks never exceed the capacity it reported (or
``max_blocks_per_rank``); a rank that claims more is reset to unknown, not trimmed.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate, repeat
from operator import and_, attrgetter, neg

from attrs import frozen

__all__ = ["CLEARED", "EXACT", "REMOVED", "STORED", "UNKNOWN", "CacheIndex", "CacheView", "KvEventBatch"]

EXACT = "exact"
UNKNOWN = "unknown"

#: Event kinds inside a batch: ``(STORED, parent, keys)``, ``(REMOVED, keys)``, ``(CLEARED,)``.
STORED = 0
REMOVED = 1
CLEARED = 2

#: Blocks per rank when the rank did not say its capacity (about 64 GiB of KV at 64-token
#: blocks of a small model; a bound on memory, not a guess at the engine).
DEFAULT_MAX_BLOCKS_PER_RANK = 1 << 22


@frozen
class KvEventBatch:
    """One batch of KV events from one rank, in the order the rank's cache changed.

    :ivar rank: The publishing rank.
    :ivar epoch: The rank's life (the same epoch its load reports carry).
    :ivar seq: Batch sequence number in this life: 0, 1, 2... with no gaps.
    :ivar events: ``(STORED, parent, keys)``: *keys* stored as a chain, the first one extending
        *parent* (``None``: from the root); ``(REMOVED, keys)``: evicted; ``(CLEARED,)``: all gone.
    :ivar capacity: Blocks the rank's cache can hold (``0``: not said).
    """

    rank: int
    epoch: int
    seq: int
    events: tuple[tuple, ...]
    capacity: int = 0

    @property
    def resync(self) -> bool:
        """Whether the batch starts by clearing everything: applied in full, it is exact."""
        return bool(self.events) and self.events[0][0] == CLEARED


class CacheIndex:
    """Per-rank exact cache contents, kept from KV event batches (the controller's side).

    :param dp_size: Number of ranks.
    :param max_blocks_per_rank: Bound on a rank's blocks when it did not report a capacity.
    """

    __slots__ = (
        "dp_size",
        "max_blocks_per_rank",
        "_holders",
        "_blocks",
        "_known",
        "_epoch",
        "_next_seq",
        "_capacity",
        "view",
        "batches",
        "gaps",
        "stale",
        "overflows",
        "orphans",
        "unknown_removals",
    )

    def __init__(self, dp_size: int, *, max_blocks_per_rank: int = DEFAULT_MAX_BLOCKS_PER_RANK) -> None:
        if type(dp_size) is not int or dp_size < 1:
            msg = f"dp_size must be a positive integer, got {dp_size!r}"
            raise ValueError(msg)
        if type(max_blocks_per_rank) is not int or max_blocks_per_rank < 1:
            msg = f"max_blocks_per_rank must be a positive integer, got {max_blocks_per_rank!r}"
            raise ValueError(msg)
        self.dp_size = dp_size
        self.max_blocks_per_rank = max_blocks_per_rank
        # Key -> bitmask of the ranks holding it: one lookup per block answers every rank.
        self._holders: dict[int, int] = {}
        # Per rank: its keys (to count them, and to drop them all on a reset).
        self._blocks: list[set[int]] = [set() for _ in range(dp_size)]
        #: Bitmask of the ranks in the exact state.
        self._known = 0
        self._epoch: list[int | None] = [None] * dp_size
        self._next_seq = [0] * dp_size
        self._capacity = [0] * dp_size
        self.view = CacheView(self)
        #: Batches applied; sequence gaps seen; stale (duplicate or old) batches ignored;
        #: ranks reset for claiming more than their capacity; stored chains whose parent the
        #: rank did not hold; removals of keys the rank did not hold.
        self.batches = self.gaps = self.stale = self.overflows = self.orphans = self.unknown_removals = 0

    # ------------------------------------------------------------------ reading

    def known(self, rank: int) -> bool:
        return bool(self._known >> rank & 1)

    @property
    def known_mask(self) -> int:
        """Bitmask of the ranks in the exact state."""
        return self._known

    def state(self, rank: int) -> str:
        return EXACT if self._known >> rank & 1 else UNKNOWN

    def blocks(self, rank: int) -> int:
        """Blocks held by *rank* (0 for an unknown rank)."""
        return len(self._blocks[rank])

    def match(self, rank: int, keys: Sequence[int]) -> int | None:
        """Leading blocks of *keys* cached on *rank*; ``None`` when *rank* is unknown."""
        bit = 1 << rank
        if not self._known & bit:
            return None
        holders = self._holders
        n = 0
        for k in keys:
            if not holders.get(k, 0) & bit:
                break
            n += 1
        return n

    def depths(self, keys: Sequence[int], mask: int = -1) -> dict[int, int]:
        """Per exact rank in *mask*, the leading blocks of *keys* it holds (ranks at 0 left out).

        One dictionary lookup per block for all ranks together; ranks not in
        :attr:`known_mask` are never in the answer.
        """
        mask &= self._known
        if keys and mask:
            # One rank holds the first block (a prompt that went back to where it was cached):
            # its set says in one C-level pass, without a list of every block's holders,
            # whether it holds them all.
            holding = self._holders.get(keys[0], 0) & mask
            if holding and not holding & (holding - 1):
                r = holding.bit_length() - 1
                if self._blocks[r].issuperset(keys):
                    return {r: len(keys)}
        return prefix_depths(self._holders, keys, mask)

    def __len__(self) -> int:
        """(rank, block) pairs held."""
        return sum(len(b) for b in self._blocks)

    def stats(self) -> dict[str, int]:
        return {
            "exact_ranks": bin(self._known).count("1"),
            "blocks": len(self),
            "distinct_blocks": len(self._holders),
            "batches": self.batches,
            "gaps": self.gaps,
            "stale": self.stale,
            "overflows": self.overflows,
            "orphans": self.orphans,
            "unknown_removals": self.unknown_removals,
        }

    # ------------------------------------------------------------------ writing

    def apply(self, batch: KvEventBatch) -> bool:
        """Apply one batch; returns whether it was applied (not stale, not for an unknown rank).

        A new epoch restarts the rank's sequence: exact from sequence 0, else unknown (its
        first batches were missed). A gap in the sequence makes the rank unknown. A resync
        batch makes it exact again, whatever came before.
        """
        r = batch.rank
        if type(r) is not int or not 0 <= r < self.dp_size:
            msg = f"KV events from rank {r!r}, but ranks are 0..{self.dp_size - 1}"
            raise ValueError(msg)
        seq = batch.seq
        bit = 1 << r
        if batch.epoch != self._epoch[r]:
            self.reset(r)
            self._epoch[r] = batch.epoch
            if seq == 0:
                self._known |= bit
        elif seq < self._next_seq[r]:
            self.stale += 1
            return False
        elif seq > self._next_seq[r]:
            self.gaps += 1
            self.reset(r)
        self._next_seq[r] = seq + 1
        if batch.capacity:
            self._capacity[r] = batch.capacity
        if not self._known & bit:
            # An unknown rank's index is empty: a resync batch makes it exact, and its
            # leading clear is replayed like any other (on a known rank it drops all).
            if not batch.resync:
                return False
            self._known |= bit
        self.batches += 1
        self._replay(r, batch.events)
        cap = self._capacity[r] or self.max_blocks_per_rank
        if len(self._blocks[r]) > cap:
            # More than the rank can hold: some removals never reached us. Trimming would
            # guess which; unknown is the truth.
            self.overflows += 1
            self.reset(r)
            return False
        return True

    def _replay(self, r: int, events: Sequence[tuple]) -> None:
        holders = self._holders
        mine = self._blocks[r]
        bit = 1 << r
        for ev in events:
            kind = ev[0]
            if kind == STORED:
                parent, keys = ev[1], ev[2]
                if parent is not None and parent not in mine:
                    self.orphans += 1
                if mine.issuperset(keys):  # all re-announced (one C-level pass)
                    continue
                for k in keys:
                    if k not in mine:
                        mine.add(k)
                        holders[k] = holders.get(k, 0) | bit
            elif kind == REMOVED:
                for k in ev[1]:
                    if k in mine:
                        mine.discard(k)
                        self._unhold(k, bit)
                    else:
                        self.unknown_removals += 1
            else:
                self._drop_all(r)

    def _unhold(self, k: int, bit: int) -> None:
        m = self._holders[k] & ~bit
        if m:
            self._holders[k] = m
        else:
            del self._holders[k]

    def _drop_all(self, r: int) -> None:
        bit = 1 << r
        mine = self._blocks[r]
        for k in mine:
            self._unhold(k, bit)
        mine.clear()

    def reset(self, rank: int) -> None:
        """Forget everything *rank* holds and make it unknown (it died, or events were lost)."""
        self._drop_all(rank)
        self._known &= ~(1 << rank)

    def new_life(self, rank: int, epoch: int | None) -> None:
        """*rank* went away or restarted as *epoch*: unless its events already started this
        life, what the index holds for it is gone."""
        if epoch is None or epoch != self._epoch[rank]:
            self.reset(rank)


class CacheView:
    """Read-only access to a :class:`CacheIndex`: what ``ctx.cache`` gives a policy.

    ``match(rank, keys) -> int | None``, ``depths(keys, mask) -> {rank: depth}``,
    ``known(rank)``, ``known_mask``, ``state(rank)`` (``"exact"`` or ``"unknown"``),
    ``blocks(rank)``.
    """

    __slots__ = ("_index", "match", "depths", "known", "state", "blocks")

    def __init__(self, index: CacheIndex) -> None:
        self._index = index
        self.match = index.match
        self.depths = index.depths
        self.known = index.known
        self.state = index.state
        self.blocks = index.blocks

    # A C-level getter: policies read it on every decision.
    known_mask = property(attrgetter("_index._known"), doc="Bitmask of the ranks in the exact state (0 when no rank publishes).")

    @property
    def any_known(self) -> bool:
        return self._index.known_mask != 0


def prefix_depths(holders: Mapping[int, int], keys: Sequence[int], mask: int) -> dict[int, int]:
    """Per rank in *mask*, how many leading blocks of *keys* it holds (ranks at 0 left out).

    *holders* maps a block key to the bitmask of ranks holding it (bit ``r`` for rank ``r``).
    The lookups are one C-level pass; the ranks still matching after each block only ever
    lose members, so a running AND and a binary search per step where ranks drop out give
    every depth (a prompt held whole by the same ranks needs neither). Both the exact index and
    ``cache_aware``'s own estimate answer their prefix questions with it.
    """
    depth: dict[int, int] = {}
    if not keys:
        while mask:
            low = mask & -mask
            depth[low.bit_length() - 1] = 0
            mask ^= low
        return depth
    get = holders.get
    first = get(keys[0], 0)
    mask &= first
    if not mask:  # a prompt no rank starts with (the common miss): one lookup
        return depth
    held = list(map(get, keys, repeat(0)))
    n = len(keys)
    if held.count(first) == n:  # every block held by the same ranks (a whole-prompt hit)
        while mask:
            low = mask & -mask
            depth[low.bit_length() - 1] = n
            mask ^= low
        return depth
    # after[i]: the ranks holding the first i blocks (i >= 1); a subset of after[i - 1], so
    # as integers the list never increases, and bisect (on the negated values) finds where
    # a set of ranks ends.
    after = list(accumulate(held, and_, initial=mask))
    i = 1
    while mask:
        # The last block all of *mask* holds; the ranks that drop out after it stop there.
        end = bisect_right(after, -mask, i, n + 1, key=neg)
        rest = after[end] if end <= n else 0
        dropped = mask & ~rest
        while dropped:
            low = dropped & -dropped
            depth[low.bit_length() - 1] = end - 1
            dropped ^= low
        mask, i = rest, end
    return depth
