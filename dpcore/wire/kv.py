"""``kv``: a batch of a rank's KV cache events (blocks stored, removed, cache cleared), and the
control op that asks a rank to send its whole cache again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from dpcore.cacheindex import CLEARED, REMOVED, STORED, KvEventBatch
from dpcore.errors import WireError
from dpcore.wire.header import KV, VERSION, _req_int

#: Control op (controller → one rank) asking it to resend everything its cache holds, as a
#: resync batch (``data``: ``{"rank": r}``).
KV_RESYNC = "kv_resync"
#: Most events in one KV batch, and most block keys in all its events together (a batch of
#: 65,536 keys is about 600 KB, under :data:`MAX_REPORT_BYTES`).
MAX_KV_EVENTS = 4096
MAX_KV_KEYS = 1 << 16
#: Block keys are 64-bit integers (dpcore's hashes are 63-bit; engines' may be signed).
_MIN_KEY = -(1 << 63)
_MAX_KEY = (1 << 64) - 1


def encode_kv(rank: int, *, epoch: int, seq: int, events: Sequence[Sequence[Any]], capacity: int = 0) -> bytes:
    """A batch of KV cache events from *rank*: ``[STORED, parent, keys]``,
    ``[REMOVED, keys]``, ``[CLEARED]`` (see :mod:`dpcore.cacheindex`). *seq* counts batches
    of this life from 0 without gaps; *capacity* is the rank's cache size in blocks (0: not said)."""
    return msgpack.packb({"v": VERSION, "t": KV, "rank": rank, "epoch": epoch, "seq": seq, "cap": capacity, "ev": events})


def _keys(x: Any, rank: int, budget: int) -> tuple[int, ...]:
    if type(x) is not list or len(x) > budget or not all(type(k) is int and _MIN_KEY <= k <= _MAX_KEY for k in x):
        msg = f"kv from rank {rank}: block keys must be a list of 64-bit integers, at most {MAX_KV_KEYS} per batch"
        raise WireError(msg)
    return tuple(x)


def _kv_from_header(h: Mapping[str, Any]) -> KvEventBatch:
    w = "kv"
    rank = _req_int(h, "rank", w)
    epoch = _req_int(h, "epoch", w)
    seq = _req_int(h, "seq", w)
    cap = _req_int(h, "cap", w)
    ev = h.get("ev")
    if type(ev) is not list or len(ev) > MAX_KV_EVENTS:
        msg = f"kv from rank {rank}: field 'ev' must be a list of at most {MAX_KV_EVENTS} events"
        raise WireError(msg)
    budget = MAX_KV_KEYS
    events: list[tuple[Any, ...]] = []
    for e in ev:
        kind = e[0] if type(e) is list and e else None
        if kind == STORED and len(e) == 3:
            parent = e[1]
            if parent is not None and not (type(parent) is int and _MIN_KEY <= parent <= _MAX_KEY):
                msg = f"kv from rank {rank}: a stored chain's parent must be a 64-bit integer or nil, got {parent!r}"
                raise WireError(msg)
            keys = _keys(e[2], rank, budget)
            events.append((STORED, parent, keys))
        elif kind == REMOVED and len(e) == 2:
            keys = _keys(e[1], rank, budget)
            events.append((REMOVED, keys))
        elif kind == CLEARED and len(e) == 1:
            events.append((CLEARED,))
            continue
        else:
            msg = f"kv from rank {rank}: bad event {e!r:.80}; expected [0, parent, keys], [1, keys] or [2]"
            raise WireError(msg)
        budget -= len(keys)
    return KvEventBatch(rank, epoch, seq, tuple(events), cap)
