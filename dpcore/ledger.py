"""The shared load ledger: one per controller, read by every load-aware policy.

Per rank it keeps the last applied :class:`~dpcore.model.LoadReport` and the dispatches the
rank has not acknowledged yet. The effective load is ``report + unacknowledged dispatches``,
so a report that was taken before a burst of dispatches cannot erase them (SGLang #26058),
and a burst between two reports is seen dispatch by dispatch.

Effective loads live in two plain lists, :attr:`LoadLedger.requests` and
:attr:`LoadLedger.tokens`, because policies read them on every decision. Treat them as
read-only; only the ledger writes them.

**Queued work.** A report is old by the time it is applied (50 ms by default, seconds when
the report path is slow), and so is the queue it describes: the ranks kept admitting work
since. The ledger therefore also keeps, per rank, an estimate of the work *queued* now
(dispatched or reported waiting, and not started yet): :attr:`LoadLedger.queued_tokens` and
:attr:`LoadLedger.queued_requests`. It is a first-in-first-out fluid queue that drains at
:attr:`LoadLedger.drain_rate`, the prompt tokens per second a busy rank starts, learned from
consecutive reports. A report resets the queue to what the rank said was waiting (and, when
it says, the rest of the prompt it was computing) at the moment it took the report, then
replays every dispatch it has not acknowledged, each from the moment it was sent. That moment
is bounded without comparing clocks across processes: a report acknowledging dispatch ``a``
was taken after ``a`` was sent and before dispatch ``a + 1`` arrived. Policies read the queue
with :meth:`LoadLedger.queued` (or inline its formula in their scan).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

from dpcore.errors import InvalidReportError
from dpcore.ledgerview import LedgerView as LedgerView  # its public path stays dpcore.ledger too
from dpcore.model import LoadReport

#: Unacknowledged dispatches kept per rank. Past this the rank has not acknowledged
#: anything for a very long time; the oldest entries are folded into the count only.
MAX_PENDING_PER_RANK = 1 << 16
#: Unacknowledged dispatches replayed one by one into the queue estimate when a report
#: arrives; older ones enter it together. Bounds the cost of a report from a rank that
#: stopped acknowledging.
MAX_REPLAY = 512
#: Dispatches the mean prompt length averages over (recent ones weigh more).
MEAN_WINDOW = 1024
#: Seconds over which the drain-rate estimate forgets old observations: long enough to
#: average many busy intervals, short enough to follow a change of model or batch size.
DRAIN_RATE_HORIZON_S = 30.0


def waiting_tokens(report: LoadReport) -> int:
    """Prompt tokens of the requests *report* says are waiting (not started yet)."""
    waiting = report.num_waiting
    if waiting <= 0:
        return 0
    if report.kv_used > 0 or report.num_running == 0:
        return max(report.num_tokens - report.kv_used, 0)
    # The rank does not say how much KV it holds: split its tokens by request count.
    return report.num_tokens * waiting // (waiting + report.num_running)


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
        "queued_tokens",
        "queued_requests",
        "drain_rate",
        "_queue",
        "queued_at",
        "_queued_ranks",
        "_refreshed_at",
        "_last_waiting",
        "_drained",
        "_drain_time",
        "_drain_seen",
        "mean_prompt_tokens",
        "_dispatches",
        "_age",
        "_acked_sent",
        "on_state",
        "_restarted",
        "version",
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
        #: Per rank: (dispatch seq, prompt tokens, when it was sent), oldest first.
        self._pending: list[deque[tuple[int, int, float]]] = [deque() for _ in range(dp_size)]
        self._pending_tokens = [0] * dp_size
        #: Estimated prompt tokens queued at the rank and not started, as of
        #: :attr:`queued_at`; :meth:`queued` drains it up to now.
        self.queued_tokens: list[float] = [0.0] * dp_size
        #: The same queue in requests (a partly started request counts in part).
        self.queued_requests: list[float] = [0.0] * dp_size
        #: Prompt tokens per second a busy rank starts, learned from reports; ``0.0`` until
        #: the first busy interval is seen (then queues only shrink when a report says so).
        self.drain_rate = 0.0
        #: When ``queued_tokens`` / ``queued_requests`` were last brought up to date.
        self.queued_at = [now] * dp_size
        # The queue: [tokens left, tokens, requests] entries, first in first out.
        self._queue: list[deque[list[float]]] = [deque() for _ in range(dp_size)]
        self._queued_ranks: set[int] = set()
        self._refreshed_at = now
        self._last_waiting: list[tuple[float, int] | None] = [None] * dp_size
        self._drained = 0.0
        self._drain_time = 0.0
        self._drain_seen: float | None = None
        #: Mean prompt tokens per dispatch (recent ones weigh more); ``0.0`` before any.
        self.mean_prompt_tokens = 0.0
        self._dispatches = 0
        # Per rank: how old its reports are when applied, and when the last dispatch a
        # report acknowledged was sent.
        self._age = [0.0] * dp_size
        self._acked_sent: list[float | None] = [None] * dp_size
        #: Called as ``on_state(rank, active, epoch, new_life)`` when a rank goes inactive,
        #: comes back, or reports a new epoch (a restart); the policy manager sets it.
        self.on_state: Callable[[int, bool, int | None, bool], None] | None = None
        # Per rank: a new epoch was seen while inactive; the return then says new_life.
        self._restarted = [False] * dp_size
        #: Bumped by every change, so :class:`~dpcore.ledgerview.LedgerView` knows when its copies are stale.
        self.version = 0

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

    def epoch(self, rank: int) -> int | None:
        """The life of *rank* its loads belong to (``None``: nothing heard from it yet).

        The one record of rank lives: the live controller reads it to tell a restart or a
        late report from a previous life from a current report.
        """
        return self._epoch[rank]

    def begin_life(self, rank: int, epoch: int) -> None:
        """Take reports from life *epoch* of *rank* from now on (its report sequence restarts).

        A life after a known one is a restart: the next applied report tells the policies
        (``on_rank_state`` with ``new_life``).
        """
        self.version += 1
        if self._epoch[rank] is not None and self._epoch[rank] != epoch:
            self._restarted[rank] = True
        self._epoch[rank] = epoch
        self._report_seq[rank] = -1

    def unacked(self, rank: int) -> int:
        """Dispatches to *rank* that no report has acknowledged yet."""
        return len(self._pending[rank])

    def snapshot(self) -> list[dict[str, object]]:
        """Per-rank state as plain dicts (for ``/get_load``, metrics and reports)."""
        self.refresh()
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
                    "queued_tokens": round(self.queued_tokens[r]),
                    "kv_used": rep.kv_used if rep else 0,
                    "kv_capacity": rep.kv_capacity if rep else 0,
                }
            )
        return out

    # ------------------------------------------------------------------ dispatches

    def record_dispatch(self, rank: int, num_tokens: int) -> int:
        """Count one request of *num_tokens* sent to *rank*; return its dispatch sequence."""
        self.version += 1
        seq = self._next_seq[rank]
        self._next_seq[rank] = seq + 1
        pending = self._pending[rank]
        if len(pending) >= MAX_PENDING_PER_RANK:
            old = pending.popleft()[1]
            self._pending_tokens[rank] -= old
            self.requests[rank] -= 1
            self.tokens[rank] -= old
        n = self._dispatches = self._dispatches + 1
        # The plain mean at first, then an average over roughly the last MEAN_WINDOW dispatches.
        self.mean_prompt_tokens += (num_tokens - self.mean_prompt_tokens) / (n if n < MEAN_WINDOW else MEAN_WINDOW)
        now = self._clock()
        pending.append((seq, num_tokens, now))
        self._pending_tokens[rank] += num_tokens
        self.requests[rank] += 1
        self.tokens[rank] += num_tokens
        # _enqueue(rank, num_tokens, 1, now), inlined: this runs for every dispatch.
        queue = self._queue[rank]
        if queue:
            self._drain(rank, now)
        else:
            self.queued_at[rank] = now
        tokens = float(num_tokens)
        queue.append([tokens, tokens, 1.0])
        self.queued_tokens[rank] += num_tokens
        self.queued_requests[rank] += 1
        self._queued_ranks.add(rank)
        return seq

    def oldest_unacked_at(self, rank: int) -> float | None:
        """When the oldest dispatch to *rank* that no report acknowledged was sent."""
        pending = self._pending[rank]
        return pending[0][2] if pending else None

    def give_up(self, rank: int, sent_before: float) -> list[int]:
        """Stop counting the dispatches to *rank* sent before *sent_before* and still not
        acknowledged (the rank is not admitting them); returns their seqs, oldest first."""
        pending = self._pending[rank]
        out = []
        while pending and pending[0][2] < sent_before:
            seq, tokens, _ = pending.popleft()
            self._pending_tokens[rank] -= tokens
            self.requests[rank] -= 1
            self.tokens[rank] -= tokens
            out.append(seq)
        if out:
            self.version += 1
        return out

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
        self.version += 1
        if report.epoch != self._epoch[r]:
            self.begin_life(r, report.epoch)
        elif report.seq <= self._report_seq[r]:
            self.heard_from(r)
            return False
        self._report_seq[r] = report.seq
        now = self._clock()
        pending = self._pending[r]
        acked = report.acked_seq
        admitted = 0
        while pending and pending[0][0] <= acked:
            _, tokens, self._acked_sent[r] = pending.popleft()
            admitted += tokens
        ptoks = self._pending_tokens[r] - admitted
        self._pending_tokens[r] = ptoks
        self.requests[r] = report.num_running + report.num_waiting + len(pending)
        self.tokens[r] = report.num_tokens + ptoks
        self.reports[r] = report
        self.reported[r] = True
        waiting = waiting_tokens(report)
        self._learn_drain_rate(r, waiting, admitted, now)
        self._requeue(r, report, waiting, now)
        if not self.heard_from(r, now) and self._restarted[r]:
            # Restarted without being missed: the same active rank, an empty cache.
            self._notify(r, True)
        return True

    # ------------------------------------------------------------------ queued work

    def queued(self, rank: int, now: float | None = None) -> float:
        """Prompt tokens queued at *rank* at *now* (default: the clock's now).

        The queue drains at a constant rate until it is empty, so this is
        ``max(queued_tokens[rank] - drain_rate * (now - queued_at[rank]), 0)``; a policy may
        inline that in its scan instead of calling this.
        """
        if now is None:
            now = self._clock()
        left = self.queued_tokens[rank] - self.drain_rate * (now - self.queued_at[rank])
        return left if left > 0.0 else 0.0

    def refresh(self, now: float | None = None) -> None:
        """Bring every rank's ``queued_tokens`` and ``queued_requests`` up to *now*."""
        if now is None:
            now = self._clock()
        if now == self._refreshed_at or not self._queued_ranks:
            return
        self.version += 1
        self._refreshed_at = now
        for r in tuple(self._queued_ranks):
            self._drain(r, now)

    def _drain(self, r: int, now: float) -> None:
        queue = self._queue[r]
        left = self.drain_rate * (now - self.queued_at[r])
        self.queued_at[r] = now
        if left <= 0.0 or not queue:
            return
        toks = self.queued_tokens[r]
        reqs = self.queued_requests[r]
        while queue:
            entry = queue[0]
            rest, size, count = entry
            if left < rest:
                entry[0] = rest - left
                toks -= left
                reqs -= count * left / size
                break
            left -= rest
            toks -= rest
            reqs -= count * rest / size if size else count
            queue.popleft()
        if queue:
            self.queued_tokens[r] = toks
            self.queued_requests[r] = reqs
        else:  # exactly empty, whatever rounding did
            self.queued_tokens[r] = self.queued_requests[r] = 0.0
            self._queued_ranks.discard(r)

    def _enqueue(self, r: int, tokens: float, count: float, at: float) -> None:
        if self._queue[r]:
            self._drain(r, at)
        else:
            self.queued_at[r] = at
        self._queue[r].append([float(tokens), float(tokens), float(count)])
        self.queued_tokens[r] += tokens
        self.queued_requests[r] += count
        self._queued_ranks.add(r)

    def _requeue(self, r: int, report: LoadReport, waiting: int, now: float) -> None:
        """Rebuild *r*'s queue from *report*: its waiting work, then the unacknowledged."""
        self._queue[r].clear()
        self._queued_ranks.discard(r)
        self.queued_tokens[r] = self.queued_requests[r] = 0.0
        taken = now - self._report_age(r, now)
        self.queued_at[r] = taken
        # The rest of the prompt being computed when the report was taken delays the queue
        # behind it (-1: the engine does not say).
        if report.prefill_tokens > 0:
            self._enqueue(r, report.prefill_tokens, 0, taken)
        if report.num_waiting > 0:
            self._enqueue(r, waiting, report.num_waiting, taken)
        pending = self._pending[r]
        skip = len(pending) - MAX_REPLAY
        if skip > 0:
            old = sum(e[1] for e in islice(pending, skip))
            self._enqueue(r, old, skip, taken)
        for _, tokens, sent in islice(pending, max(skip, 0), None):
            self._enqueue(r, tokens, 1, sent if sent > taken else taken)
        self._drain(r, now)

    def _report_age(self, r: int, now: float) -> float:
        """How long ago the report being applied was taken, bounded by dispatch times.

        It acknowledges dispatch ``a`` and not ``a + 1``: it was taken after ``a`` was sent
        and before ``a + 1`` arrived (about when it was sent). Within those bounds the age
        is the rank's previous estimate, so with a steady report delay the estimate
        settles inside every report's bounds, i.e. on the delay itself.
        """
        pending = self._pending[r]
        low = now - pending[0][2] if pending else 0.0
        sent = self._acked_sent[r]
        high = now - sent if sent is not None else low
        age = self._age[r]
        age = high if age > high else low if age < low else age
        self._age[r] = age
        return age

    def _learn_drain_rate(self, r: int, waiting: int, admitted: int, now: float) -> None:
        """Prompt tokens started between two reports that both found work waiting.

        The rank had a queue at both ends, so it was (almost surely) busy starting work in
        between: ``waiting before + admitted since - waiting now`` tokens over the time
        between the two arrivals. Summed over every rank with exponential forgetting.
        """
        last = self._last_waiting[r]
        self._last_waiting[r] = (now, waiting)
        if last is None or last[1] <= 0 or waiting <= 0:
            return
        dt = now - last[0]
        if dt <= 0.0:
            return
        started = last[1] + admitted - waiting
        if self._drain_seen is not None:
            keep = math.exp((self._drain_seen - now) / DRAIN_RATE_HORIZON_S)
            self._drained *= keep
            self._drain_time *= keep
        self._drain_seen = now
        self._drained += started if started > 0 else 0
        self._drain_time += dt
        self.drain_rate = self._drained / self._drain_time

    # ------------------------------------------------------------------ liveness

    def heard_from(self, rank: int, now: float | None = None) -> bool:
        """Note a sign of life; returns ``True`` when this brings the rank back."""
        self.version += 1
        self.last_seen[rank] = self._clock() if now is None else now
        if not self._active[rank]:
            self.set_active(rank, True)
            return True
        return False

    def set_active(self, rank: int, active: bool) -> bool:
        """Mark *rank* (in)active; returns whether that changed anything."""
        if self._active[rank] == active:
            return False
        self.version += 1
        self._active[rank] = active
        self._active_ranks = tuple(i for i, a in enumerate(self._active) if a)
        if not active:
            self.forget(rank)
        self._notify(rank, active)
        return True

    def _notify(self, rank: int, active: bool) -> None:
        new_life = active and self._restarted[rank]
        self._restarted[rank] = False
        if self.on_state is not None:
            self.on_state(rank, active, self._epoch[rank], new_life)

    def expire(self, timeout: float, now: float | None = None) -> list[int]:
        """Mark inactive every active rank silent for more than *timeout* seconds."""
        now = self._clock() if now is None else now
        dead = [r for r in self._active_ranks if now - self.last_seen[r] > timeout]
        for r in dead:
            self.set_active(r, False)
        return dead

    def forget(self, rank: int) -> None:
        """Drop everything known about *rank*'s load (it died; its requests are gone)."""
        self.version += 1
        self._pending[rank].clear()
        self._pending_tokens[rank] = 0
        self.requests[rank] = 0
        self.tokens[rank] = 0
        self._queue[rank].clear()
        self._queued_ranks.discard(rank)
        self.queued_tokens[rank] = self.queued_requests[rank] = 0.0
        self._last_waiting[rank] = None
        self._acked_sent[rank] = None
        self._age[rank] = 0.0
        self.reported[rank] = False
        self.reports[rank] = None
        self._report_seq[rank] = -1
