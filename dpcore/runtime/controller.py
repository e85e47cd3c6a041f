"""The controller: one ZMQ poller loop between request senders and ``dp_size`` ranks.

Sockets (all bound here; senders and ranks connect):

* **ingress** (PULL): ``req`` and ``ctl`` messages from any number of senders.
* **dispatch[r]** (PUSH, one per rank): dispatches wait in a bounded per-rank backlog and are
  sent ``NOBLOCK`` (bounded ``SNDHWM``) before the loop polls again, so a burst costs each
  rank socket one wake-up. What a full socket (slow, dead, or not connected yet) does not
  take stays in the backlog until the socket is writable; when the backlog is full too, the
  request is rejected (``rank_busy``). The loop never blocks on a rank.
* **report** (PULL): load reports, drained completely every turn before any request is
  handled. Only the newest report per rank is applied (latest wins); the ``done`` lists of
  all of them are used, so no completion is lost by coalescing.

Per request only the header frame is decoded; it is forwarded byte for byte, with the
payload frame, behind a small dispatch frame (rank, dispatch seq, prefill rank).

**What happens to requests on a rank that dies** (silent past ``heartbeat_timeout_s``, or
restarted with a new epoch): the controller keeps each request's frames until the rank
acknowledges admission (``ack`` in its load reports). Requests the rank had not admitted are
re-dispatched to another rank (they may have been lost in the dead socket's queue, and no
engine has started them). Admitted requests are failed: their sender gets a ``fail`` with
code ``rank_died``. Requests admitted after the rank's last report look unadmitted and are
re-dispatched, so a request may in rare cases run twice; the client SDK keeps only the first
final reply per request. A rank restarted before its deadline keeps what is still in its
backlog (never sent); of what was sent, its reports' ``lo`` (first seq this life received)
tells the new life's requests from the lost ones.

Accounting (see :meth:`Controller.stats`), exact at any moment::

    received   = dispatched - redispatched + rejected + parked
    dispatched = completed + failed + redispatched + in_flight      (per rank, and in total)
"""

from __future__ import annotations

import bisect
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import msgpack
import structlog
import zmq
from attrs import frozen

from dpcore import security, wire
from dpcore.cacheindex import KvEventBatch
from dpcore.errors import ConfigError, InvalidRankError, RequestRejected, WireError
from dpcore.manager import PolicyManager
from dpcore.model import LoadReport, Request
from dpcore.sdk import endpoints as ep

#: Decision latency histogram bucket upper bounds, in seconds.
LATENCY_BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 1e-2)
#: Distinct (policy, reason) label pairs kept; further ones count as (policy, "other").
MAX_REASONS = 64
#: Requests handled per poller turn before reports are drained again.
BATCH = 128
#: How long rejections and failures may wait to reach a sender after the controller closes.
REPLY_LINGER_MS = 500
#: Reply sockets kept open (one per sender endpoint, LRU).
REPLY_SOCKETS = 256
#: Rejections/failures queued per sender: a shutdown or a dead rank can fail thousands at
#: once, possibly before the connection to that sender is even up. Frames are ~100 bytes.
REPLY_HWM = 1 << 16

CODE_RANK_DIED = "rank_died"
CODE_RANK_BUSY = "rank_busy"
CODE_SHUTDOWN = "shutting_down"
#: Control op asking one rank to resend everything its cache holds (``{"rank": r}``), sent
#: when the cache index lost track of it; at most once per interval per rank.
KV_RESYNC = "kv_resync"
KV_RESYNC_INTERVAL_S = 1.0


class RankBusyError(RequestRejected):
    """The chosen rank's socket and backlog are both full."""

    code = CODE_RANK_BUSY
    http_status = 503


class PrefillRankUnknownError(RequestRejected):
    """PD decode: nothing says which prefill rank holds this request's KV."""

    code = "prefill_rank_unknown"


class PDHandler(Protocol):
    """The PD plug point (implemented in :mod:`dpcore.runtime.pd`)."""

    socket: Any

    def on_prefill_dispatch(self, request: Request, rank: int) -> None: ...

    def resolve_now(self, request: Request) -> int | None: ...

    def submit(self, request: Request) -> None: ...

    def drain(self) -> list[tuple[str, int | RequestRejected]]: ...


