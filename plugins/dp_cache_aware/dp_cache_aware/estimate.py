"""``cache_aware``'s own estimate of each rank's prefix cache, from the requests sent there.

Per rank, every block of a dispatched prompt is *touched*, deepest block first, and gets a
stamp from the rank's running count of touched tokens (so a prefix is always at least as
recent as what extends it, as in a radix cache) and the time. The blocks form one LRU order
per rank; forgetting cuts from its old end. Its answers are those of a per-block LRU map.

It is stored in *runs*: blocks that one touch left next to each other in the LRU order,
listed root first, with their stamps (which never increase along a run) and the touch time.
A prompt that extends an earlier one is the earlier one's runs plus new blocks, so a touch
re-stamps and moves a few runs instead of every block, and a lookup checks one stamp per run:
the deepest block of a run is its oldest. Once a rank gets a prompt whose block hashes are
not chained (a key in two places), it keeps a run per block: the same answers, at about the
cost of a block-by-block map, and linear in the prompt whatever its keys.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from itertools import accumulate, compress, repeat
from operator import and_, neg, not_, or_

from dpcore import prefix_depths

__all__ = ["PrefixEstimate"]

#: Block-token values whose running sums are kept (cleared past this many).
_SUMS_KEPT = 1024


class _Run:
    """Blocks one touch left together: keys root first, their stamps, the touch's time."""

    __slots__ = ("keys", "stamps", "used")

    def __init__(self, keys: tuple[int, ...], stamps: list[float], used: float) -> None:
        self.keys = keys
        self.stamps = stamps
        self.used = used


