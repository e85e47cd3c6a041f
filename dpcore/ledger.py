"""The shared load ledger: one per controller, read by every load-aware policy.

Per rank it keeps the last applied :class:`~dpcore.model.LoadReport` and the dispatches the
rank has not acknowledged yet. The effective load is ``report + unacknowledged dispatches``,
so a report that was taken before a burst of dispatches cannot erase them (SGLang #26058),
and a burst between two reports is seen dispatch by dispatch.

Effective loads live in two plain lists, :attr:`LoadLedger.requests` and
:attr:`LoadLedger.tokens`, because policies read them on every decision. Treat them as
read-only; only the ledger writes them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from dpcore.errors import InvalidReportError
from dpcore.model import LoadReport

#: Unacknowledged dispatches kept per rank. Past this the rank has not acknowledged
#: anything for a very long time; the oldest entries are folded into the count only.
MAX_PENDING_PER_RANK = 1 << 16


class LoadLedger:
    """Loads and liveness of ``dp_size`` ranks.

    :param dp_size: Number of ranks.
    :param clock: Monotonic clock, injectable for tests.
    """

    __slots__ = (
        "dp_size",
        "requests",
        "tokens",
        "reported",
        "reports",
        "last_seen",
        "_clock",
        "_active",
        "_active_ranks",
        "_epoch",
        "_report_seq",
        "_next_seq",
        "_pending",
        "_pending_tokens",
    )

    def __init__(self, dp_size: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if type(dp_size) is not int or dp_size < 1:
            msg = f"dp_size must be a positive integer, got {dp_size!r}"
            raise ValueError(msg)
        self.dp_size = dp_size
        self._clock = clock
        #: Effective requests per rank: last report + unacknowledged dispatches.
        self.requests: list[int] = [0] * dp_size
        #: Effective tokens per rank: last report + unacknowledged dispatched prompt tokens.
        self.tokens: list[int] = [0] * dp_size
        #: Whether the rank has reported at least once in its current life. A rank that
        #: never reported is *unknown*: its effective load is only what we sent it.
        self.reported: list[bool] = [False] * dp_size
        self.reports: list[LoadReport | None] = [None] * dp_size
        now = clock()
        self.last_seen: list[float] = [now] * dp_size
        self._active = [True] * dp_size
        self._active_ranks: tuple[int, ...] = tuple(range(dp_size))
        self._epoch: list[int | None] = [None] * dp_size
        self._report_seq = [-1] * dp_size
        self._next_seq = [0] * dp_size
        self._pending: list[deque[tuple[int, int]]] = [deque() for _ in range(dp_size)]
        self._pending_tokens = [0] * dp_size

    # ------------------------------------------------------------------ reading

    def now(self) -> float:
        """The ledger's clock (simulated time in the simulator, monotonic seconds live)."""
        return self._clock()

    @property
    def active_ranks(self) -> tuple[int, ...]:
        """Ranks currently alive, ascending (cached; rebuilt only when liveness changes)."""
        return self._active_ranks

    def is_active(self, rank: int) -> bool:
        return 0 <= rank < self.dp_size and self._active[rank]

    def unacked(self, rank: int) -> int:
        """Dispatches to *rank* that no report has acknowledged yet."""
        return len(self._pending[rank])

    def snapshot(self) -> list[dict[str, object]]:
        """Per-rank state as plain dicts (for ``/get_load``, metrics and reports)."""
        out = []
        for r in range(self.dp_size):
            rep = self.reports[r]
            out.append(
                {
                    "dp_rank": r,
                    "active": self._active[r],
                    "reported": self.reported[r],
                    "num_reqs": self.requests[r],
                    "num_waiting_reqs": rep.num_waiting if rep else 0,
                    "num_tokens": self.tokens[r],
                    "unacked": len(self._pending[r]),
                    "kv_used": rep.kv_used if rep else 0,
                    "kv_capacity": rep.kv_capacity if rep else 0,
                }
            )
        return out

    # ------------------------------------------------------------------ dispatches

    def record_dispatch(self, rank: int, num_tokens: int) -> int:
        """Count one request of *num_tokens* sent to *rank*; return its dispatch sequence."""
        seq = self._next_seq[rank]
        self._next_seq[rank] = seq + 1
        pending = self._pending[rank]
        if len(pending) >= MAX_PENDING_PER_RANK:
            _, old = pending.popleft()
            self._pending_tokens[rank] -= old
            self.requests[rank] -= 1
            self.tokens[rank] -= old
        pending.append((seq, num_tokens))
        self._pending_tokens[rank] += num_tokens
        self.requests[rank] += 1
        self.tokens[rank] += num_tokens
        return seq

    def next_dispatch_seq(self, rank: int) -> int:
        """The sequence number the next dispatch to *rank* will get."""
        return self._next_seq[rank]

    # ------------------------------------------------------------------ reports

    def apply_report(self, report: LoadReport) -> bool:
        """Force-set *report*'s rank to the reported load plus what it has not acknowledged.

        Returns ``False`` (and changes nothing) when the report is not newer than the last
        one applied for the same life of that rank. Also counts as a sign of life.
        """
        r = report.rank
        if type(r) is not int or not 0 <= r < self.dp_size:
            msg = f"load report for rank {r!r}, but ranks are 0..{self.dp_size - 1}"
            raise InvalidReportError(msg)
        if report.epoch != self._epoch[r]:
            # A new life of the rank: its report sequence starts over.
            self._epoch[r] = report.epoch
        elif report.seq <= self._report_seq[r]:
            self.heard_from(r)
            return False
        self._report_seq[r] = report.seq
        pending = self._pending[r]
        acked = report.acked_seq
        ptoks = self._pending_tokens[r]
        while pending and pending[0][0] <= acked:
            ptoks -= pending.popleft()[1]
        self._pending_tokens[r] = ptoks
        self.requests[r] = report.num_running + report.num_waiting + len(pending)
        self.tokens[r] = report.num_tokens + ptoks
        self.reports[r] = report
        self.reported[r] = True
        self.heard_from(r)
        return True

    # ------------------------------------------------------------------ liveness

    def heard_from(self, rank: int, now: float | None = None) -> bool:
        """Note a sign of life; returns ``True`` when this brings the rank back."""
        self.last_seen[rank] = self._clock() if now is None else now
        if not self._active[rank]:
            self.set_active(rank, True)
            return True
        return False

    def set_active(self, rank: int, active: bool) -> bool:
        """Mark *rank* (in)active; returns whether that changed anything."""
        if self._active[rank] == active:
            return False
        self._active[rank] = active
        self._active_ranks = tuple(i for i, a in enumerate(self._active) if a)
        if not active:
            self.forget(rank)
        return True

    def expire(self, timeout: float, now: float | None = None) -> list[int]:
        """Mark inactive every active rank silent for more than *timeout* seconds."""
        now = self._clock() if now is None else now
        dead = [r for r in self._active_ranks if now - self.last_seen[r] > timeout]
        for r in dead:
            self.set_active(r, False)
        return dead

    def forget(self, rank: int) -> None:
        """Drop everything known about *rank*'s load (it died; its requests are gone)."""
        self._pending[rank].clear()
        self._pending_tokens[rank] = 0
        self.requests[rank] = 0
        self.tokens[rank] = 0
        self.reported[rank] = False
        self.reports[rank] = None
        self._report_seq[rank] = -1