@frozen
class ControllerEndpoints:
    """Where the controller listens. Ranks connect to ``dispatch[rank]`` and ``report``."""

    ingress: str
    report: str
    dispatch: tuple[str, ...]

    @classmethod
    def ipc(cls, run_dir: str, dp_size: int) -> ControllerEndpoints:
        return cls(
            ep.ipc(run_dir, "ingress"),
            ep.ipc(run_dir, "report"),
            tuple(ep.ipc(run_dir, f"rank{r}") for r in range(dp_size)),
        )

    @classmethod
    def tcp(cls, dp_size: int, host: str = "127.0.0.1", port_base: int = 0) -> ControllerEndpoints:
        """``port_base`` 0: random free ports; else ingress, report, rank 0, 1... from it."""
        if port_base == 0:
            return cls(f"tcp://{host}:*", f"tcp://{host}:*", tuple(f"tcp://{host}:*" for _ in range(dp_size)))
        return cls(
            f"tcp://{host}:{port_base}",
            f"tcp://{host}:{port_base + 1}",
            tuple(f"tcp://{host}:{port_base + 2 + r}" for r in range(dp_size)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"ingress": self.ingress, "report": self.report, "dispatch": list(self.dispatch)}


def _send_frames(sock: zmq.Socket, frames: Sequence[Any]) -> bool:  # type: ignore[type-arg]
    """Send a multipart message without blocking and without copying received frames.

    Returns ``False`` when the socket is full (nothing was sent). Only the first part can
    be refused: ZMQ takes the remaining parts of a message it accepted.
    """
    last = len(frames) - 1
    try:
        sock.send(frames[0], _MORE_NOBLOCK if last else _NOBLOCK, copy=False)
    except zmq.Again:
        return False
    for i in range(1, last):
        sock.send(frames[i], _SNDMORE, copy=False)
    if last:
        sock.send(frames[last], 0, copy=False)
    return True


# Plain ints: combining pyzmq's enum flags per message costs more than the send itself.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_MORE_NOBLOCK = _NOBLOCK | _SNDMORE


def _rate_limited(n: int) -> bool:
    """Log the 1st, 10th, 100th... occurrence of a repeated problem, not every one."""
    return n in (1, 10, 100) or n % 1000 == 0


class Controller:
    """Routes requests from senders to ranks through a :class:`PolicyManager`.

    Sockets are bound in the constructor, so :attr:`endpoints` is known (random TCP ports
    resolved) before the loop runs. Run the loop with :meth:`run` (blocks; ``dpcore serve``)
    or :meth:`start` (a thread; tests and benchmarks), and end it with :meth:`stop` or
    :meth:`request_stop` (safe from any thread and from signal handlers).

    :param manager: The policy chain and its ledger.
    :param endpoints: Where to listen; default: ipc sockets under *run_dir*.
    :param run_dir: Directory for ipc sockets; default: a fresh temporary one (removed on close).
    :param heartbeat_timeout_s: A rank silent this long becomes inactive.
    :param sndhwm: Messages queued per rank socket before dispatches stay in the backlog.
    :param backlog: Dispatches waiting per rank in the controller (staged for the next send,
        or refused by a full socket); when full, new ones for that rank are ``rank_busy``.
    :param pd: PD handler (see :class:`PDHandler`), in prefill or decode mode.
    :param prefill_dp_size: PD decode: the prefill side's dp size (validates
        ``disagg_prefill_dp_rank``; ``1`` means every request's KV is on prefill rank 0).
    :param drain_timeout_s: On stop, how long in-flight requests may still complete.
    :param curve: CURVE keys for TCP endpoints (:mod:`dpcore.security`); default: from the
        environment, ``False``: none.
    :param max_message_bytes: Largest ingress frame; the transport drops the connection of
        a peer that sends a bigger one (the client SDK refuses to send it).
    """

    def __init__(
        self,
        manager: PolicyManager,
        *,
        endpoints: ControllerEndpoints | None = None,
        run_dir: str | None = None,
        zmq_ctx: zmq.Context | None = None,  # type: ignore[type-arg]
        heartbeat_timeout_s: float = 3.0,
        sndhwm: int = 1000,
        backlog: int = 1024,
        pd: PDHandler | None = None,
        prefill_dp_size: int | None = None,
        drain_timeout_s: float = 10.0,
        log: Any = None,
        curve: security.CurveArg = None,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
    ) -> None:
        n = manager.ctx.dp_size
        mode = manager.ctx.disaggregation_mode
        if not heartbeat_timeout_s > 0:
            msg = f"--heartbeat-timeout must be > 0 seconds, got {heartbeat_timeout_s}"
            raise ConfigError(msg)
        if sndhwm < 1 or backlog < 1:
            msg = f"--sndhwm and --backlog must be >= 1, got {sndhwm} and {backlog}"
            raise ConfigError(msg)
        if prefill_dp_size is not None and (mode != "decode" or prefill_dp_size < 1):
            msg = f"--prefill-dp-size={prefill_dp_size} needs --disaggregation-mode decode and a value >= 1"
            raise ConfigError(msg)
        if endpoints is not None and len(endpoints.dispatch) != n:
            msg = f"{len(endpoints.dispatch)} dispatch endpoints given for dp_size {n}"
            raise ConfigError(msg)
        self.manager = manager
        self.ledger = manager.ledger
        self.dp_size = n
        self.mode = mode
        self.pd = pd
        self.prefill_dp_size = prefill_dp_size
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.backlog_max = backlog
        self.drain_timeout_s = drain_timeout_s
        self.log = log if log is not None else structlog.get_logger("dpcore.controller")

        # --- counters (plain ints: metrics read them at scrape time, the hot path stays cheap)
        self.received = 0
        self.bad_frames = 0
        self.bad_reports = 0
        self.stale_reports = 0
        # KV events: batches from another life than the current one; resyncs asked, and when
        # each rank may be asked again.
        self.kv_stale_batches = 0
        self.kv_resyncs = 0
        self._kv_resync_at = [0.0] * n
        self.unknown_done = 0
        self.undeliverable = 0
        self.reports = 0
        self.controls = 0
        self.internal_errors = 0
        self.dispatched = [0] * n
        self.completed = [0] * n
        self.failed = [0] * n
        self.redispatched = [0] * n
        self.rejected = [0] * n
        self.rejected_unranked = 0
        self.rejected_by_code: dict[str, int] = {}
        self.failed_by_code: dict[str, int] = {}
        self.decision_reasons: dict[tuple[str, str], int] = {}
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0

        # --- state
        # seq -> [request, reply, header, payload, prefill rank]; header and payload are
        # dropped when the rank admits the request (they are only kept for a re-dispatch).
        self._inflight: list[dict[int, list[Any]]] = [{} for _ in range(n)]
        self._backlog: list[deque[tuple[int | None, Sequence[Any]]]] = [deque() for _ in range(n)]
        self._acked = [-1] * n
        self._epoch: list[int | None] = [None] * n
        # A rank that restarted before anyone noticed: the previous life's ack, the seqs that
        # may have gone to it, and when to stop waiting to learn which did (see _new_life).
        self._old_life: dict[int, tuple[int, set[int], float]] = {}
        self._parked: dict[str, tuple[Request, str, Any, Any]] = {}
        self._commands: deque[Callable[[], None]] = deque()
        self._stop_at: float | None = None
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._final_stats: dict[str, Any] | None = None
        self._next_liveness = 0.0
        self._pack = msgpack.Packer(use_bin_type=True).pack

        # --- sockets
        self._own_ctx = zmq_ctx is None
        self._ctx = zmq_ctx or zmq.Context()
        self._curve = security.resolve(curve)
        self._zap: security.ZapGuard | None = None
        self.max_message_bytes = max_message_bytes
        self._run_dir: str | None = None
        if endpoints is None:
            if run_dir is None:
                run_dir = self._run_dir = ep.make_run_dir()
            endpoints = ControllerEndpoints.ipc(run_dir, n)
        self._socks: list[zmq.Socket] = []  # type: ignore[type-arg]
        try:
            eps = (endpoints.ingress, endpoints.report, *endpoints.dispatch)
            self._zap = security.guard_for(self._ctx, self._curve, eps)
            self._ingress = self._bind(zmq.PULL, endpoints.ingress, maxmsgsize=max_message_bytes)
            self._reports = self._bind(zmq.PULL, endpoints.report, maxmsgsize=wire.MAX_REPORT_BYTES)
            self._dispatch = [self._bind(zmq.PUSH, e, sndhwm=sndhwm) for e in endpoints.dispatch]
        except BaseException:
            self._close_sockets()
            raise
        self.endpoints = ControllerEndpoints(
            self._ingress.last_endpoint.decode(),
            self._reports.last_endpoint.decode(),
            tuple(s.last_endpoint.decode() for s in self._dispatch),
        )
        # Bounded linger: a rejection or failure sent just before shutdown should still arrive.
        self._replies = ep.PushCache(
            self._ctx, size=REPLY_SOCKETS, linger_ms=REPLY_LINGER_MS, sndhwm=REPLY_HWM, curve=self._curve
        )
        # A socketpair wakes the poller from other threads and signal handlers.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._poller.register(self._reports, zmq.POLLIN)
        self._poller.register(self._ingress, zmq.POLLIN)
        self._pd_sock = getattr(pd, "socket", None)
        if self._pd_sock is not None:
            self._poller.register(self._pd_sock, zmq.POLLIN)
        self._writable = {s: r for r, s in enumerate(self._dispatch)}
        self._watching: set[int] = set()
        # Ranks with dispatches staged this turn; sent together before the next poll, so a
        # burst wakes each rank socket's I/O once instead of once per message.
        self._dirty: set[int] = set()

    def _bind(self, kind: int, endpoint: str, sndhwm: int | None = None, maxmsgsize: int = -1) -> zmq.Socket:  # type: ignore[type-arg]
        s = self._ctx.socket(kind)
        s.linger = 0
        if sndhwm is not None:
            s.sndhwm = sndhwm
        self._socks.append(s)
        s.maxmsgsize = maxmsgsize
        security.server(s, endpoint, self._curve)
        ep.bind(s, endpoint)
        return s

    # ------------------------------------------------------------------ control from outside

    def start(self) -> threading.Thread:
        """Run the loop in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("controller already started")
        self._thread = threading.Thread(target=self.run, name="dpcore-controller", daemon=True)
        self._thread.start()
        return self._thread

    def request_stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish for up to *drain_timeout_s*, then
        fail the rest and close. Safe from any thread and from a signal handler."""
        drain = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        at = time.monotonic() + drain
        if self._stop_at is None or at < self._stop_at:
            self._stop_at = at
        self._wake()

    def stop(self, drain_timeout_s: float = 0.0, join_timeout_s: float = 30.0) -> dict[str, Any]:
        """:meth:`request_stop`, wait for the loop thread, return the final :meth:`stats`."""
        self.request_stop(drain_timeout_s)
        if self._thread is not None:
            self._thread.join(join_timeout_s)
            if self._thread.is_alive():
                msg = "controller loop did not stop in time"
                raise RuntimeError(msg)
        elif not self._running and not self._closed:
            self._shutdown()
        return self._final_stats or self.stats()

    def broadcast(self, op: str, data: Any = None) -> None:
        """Send a control message to every active rank (from any thread)."""
        frame = wire.encode_ctl(op, data)
        self._commands.append(lambda: self._broadcast(frame))
        self._wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run *fn* on the loop thread (from any thread), e.g. to read state consistently."""
        self._commands.append(fn)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed: either way nothing to do

    # ------------------------------------------------------------------ accounting

    def in_flight(self) -> list[int]:
        return [len(d) for d in self._inflight]

    def in_flight_tokens(self) -> list[int]:
        return [sum(e[0].num_tokens for e in list(d.values())) for d in self._inflight]

    def consistent_stats(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """:meth:`stats` taken on the loop thread, between two messages (from any thread).

        :meth:`stats` itself reads counters the loop may be updating, so from another
        thread the identities can be off by a message in flight through the code.
        """
        if not self._running or threading.current_thread() is self._thread:
            return self.stats()
        fut: Future[dict[str, Any]] = Future()
        self.call_soon(lambda: fut.set_result(self.stats()))
        return fut.result(timeout_s)

    def stats(self) -> dict[str, Any]:
        """Counters and the two accounting identities (see the module docstring)."""
        inflight = self.in_flight()
        dispatched = sum(self.dispatched)
        redisp = sum(self.redispatched)
        rejected = sum(self.rejected) + self.rejected_unranked
        return {
            "received": self.received,
            "dispatched": dispatched,
            "redispatched": redisp,
            "rejected": rejected,
            "parked": len(self._parked),
            "completed": sum(self.completed),
            "failed": sum(self.failed),
            "in_flight": sum(inflight),
            "bad_frames": self.bad_frames,
            "reports": self.reports,
            "bad_reports": self.bad_reports,
            "stale_reports": self.stale_reports,
            "kv_events": {**self.manager.cache.stats(), "stale_lives": self.kv_stale_batches, "resyncs_asked": self.kv_resyncs},
            "unknown_done": self.unknown_done,
            "undeliverable_replies": self.undeliverable,
            "controls": self.controls,
            "internal_errors": self.internal_errors,
            "rejected_by_code": dict(self.rejected_by_code),
            "failed_by_code": dict(self.failed_by_code),
            "active_ranks": list(self.ledger.active_ranks),
            "per_rank": [
                {
                    "rank": r,
                    "dispatched": self.dispatched[r],
                    "completed": self.completed[r],
                    "failed": self.failed[r],
                    "redispatched": self.redispatched[r],
                    "rejected": self.rejected[r],
                    "in_flight": inflight[r],
                    "backlog": len(self._backlog[r]),
                    "active": self.ledger.is_active(r),
                }
                for r in range(self.dp_size)
            ],
            "balanced": {
                "received": self.received == dispatched - redisp + rejected + len(self._parked),
                "dispatched": dispatched
                == sum(self.completed) + sum(self.failed) + redisp + sum(inflight),
            },
        }

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """The poller loop; returns the final :meth:`stats` after a stop."""
        if self._closed:
            raise RuntimeError("controller is closed")
        self._running = True
        poller = self._poller
        wake_fd = self._wake_r.fileno()
        reports = self._reports
        ingress = self._ingress
        pd_sock = self._pd_sock
        writable = self._writable
        self.log.info(
            "controller_started",
            dp_size=self.dp_size,
            chain=list(self.manager.chain),
            mode=self.mode,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            **self.endpoints.to_dict(),
        )
        # Every rank gets a full heartbeat timeout from now to say hello.
        for r in self.ledger.active_ranks:
            self.ledger.heard_from(r)
        self._next_liveness = time.monotonic() + self.heartbeat_timeout_s
        try:
            while True:
                now = time.monotonic()
                if now >= self._next_liveness:
                    self._check_liveness(now)
                if self._stop_at is not None and self._drain_step(now):
                    break
                if self._dirty:
                    self._flush_dirty()
                wait = self._next_liveness - now
                if self._stop_at is not None:
                    wait = min(wait, 0.05)
                events = poller.poll(max(1, int(wait * 1000) + 1))
                if not events:
                    continue
                try:
                    ev = dict(events)
                    if wake_fd in ev:
                        self._on_wake()
                    if reports in ev:
                        self._drain_reports()
                    if pd_sock is not None and pd_sock in ev:
                        self._drain_pd()
                    if ingress in ev:
                        self._on_ingress()
                    if len(ev) > 1 or ingress not in ev:
                        for sock, flags in events:
                            if flags & zmq.POLLOUT and sock in writable:
                                self._flush(writable[sock])
                except Exception:
                    # A bug must cost at most the messages of this turn, never the loop.
                    self.internal_errors += 1
                    if _rate_limited(self.internal_errors):
                        self.log.exception("controller_internal_error", count=self.internal_errors)
        finally:
            self._shutdown()
            self._running = False
        return self._final_stats or self.stats()

    def _on_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        cmds = self._commands
        while cmds:
            fn = cmds.popleft()
            try:
                fn()
            except Exception as exc:  # a caller's function must not take the loop down
                self.log.error("call_soon_failed", fn=repr(fn), error=repr(exc))

    # ------------------------------------------------------------------ requests

    def _on_ingress(self) -> bool:
        """Handle up to :data:`BATCH` ingress messages; ``True`` if more may be waiting."""
        # Frames are received without copying (copy=False) and forwarded the same way:
        # the payload is never copied or decoded in this process.
        recv = self._ingress.recv
        decode = wire.decode_ingress
        place = self._place
        for _ in range(BATCH):
            try:
                hdr = recv(_NOBLOCK, copy=False)
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
                msg = decode(hdr)  # msgpack reads the frame's buffer directly
            except wire.MalformedHeader as exc:
                self.received += 1
                self._reject(exc.reply, exc.rid, exc.code, str(exc))
                continue
            except WireError as exc:
                self._bad_frame(str(exc))
                continue
            if type(msg) is wire.Control:
                self._broadcast(hdr.bytes)
                continue
            request, reply = msg
            self.received += 1
            if extra:
                msg = f"request {request.rid!r}: {extra + 2} frames, expected a header and a payload"
                self._reject(reply, request.rid, "malformed_request", msg)
            elif self._stop_at is not None:
                self._reject(reply, request.rid, CODE_SHUTDOWN, "controller is shutting down")
            else:
                place(request, reply, hdr, payload, None)
        return True

    def _place(
        self, request: Request, reply: str, hdr: Any, payload: Any, moved_from: int | None, pr: int | None = None
    ) -> None:
        """Choose a rank for one request and send it (or reject/park it).

        *moved_from*: the dead rank it is re-dispatched from; *pr*: its prefill rank, when
        already known (PD decode).
        """
        if pr is None and self.mode == "decode":
            try:
                pr = self._prefill_rank(request, reply, hdr, payload)
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
        dt = time.perf_counter() - t0
        self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, dt)] += 1
        self.latency_sum += dt
        d = self.manager.ctx.decision
        key = (d.policy, d.reason)
        reasons = self.decision_reasons
        if key in reasons:
            reasons[key] += 1
        elif len(reasons) < MAX_REASONS:
            reasons[key] = 1
        else:
            key = (d.policy, "other")
            reasons[key] = reasons.get(key, 0) + 1
        self._send(rank, request, reply, hdr, payload, pr, moved_from)

    def _send(self, rank: int, request: Request, reply: str, hdr: Any, payload: Any, pr: int | None, moved_from: int | None) -> None:
        seq = self.ledger.next_dispatch_seq(rank)
        frames = (self._pack({"v": 1, "t": "dispatch", "rank": rank, "seq": seq, "pr": pr}), hdr, payload)
        bl = self._backlog[rank]
        if len(bl) >= self.backlog_max:
            self._flush(rank)
            if len(bl) >= self.backlog_max:
                self._busy(rank, request, reply, moved_from)
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
        bl.append((seq, frames))
        self._dirty.add(rank)
        self.manager.dispatched(request, rank)
        self._inflight[rank][seq] = [request, reply, hdr, payload, pr]
        self.dispatched[rank] += 1
        if moved_from is not None:
            self.redispatched[moved_from] += 1

    def _busy(self, rank: int, request: Request, reply: str, moved_from: int | None) -> None:
        msg = f"rank {rank} is not taking requests (socket and backlog of {self.backlog_max} full)"
        self._refuse(RankBusyError(msg, rid=request.rid), request, reply, moved_from, rank)

    def _refuse(self, exc: RequestRejected, request: Request, reply: str, moved_from: int | None, rank: int | None = None) -> None:
        if moved_from is None:
            if rank is None and isinstance(exc, InvalidRankError):
                v = request.routed_dp_rank if request.routed_dp_rank is not None else request.data_parallel_rank
                if type(v) is int and 0 <= v < self.dp_size:
                    rank = v
            self._reject(reply, request.rid, exc.code, str(exc), rank)
        else:
            # It was dispatched once already: from the sender's view it failed.
            msg = f"rank {moved_from} died before admitting it, and it could not be re-dispatched: {exc}"
            self._fail_one(moved_from, request.rid, reply, exc.code, msg)

    def _flush(self, rank: int) -> None:
        bl = self._backlog[rank]
        sock = self._dispatch[rank]
        while bl:
            if not _send_frames(sock, bl[0][1]):
                self._watch_out(rank)  # the rest goes when the socket has room
                return
            bl.popleft()
        self._unwatch_out(rank)

    def _flush_dirty(self) -> None:
        for r in self._dirty:
            self._flush(r)
        self._dirty.clear()

    def _watch_out(self, rank: int) -> None:
        """Poll *rank*'s socket for writability while its backlog is not empty."""
        if rank not in self._watching:
            self._watching.add(rank)
            self._poller.register(self._dispatch[rank], zmq.POLLOUT)

    def _unwatch_out(self, rank: int) -> None:
        if rank in self._watching:
            self._watching.discard(rank)
            self._poller.unregister(self._dispatch[rank])

    def _bad_frame(self, why: str) -> None:
        self.bad_frames += 1
        if _rate_limited(self.bad_frames):
            self.log.warning("bad_frame", reason=why, count=self.bad_frames)

    # ------------------------------------------------------------------ PD

    def _prefill_rank(self, request: Request, reply: str, hdr: Any, payload: Any) -> int | None:
        """Decode side: the prefill rank, or ``None`` after parking the request."""
        pdr = request.disagg_prefill_dp_rank
        if pdr is not None:
            limit = self.prefill_dp_size
            if type(pdr) is not int or pdr < 0 or (limit is not None and pdr >= limit):
                bound = f"[0, {limit})" if limit is not None else ">= 0"
                msg = f"disagg_prefill_dp_rank={pdr!r} is not a prefill rank {bound}"
                raise InvalidRankError(msg, rid=request.rid)
            return pdr
        if self.pd is not None:
            pr = self.pd.resolve_now(request)
            if pr is not None:
                return pr
            if request.rid in self._parked:
                msg = f"request id {request.rid!r} is already waiting for its prefill rank"
                raise PrefillRankUnknownError(msg, rid=request.rid)
            self._parked[request.rid] = (request, reply, hdr, payload)
            self.pd.submit(request)
            return None
        if self.prefill_dp_size == 1:
            return 0
        msg = (
            f"request {request.rid!r} has no disagg_prefill_dp_rank and no bootstrap registry is "
            "configured to look it up (--bootstrap-url), and --prefill-dp-size is not 1"
        )
        raise PrefillRankUnknownError(msg, rid=request.rid)

    def _drain_pd(self) -> None:
        assert self.pd is not None  # only registered with a PD handler
        for rid, res in self.pd.drain():
            item = self._parked.pop(rid, None)
            if item is None:
                continue
            request, reply, hdr, payload = item
            if isinstance(res, RequestRejected):
                self._reject(reply, rid, res.code, str(res))
            elif self._stop_at is not None:
                self._reject(reply, rid, CODE_SHUTDOWN, "controller is shutting down")
            else:
                self._place(request, reply, hdr, payload, None, res)

    # ------------------------------------------------------------------ replies

    def _send_reply(self, endpoint: str, frame: bytes) -> None:
        try:
            self._replies.get(endpoint).send(frame, zmq.NOBLOCK)
        except (zmq.Again, zmq.ZMQError) as exc:
            self.undeliverable += 1
            if _rate_limited(self.undeliverable):
                self.log.warning("reply_undeliverable", endpoint=endpoint, error=str(exc), count=self.undeliverable)

    def _reject(self, reply: str, rid: str | None, code: str, msg: str, rank: int | None = None) -> None:
        if rank is None:
            self.rejected_unranked += 1
        else:
            self.rejected[rank] += 1
        self.rejected_by_code[code] = self.rejected_by_code.get(code, 0) + 1
        self._send_reply(reply, wire.encode_rej(rid, code, msg))

    def _fail_one(self, rank: int, rid: str, reply: str, code: str, msg: str) -> None:
        self.failed[rank] += 1
        self.failed_by_code[code] = self.failed_by_code.get(code, 0) + 1
        self._send_reply(reply, wire.encode_fail(rid, rank, code, msg))

    def _broadcast(self, frame: bytes) -> None:
        self.controls += 1
        for r in self.ledger.active_ranks:
            bl = self._backlog[r]
            if len(bl) >= self.backlog_max:
                self._flush(r)
                if len(bl) >= self.backlog_max:
                    self.log.warning("control_dropped", rank=r, reason="rank socket and backlog full")
                    continue
            bl.append((None, (frame,)))
            self._dirty.add(r)

    # ------------------------------------------------------------------ reports

    def _drain_reports(self) -> None:
        recv = self._reports.recv
        latest: dict[int, LoadReport] = {}
        n = self.dp_size
        while True:
            try:
                buf = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self.reports += 1
            try:
                msg = wire.decode_rank_message(buf)
            except WireError as exc:
                self._bad_report(str(exc))
                continue
            if type(msg) is KvEventBatch:
                self._kv_batch(msg)
                continue
            report, done, lo = msg
            r = report.rank
            if r >= n:
                self._bad_report(f"load report from rank {r}, but ranks are 0..{n - 1}")
                continue
            known = self._epoch[r]
            if known != report.epoch:
                # A smaller epoch is a late report from a previous life, while the current
                # life is alive. Once it went silent past its deadline, any other epoch is a
                # new life: a restart on a host whose clock is behind must not be locked out.
                if known is not None and report.epoch < known and self.ledger.is_active(r):
                    self.stale_reports += 1
                    continue
                if known is not None:
                    self._new_life(r, report.epoch, lo)
                self._epoch[r] = report.epoch
                latest.pop(r, None)
            elif lo is not None and r in self._old_life:
                self._settle_old_life(r, lo)
            if done:
                self._complete(r, done)
            prev = latest.get(r)
            if prev is None or report.seq > prev.seq:
                latest[r] = report
        for report in latest.values():
            self._apply(report)

    def _kv_batch(self, batch: KvEventBatch) -> None:
        """Apply a rank's KV events to the cache index; ask the rank for a resync when the
        index lost track of it (a gap, a restart mid-stream, a stretch of inactivity)."""
        r = batch.rank
        if r >= self.dp_size or batch.epoch != self._epoch[r]:
            self.kv_stale_batches += 1  # from a previous life, or before this life's hello
            return
        index = self.manager.cache
        if index.apply(batch) or index.known(r):
            return
        now = time.monotonic()
        if now >= self._kv_resync_at[r] and len(self._backlog[r]) < self.backlog_max:
            self._kv_resync_at[r] = now + KV_RESYNC_INTERVAL_S
            self.kv_resyncs += 1
            self._backlog[r].append((None, (wire.encode_ctl(KV_RESYNC, {"rank": r}),)))
            self._dirty.add(r)

    def _bad_report(self, why: str) -> None:
        self.bad_reports += 1
        if _rate_limited(self.bad_reports):
            self.log.warning("bad_report", reason=why, count=self.bad_reports)

    def _apply(self, report: LoadReport) -> None:
        r = report.rank
        was_active = self.ledger.is_active(r)
        self.manager.report(report)
        if not was_active:
            self.log.info("rank_rejoined", rank=r, epoch=report.epoch)
            self._reschedule_liveness()
        ack = report.acked_seq
        prev = self._acked[r]
        if ack > prev:
            self._acked[r] = ack
            inflight = self._inflight[r]
            # Admitted: the rank owns it now; drop the frames we kept for a re-dispatch.
            if ack - prev <= len(inflight):
                for s in range(prev + 1, ack + 1):
                    e = inflight.get(s)
                    if e is not None:
                        e[2] = e[3] = None
            else:
                for s, e in inflight.items():
                    if s <= ack:
                        e[2] = e[3] = None

    def _complete(self, r: int, done: Sequence[int]) -> None:
        inflight = self._inflight[r]
        for s in done:
            if inflight.pop(s, None) is None:
                self.unknown_done += 1
            else:
                self.completed[r] += 1

    # ------------------------------------------------------------------ liveness

    def _reschedule_liveness(self) -> None:
        self._next_liveness = min(self._next_liveness, time.monotonic() + self.heartbeat_timeout_s)

    def _check_liveness(self, now: float) -> None:
        timeout = self.heartbeat_timeout_s
        for r in self.ledger.expire(timeout, now):
            self.log.warning("rank_inactive", rank=r, silent_s=round(now - self.ledger.last_seen[r], 3))
            self._lose(r, f"rank {r} stopped reporting for more than {timeout:g}s")
        for r, (_, _, deadline) in list(self._old_life.items()):
            if now >= deadline:
                self._settle_old_life(r, None)
        seen = self.ledger.last_seen
        active = self.ledger.active_ranks
        nxt = min((seen[r] for r in active), default=now) + timeout
        nxt = min([nxt, *(d for _, _, d in self._old_life.values())])
        # Wake just after the earliest deadline; never sooner than 10 ms from now.
        self._next_liveness = max(nxt + 0.001, now + 0.01)

    def _lose(self, r: int, why: str) -> None:
        """Rank *r* is gone: settle everything it held, including its backlog."""
        old = self._old_life.pop(r, None)
        if old is not None:
            self._settle(r, old[1], old[0], why)
        self._backlog[r].clear()  # never sent: re-dispatched below with the rest
        self._unwatch_out(r)
        ack = self._acked[r]
        self._acked[r] = -1
        self._settle(r, set(self._inflight[r]), ack, why)

    def _new_life(self, r: int, epoch: int, lo: int | None) -> None:
        """Rank *r* restarted (a new epoch) before its silence was noticed.

        Requests still in its backlog were never sent and go to the new life. Of those sent,
        the ones from ``lo`` on (the first seq the new life received) are the new life's; the
        others were lost with the old one. Until a report says ``lo`` they cannot be told
        apart (some may still be on their way to the new life), so they wait for it, at most
        one heartbeat timeout, and are settled as lost then.
        """
        self.log.warning("rank_restarted", rank=r, epoch=epoch)
        # Forget the old life's load first: re-dispatches may land on the new one.
        self.ledger.forget(r)
        old = self._old_life.pop(r, None)
        if old is not None:  # restarted twice before we learned anything: the oldest is gone
            self._settle(r, old[1], old[0], f"rank {r} restarted")
        ack = self._acked[r]
        self._acked[r] = -1
        unsent = {x[0] for x in self._backlog[r]}
        sent = {s for s in self._inflight[r] if s not in unsent}
        if not sent:
            return
        self._old_life[r] = (ack, sent, time.monotonic() + self.heartbeat_timeout_s)
        self._reschedule_liveness()
        if lo is not None:
            self._settle_old_life(r, lo)

    def _settle_old_life(self, r: int, lo: int | None) -> None:
        ack, sent, _ = self._old_life.pop(r)
        self._settle(r, {s for s in sent if lo is None or s < lo}, ack, f"rank {r} restarted")

    def _settle(self, r: int, seqs: set[int], ack: int, why: str) -> None:
        """Requests *seqs* of rank *r* were lost with it: fail the ones it had admitted
        (``<= ack``), re-dispatch the others (their frames are still here)."""
        inflight = self._inflight[r]
        failed = moved = 0
        for s in sorted(seqs):
            e = inflight.pop(s, None)
            if e is None:
                continue  # completed meanwhile
            request, reply, hdr, payload, pr = e
            if s <= ack or hdr is None:
                failed += 1
                self._fail_one(r, request.rid, reply, CODE_RANK_DIED, f"{why}; the request was running there")
            else:
                moved += 1
                self._place(request, reply, hdr, payload, r, pr)
        if failed or moved:
            self.log.warning("rank_requests_settled", rank=r, failed=failed, redispatched=moved)

    # ------------------------------------------------------------------ shutdown

    def _drain_step(self, now: float) -> bool:
        """While stopping: True when it is time to close."""
        self._reject_parked()
        return sum(len(d) for d in self._inflight) == 0 or now >= (self._stop_at or 0.0)

    def _reject_parked(self) -> None:
        for rid, (_, reply, _, _) in self._parked.items():
            self._reject(reply, rid, CODE_SHUTDOWN, "controller is shutting down")
        self._parked.clear()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Whatever is still queued at the ingress is answered (shutting_down), not dropped.
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        while self._on_ingress():
            pass
        self._reject_parked()
        for r, inflight in enumerate(self._inflight):
            for e in inflight.values():
                self._fail_one(r, e[0].rid, e[1], "controller_shutdown", "the controller stopped before the request finished")
            inflight.clear()
            self._backlog[r].clear()
        self._final_stats = self.stats()
        self._close_sockets()
        s = self._final_stats
        self.log.info(
            "controller_stopped",
            **{k: s[k] for k in ("received", "dispatched", "redispatched", "rejected", "completed", "failed", "in_flight")},
            balanced=all(s["balanced"].values()),
        )

    def _close_sockets(self) -> None:
        replies = getattr(self, "_replies", None)
        if replies is not None:
            replies.close()
        for s in self._socks:
            s.close(linger=0)
        for s in (getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if s is not None:
                s.close()
        zap, self._zap = getattr(self, "_zap", None), None
        if zap is not None:
            zap.release()  # before term(): the handler's sockets live in this context
        if self._own_ctx:
            self._ctx.term()
        ep.remove_run_dir(self._run_dir)

    def close(self) -> None:
        """Close without running (or after :meth:`run` returned)."""
        if self._running:
            self.stop()
        else:
            self._shutdown()

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        else:
            self.close()

