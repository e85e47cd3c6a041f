"""What a policy sees of the load ledger (``ctx.ledger``): :class:`LedgerView`, read-only.

The controller owns the one :class:`~dpcore.ledger.LoadLedger`; a policy gets this view of
it, whose per-rank values are tuples (a policy cannot change them by mistake) copied only
after the ledger changed, and whose hot attributes are C-level getters.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpcore.ledger import LoadLedger


def _copied(name: str, doc: str) -> property:
    """A read-only attribute of :class:`LedgerView`: a tuple copy of the ledger's list,
    rebuilt only after the ledger changed (one copy per decision at most)."""

    def get(self: LedgerView) -> tuple[Any, ...]:
        # _copies: name -> (ledger version, copy); a copy is good until the version moves.
        ledger = self._ledger
        kept = self._copies.get(name)
        if kept is not None and kept[0] == ledger.version:
            return kept[1]
        t = tuple(getattr(ledger, name))
        self._copies[name] = (ledger.version, t)
        return t

    return property(get, doc=doc)


class LedgerView:
    """What a policy sees of the ledger (``ctx.ledger``): read-only.

    Per-rank values are tuples (copies taken after each change, so reading one in a loop
    costs an index); methods only read. Only the controller (through the policy manager)
    changes the ledger itself.
    """

    __slots__ = ("_ledger", "_copies", "now")

    def __init__(self, ledger: LoadLedger) -> None:
        self._ledger = ledger
        self._copies: dict[str, tuple[int, tuple[Any, ...]]] = {}
        #: ``now()``: the ledger's clock (simulated time in the simulator, monotonic
        #: seconds live), called directly: policies read it on every decision.
        self.now: Callable[[], float] = ledger._clock

    requests = _copied("requests", "Effective requests per rank: last report + unacknowledged dispatches.")
    tokens = _copied("tokens", "Effective tokens per rank: last report + unacknowledged prompt tokens.")
    queued_tokens = _copied("queued_tokens", "Prompt tokens queued per rank as of :attr:`queued_at`.")
    queued_requests = _copied("queued_requests", "Requests queued per rank as of :attr:`queued_at`.")
    queued_at = _copied("queued_at", "When each rank's queue estimate was last brought up to date.")
    reported = _copied("reported", "Whether each rank has reported in its current life.")
    reports = _copied("reports", "The last applied :class:`~dpcore.model.LoadReport` per rank (or ``None``).")
    last_seen = _copied("last_seen", "When each rank was last heard from (ledger clock).")

    # Read on every decision: C-level getters (no Python frame per read).
    dp_size = property(attrgetter("_ledger.dp_size"), doc="Number of ranks.")
    active_ranks = property(attrgetter("_ledger._active_ranks"), doc="Ranks currently alive, ascending.")
    drain_rate = property(
        attrgetter("_ledger.drain_rate"),
        doc="Prompt tokens per second a busy rank starts (see :class:`LoadLedger`).",
    )
    mean_prompt_tokens = property(
        attrgetter("_ledger.mean_prompt_tokens"), doc="Mean prompt tokens per dispatch, recent ones weighing more."
    )

    def is_active(self, rank: int) -> bool:
        return self._ledger.is_active(rank)

    def queued(self, rank: int, now: float | None = None) -> float:
        return self._ledger.queued(rank, now)

    def unacked(self, rank: int) -> int:
        return self._ledger.unacked(rank)

    def epoch(self, rank: int) -> int | None:
        return self._ledger.epoch(rank)

    def next_dispatch_seq(self, rank: int) -> int:
        """The sequence number the next dispatch to *rank* will get (``on_dispatch``
        receives the one a request got as ``seq``)."""
        return self._ledger.next_dispatch_seq(rank)

    def snapshot(self) -> list[dict[str, object]]:
        return self._ledger.snapshot()
