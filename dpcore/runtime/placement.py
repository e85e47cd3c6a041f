"""Requests in, dispatches out: the controller's per-request path.

A request is decoded (header only), given a prefill rank on the PD decode side, placed by
the policy chain, staged in its rank's outbox behind a dispatch frame, and recorded in
flight. Whatever cannot be placed is rejected back to its sender with a code and a reason;
a request that was already dispatched once (moved off a dead rank) fails instead.

An abort goes only to the rank holding its request (:meth:`Placer.abort`), staged in that
rank's outbox like a dispatch. The sender's request and its abort reach the ingress in the
order sent (one PUSH connection per sender, and ZMQ keeps a connection's order), and the
controller's messages to one rank leave in staging order over one PUSH socket, so the rank
receives the dispatch before the abort.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import zmq

from dpcore import wire
from dpcore.errors import InvalidRankError, RequestRejected, WireError
from dpcore.manager import PolicyManager
from dpcore.model import Request
from dpcore.runtime.books import (
    ABORT_FORWARDED, ABORT_PARKED_ENDED, ABORT_REPEATED, ABORT_UNKNOWN, Books, rate_limited,
)  # fmt: skip
from dpcore.runtime.inflight import CODE_ABORTED, InFlight, InFlightTable
from dpcore.runtime.outbox import Outbox
from dpcore.runtime.parking import PDHandler, PrefillParking
from dpcore.runtime.transport import NOBLOCK, Transport

#: Requests handled per poller turn before reports are drained again.
BATCH = 128

#: Time budget of one policy chain call (``--policy-budget-ms``); over it is an overrun.
#: Policies are Python: a call cannot be pre-empted, so the budget is measured and
#: reported (``policy_overruns``, a log line naming the policy), and request sizes are
#: bounded at the wire so a policy's work per request stays bounded.
POLICY_BUDGET_S = 0.005
CODE_RANK_BUSY = "rank_busy"
CODE_SHUTDOWN = "shutting_down"
CODE_MALFORMED = "malformed_request"


class RankBusyError(RequestRejected):
    """The chosen rank's socket and backlog are both full."""

    code = CODE_RANK_BUSY
    http_status = 503


