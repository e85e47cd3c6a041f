"""One rank's KV cache: running requests' KV and an LRU prefix cache in the same tokens.

A request is admitted only when its uncached prompt blocks plus its whole output fit
(output reserved up front, so a running request is never preempted); cached blocks no
running request uses are evicted LRU to make room. Blocks in use are pinned; when the last
user finishes they become evictable, deepest block first (as a radix tree evicts leaves
first). Both engines (:mod:`~dpcore.sim.engine`, :mod:`~dpcore.sim.lockstep`) use it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from dpcore.cacheindex import CLEARED, REMOVED, STORED


class RankKV:
    """KV accounting of one rank with *capacity* tokens and *block_size*-token blocks."""

    __slots__ = ("capacity", "block_size", "pinned", "evictable", "pinned_tokens", "evictable_tokens", "reserved", "events")

    def __init__(self, capacity: int, block_size: int) -> None:
        self.capacity = capacity
        self.block_size = block_size
        self.pinned: dict[int, list[int]] = {}  # block -> [users, tokens]
        self.evictable: OrderedDict[int, int] = OrderedDict()  # block -> tokens, LRU first
        self.pinned_tokens = 0
        self.evictable_tokens = 0
        self.reserved = 0  # output tokens reserved by admitted requests
        #: When a list: the cache's changes as KV events (dpcore.cacheindex kinds), for a rank
        #: that publishes them; its owner empties it.
        self.events: list[tuple] | None = None

    def clear(self) -> None:
        """Forget everything (a restarted rank comes back with an empty cache)."""
        self.pinned.clear()
        self.evictable.clear()
        self.pinned_tokens = self.evictable_tokens = self.reserved = 0
        if self.events is not None:
            self.events.append((CLEARED,))

    def blocks(self) -> list[int]:
        """Every block held (a KV resync)."""
        return [*self.pinned, *self.evictable]

    def cached_blocks(self, hashes: Sequence[int]) -> int:
        """Blocks of *hashes*' prefix held now."""
        pinned, evictable = self.pinned, self.evictable
        n = 0
        for h in hashes:
            if h in pinned or h in evictable:
                n += 1
            else:
                break
        return n

    def admit(self, hashes: Sequence[int], n_in: int, n_out: int) -> int:
        """Admit a request if it fits: returns its prefix-hit tokens, or ``-1`` (nothing changed)."""
        bs = self.block_size
        pinned, evictable = self.pinned, self.evictable
        m = moved = 0
        for h in hashes:
            if h in pinned:
                m += 1
            elif h in evictable:
                moved += evictable[h]
                m += 1
            else:
                break
        hit = min(m * bs, n_in) if hashes else 0
        new_tokens = n_in - hit
        if self.pinned_tokens + moved + new_tokens + self.reserved + n_out > self.capacity:
            return -1
        # Pin the matched prefix, insert the rest; then evict to fit.
        for k in range(m):
            h = hashes[k]
            e = pinned.get(h)
            if e is None:
                pinned[h] = [1, evictable.pop(h)]
            else:
                e[0] += 1
        left = n_in - m * bs
        events = self.events
        stored = [] if events is not None else None
        for k in range(m, len(hashes)):
            h = hashes[k]
            tok = bs if left > bs else left
            left -= bs
            e = pinned.get(h)
            if e is None and h not in evictable:
                pinned[h] = [1, tok]
                if stored is not None:
                    stored.append(h)
                continue
            # Cached already, though not as part of the matched prefix (a duplicate id in one
            # prompt, or a deeper block that outlived its parent): no new KV for it.
            new_tokens -= tok
            if e is None:
                old = evictable.pop(h)
                pinned[h] = [1, old]
                moved += old
            else:
                e[0] += 1
        self.pinned_tokens += moved + new_tokens
        self.evictable_tokens -= moved
        self.reserved += n_out
        if stored:
            events.append((STORED, hashes[m - 1] if m else None, tuple(stored)))
        excess = self.pinned_tokens + self.evictable_tokens + self.reserved - self.capacity
        while excess > 0:
            h, tok = evictable.popitem(last=False)
            self.evictable_tokens -= tok
            excess -= tok
            if events is not None:
                events.append((REMOVED, (h,)))
        return hit

    def release(self, hashes: Sequence[int], n_in: int, n_out: int) -> None:
        """A request admitted with :meth:`admit` finished: unpin its blocks."""
        self.reserved -= n_out
        if not hashes:
            self.pinned_tokens -= n_in
            return
        pinned, evictable = self.pinned, self.evictable
        freed = 0
        # Deepest block first, so the shared root is the most recently used.
        for h in reversed(hashes):
            e = pinned[h]
            e[0] -= 1
            if not e[0]:
                del pinned[h]
                evictable[h] = e[1]
                freed += e[1]
        self.pinned_tokens -= freed
        self.evictable_tokens += freed
