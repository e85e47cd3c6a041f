"""The worker SDK: what an engine rank's scheduler uses to talk to the dpcore controller.

A rank PULLs its dispatches from the controller and PUSHes load reports back. The engine
calls :meth:`Worker.admit` when a request enters its queue (the next load report tells the
controller the last admitted dispatch sequence, so the controller stops counting that
request on top of the report), sends outputs straight to the request's sender with
:meth:`Worker.send`, and reports its load with :meth:`Worker.report`. A load report is
also the heartbeat: :meth:`Worker.recv` sends one by itself whenever the rank has been quiet
for ``heartbeat_interval_s``, so a rank that is alive never looks dead.

:mod:`dpcore.sdk.echo` is a minimal rank built on it (the realistic mock engine is
``dpcore mock-worker``).

Aborts: when a sender gives a request up it sends an ``abort`` control message (see
:func:`dpcore.wire.encode_abort`), which the controller forwards only to the rank holding
the request. The worker drops a dispatch of that request that has not been handed out yet
(acknowledging it, so the controller's books close), and tells the engine about one already
handed out through *on_abort* (or :attr:`Worker.aborts`); the engine stops it and calls
:meth:`Worker.finish`.

An abort the controller forwards always reaches the rank after the request's dispatch: the
sender sends both over one connection, in order, and the controller stages both in the
rank's one outbox and sends them over its one socket, in order. The worker still remembers
the last aborts of requests it has not seen (:data:`_ABORTS_KEPT`) and drops a dispatch
that comes after its abort: that happens only for an abort sent to every rank as a plain
control (:meth:`Controller.broadcast <dpcore.runtime.controller.Controller.broadcast>`, or
a controller that broadcasts aborts) racing its request's dispatch. An abort of a request
that rank never gets (it was lost with the rank's previous life; or two processes are
connected as one rank, and ZMQ dealt the dispatch and the abort to different ones) is
remembered the same way and ages out.

A dispatch addressed to another rank (two ranks started on swapped endpoints) is never
served: it is counted in :attr:`Worker.misaddressed` and logged as an error, because every
request sent to this socket is then lost to its rank.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import structlog
import zmq
from attrs import frozen

from dpcore import security, wire
from dpcore.cacheindex import CLEARED, REMOVED, STORED
from dpcore.errors import WireError
from dpcore.model import Request
from dpcore.sdk import endpoints
from dpcore.wire import Control

__all__ = ["Control", "Work", "Worker"]

#: Done seqs sent per report at most (the rest go in the next one).
_DONE_PER_REPORT = 4096
#: A rank's reply sockets keep unsent outputs this long after being closed.
_REPLY_LINGER_MS = 1000
#: Control messages kept for :attr:`Worker.controls` (each at most the controller's
#: control-frame limit, 64 KiB by default: at most 16 MiB held).
_CONTROLS_KEPT = 256
#: Aborted requests remembered, so a dispatch arriving after its abort is dropped too.
_ABORTS_KEPT = 4096
#: Seconds between two "misaddressed dispatch" error lines.
_MISADDRESSED_LOG_S = 5.0
_log = structlog.get_logger("dpcore.worker")


def _clamp(x: Any, lo: int, hi: int) -> int:
    """*x* as an int inside the wire's range (an engine's counter can never break a report);
    something that is not a finite number becomes *lo*."""
    try:
        x = int(x)
    except (TypeError, ValueError, OverflowError):
        return lo
    return lo if x < lo else hi if x > hi else x


@frozen
class Work:
    """One request dispatched to this rank.

    :ivar rid: Request id.
    :ivar seq: Dispatch sequence number (what :meth:`Worker.admit` acknowledges).
    :ivar header: The request header exactly as the sender wrote it.
    :ivar payload: The sender's opaque payload (e.g. token ids, sampling params).
    :ivar reply: The sender's reply endpoint (outputs go there).
    :ivar prefill_rank: PD decode: the prefill rank holding this request's KV, else ``None``.
    :ivar request: The header as a :class:`~dpcore.model.Request` (num_tokens, block_hashes...).
    """

    rid: str
    seq: int
    header: Mapping[str, Any]
    payload: bytes
    reply: str
    prefill_rank: int | None
    request: Request


class Worker:
    """One rank's connection to the controller.

    :param rank: This rank's index.
    :param dispatch_endpoint: The controller's dispatch endpoint for this rank.
    :param report_endpoint: The controller's load-report endpoint (shared by all ranks).
    :param zmq_ctx: A context to share; a private one is made and terminated otherwise.
    :param epoch: Identifies this life of the rank; default: the start time in ns, so a
        restarted rank is recognised as new.
    :param heartbeat_interval_s: Longest quiet time before :meth:`recv` sends a heartbeat.
    :param reply_sockets: How many senders' reply sockets to keep open (LRU).
    :param on_control: Called with each control message; otherwise they queue in
        :attr:`controls`. Aborts are not control messages for this purpose.
    :param on_abort: Called with the :class:`Work` of an aborted request the engine already
        has (stop it, then call :meth:`finish`); otherwise they queue in :attr:`aborts`.
    :param curve: CURVE keys for TCP (:mod:`dpcore.security`); default: from the environment,
        ``False``: none.
    """

    def __init__(
        self,
        rank: int,
        *,
        dispatch_endpoint: str,
        report_endpoint: str,
        zmq_ctx: zmq.Context | None = None,  # type: ignore[type-arg]
        epoch: int | None = None,
        heartbeat_interval_s: float = 0.5,
        reply_sockets: int = 64,
        on_control: Callable[[Control], None] | None = None,
        curve: security.CurveArg = None,
        on_abort: Callable[[Work], None] | None = None,
    ) -> None:
        if type(rank) is not int or rank < 0:
            msg = f"rank must be an integer >= 0, got {rank!r}"
            raise ValueError(msg)
        self.rank = rank
        self.epoch = time.time_ns() if epoch is None else epoch
        self.heartbeat_interval_s = heartbeat_interval_s
        self.on_control = on_control
        self.on_abort = on_abort
        #: Control messages received and not handled by *on_control*.
        self.controls: deque[Control] = deque(maxlen=_CONTROLS_KEPT)
        #: Aborted requests the engine has, when there is no *on_abort*.
        self.aborts: deque[Work] = deque(maxlen=_ABORTS_KEPT)
        #: Requests dropped or stopped because their sender aborted them.
        self.aborted = 0
        #: Dispatches addressed to another rank (never served).
        self.misaddressed = 0
        #: Report values outside the wire's range, sent as the nearest bound instead.
        self.clamped_reports = 0
        #: Frames that could not be decoded (logged by the caller if it wants).
        self.bad_frames = 0
        #: Outputs dropped because the sender's reply socket was full or gone.
        self.dropped_outputs = 0
        self._own_ctx = zmq_ctx is None
        self._ctx = zmq_ctx or zmq.Context()
        self._rx = self._ctx.socket(zmq.PULL)
        self._rx.linger = 0
        self._tx = self._ctx.socket(zmq.PUSH)
        self._tx.linger = 0
        self._curve = security.resolve(curve, security.RANK)
        security.client(self._rx, dispatch_endpoint, self._curve)
        security.client(self._tx, report_endpoint, self._curve)
        self._rx.connect(dispatch_endpoint)
        self._tx.connect(report_endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._rx, zmq.POLLIN)
        # Outputs are the product: give them a moment to leave when a socket is evicted.
        self._replies = endpoints.PushCache(
            self._ctx, size=reply_sockets, linger_ms=_REPLY_LINGER_MS, curve=self._curve
        )
        self._report_seq = 0
        self._ack = -1
        self._lo: int | None = None
        self._done: list[int] = []
        # Output tokens of each _done seq (-1: not counted); sent only when one is counted.
        self._out: list[int] = []
        self._load = (0, 0, 0, 0, 0, -1)
        self._last_sent = 0.0
        # KV events waiting for kv_flush(), their block keys, and the next batch's seq.
        self._kv: list[list[Any]] = []
        self._kv_keys = 0
        self._kv_seq = 0
        #: This rank's prefix-cache capacity in blocks, sent with every KV batch (0: not said).
        self.kv_capacity_blocks = 0
        #: KV batches that could not be sent (the controller then sees a sequence gap).
        self.kv_dropped_batches = 0
        # (rid, reply) -> its Work once handed out (None: aborted before it arrived).
        self._handed: OrderedDict[tuple[str, str], Work] = OrderedDict()
        self._aborted_keys: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._misaddressed_logged = -_MISADDRESSED_LOG_S
        # Say hello at once: the controller learns this life (and its epoch) before any work.
        self.heartbeat()

    # ------------------------------------------------------------------ receiving

    def watch(self, socket: zmq.Socket) -> None:  # type: ignore[type-arg]
        """Also wake :meth:`recv` when *socket* (one of the engine's own) has input, so the
        engine waits on its sockets and the controller's in one poll."""
        self._poller.register(socket, zmq.POLLIN)

    def recv(self, timeout_s: float = 0.0, max_items: int = 1024) -> list[Work]:
        """Dispatches that arrived, waiting up to *timeout_s* for the first one.

        Sends a heartbeat first if the rank has been quiet for too long.
        """
        if time.monotonic() - self._last_sent >= self.heartbeat_interval_s:
            self.heartbeat()
        out: list[Work] = []
        # Never sleep past the next heartbeat.
        wait = min(timeout_s, max(0.0, self._last_sent + self.heartbeat_interval_s - time.monotonic()))
        if not self._poller.poll(int(wait * 1000)):
            return out
        rx = self._rx
        while len(out) < max_items:
            try:
                frames = rx.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            work = self._decode(frames)
            if work is not None:
                out.append(work)
        return out

    def _decode(self, frames: list[bytes]) -> Work | None:
        try:
            if len(frames) == 1:
                self._control(wire.decode_ctl(frames[0]))
                return None
            d = wire.decode_dispatch(frames)
            req, reply = wire.request_from_header(d.header, wire.WIDEST_LIMITS)
        except WireError:
            self.bad_frames += 1
            return None
        if reply is None:
            self.bad_frames += 1
            return None
        if d.rank != self.rank:
            self._misaddressed(d.rank)
            return None
        if self._lo is None:
            self._lo = d.seq
        work = Work(req.rid, d.seq, d.header, d.payload, reply, d.prefill_rank, req)
        key = (req.rid, reply)
        if key in self._aborted_keys:
            self.aborted += 1
            self.finish(work)  # never started: acknowledged and done, nothing sent
            return None
        handed = self._handed
        handed[key] = work
        if len(handed) > _ABORTS_KEPT:
            handed.popitem(last=False)
        return work

    def _misaddressed(self, rank: int) -> None:
        self.misaddressed += 1
        now = time.monotonic()
        if now - self._misaddressed_logged >= _MISADDRESSED_LOG_S:
            self._misaddressed_logged = now
            _log.error(
                "dispatch_for_another_rank", rank=self.rank, addressed_to=rank, count=self.misaddressed,
                fix="this rank is connected to another rank's dispatch endpoint; check --rank and --dispatch",
            )  # fmt: skip

    def _abort(self, ctl: Control) -> None:
        try:
            key = wire.abort_target(ctl)
        except WireError:
            self.bad_frames += 1
            return
        work = self._handed.pop(key, None)
        if work is None:  # not here yet (or another rank's): drop it if it comes
            self._aborted_keys[key] = None
            if len(self._aborted_keys) > _ABORTS_KEPT:
                self._aborted_keys.popitem(last=False)
            return
        self.aborted += 1
        if self.on_abort is not None:
            self.on_abort(work)
        else:
            self.aborts.append(work)

    def _control(self, ctl: Control) -> None:
        if ctl.op == wire.ABORT:
            self._abort(ctl)
        elif self.on_control is not None:
            self.on_control(ctl)
        else:
            self.controls.append(ctl)

    # ------------------------------------------------------------------ progress

    def admit(self, work: Work) -> None:
        """The engine took *work* into its queue; the next report acknowledges it."""
        if work.seq > self._ack:
            self._ack = work.seq

    def finish(self, work: Work, output_tokens: int | None = None) -> None:
        """*work* ended without a final :meth:`send` (e.g. the engine aborted it).

        *output_tokens*: how many tokens it generated, when the engine counts them: the next
        load report carries it (``dpcore serve --record`` writes it as the output length).
        """
        self.admit(work)
        self._done.append(work.seq)
        self._out.append(-1 if output_tokens is None else _clamp(output_tokens, 0, wire.MAX_OUTPUT_TOKENS))
        self._handed.pop((work.rid, work.reply), None)

    def send(
        self,
        work: Work,
        meta: Mapping[str, Any] | None = None,
        payload: bytes = b"",
        final: bool = True,
        output_tokens: int | None = None,
    ) -> bool:
        """Send an output for *work* to its sender; ``final`` marks it finished (with
        *output_tokens* generated in all, if counted: see :meth:`finish`).

        Never blocks: if the sender's socket is full or gone the output is dropped and
        counted in :attr:`dropped_outputs`. Returns whether it was sent.
        """
        if final:
            self.finish(work, output_tokens)
        try:
            sock = self._replies.get(work.reply)
            sock.send_multipart((wire.encode_out(work.rid, self.rank, final, meta), payload), zmq.NOBLOCK)
        except zmq.ZMQError:  # full (Again), or an endpoint nobody can connect to: never fatal
            self.dropped_outputs += 1
            return False
        return True

    # ------------------------------------------------------------------ reports

    def report(
        self,
        num_running: int,
        num_waiting: int,
        num_tokens: int,
        kv_used: int = 0,
        kv_capacity: int = 0,
        done_seqs: Iterable[int] = (),
        prefill_tokens: int = -1,
    ) -> bool:
        """Send a load report (also a heartbeat). *done_seqs* add to what :meth:`send`
        with ``final=True`` and :meth:`finish` recorded. *prefill_tokens*: uncached prompt
        tokens still to compute for prefills in progress (``-1``: not known), which lets
        backlog-aware policies see a long prefill the moment it starts. Returns whether it
        was sent."""
        self._load = (num_running, num_waiting, num_tokens, kv_used, kv_capacity, prefill_tokens)
        added = len(self._done)
        self._done.extend(done_seqs)
        self._out.extend([-1] * (len(self._done) - added))
        return self._send_report()

    def heartbeat(self) -> bool:
        """Re-send the last reported load (with anything finished since)."""
        return self._send_report()

    def _send_report(self) -> bool:
        run, wait, tok, kvu, kvc, pf = self._load
        reqs, toks = wire.MAX_REPORT_REQUESTS, wire.MAX_REPORT_TOKENS
        load = (_clamp(run, 0, reqs), _clamp(wait, 0, reqs), _clamp(tok, 0, toks), _clamp(kvu, 0, toks),
                _clamp(kvc, 0, toks), _clamp(pf, -1, toks))  # fmt: skip
        if load != self._load:
            self.clamped_reports += 1
            self._load = load
        run, wait, tok, kvu, kvc, pf = load
        done = self._done[:_DONE_PER_REPORT]
        out = self._out[: len(done)]
        self._report_seq += 1
        frame = wire.encode_load(
            self.rank, epoch=self.epoch, seq=self._report_seq, ack=self._ack, run=run, wait=wait, tok=tok,
            kvu=kvu, kvc=kvc, pf=pf, done=done, lo=self._lo, out=out if max(out, default=-1) >= 0 else None,
        )  # fmt: skip
        self._last_sent = time.monotonic()
        try:
            self._tx.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False  # the controller is not reading; keep `done` for the next report
        del self._done[: len(done)]
        del self._out[: len(done)]
        return True

    # ------------------------------------------------------------------ KV events

    def kv_stored(self, keys: Iterable[int], parent: int | None = None) -> None:
        """The cache stored *keys* (dpcore block hashes) as a chain under *parent* (``None``:
        from the root). Queued; sent by :meth:`kv_flush`, or at once when a batch is full."""
        for part in self._kv_parts(keys):
            self._kv_event([STORED, parent, part], len(part))
            parent = part[-1]

    def kv_removed(self, keys: Iterable[int]) -> None:
        """The cache evicted *keys*."""
        for part in self._kv_parts(keys):
            self._kv_event([REMOVED, part], len(part))

    def kv_cleared(self) -> None:
        """The cache dropped everything (e.g. a cache flush)."""
        self._kv_event([CLEARED], 0)

    def kv_resync(self, chains: Iterable[tuple[int | None, Iterable[int]]]) -> bool:
        """Tell the controller everything the cache holds, as ``(parent, keys)`` chains:
        what a rank sends when the controller asks (control op ``kv_resync``) after it lost
        some of this rank's batches. Events queued before are dropped (the resync replaces
        them). Returns whether every batch was sent."""
        self._kv.clear()
        self._kv_keys = 0
        self.kv_cleared()
        for parent, keys in chains:
            self.kv_stored(keys, parent)
        return self.kv_flush()

    def kv_flush(self) -> bool:
        """Send the queued KV events as one batch; returns whether it was sent (``True``
        when nothing was queued). An unsent batch is counted in :attr:`kv_dropped_batches`
        and leaves a gap in the sequence, which makes the controller treat this rank's cache
        as unknown until a resync."""
        if not self._kv:
            return True
        frame = wire.encode_kv(self.rank, epoch=self.epoch, seq=self._kv_seq, events=self._kv, capacity=self.kv_capacity_blocks)
        self._kv_seq += 1
        self._kv = []
        self._kv_keys = 0
        try:
            self._tx.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.kv_dropped_batches += 1
            return False
        return True

    def _kv_parts(self, keys: Iterable[int]) -> Iterator[list[int]]:
        """*keys* in parts that each fit the batch being filled (a full batch is sent first)."""
        keys = list(keys)
        while keys:
            room = wire.MAX_KV_KEYS - self._kv_keys
            if room <= 0:
                self.kv_flush()
                continue
            part, keys = keys[:room], keys[room:]
            yield part

    def _kv_event(self, event: list[Any], keys: int) -> None:
        self._kv.append(event)
        self._kv_keys += keys
        if len(self._kv) >= wire.MAX_KV_EVENTS or self._kv_keys >= wire.MAX_KV_KEYS:
            self.kv_flush()

    @property
    def acked_seq(self) -> int:
        return self._ack

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        self._replies.close()
        self._rx.close(linger=0)
        self._tx.close(linger=0)
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