class PrefixEstimate:
    """Per rank, the blocks believed cached, in LRU order, with touch stamps and times.

    :ivar holders: Block hash -> bitmask of the ranks holding it (for
        :func:`dpcore.prefix_depths`).
    :ivar touched: Per rank, tokens touched so far (the stamp clock).
    :ivar size: (rank, block) pairs held (``len``, kept as blocks come and go).
    """

    __slots__ = ("holders", "touched", "size", "_where", "_runs", "_loose", "_sums")

    def __init__(self, dp_size: int) -> None:
        self.holders: dict[int, int] = {}
        self.touched = [0.0] * dp_size
        self.size = 0
        # Per rank: block hash -> the run holding it; the runs, oldest first.
        self._where: list[dict[int, _Run]] = [{} for _ in range(dp_size)]
        self._runs: list[OrderedDict[_Run, None]] = [OrderedDict() for _ in range(dp_size)]
        # Per rank: whether it got prompts that are not chained (then a run per block).
        self._loose = [False] * dp_size
        # Block tokens -> running sums of it (the sure tokens of 1, 2, ... blocks, added
        # one block at a time exactly as a block-by-block loop would).
        self._sums: dict[float, list[float]] = {}

    def __len__(self) -> int:
        """(rank, block) pairs held."""
        return self.size

    def entries(self, rank: int) -> list[tuple[int, float, float]]:
        """``(block hash, stamp, time)`` of *rank*'s blocks, least recently used first."""
        return [(k, s, run.used) for run in self._runs[rank] for k, s in reversed(list(zip(run.keys, run.stamps)))]

    # ------------------------------------------------------------------ reading

    def cached(
        self, rank: int, hashes: tuple[int, ...], depth: int, block_tokens: float, sure_age: float, horizon: float
    ) -> tuple[float, float]:
        """Sure and uncertain cached tokens of the first *depth* blocks (all held by *rank*).

        A block touched at most *sure_age* tokens ago counts *block_tokens*; an older one
        counts less and less up to *horizon* tokens ago.
        """
        where = self._where[rank]
        clock = self.touched[rank]
        sure = 0
        uncertain = 0.0
        i = 0
        while i < depth:
            h = hashes[i]
            run = where[h]
            keys = run.keys
            m = len(keys)
            if m > depth - i:
                m = depth - i
                aligned = keys[0] == h and keys[:m] == hashes[i : i + m]
            elif keys is hashes:  # the prompt itself (a repeat of the request that made the run)
                aligned = True
            else:
                aligned = keys[0] == h and keys == hashes[i : i + m]
            if not aligned:  # not a chained prompt: from now on, a run per block
                self._loosen(rank)
                continue
            stamps = run.stamps
            if clock - stamps[m - 1] <= sure_age:  # the oldest of them is sure: all are
                sure += m
                i += m
                continue
            for s in stamps[:m]:
                age = clock - s
                if age <= sure_age:
                    sure += 1
                elif age < horizon:
                    uncertain += block_tokens * (horizon - age) / (horizon - sure_age)
            i += m
        if not sure:
            return 0.0, uncertain
        sums = self._sums.get(block_tokens)
        if sums is None or len(sums) < sure:
            if len(self._sums) >= _SUMS_KEPT:
                self._sums.clear()
            sums = self._sums[block_tokens] = list(accumulate(repeat(block_tokens, max(sure, 64))))
        return sums[sure - 1], uncertain

    def depths(self, hashes: tuple[int, ...], mask: int) -> dict[int, int]:
        """Per rank in *mask*, how many leading blocks of *hashes* (non-empty) it holds, ranks
        at 0 left out: :func:`dpcore.prefix_depths` over :attr:`holders`.

        When every rank holding the first block holds the prompt as one whole run (a repeat
        of a prompt sent there), the runs say so without a lookup per block.
        """
        holders = self.holders
        first = hashes[0]
        holding = holders.get(first, 0) & mask
        if not holding:
            return {}
        where = self._where
        left = holding
        while left:
            low = left & -left
            run = where[low.bit_length() - 1].get(first)
            if run is None or (run.keys is not hashes and run.keys != hashes):
                return prefix_depths(holders, hashes, mask)
            left ^= low
        n = len(hashes)
        depth = {}
        while holding:
            low = holding & -holding
            depth[low.bit_length() - 1] = n
            holding ^= low
        return depth

    def oldest_use(self) -> float:
        """The earliest time among each rank's least recently used block (inf: none)."""
        return min((next(iter(runs)).used for runs in self._runs if runs), default=float("inf"))

    # ------------------------------------------------------------------ writing

    def touch(self, rank: int, hashes: tuple[int, ...], block_tokens: float, now: float) -> None:
        """Touch *hashes* (a prompt's chained block hashes) on *rank*, deepest first."""
        n = len(hashes)
        if not n:
            return
        if type(hashes) is not tuple:
            hashes = tuple(hashes)
        # The k-th block touched (deepest first) gets clock + k * block_tokens, summed one
        # block at a time; stamps[i] is block i's (root first).
        stamps = list(accumulate(repeat(block_tokens, n), initial=self.touched[rank]))
        stamps.reverse()  # (in place: the clock's start, now last, is not a block's stamp)
        stamps.pop()
        self.touched[rank] = stamps[0]
        where = self._where[rank]
        # (Stamps only decrease along a run while blocks carry tokens.)
        chained = not self._loose[rank] and block_tokens >= 0.0
        if chained:
            run = where.get(hashes[0])
            if run is not None and run.keys == hashes:  # a repeat of one whole run: _plan's answer
                run.stamps = stamps
                run.used = now
                self._runs[rank].move_to_end(run)
                return
        plan = self._plan(where, hashes) if chained else None
        if plan is None:
            self._loosen(rank)
            self._touch_blocks(rank, hashes, stamps, now)
            return
        segments, tail = plan
        runs = self._runs[rank]
        if tail < n:  # new blocks (the deepest): a new run, first into the LRU order
            run = _Run(hashes[tail:], stamps[tail:], now)
            keys = run.keys
            where.update(zip(keys, repeat(run)))
            self.size += len(keys)  # (new keys: _plan checked that where has none of them)
            # holders[h] |= bit for each (distinct) new key, in one C-level pass.
            holders = self.holders
            holders.update(zip(keys, map(or_, map(holders.get, keys, repeat(0)), repeat(1 << rank))))
            runs[run] = None
        # Then the existing blocks, deepest run first, so the root ends most recent.
        for run, a, b in reversed(segments):
            if b - a < len(run.keys):  # the prompt covers the head of the run: split it
                keys = run.keys
                head = _Run(keys[: b - a], stamps[a:b], now)
                run.keys = keys[b - a :]
                run.stamps = run.stamps[b - a :]
                where.update(zip(head.keys, repeat(head)))
                runs[head] = None
            else:
                run.stamps = stamps[a:b]
                run.used = now
                runs.move_to_end(run)

    @staticmethod
    def _plan(where: dict[int, _Run], hashes: tuple[int, ...]) -> tuple[list[tuple[_Run, int, int]], int] | None:
        """The prompt as runs it covers from their heads, ``(run, start, end)`` root first,
        and where its new blocks start; ``None`` if it is not that simple."""
        n = len(hashes)
        segments = []
        seen = set()
        get = where.get
        i = 0
        while i < n:
            run = get(hashes[i])
            if run is None:
                break
            if run in seen:
                return None
            seen.add(run)
            keys = run.keys
            m = len(keys)
            if hashes[i : i + m] == keys:
                segments.append((run, i, i + m))
                i += m
                continue
            if keys[0] != hashes[i]:
                return None
            # The prompt leaves the run (or ends) inside it: it covers the run's first p blocks.
            p = 1
            end = min(m, n - i)
            while p < end and keys[p] == hashes[i + p]:
                p += 1
            segments.append((run, i, i + p))
            i += p
        if i < n:
            new = hashes[i:]
            if not where.keys().isdisjoint(new) or len(set(new)) != len(new):
                return None
        return segments, i

    def _loosen(self, rank: int) -> None:
        """From now on (until :meth:`forget`), keep a run per block on *rank*: its prompts
        are not chained, so a run says nothing about the next prompt, and per block every
        touch and lookup stays linear in the prompt, whatever its keys."""
        if self._loose[rank]:
            return
        self._loose[rank] = True
        where = self._where[rank]
        singles: OrderedDict[_Run, None] = OrderedDict()
        for run in self._runs[rank]:
            for k, s in reversed(list(zip(run.keys, run.stamps))):
                single = where[k] = _Run((k,), [s], run.used)
                singles[single] = None
        self._runs[rank] = singles

    def _touch_blocks(self, rank: int, hashes: tuple[int, ...], stamps: list[float], now: float) -> None:
        """Any prompt on a loose rank, block by block: a new run for each block, deepest first."""
        where = self._where[rank]
        runs = self._runs[rank]
        # A key repeated in the prompt keeps its last touch: the one nearest the root.
        first: dict[int, float] = {}
        for h, s in zip(hashes, stamps):
            if h not in first:
                first[h] = s
        holders = self.holders
        bit = 1 << rank
        for h in first:
            old = where.get(h)
            if old is None:
                holders[h] = holders.get(h, 0) | bit
                self.size += 1
            else:
                del runs[old]
        for h, s in reversed(first.items()):
            run = where[h] = _Run((h,), [s], now)
            runs[run] = None

    def _drop(self, rank: int, keys: tuple[int, ...]) -> None:
        # (C-level passes: keys are distinct, and a block no rank holds any more leaves holders.)
        where = self._where[rank]
        for h in keys:
            del where[h]
        self.size -= len(keys)
        holders = self.holders
        masks = list(map(and_, map(holders.get, keys, repeat(0)), repeat(~(1 << rank))))
        holders.update(zip(keys, masks))
        if masks.count(0):
            pop = holders.pop
            for h in compress(keys, map(not_, masks)):
                pop(h)

    def trim(self, rank: int, oldest: float) -> None:
        """Forget *rank*'s blocks stamped before *oldest*."""
        runs = self._runs[rank]
        while runs:
            run = next(iter(runs))
            stamps = run.stamps
            if stamps[-1] >= oldest:
                return
            cut = bisect_right(stamps, -oldest, key=neg)  # the first stamp below oldest
            self._drop(rank, run.keys[cut:])
            if cut:
                run.keys = run.keys[:cut]
                run.stamps = stamps[:cut]
                return
            del runs[run]

    def age(self, horizon: float, max_blocks: int) -> None:
        """Forget blocks last used before *horizon*, then the least recently used past
        *max_blocks* in all, rank by rank."""
        total = len(self)
        for rank, runs in enumerate(self._runs):
            while runs:
                run = next(iter(runs))
                n = len(run.keys)
                if run.used >= horizon:
                    over = total - max_blocks
                    if over <= 0:
                        break
                    if over < n:  # the run's oldest (deepest) blocks
                        self._drop(rank, run.keys[n - over :])
                        run.keys = run.keys[: n - over]
                        run.stamps = run.stamps[: n - over]
                        total -= over
                        break
                self._drop(rank, run.keys)
                del runs[run]
                total -= n

    def forget(self, rank: int) -> None:
        """Forget everything about *rank* (its stamp clock goes on)."""
        where = self._where[rank]
        holders = self.holders
        keep = ~(1 << rank)
        for h in where:
            m = holders.get(h, 0) & keep
            if m:
                holders[h] = m
            else:
                holders.pop(h, None)
        self.size -= len(where)
        where.clear()
        self._runs[rank].clear()
        self._loose[rank] = False
