"""Rank lifecycle: load reports in, lives and deaths of ranks, and what their requests become.

**Reports** are drained every turn before any request is handled, at most
:data:`REPORTS_PER_TURN` per turn (a flood cannot starve the ingress; the rest wait for the
next turn). Only the newest report per rank is applied (latest wins); the ``done`` lists of
all of them are used, so no completion is lost by coalescing. A report older than the last
one applied, or from a previous life, is counted in ``stale_reports``; one that
acknowledges a dispatch never sent is counted bad and not applied.

**Liveness** is judged only after reading what has arrived: a check first drains the report
socket. Silence is measured on the loop's own clock: when a check runs later than it was
due by more than :data:`STALL_FRACTION` of the heartbeat timeout, the loop itself was held up
(CPU starvation, swap, a stopped process, a slow policy) and that time is not counted
against any rank (``loop_stalls``). KV event batches share the report socket and
go to :mod:`dpcore.runtime.kvsync` as they come.

**Lives.** A report's ``epoch`` names one life of the rank's process. The ledger is the one
record of which life a rank is in (:meth:`LoadLedger.epoch`); this module decides when a
new life begins. A report is believed only with evidence from the rank's own dispatch
socket (:mod:`dpcore.runtime.connwatch`): while no process is connected there, a report for
that rank is no sign of life (``unconnected_reports``; its completions still count), and a
new epoch for an active rank is accepted only after a connection older than its current
life closed and a new one completed its handshake, within a heartbeat timeout
(``unproven_restarts`` otherwise: the report is dropped, nothing fails). A rank already
inactive takes a new epoch without that proof: its previous life is settled, so believing
the report fails nothing, and a restart whose reconnection was missed still gets in.

**What happens to requests on a rank that dies** (silent past ``heartbeat_timeout_s``, or
restarted with a new epoch): requests the rank had not admitted are re-dispatched to another
rank (they may have been lost in the dead socket's queue, and no engine has started them).
Admitted requests are failed: their sender gets a ``fail`` with code ``rank_died``.
Requests admitted after the rank's last report look unadmitted and are re-dispatched, so a
request may in rare cases run twice; the client SDK keeps only the first final reply per
request. A rank restarted before its deadline keeps what is still in its backlog (never
sent); of what was sent, its reports' ``lo`` (first seq this life received) tells the new
life's requests from the lost ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from dpcore import wire
from dpcore.cacheindex import KvEventBatch
from dpcore.errors import WireError
from dpcore.manager import PolicyManager
from dpcore.model import LoadReport
from dpcore.runtime.books import Books, rate_limited
from dpcore.runtime.connwatch import ConnectionWatch
from dpcore.runtime.defaults import ADMISSION_TIMEOUT_S, STARTUP_TIMEOUT_S
from dpcore.runtime.inflight import CODE_ABORTED, InFlight, InFlightTable
from dpcore.runtime.kvsync import KvSync
from dpcore.runtime.outbox import Outbox

CODE_RANK_DIED = "rank_died"
#: A rank that heartbeats but does not admit a request within the admission timeout.
CODE_RANK_STUCK = "rank_stuck"
#: The loop never wakes for liveness sooner than this after a check, and wakes this much
#: after a deadline, so a deadline is never checked a hair too early.
MIN_CHECK_INTERVAL_S = 0.01
DEADLINE_SLACK_S = 0.001
#: Reports read per loop turn at most (each socket gets a bounded share of a turn).
REPORTS_PER_TURN = 1024
#: A liveness check this late (a fraction of the heartbeat timeout) means the loop stalled.
STALL_FRACTION = 0.25

#: Re-dispatch one request that was on a rank that is gone: ``(entry, from_rank)``.
Redispatch = Callable[[InFlight, int], None]
#: Fail one request dispatched to a rank: ``(rank, rid, reply endpoint, code, message)``.
Fail = Callable[[int, str, str, str, str], None]


class RankLifecycle:
    """Applies reports, notices silent and restarted ranks, and settles their requests.

    :param heartbeat_timeout_s: A rank silent this long is inactive.
    :param redispatch: Places a request again, on another rank.
    :param fail: Fails a request towards its sender.
    :param conns: Connections to the ranks' dispatch sockets: a report counts only while its
        rank is connected, and a new epoch for a live rank only after a real reconnection.
    """

    def __init__(
        self,
        manager: PolicyManager,
        inflight: InFlightTable,
        outbox: Outbox,
        books: Books,
        *,
        heartbeat_timeout_s: float,
        admission_timeout_s: float = ADMISSION_TIMEOUT_S,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        redispatch: Redispatch,
        fail: Fail,
        log: Any,
        conns: ConnectionWatch | None = None,
    ) -> None:
        self.manager = manager
        #: A shadow chain (:class:`dpcore.runtime.shadow.Shadow`), told of every applied report.
        self.shadow: Any = None
        self.ledger = manager.ledger
        self.inflight = inflight
        self.outbox = outbox
        self.books = books
        self.heartbeat_timeout_s = heartbeat_timeout_s
        #: A dispatch a live rank has not admitted after this long fails ``rank_stuck``.
        self.admission_timeout_s = admission_timeout_s
        #: Each rank's first report may take this long after :meth:`start`.
        self.startup_timeout_s = max(startup_timeout_s, heartbeat_timeout_s)
        self._redispatch = redispatch
        self._fail = fail
        self.log = log
        #: Who is connected as each rank (``None``: every report is believed).
        self.conns = conns
        # A rank that restarted before anyone noticed: the previous life's ack, the seqs that
        # may have gone to it, and when to stop waiting to learn which did (see _new_life).
        self._old_life: dict[int, tuple[int, set[int], float]] = {}
        #: When :meth:`check` should run next (monotonic seconds).
        self.next_check = 0.0
        self.kv = KvSync(manager, outbox, books)

    def start(self) -> None:
        """Every rank gets the startup timeout from now to say hello.

        A rank process (or an engine loading its model) may come up well after the
        controller, on a busy host several heartbeat timeouts later; it has not gone
        silent, it has not spoken yet. Requests placed on it meanwhile wait in its queue.
        Its silence counts from ``startup_timeout - heartbeat_timeout`` from now."""
        now = time.monotonic()
        for r in self.ledger.active_ranks:
            self.ledger.heard_from(r, now + self.startup_timeout_s - self.heartbeat_timeout_s)
        self.next_check = now + self.startup_timeout_s

    # ------------------------------------------------------------------ reports

    def drain_reports(self, sock: zmq.Socket, limit: int = REPORTS_PER_TURN) -> bool:  # type: ignore[type-arg]
        """Read up to *limit* queued reports; apply the newest per rank. Returns whether more
        may be waiting."""
        recv = sock.recv
        latest: dict[int, LoadReport] = {}
        n = self.ledger.dp_size
        ledger = self.ledger
        books = self.books
        conns = self.conns
        more = False
        for _ in range(limit):
            try:
                buf = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            books.reports += 1
            try:
                msg = wire.decode_rank_message(buf)
            except WireError as exc:
                self._bad_report(str(exc))
                continue
            if type(msg) is KvEventBatch:
                self.kv.batch(msg)
                continue
            report, done, lo, out = msg
            r = report.rank
            if r >= n:
                self._bad_report(f"load report from rank {r}, but ranks are 0..{n - 1}")
                continue
            known = ledger.epoch(r)
            # A smaller epoch is a late report from a previous life, while the current life
            # is alive. Once it went silent past its deadline, any other epoch is a new life:
            # a restart on a host whose clock is behind must not be locked out.
            if known is not None and report.epoch < known and ledger.is_active(r):
                books.stale_reports += 1
                continue
            if report.acked_seq >= ledger.next_dispatch_seq(r):
                # Never-sent requests cannot have been admitted; believing it would fail
                # requests that were never started instead of re-sending them.
                self._bad_report(
                    f"load report from rank {r} acknowledges dispatch {report.acked_seq}, "
                    f"but only {ledger.next_dispatch_seq(r)} were sent to it"
                )
                continue
            if conns is not None and not conns.connected(r):
                # Nobody is connected as rank r: not a sign of life (a dead rank stays dead
                # whatever a stranger sends). Completions of the current life still count.
                self._unconnected(r, report.epoch)
                if done and known == report.epoch:
                    self._complete(r, done, out)
                continue
            if known != report.epoch:
                if known is not None:
                    # A live rank's requests would all fail: only a real reconnection
                    # proves the restart. An inactive rank's life is settled already.
                    if conns is not None and ledger.is_active(r) and not self._reconnected(r):
                        self._unproven_restart(r, known, report.epoch)
                        continue
                    self._new_life(r, report.epoch, lo)
                ledger.begin_life(r, report.epoch)
                if conns is not None:
                    conns.begin_life(r, time.monotonic())
                latest.pop(r, None)
            elif lo is not None and r in self._old_life:
                self._settle_old_life(r, lo)
            if done:
                self._complete(r, done, out)
            prev = latest.get(r)
            if prev is None or report.seq > prev.seq:
                latest[r] = report
            if prev is not None:  # one of the two is dropped
                self._superseded(prev if latest[r] is report else report)
        else:
            more = True
        for report in latest.values():
            self._apply(report)
        return more

    def _superseded(self, report: LoadReport) -> None:
        """*report* lost to a newer one of its drain: stale if not newer than the last applied."""
        last = self.ledger.reports[report.rank]
        if last is not None and last.epoch == report.epoch and report.seq <= last.seq:
            self.books.stale_reports += 1

    def _complete(self, r: int, done: Sequence[int], out: Sequence[int] | None = None) -> None:
        unknown = self.inflight.complete(r, done, out)
        self.books.unknown_done += unknown
        self.books.completed[r] += len(done) - unknown

    def _reconnected(self, r: int) -> bool:
        return self.conns is not None and self.conns.reconnected(r, time.monotonic(), self.heartbeat_timeout_s)

    def _unconnected(self, r: int, epoch: int) -> None:
        b = self.books
        b.unconnected_reports += 1
        if rate_limited(b.unconnected_reports):
            self.log.warning(
                "report_without_connection", rank=r, epoch=epoch, count=b.unconnected_reports,
                why="no process is connected to this rank's dispatch socket; the report is not a sign of life",
            )  # fmt: skip

    def _unproven_restart(self, r: int, known: int, epoch: int) -> None:
        """A report claims a new life for active rank *r*, but its dispatch socket saw no
        reconnection: believing it would fail every request running there. Dropped."""
        b = self.books
        b.unproven_restarts += 1
        if rate_limited(b.unproven_restarts):
            self.log.error(
                "restart_unproven", rank=r, epoch=known, claimed_epoch=epoch, count=b.unproven_restarts,
                why="a new epoch for a live rank without a new connection on its dispatch socket; report dropped",
            )  # fmt: skip

    def _bad_report(self, why: str) -> None:
        b = self.books
        b.bad_reports += 1
        if rate_limited(b.bad_reports):
            self.log.warning("bad_report", reason=why, count=b.bad_reports)

    def _apply(self, report: LoadReport) -> None:
        r = report.rank
        ledger = self.ledger
        was_active, was_reported = ledger.is_active(r), ledger.reported[r]
        if not self.manager.report(report):
            self.books.stale_reports += 1  # not newer than the last one applied (still a sign of life)
        elif self.shadow is not None:
            self.shadow.report(report)
        if not was_active:
            self.log.info("rank_rejoined", rank=r, epoch=report.epoch)
            self._reschedule()
        elif not was_reported:
            self._reschedule()  # its deadline is a heartbeat timeout now, not the startup one
        self.inflight.admit(r, report.acked_seq)

    # ------------------------------------------------------------------ liveness

    def _reschedule(self) -> None:
        self.next_check = min(self.next_check, time.monotonic() + self.heartbeat_timeout_s)

    def check(self, now: float, sock: zmq.Socket | None = None) -> None:  # type: ignore[type-arg]
        """Mark silent ranks inactive and settle their requests; schedule the next check.

        *sock*: the report socket, drained first (what has arrived is read before anyone is
        judged silent)."""
        timeout = self.heartbeat_timeout_s
        late = now - self.next_check
        if sock is not None:
            self.drain_reports(sock)
        if late > STALL_FRACTION * timeout:
            self._forgive_stall(now, late)
        for r in self.ledger.expire(timeout, now):
            self.log.warning("rank_inactive", rank=r, silent_s=round(now - self.ledger.last_seen[r], 3))
            self._lose(r, f"rank {r} stopped reporting for more than {timeout:g}s")
        for r, (_, _, deadline) in list(self._old_life.items()):
            if now >= deadline:
                self._settle_old_life(r, None)
        admit = self.admission_timeout_s
        ledger = self.ledger
        for r in ledger.active_ranks:
            oldest = ledger.oldest_unacked_at(r)
            # Only a rank that reports can be stuck; one not up yet has its startup timeout.
            if oldest is not None and now - oldest > admit and ledger.reported[r]:
                self._stuck(r, ledger.give_up(r, now - admit))
        seen = ledger.last_seen
        nxt = min((seen[r] for r in ledger.active_ranks), default=now) + timeout
        reporting = [r for r in ledger.active_ranks if ledger.reported[r]]
        waits = [t + admit for t in map(ledger.oldest_unacked_at, reporting) if t is not None]
        nxt = min([nxt, *waits, *(d for _, _, d in self._old_life.values())])
        self.next_check = max(nxt + DEADLINE_SLACK_S, now + MIN_CHECK_INTERVAL_S)

    def _stuck(self, r: int, seqs: list[int]) -> None:
        """Rank *r* reports but has not admitted *seqs* within the admission timeout: fail
        them ``rank_stuck`` (the sender may retry; the rank's later output for them, if any,
        is dropped by the client SDK)."""
        failed = 0
        why = (
            f"rank {r} did not admit the request within {self.admission_timeout_s:g}s "
            "although it is reporting (a stuck scheduler, or another process on its socket)"
        )
        for s in seqs:
            e = self.inflight.pop(r, s)
            if e is None or e.admitted:
                continue
            failed += 1
            self._fail(r, e.request.rid, e.reply, CODE_RANK_STUCK, why)
        if failed:
            self.log.error("rank_stuck", rank=r, failed=failed, admission_timeout_s=self.admission_timeout_s)

    def _forgive_stall(self, now: float, late: float) -> None:
        """The loop did not run for *late* seconds: measure silence on its clock, so the
        ranks are not blamed for reports it could not read."""
        self.books.loop_stalls += 1
        self.log.warning("loop_stalled", late_s=round(late, 3), count=self.books.loop_stalls)
        seen = self.ledger.last_seen
        for r in self.ledger.active_ranks:
            seen[r] = max(seen[r], min(now, seen[r] + late))  # (a first deadline may lie ahead)

    def _lose(self, r: int, why: str) -> None:
        """Rank *r* is gone: settle everything it held, including its backlog."""
        old = self._old_life.pop(r, None)
        if old is not None:
            self._settle(r, old[1], old[0], why)
        self.outbox.drop(r)  # never sent: re-dispatched below with the rest
        ack = self.inflight.take_acked(r)
        self._settle(r, self.inflight.seqs(r), ack, why)

    def _new_life(self, r: int, epoch: int, lo: int | None) -> None:
        """Rank *r* restarted (a new epoch) before its silence was noticed.

        Requests still in its backlog were never sent and go to the new life. Those the old
        life admitted are lost with it and fail at once. Of the others sent, the ones from
        ``lo`` on (the first seq the new life received) are the new life's; the others were
        lost with the old one. Until a report says ``lo`` they cannot be told
        apart (some may still be on their way to the new life), so they wait for it, at most
        one heartbeat timeout, and are settled as lost then.
        """
        self.log.warning("rank_restarted", rank=r, epoch=epoch)
        # Forget the old life's load first: re-dispatches may land on the new one.
        self.ledger.forget(r)
        old = self._old_life.pop(r, None)
        if old is not None:  # restarted twice before we learned anything: the oldest is gone
            self._settle(r, old[1], old[0], f"rank {r} restarted")
        ack = self.inflight.take_acked(r)
        unsent = self.outbox.unsent(r)
        sent = {s for s in self.inflight.seqs(r) if s not in unsent}
        # What the old life admitted was delivered to it, never to the new one: lost now.
        admitted = {s for s in sent if s <= ack}
        if admitted:
            self._settle(r, admitted, ack, f"rank {r} restarted")
            sent -= admitted
        if not sent:
            return
        self._old_life[r] = (ack, sent, time.monotonic() + self.heartbeat_timeout_s)
        self._reschedule()
        if lo is not None:
            self._settle_old_life(r, lo)

    def _settle_old_life(self, r: int, lo: int | None) -> None:
        ack, sent, _ = self._old_life.pop(r)
        self._settle(r, {s for s in sent if lo is None or s < lo}, ack, f"rank {r} restarted")

    def _settle(self, r: int, seqs: set[int], ack: int, why: str) -> None:
        """Requests *seqs* of rank *r* were lost with it: fail the ones it had admitted
        (``<= ack``) or its senders aborted, re-dispatch the others (their frames are still here)."""
        failed = moved = 0
        for s in sorted(seqs):
            e = self.inflight.pop(r, s)
            if e is None:
                continue  # completed meanwhile
            if s <= ack or e.admitted:
                failed += 1
                self._fail(r, e.request.rid, e.reply, CODE_RANK_DIED, f"{why}; the request was running there")
            elif e.aborted:
                # Its sender gave it up, and the abort went to this rank: not sent again.
                failed += 1
                self._fail(r, e.request.rid, e.reply, CODE_ABORTED, f"{why}; its sender had aborted it")
            else:
                moved += 1
                self._redispatch(e, r)
        if failed or moved:
            self.log.warning("rank_requests_settled", rank=r, failed=failed, redispatched=moved)
