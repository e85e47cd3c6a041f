"""Requests dispatched to a rank and not finished yet, by rank and dispatch seq.

Each entry keeps the request's frames until the rank acknowledges admission (``ack`` in its
load reports): until then the request may have been lost in a dead rank's socket queue and
can be re-dispatched; after it, the rank owns it and only its identity is kept.

The table is also indexed by request id, so an abort finds the one rank holding its
request (:meth:`InFlightTable.find`). Request ids are meant to be unique per sender, not
across senders: two entries may share an id, and the index keeps both (told apart by their
reply endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from dpcore.model import Request


#: The ``fail`` code of a request its sender aborted, whose rank was lost before admitting it
#: (it is not dispatched again), and the ``rej`` code of one aborted while parked.
CODE_ABORTED = "aborted"


@attrs.define(slots=True, eq=False)
class InFlight:
    """One dispatched request.

    :ivar request: What the policies saw.
    :ivar reply: The sender's reply endpoint.
    :ivar header: The request header frame, forwarded as received; ``None`` once admitted.
    :ivar payload: The payload frame; ``None`` once admitted.
    :ivar prefill_rank: PD decode: the prefill rank holding its KV.
    :ivar rank: The rank it was dispatched to.
    :ivar aborted: Its sender gave it up and the rank was told: if the rank is lost before
        admitting it, it fails (``aborted``) instead of being dispatched again.
    """

    request: Request
    reply: str
    header: Any
    payload: Any
    prefill_rank: int | None
    rank: int
    aborted: bool = False

    @property
    def admitted(self) -> bool:
        return self.header is None

    def admit(self) -> None:
        """The rank owns it now: drop the frames kept for a re-dispatch."""
        self.header = self.payload = None


class _SameRid(dict):  # type: ignore[type-arg]
    """The entries of one request id in the index when there is more than one (rare), as
    dict keys (entries hash by identity): removing one is O(1) however many share the id."""

    __slots__ = ()


class InFlightTable:
    """Per rank: ``seq → InFlight``, and the last seq the rank acknowledged as admitted;
    and ``rid → InFlight`` over all ranks (:meth:`find`)."""

    __slots__ = ("_ranks", "_acked", "_by_rid", "ended")

    def __init__(self, dp_size: int) -> None:
        self._ranks: list[dict[int, InFlight]] = [{} for _ in range(dp_size)]
        self._acked = [-1] * dp_size
        # One entry per id, or a _SameRid list of them: one dict operation per add and per
        # removal in the common case, and no per-request allocation.
        self._by_rid: dict[str, InFlight | _SameRid] = {}
        #: Told ``(rid, output tokens or -1)`` of each request a rank reports done (``--record``).
        self.ended: Callable[[str, int], None] | None = None

    def add(self, rank: int, seq: int, entry: InFlight) -> None:
        self._ranks[rank][seq] = entry
        rid = entry.request.rid
        if self._by_rid.setdefault(rid, entry) is not entry:
            self._index_twin(rid, entry)

    def pop(self, rank: int, seq: int) -> InFlight | None:
        e = self._ranks[rank].pop(seq, None)
        if e is not None:
            self._unindex(e)
        return e

    def find(self, rid: str, reply: str) -> list[InFlight]:
        """The in-flight entries of request *rid* sent by the sender listening at *reply*
        (normally one; more only if that sender reused the id while it was in flight). The
        work is proportional to the entries sharing *rid*."""
        x = self._by_rid.get(rid)
        if x is None:
            return []
        if type(x) is _SameRid:
            return [e for e in x if e.reply == reply]
        return [x] if x.reply == reply else []  # type: ignore[union-attr]

    def _index_twin(self, rid: str, entry: InFlight) -> None:
        x = self._by_rid[rid]
        if type(x) is _SameRid:
            x[entry] = None
        else:
            self._by_rid[rid] = _SameRid({x: None, entry: None})

    def _unindex(self, e: InFlight) -> None:
        rid = e.request.rid
        x = self._by_rid.pop(rid, None)
        if x is not e and x is not None:
            self._keep_twins(rid, x, e)

    def _keep_twins(self, rid: str, x: InFlight | _SameRid, e: InFlight) -> None:
        """*x* was popped from the index for *rid* while removing *e*: put back the rest."""
        if type(x) is _SameRid:
            x.pop(e, None)
            if len(x) > 1:
                self._by_rid[rid] = x
            elif x:
                self._by_rid[rid] = next(iter(x))
        else:
            self._by_rid[rid] = x  # another entry of this id: keep it

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
        by_rid = self._by_rid
        unknown = 0
        ended = self.ended
        if ended is None:
            for s in done:
                e = inflight.pop(s, None)
                if e is None:
                    unknown += 1
                    continue
                x = by_rid.pop(e.request.rid, None)
                if x is not e and x is not None:
                    self._keep_twins(e.request.rid, x, e)
            return unknown
        for i, s in enumerate(done):
            e = inflight.pop(s, None)
            if e is None:
                unknown += 1
            else:
                self._unindex(e)
                ended(e.request.rid, -1 if out is None else out[i])
        return unknown

    def drain(self) -> Iterator[tuple[int, InFlight]]:
        """Remove and yield every entry as ``(rank, entry)`` (shutdown)."""
        self._by_rid.clear()
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
