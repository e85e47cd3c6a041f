"""SGLang's messages as dpcore values: tokenized requests → ``Request``, load snapshots → ``LoadReport``.

Nothing here imports SGLang: both functions read attributes by name, so they work on the
real ``TokenizedGenerateReqInput``/``TokenizedEmbeddingReqInput`` and ``LoadSnapshot``.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any

from dpcore.hashing import block_hashes
from dpcore.ledger import MAX_PENDING_PER_RANK
from dpcore.model import LoadReport, Request, make_request


def to_request(req: Any, block_size: int = 0, keys: tuple[int, ...] | None = None) -> Request:
    """What a policy sees of SGLang's tokenized request *req*.

    ``num_tokens`` is the prompt length (``input_ids``, else ``input_embeds`` rows; upstream
    crashes on ``len(None)`` for embeddings-only requests). ``block_hashes`` are *keys* when
    given (computed in the tokenizer process), else computed here when *block_size* is positive.
    """
    ids = req.input_ids
    if ids is not None:
        n = len(ids)
    else:
        embeds = getattr(req, "input_embeds", None)
        n = len(embeds) if embeds is not None else 0
    rid = req.rid
    # Every field, in Request's field order: this runs once per request on the hot path.
    return make_request(
        rid if type(rid) is str else str(rid),
        n,
        keys if keys is not None else block_hashes(ids, block_size) if block_size and ids is not None else (),
        getattr(req, "bootstrap_room", None),
        getattr(req, "routed_dp_rank", None),
        # data_parallel_rank left the tokenized message in 0.5.x (TokenizerManager migrates
        # it to routed_dp_rank); read it in case an older producer still sets it.
        getattr(req, "data_parallel_rank", None),
        getattr(req, "disagg_prefill_dp_rank", None),
        getattr(getattr(req, "sampling_params", None), "max_new_tokens", None),
    )


class SnapshotFeed:
    """Turns SGLang's per-rank load snapshots into dpcore load reports.

    SGLang's snapshot has no dispatch sequence, so which dispatches a snapshot already counts
    is inferred from time. A scheduler publishes at most once per loop iteration and drains
    its input socket at the start of every iteration, so by the time it takes snapshot *k*
    it has received every request sent before it took snapshot *k-1*. Dispatches sent
    before the previous snapshot's timestamp are therefore acknowledged; later ones stay
    counted on top of the report (dpcore's fix for SGLang #26058, where a stale snapshot
    erases fresh dispatches). Timestamps are the schedulers' ``time.time()``; SGLang's
    default shared-memory transport is single-host, so the clocks agree.

    :param dp_size: Number of ranks (SGLang's worker slots).
    """

    def __init__(self, dp_size: int, clock: Any = time.time) -> None:
        self._clock = clock
        self._last_ts = [0.0] * dp_size
        self._seq = [0] * dp_size
        self._acked = [-1] * dp_size
        self._sent: list[deque[tuple[float, int]]] = [
            deque(maxlen=MAX_PENDING_PER_RANK) for _ in range(dp_size)
        ]

    def sent(self, rank: int, dispatch_seq: int) -> None:
        """Note that dispatch *dispatch_seq* to *rank* left now."""
        self._sent[rank].append((self._clock(), dispatch_seq))

    def forget(self, rank: int) -> None:
        """*rank* went away: nothing sent to it is outstanding any more."""
        self._sent[rank].clear()

    def reports(self, loads: Iterable[Any]) -> list[LoadReport]:
        """Reports for the snapshots in *loads* that are new since the last call."""
        out = []
        for load in loads:
            r = load.dp_rank
            ts = load.timestamp
            # 0.0 is the placeholder a scheduler's writer publishes before its first real
            # snapshot; an unchanged timestamp is the same snapshot read again.
            if not 0 <= r < len(self._last_ts) or not ts or ts == self._last_ts[r]:
                continue
            prev = self._last_ts[r]
            self._last_ts[r] = ts
            self._seq[r] += 1
            sent = self._sent[r]
            if prev:
                while sent and sent[0][0] < prev:
                    self._acked[r] = sent.popleft()[1]
            out.append(
                LoadReport(
                    rank=r,
                    seq=self._seq[r],
                    acked_seq=self._acked[r],
                    num_running=load.num_running_reqs,
                    num_waiting=load.num_waiting_reqs,
                    num_tokens=load.num_total_tokens,
                    kv_used=load.num_used_tokens,
                    kv_capacity=load.max_total_num_tokens,
                )
            )
        return out
