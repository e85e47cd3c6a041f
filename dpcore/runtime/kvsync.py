"""KV event batches from the ranks: into the cache index, and a resync when it lost track.

A batch from a rank's current life goes to the index (:mod:`dpcore.cacheindex`); one from a
previous life, or sent before the life's first report, is counted (``kv_stale_batches``) and
dropped. When the index no longer knows a rank's cache exactly (a gap in its sequence, a
restart mid-stream, a stretch of inactivity), the rank is asked to send its whole cache again
(``wire.KV_RESYNC``), at most once per :data:`KV_RESYNC_INTERVAL_S` and only when its
backlog has room.
"""

from __future__ import annotations

import time

from dpcore import wire
from dpcore.cacheindex import KvEventBatch
from dpcore.manager import PolicyManager
from dpcore.runtime.books import Books
from dpcore.runtime.outbox import Outbox

#: A rank is asked for a resync at most once per this many seconds.
KV_RESYNC_INTERVAL_S = 1.0


class KvSync:
    """Applies the ranks' KV event batches and asks for resyncs (on the loop thread)."""

    def __init__(self, manager: PolicyManager, outbox: Outbox, books: Books) -> None:
        self.manager = manager
        self.ledger = manager.ledger
        self.outbox = outbox
        self.books = books
        # Per rank: when it may be asked for a resync again.
        self._resync_at = [0.0] * manager.ctx.dp_size

    def batch(self, batch: KvEventBatch) -> None:
        r = batch.rank
        books = self.books
        if r >= self.ledger.dp_size or batch.epoch != self.ledger.epoch(r):
            books.kv_stale_batches += 1  # from a previous life, or before this life's hello
            return
        index = self.manager.cache
        if index.apply(batch) or index.known(r):
            return
        now = time.monotonic()
        if now >= self._resync_at[r] and self.outbox.has_room(r):
            self._resync_at[r] = now + KV_RESYNC_INTERVAL_S
            books.kv_resyncs += 1
            self.outbox.stage(r, None, (wire.encode_ctl(wire.KV_RESYNC, {"rank": r}),))