class Placer:
    """Places requests on ranks and answers the ones it cannot place.

    :ivar stopping: Set when the controller stops: new requests are refused
        (``shutting_down``) from then on.
    """

    def __init__(
        self,
        manager: PolicyManager,
        transport: Transport,
        outbox: Outbox,
        inflight: InFlightTable,
        parking: PrefillParking,
        books: Books,
        *,
        pd: PDHandler | None,
        log: Any,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        policy_budget_s: float = POLICY_BUDGET_S,
    ) -> None:
        self.manager = manager
        #: The ranges request numbers must fall in (``--max-context-tokens``...).
        self.limits = limits
        #: A policy chain call longer than this is an overrun: counted and logged.
        self.policy_budget_s = policy_budget_s
        self.transport = transport
        self.outbox = outbox
        self.inflight = inflight
        self.parking = parking
        self.books = books
        self.pd = pd
        self.log = log
        self.mode = manager.ctx.disaggregation_mode
        self.dp_size = manager.ctx.dp_size
        self.stopping = False
        self._encode_dispatch = wire.dispatch_encoder()
        #: Called with every well-formed request received and its header frame (``dpcore serve
        #: --record``); must not block.
        self.record: Callable[[Request, Any], None] | None = None
        #: Told the id of every request rejected or failed here (``--record``'s output length).
        self.record_end: Callable[[str, int], None] | None = None
        #: A shadow chain (:class:`dpcore.runtime.shadow.Shadow`) asked after each live decision.
        self.shadow: Any = None

    def on_ingress(self) -> bool:
        """Handle up to :data:`BATCH` ingress messages; ``True`` if more may be waiting."""
        # Frames are received without copying (copy=False) and forwarded the same way:
        # the payload is never copied or decoded in this process.
        recv = self.transport.ingress.recv
        decode = wire.decode_ingress
        limits = self.limits
        place = self.place
        books = self.books
        for _ in range(BATCH):
            try:
                hdr = recv(NOBLOCK, copy=False)
            except zmq.Again:
                return False
            payload: Any = b""
            extra = 0
            if hdr.more:
                payload = recv(copy=False)
                more = payload.more
                while more:  # a request has at most two frames; drop the rest
                    more = recv(copy=False).more
                    extra += 1
            try:
                msg = decode(hdr, limits)  # msgpack reads the frame's buffer directly
            except wire.MalformedHeader as exc:
                books.received += 1
                self.reject(exc.reply, exc.rid, exc.code, str(exc))
                continue
            except WireError as exc:
                self._bad_frame(exc)
                continue
            if type(msg) is wire.Control:
                if msg.op == wire.ABORT:
                    self.abort(msg, hdr.bytes)
                else:
                    self.broadcast(hdr.bytes)
                continue
            request, reply = msg
            books.received += 1
            if self.record is not None:
                self.record(request, hdr)
            if extra:
                msg = f"request {request.rid!r}: {extra + 2} frames, expected a header and a payload"
                self.reject(reply, request.rid, CODE_MALFORMED, msg)
            elif self.stopping:
                self.reject(reply, request.rid, CODE_SHUTDOWN, "controller is shutting down")
            else:
                place(request, reply, hdr, payload, None)
        return True

    def place(
        self, request: Request, reply: str, hdr: Any, payload: Any, moved_from: int | None, pr: int | None = None
    ) -> None:
        """Choose a rank for one request and send it (or reject/park it).

        *moved_from*: the dead rank it is re-dispatched from; *pr*: its prefill rank, when
        already known (PD decode).
        """
        if pr is None and self.mode == "decode":
            try:
                pr = self.parking.prefill_rank(request, reply, hdr, payload)
            except RequestRejected as exc:
                self._refuse(exc, request, reply, moved_from)
                return
            if pr is None:
                return  # parked until the PD handler resolves it
        t0 = time.perf_counter()
        try:
            rank = self.manager.select(request)
        except RequestRejected as exc:
            self._refuse(exc, request, reply, moved_from)
            return
        took = time.perf_counter() - t0
        self.books.decided(took, self.manager.ctx.decision)
        if took > self.policy_budget_s:
            self._overrun(request, took)
        if self.shadow is not None:
            self.shadow.decide(request, rank)  # on the state the live chain saw
        self._send(rank, request, reply, hdr, payload, pr, moved_from)

    def _overrun(self, request: Request, took: float) -> None:
        b = self.books
        b.policy_overruns += 1
        if rate_limited(b.policy_overruns):
            self.log.warning(
                "policy_over_budget", policy=self.manager.ctx.decision.policy, took_ms=round(took * 1000, 3),
                budget_ms=self.policy_budget_s * 1000, rid=request.rid, num_tokens=request.num_tokens,
                block_hashes=len(request.block_hashes), count=b.policy_overruns,
            )  # fmt: skip

    def redispatch(self, e: InFlight, moved_from: int) -> None:
        """Place *e* again: it was on *moved_from*, which is gone, and was never admitted."""
        self.place(e.request, e.reply, e.header, e.payload, moved_from, e.prefill_rank)

    def _send(self, rank: int, request: Request, reply: str, hdr: Any, payload: Any, pr: int | None, moved_from: int | None) -> None:
        if not self.outbox.has_room(rank):
            msg = f"rank {rank} is not taking requests (socket and backlog of {self.outbox.limit} full)"
            self._refuse(RankBusyError(msg, rid=request.rid), request, reply, moved_from, rank)
            return
        if self.pd is not None and self.mode == "prefill":
            # Before sending: a request decode could not pair (no room, or pinned against
            # follow_bootstrap_room) is refused here rather than left to time out on decode.
            try:
                self.pd.on_prefill_dispatch(request, rank)
            except RequestRejected as exc:
                self._refuse(exc, request, reply, moved_from, rank)
                return
            except Exception as exc:  # registration is best effort; the request still goes
                self.log.error("pd_register_failed", rid=request.rid, rank=rank, error=repr(exc))
        seq = self.manager.dispatched(request, rank)
        if self.shadow is not None:
            self.shadow.dispatched(request, rank, seq)
        self.outbox.stage(rank, seq, (self._encode_dispatch(rank, seq, pr), hdr, payload))
        self.inflight.add(rank, seq, InFlight(request, reply, hdr, payload, pr, rank))
        books = self.books
        books.dispatched[rank] += 1
        if moved_from is not None:
            books.redispatched[moved_from] += 1

    def _refuse(self, exc: RequestRejected, request: Request, reply: str, moved_from: int | None, rank: int | None = None) -> None:
        if moved_from is None:
            if rank is None and isinstance(exc, InvalidRankError):
                v = request.routed_dp_rank if request.routed_dp_rank is not None else request.data_parallel_rank
                if type(v) is int and 0 <= v < self.dp_size:
                    rank = v
            self.reject(reply, request.rid, exc.code, str(exc), rank)
        else:
            # It was dispatched once already: from the sender's view it failed.
            msg = f"rank {moved_from} died before admitting it, and it could not be re-dispatched: {exc}"
            self.fail(moved_from, request.rid, reply, exc.code, msg)

    def reject(self, reply: str, rid: str | None, code: str, msg: str, rank: int | None = None) -> None:
        """Answer a request that was never dispatched: ``rej`` with *code* and *msg*."""
        self.books.reject(code, rank)
        if self.record_end is not None and rid is not None:
            self.record_end(rid, -1)
        self.transport.reply(reply, wire.encode_rej(rid, code, msg))

    def fail(self, rank: int, rid: str, reply: str, code: str, msg: str) -> None:
        """Answer a request that was dispatched to *rank* and will not finish: ``fail``."""
        self.books.fail(code, rank)
        if self.record_end is not None:
            self.record_end(rid, -1)
        self.transport.reply(reply, wire.encode_fail(rid, rank, code, msg))

    def broadcast(self, frame: bytes) -> None:
        """Stage a control frame for every active rank (dropped, with a warning, where full)."""
        self.books.controls += 1
        outbox = self.outbox
        for r in self.manager.ledger.active_ranks:
            if not outbox.has_room(r):
                self.log.warning("control_dropped", rank=r, reason="rank socket and backlog full")
                continue
            outbox.stage(r, None, (frame,))

    def _bad_frame(self, exc: WireError) -> None:
        """Count a frame that is not a dpcore message (nobody to answer), logged now and then."""
        books = self.books
        books.bad_frames += 1
        if rate_limited(books.bad_frames):
            self.log.warning("bad_frame", reason=str(exc), count=books.bad_frames)

    def abort(self, ctl: wire.Control, frame: bytes) -> None:
        """Route abort *ctl* (received as *frame*): to the rank holding its request, else end
        the request if it is parked, else nothing; counted by reason and outcome either way.

        Each in-flight entry is sent at most one abort, so what aborts add to a rank's
        backlog is bounded by what it holds (they are staged even past the backlog limit:
        dropping one would leave its request running for nobody).
        """
        books = self.books
        try:
            rid, reply = wire.abort_target(ctl)
        except WireError as exc:
            self._bad_frame(exc)
            return
        books.controls += 1
        entries = self.inflight.find(rid, reply)
        if entries:
            outcome = ABORT_REPEATED
            for e in entries:
                if not e.aborted:
                    e.aborted = True
                    self.outbox.stage(e.rank, None, (frame,))
                    outcome = ABORT_FORWARDED
        elif self.parking.unpark(rid, reply) is not None:
            outcome = ABORT_PARKED_ENDED
            self.reject(reply, rid, CODE_ABORTED, "aborted by its sender while waiting for its prefill rank")
        else:
            outcome = ABORT_UNKNOWN
        books.aborted(wire.abort_reason(ctl), outcome)

    def drain_pd(self) -> None:
        """Place the parked requests whose prefill rank the PD handler has found."""
        for (request, reply, hdr, payload), res in self.parking.resolved():
            if isinstance(res, RequestRejected):
                self.reject(reply, request.rid, res.code, str(res))
            elif self.stopping:
                self.reject(reply, request.rid, CODE_SHUTDOWN, "controller is shutting down")
            else:
                self.place(request, reply, hdr, payload, None, res)

    def reject_parked(self) -> None:
        for request, reply, _, _ in self.parking.take_all():
            self.reject(reply, request.rid, CODE_SHUTDOWN, "controller is shutting down")
