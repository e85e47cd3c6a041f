"""Requests dispatched to a rank and not finished yet, by rank and dispatch seq.

Each entry keeps the request's frames until the rank acknowledges admission (``ack`` in its
load reports): until then the request may have been lost in a dead rank's socket queue and
can be re-dispatched; after it, the rank owns it and only its identity is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from dpcore.model import Request


@attrs.define(slots=True, eq=False)
class InFlight:
    """One dispatched request.

    :ivar request: What the policies saw.
    :ivar reply: The sender's reply endpoint.
    :ivar header: The request header frame, forwarded as received; ``None`` once admitted.
    :ivar payload: The payload frame; ``None`` once admitted.
    :ivar prefill_rank: PD decode: the prefill rank holding its KV.
    """

    request: Request
    reply: str
    header: Any
    payload: Any
    prefill_rank: int | None

    @property
    def admitted(self) -> bool:
        return self.header is None

    def admit(self) -> None:
        """The rank owns it now: drop the frames kept for a re-dispatch."""
        self.header = self.payload = None


class InFlightTable:
    """Per rank: ``seq → InFlight``, and the last seq the rank acknowledged as admitted."""

    __slots__ = ("_ranks", "_acked", "ended")

    def __init__(self, dp_size: int) -> None:
        self._ranks: list[dict[int, InFlight]] = [{} for _ in range(dp_size)]
        self._acked = [-1] * dp_size
        #: Told ``(rid, output tokens or -1)`` of each request a rank reports done (``--record``).
        self.ended: Callable[[str, int], None] | None = None

    def add(self, rank: int, seq: int, entry: InFlight) -> None:
        self._ranks[rank][seq] = entry

    def pop(self, rank: int, seq: int) -> InFlight | None:
        return self._ranks[rank].pop(seq, None)

    def seqs(self, rank: int) -> set[int]:
        return set(self._ranks[rank])

    def admit(self, rank: int, ack: int) -> None:
        """*rank* admitted everything up to dispatch seq *ack*."""
        prev = self._acked[rank]
        if ack <= prev:
            return
        self._acked[rank] = ack
        inflight = self._ranks[rank]
        # Walk whichever is shorter: the newly acknowledged range, or the table.
        if ack - prev <= len(inflight):
            for s in range(prev + 1, ack + 1):
                e = inflight.get(s)
                if e is not None:
                    e.admit()
        else:
            for s, e in inflight.items():
                if s <= ack:
                    e.admit()

    def take_acked(self, rank: int) -> int:
        """The last acknowledged seq of *rank*'s life that just ended; the next starts at -1."""
        ack = self._acked[rank]
        self._acked[rank] = -1
        return ack

    def complete(self, rank: int, done: Sequence[int], out: Sequence[int] | None = None) -> int:
        """Remove finished seqs; returns how many of *done* were not in flight. *out*: the
        output tokens of each (``-1``: not counted), passed on to :attr:`ended`."""
        inflight = self._ranks[rank]
        unknown = 0
        ended = self.ended
        if ended is None:
            for s in done:
                if inflight.pop(s, None) is None:
                    unknown += 1
            return unknown
        for i, s in enumerate(done):
            e = inflight.pop(s, None)
            if e is None:
                unknown += 1
            else:
                ended(e.request.rid, -1 if out is None else out[i])
        return unknown

    def drain(self) -> Iterator[tuple[int, InFlight]]:
        """Remove and yield every entry as ``(rank, entry)`` (shutdown)."""
        for r, inflight in enumerate(self._ranks):
            entries = list(inflight.values())
            inflight.clear()
            for e in entries:
                yield r, e

    def counts(self) -> list[int]:
        return [len(d) for d in self._ranks]

    def total(self) -> int:
        return sum(len(d) for d in self._ranks)

    def tokens(self) -> list[int]:
        """Prompt tokens in flight per rank."""
        return [sum(e.request.num_tokens for e in d.values()) for d in self._ranks]
