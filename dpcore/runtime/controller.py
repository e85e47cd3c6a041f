"""The controller: one ZMQ poller loop between request senders and ``dp_size`` ranks.

Per request only the header frame is decoded; it is forwarded byte for byte, with the
payload frame, behind a small dispatch frame (:func:`dpcore.wire.dispatch_encoder`: rank,
dispatch seq, prefill rank). The parts, one job each:

* :mod:`~dpcore.runtime.transport`: the sockets, the wake-up pair, replies to senders;
* :mod:`~dpcore.runtime.outbox`: per-rank backlogs in front of the rank sockets;
* :mod:`~dpcore.runtime.inflight`: dispatched requests until they finish;
* :mod:`~dpcore.runtime.lifecycle`: load reports, rank lives and deaths, and what becomes
  of a dead rank's requests;
* :mod:`~dpcore.runtime.parking`: PD decode requests waiting for their prefill rank;
* :mod:`~dpcore.runtime.books`: the counters and the accounting identities.

This module places requests and runs the loop. Each turn, in this order: liveness
deadlines, staged dispatches sent, one poll, then wake-ups (commands from other threads),
reports, PD answers, requests, writable rank sockets, connection events of rank sockets.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import structlog
import zmq

from dpcore import security, wire
from dpcore.errors import ConfigError
from dpcore.manager import PolicyManager
from dpcore.runtime import defaults
from dpcore.runtime.books import Books, rate_limited
from dpcore.runtime.defaults import ADMISSION_TIMEOUT_S, STARTUP_TIMEOUT_S
from dpcore.runtime.inflight import InFlightTable
from dpcore.runtime.lifecycle import RankLifecycle
from dpcore.runtime.outbox import Outbox
from dpcore.runtime.parking import PDHandler, PrefillParking
from dpcore.runtime.placement import POLICY_BUDGET_S, Placer
from dpcore.runtime.transport import ControllerEndpoints, Transport

__all__ = ["Controller", "ControllerEndpoints", "PDHandler"]

#: Longest poll while stopping, so the drain deadline is checked often enough.
STOP_POLL_S = 0.05
#: How long a cross-thread read (:meth:`Controller.snapshot`) waits for the loop.
SNAPSHOT_TIMEOUT_S = 5.0

CODE_CONTROLLER_SHUTDOWN = "controller_shutdown"


class Controller:
    """Routes requests from senders to ranks through a :class:`PolicyManager`.

    Sockets are bound in the constructor, so :attr:`endpoints` is known (random TCP ports
    resolved) before the loop runs. Run the loop with :meth:`run` (blocks; ``dpcore serve``)
    or :meth:`start` (a thread; tests and benchmarks), and end it with :meth:`stop` or
    :meth:`request_stop` (safe from any thread and from signal handlers).

    :param manager: The policy chain and its ledger.
    :param endpoints: Where to listen; default: ipc sockets under *run_dir*.
    :param run_dir: Directory for ipc sockets; default: a fresh temporary one (removed on close).
    :param heartbeat_timeout_s: A rank silent this long becomes inactive (> 0).
    :param startup_timeout_s: How long each rank has for its first report after the loop
        starts (a rank process, or an engine loading its model, takes a while to come up).
    :param sndhwm: Messages queued per rank socket before dispatches stay in the backlog (>= 1).
    :param backlog: Dispatches waiting per rank in the controller (staged for the next send,
        or refused by a full socket); when full, new ones for that rank are ``rank_busy`` (>= 1).
    :param pd: PD handler (see :class:`PDHandler`), in prefill or decode mode.
    :param prefill_dp_size: PD decode: the prefill side's dp size (validates
        ``disagg_prefill_dp_rank``; ``1`` means every request's KV is on prefill rank 0).
    :param drain_timeout_s: On stop, how long in-flight requests may still complete.
    :param curve: CURVE keys for TCP endpoints (:mod:`dpcore.security`); default: from the
        environment, ``False``: none.
    :param shadow: A shadow chain (:class:`~dpcore.runtime.shadow.Shadow`) decided beside the
        live one on every request, never dispatching.
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
        heartbeat_timeout_s: float = defaults.HEARTBEAT_TIMEOUT_S,
        sndhwm: int = defaults.SNDHWM,
        backlog: int = defaults.BACKLOG,
        pd: PDHandler | None = None,
        prefill_dp_size: int | None = None,
        drain_timeout_s: float = defaults.DRAIN_TIMEOUT_S,
        log: Any = None,
        curve: security.CurveArg = None,
        max_message_bytes: int = wire.MAX_MESSAGE_BYTES,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
        policy_budget_s: float = POLICY_BUDGET_S,
        admission_timeout_s: float = ADMISSION_TIMEOUT_S,
        shadow: Any = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
    ) -> None:
        n = manager.ctx.dp_size
        self.mode = manager.ctx.disaggregation_mode
        _check_options(self.mode, n, endpoints, heartbeat_timeout_s, sndhwm, backlog, prefill_dp_size)
        self.manager = manager
        self.ledger = manager.ledger
        self.dp_size = n
        self.pd = pd
        self.drain_timeout_s = drain_timeout_s
        self.log = log if log is not None else structlog.get_logger("dpcore.controller")
        self.books = Books(n)
        self.transport = Transport(
            n, endpoints=endpoints, run_dir=run_dir, zmq_ctx=zmq_ctx, sndhwm=sndhwm, curve=curve,
            max_message_bytes=max_message_bytes, books=self.books, log=self.log,
        )  # fmt: skip
        self.endpoints = self.transport.endpoints
        self.outbox = Outbox(self.transport.dispatch, self.transport.poller, backlog)
        self.inflight = InFlightTable(n)
        self.parking = PrefillParking(pd, prefill_dp_size)
        self.placer = Placer(
            manager, self.transport, self.outbox, self.inflight, self.parking, self.books, pd=pd, log=self.log,
            limits=limits, policy_budget_s=policy_budget_s,
        )  # fmt: skip
        self.lifecycle = RankLifecycle(
            manager, self.inflight, self.outbox, self.books, heartbeat_timeout_s=heartbeat_timeout_s,
            admission_timeout_s=admission_timeout_s, startup_timeout_s=startup_timeout_s,
            redispatch=self.placer.redispatch, fail=self.placer.fail, log=self.log, conns=self.transport.conns,
        )  # fmt: skip
        if shadow is not None:
            shadow.attach()
            self.placer.shadow = self.lifecycle.shadow = shadow
        self._pd_sock = getattr(pd, "socket", None)
        if self._pd_sock is not None:
            self.transport.poller.register(self._pd_sock, zmq.POLLIN)
        self._commands: deque[Callable[[], None]] = deque()
        self._stop_at: float | None = None
        self._running = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._final_stats: dict[str, Any] | None = None

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
        self.placer.stopping = True
        self.transport.wake()

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
        self.call_soon(lambda: self.placer.broadcast(frame))

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run *fn* on the loop thread (from any thread), e.g. to read state consistently."""
        self._commands.append(fn)
        self.transport.wake()

    def on_loop(self, fn: Callable[[], Any], timeout_s: float = SNAPSHOT_TIMEOUT_S) -> Any:
        """*fn*'s result, computed on the loop thread between two messages (from any thread).

        Runs *fn* directly when the loop is not running or when called on the loop thread.
        """
        if not self._running or threading.current_thread() is self._thread:
            return fn()
        fut: Future[Any] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller, not lost on the loop
                fut.set_exception(exc)

        self.call_soon(run)
        return fut.result(timeout_s)

    # ------------------------------------------------------------------ accounting

    def in_flight(self) -> list[int]:
        return self.inflight.counts()

    def stats(self) -> dict[str, Any]:
        """Counters and the accounting identities (:mod:`dpcore.runtime.books`).

        Read on the loop thread; from another thread use :meth:`consistent_stats`.
        """
        ledger = self.ledger
        active = [ledger.is_active(r) for r in range(self.dp_size)]
        return self.books.stats(
            self.inflight.counts(), self.outbox.sizes(), len(self.parking), active, self.manager.cache.stats()
        )

    def consistent_stats(self, timeout_s: float = SNAPSHOT_TIMEOUT_S) -> dict[str, Any]:
        """:meth:`stats` taken on the loop thread, between two messages (from any thread)."""
        return self.on_loop(self.stats, timeout_s)  # type: ignore[no-any-return]

    def snapshot(self, timeout_s: float = SNAPSHOT_TIMEOUT_S) -> dict[str, Any]:
        """Everything the metrics export, taken on the loop thread (from any thread)."""

        def take() -> dict[str, Any]:
            ledger = self.ledger
            return {
                **self.stats(),
                **self.books.metrics(),
                "in_flight_tokens": self.inflight.tokens(),
                "load_requests": list(ledger.requests),
                "load_tokens": list(ledger.tokens),
            }

        return self.on_loop(take, timeout_s)  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict[str, Any]:
        """The poller loop; returns the final :meth:`stats` after a stop."""
        if self._closed:
            raise RuntimeError("controller is closed")
        self._running = True
        t = self.transport
        poller, wake_fd, reports, ingress = t.poller, t.wake_fd, t.reports, t.ingress
        pd_sock = self._pd_sock
        outbox = self.outbox
        writable = outbox.writable
        life = self.lifecycle
        placer = self.placer
        conns = t.conns
        monitors = conns.rank_of if conns is not None else {}
        self.log.info(
            "controller_started",
            dp_size=self.dp_size,
            chain=list(self.manager.chain),
            mode=self.mode,
            heartbeat_timeout_s=life.heartbeat_timeout_s,
            **self.endpoints.to_dict(),
        )
        life.start()
        try:
            while True:
                now = time.monotonic()
                if now >= life.next_check:
                    life.check(now, reports)  # reads what has arrived before judging silence
                if self._stop_at is not None and self._drain_step(now):
                    break
                if outbox.dirty:
                    outbox.flush_dirty()
                wait = life.next_check - now
                if self._stop_at is not None:
                    wait = min(wait, STOP_POLL_S)
                events = poller.poll(max(1, int(wait * 1000) + 1))
                if not events:
                    continue
                try:
                    ev = dict(events)
                    if wake_fd in ev:
                        self._on_wake()
                    if reports in ev:
                        life.drain_reports(reports)
                    if pd_sock is not None and pd_sock in ev:
                        placer.drain_pd()
                    if ingress in ev:
                        placer.on_ingress()
                    if len(ev) > 1 or ingress not in ev:
                        for sock, flags in events:
                            if flags & zmq.POLLOUT and sock in writable:
                                outbox.flush(writable[sock])
                            elif sock in monitors:
                                conns.read(monitors[sock])  # type: ignore[union-attr]  # who connected as a rank
                except Exception:
                    # A bug must cost at most the messages of this turn, never the loop.
                    b = self.books
                    b.internal_errors += 1
                    if rate_limited(b.internal_errors):
                        self.log.exception("controller_internal_error", count=b.internal_errors)
        finally:
            self._shutdown()
            self._running = False
        return self._final_stats or self.stats()

    def _on_wake(self) -> None:
        self.transport.clear_wake()
        cmds = self._commands
        while cmds:
            fn = cmds.popleft()
            try:
                fn()
            except Exception as exc:  # a caller's function must not take the loop down
                self.log.error("call_soon_failed", fn=repr(fn), error=repr(exc))

    # ------------------------------------------------------------------ shutdown

    def _drain_step(self, now: float) -> bool:
        """While stopping: True when it is time to close."""
        self.placer.reject_parked()
        return self.inflight.total() == 0 or now >= (self._stop_at or 0.0)

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Whatever is still queued at the ingress is answered (shutting_down), not dropped.
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        placer = self.placer
        placer.stopping = True
        while placer.on_ingress():
            pass
        placer.reject_parked()
        for r, e in self.inflight.drain():
            msg = "the controller stopped before the request finished"
            placer.fail(r, e.request.rid, e.reply, CODE_CONTROLLER_SHUTDOWN, msg)
        for r in range(self.dp_size):
            self.outbox.drop(r)
        self._final_stats = self.stats()
        self.transport.close()
        s = self._final_stats
        self.log.info(
            "controller_stopped",
            **{k: s[k] for k in ("received", "dispatched", "redispatched", "rejected", "completed", "failed", "in_flight")},
            balanced=all(s["balanced"].values()),
        )

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


def _check_options(
    mode: str,
    dp_size: int,
    endpoints: ControllerEndpoints | None,
    heartbeat_timeout_s: float,
    sndhwm: int,
    backlog: int,
    prefill_dp_size: int | None,
) -> None:
    """Refuse bad controller options before any socket is bound."""
    if not heartbeat_timeout_s > 0:
        msg = f"--heartbeat-timeout must be > 0 seconds, got {heartbeat_timeout_s}"
        raise ConfigError(msg)
    if sndhwm < 1 or backlog < 1:
        msg = f"--sndhwm and --backlog must be >= 1, got {sndhwm} and {backlog}"
        raise ConfigError(msg)
    if prefill_dp_size is not None and (mode != "decode" or prefill_dp_size < 1):
        msg = f"--prefill-dp-size={prefill_dp_size} needs --disaggregation-mode decode and a value >= 1"
        raise ConfigError(msg)
    if endpoints is not None and len(endpoints.dispatch) != dp_size:
        msg = f"{len(endpoints.dispatch)} dispatch endpoints given for dp_size {dp_size}"
        raise ConfigError(msg)
