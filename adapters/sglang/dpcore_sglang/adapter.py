"""dpcore's policy chain in place of the dispatch inside SGLang's ``DataParallelController``.

:func:`install` takes a constructed controller and swaps four of its attributes; SGLang's
own event loop, message dispatcher, sockets, message formats and load-snapshot reader keep
running unchanged:

* ``dispatching`` (what the controller calls for every tokenized request): build a
  :class:`dpcore.Request`, ask the chain for a rank, encode it as SGLang's ``sock_send`` does and send it, then
  ``manager.dispatched`` (ledger + ``on_dispatch``). A request the chain rejects (bad
  ``routed_dp_rank``, missing ``bootstrap_room``, no active rank...) is answered to the
  tokenizer with SGLang's own ``AbortReq`` — the message a scheduler sends for a request it
  aborts — so only that request fails, with the reason and an HTTP status. Upstream raises
  instead, which ends the controller and the whole server.
* ``dp_budget`` (what ``refresh_load_budget`` hands every new load-snapshot batch): each
  snapshot becomes a :class:`dpcore.LoadReport` through ``manager.report``.
* ``recv_from_tokenizer``: wrapped so that SGLang's loop blocks in ``poll`` when idle
  instead of spinning, and so that block hashes the tokenizer process computed reach the
  dispatch (:mod:`dpcore_sglang.recv`, :mod:`dpcore_sglang.tokenizer_hashes`).
* ``dispatch_health_check``: SGLang's own, but a failure (no active rank) answers the
  health check instead of ending the server.

SGLang's active-rank state (``status``, ``dp_active``, updated by ``ActiveRanksOutput`` and
elastic scale-up) is mirrored into the ledger before each decision. A rank whose socket has
no scheduler connected (it died) is taken out of rotation for :data:`PEER_RETRY_S` instead of
stalling every rank, as upstream does.
"""

from __future__ import annotations

import atexit
import functools
import logging
import pickle
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import msgspec
import structlog
import zmq
from sglang.srt.managers import io_struct
from sglang.srt.managers.io_struct import AbortReq, sock_send
from sglang.utils import TypeBasedDispatcher
from sglang.srt.utils.network import get_zmq_socket

from dpcore.errors import MalformedRequestError, NoActiveRankError, RequestRejected
from dpcore.hashing import block_hashes
from dpcore.manager import PolicyManager
from dpcore.model import Request, make_request
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.convert import SnapshotFeed, to_request
from dpcore_sglang.forward import Forwarded
from dpcore_sglang.kv_events import SglangKvEvents
from dpcore_sglang.metrics import serve as serve_metrics
from dpcore_sglang.output_lengths import Ended
from dpcore_sglang.recv import BlockingReceiver
from dpcore_sglang.tokenizer_hashes import Carried, dp_controller_reads

log = logging.getLogger("dpcore_sglang")

#: How long a rank with no connected scheduler stays out of rotation before a send is tried again.
PEER_RETRY_S = 1.0
#: How long a send waits for a rank's first scheduler connection before giving up on it.
CONNECT_WAIT_MS = 5000


def policy_logger() -> Any:
    """A structlog logger that writes through SGLang's stdlib logging (filtered by level first)."""
    return structlog.wrap_logger(
        logging.getLogger("dpcore"),
        wrapper_class=structlog.stdlib.BoundLogger,
        processors=[
            structlog.stdlib.filter_by_level,
            structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
    )


def _runtime(ctl: Any) -> tuple[str, int]:
    """(disaggregation mode, page size) as SGLang resolved them for this process."""
    try:
        from sglang.srt.runtime_context import get_disagg, get_schedule

        return str(get_disagg().disaggregation_mode or "null"), int(get_schedule().page_size or 1)
    except Exception:  # not published (a controller built by hand): read the raw args
        args = ctl.server_args
        return str(getattr(args, "disaggregation_mode", None) or "null"), int(getattr(args, "page_size", None) or 1)


def frame_encoder() -> Callable[[Any], bytes]:
    """How SGLang 0.5.23 serialises a message to a scheduler (``io_struct.sock_send``).

    Pickle unless ``SGLANG_USE_PICKLE_IPC`` is off, then SGLang's msgpack encoder. The
    adapter encodes with it and sends the bytes itself, so that a send that would block
    can be retried on another rank without encoding again.
    """
    from sglang.srt.managers import io_struct

    if io_struct._USE_PICKLE_IPC:
        return functools.partial(pickle.dumps, protocol=pickle.HIGHEST_PROTOCOL)
    return io_struct.msgpack_encode


class DpcoreForwarded(msgspec.Struct, tag=True, array_like=True):
    """With SGLang's msgpack IPC, what its decoder makes of the receiver's marker bytes for a
    request to forward (registered with ``io_struct.hook_custom_types``, SGLang's own way to
    add a message type)."""


def _soft_watchdog_timeout() -> float | None:
    try:
        from sglang.srt.runtime_context import get_device

        return get_device().soft_watchdog_timeout
    except Exception:
        return None


class DpcoreDispatcher:
    """The adapter's state inside one controller; see the module docstring.

    :param ctl: The controller (after SGLang's ``__init__`` bound its sockets).
    :param config: The adapter's settings.
    :param manager: A ready manager (tests); default: built from ``config.method``.
    """

    def __init__(self, ctl: Any, config: AdapterConfig, manager: PolicyManager | None = None) -> None:
        self.ctl = ctl
        self.config = config
        dp_size = len(ctl.workers)
        mode, page_size = _runtime(ctl)
        if manager is None:
            manager = PolicyManager.from_method(
                config.method,
                dp_size=dp_size,
                disaggregation_mode=mode,
                options=config.options,
                log=policy_logger(),
            )
        self.manager = manager
        self.ledger = manager.ledger
        self.block_size = config.hashed_block_size(manager.needs_block_hashes, page_size)
        #: Block hashes that came from the tokenizer process with the request being dispatched
        #: (for the recording too when the chain reads none: the tokenizer hashes for it).
        self.carried = Carried(self.block_size or (config.whole_pages(page_size) if config.record else 0))
        self.feed = SnapshotFeed(dp_size)
        # SGLang's own KV events (--kv-events-config), when it publishes them: ctx.cache.
        self.kv_events = SglangKvEvents.from_server_args(ctl.server_args, manager.cache, dp_size, self.block_size)
        self.dispatched = [0] * dp_size
        self.rejected: Counter[str] = Counter()
        #: Decisions by (policy, reason), as the policies explained them.
        self.decisions: dict[tuple[str, str], int] = {}
        self.metrics_port: int | None = None
        self._abort_sock: zmq.Socket | None = None
        self._status: Any = None
        self._active: Any = None
        self._upstream_health_check = ctl.dispatch_health_check
        self._no_peer: set[int] = set()
        self._connected = [False] * dp_size
        self._retry_at = 0.0
        self.lost_peers = 0
        #: Requests placed from a route header and sent on as received / decoded here.
        self.forwarded = 0
        self.decoded = 0
        self._encode = frame_encoder()
        self.recorder = _recorder(config, self.block_size or config.whole_pages(page_size))
        #: Output tokens of ended requests, from the tokenizer process, for the recorder.
        self.ended = Ended(self.recorder.ended) if self.recorder is not None else None
        self._sync_active()

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, req: Any) -> None:
        """``ctl.dispatching``: place and send one decoded tokenized request."""
        ctl = self.ctl
        if ctl.status is not self._status or ctl._active_workers is not self._active:
            self._sync_active()
        if self.kv_events is not None:
            self.kv_events.poll()
        self.decoded += 1
        try:
            ids = req.input_ids
            carried = self.carried
            keys = carried.take(req.rid, len(ids)) if carried.block_size and ids is not None else None
            request = to_request(req, self.block_size, keys)
        except Exception as exc:
            msg = f"request {req.rid!r} cannot be read: {exc!r}"
            self.reject(req.rid, getattr(req, "http_worker_ipc", None), MalformedRequestError(msg, rid=req.rid))
            return
        if self.recorder is not None:
            self._record(req.input_ids, request)
        self._place(request, req, req.rid, getattr(req, "http_worker_ipc", None))

    def forward(self, _marker: Any) -> None:
        """A request placed from its route header and sent on as the tokenizer encoded it
        (:mod:`dpcore_sglang.forward`; the receiver handed SGLang's dispatcher the marker).

        Does what SGLang's ``dispatching_with_trace`` does around ``dispatching`` (reads the
        load snapshots), except the time stats: see :mod:`dpcore_sglang.forward`.
        """
        ctl = self.ctl
        if ctl.refresh_load_budget_on_dispatch:
            ctl.refresh_load_budget()
        if ctl.status is not self._status or ctl._active_workers is not self._active:
            self._sync_active()
        if self.kv_events is not None:
            self.kv_events.poll()
        header, keys, frame = self.carried.route  # type: ignore[misc]
        self.carried.route = None
        self.forwarded += 1
        # route_header's field order: block size, rid, keys, then Request's fields.
        _bs, rid, _raw, n, max_new, routed, dp_rank, prefill, room, ipc = header
        request = make_request(rid, n, keys, room, routed, dp_rank, prefill, max_new)
        if self.recorder is not None:
            self._record(None, request)
        self._place(request, frame, rid, ipc)

    def _place(self, request: Request, req: Any, rid: Any, http_worker_ipc: str | None) -> None:
        """Choose a rank for *request* and send *req* there: a decoded request (encoded here
        as SGLang's ``sock_send`` would) or the bytes of a forwarded one."""
        ctl = self.ctl
        if self._no_peer and time.monotonic() >= self._retry_at:
            self._retry_lost()
        try:
            rank = self.manager.select(request)
        except RequestRejected as exc:
            self.reject(rid, http_worker_ipc, exc)
            return
        frame = req if type(req) is memoryview else self._encode(req)
        try:
            # The rank's PUSH socket never blocks while a scheduler is connected (SGLang
            # sets no high-water mark); it does when none is: upstream then stalls every
            # rank behind one dead scheduler.
            ctl.workers[rank].send(frame, zmq.NOBLOCK)
        except zmq.Again:
            rank = self._send_elsewhere(request, frame, rank, rid, http_worker_ipc)
            if rank is None:
                return
        self._connected[rank] = True
        manager = self.manager
        decision = manager.ctx.decision
        key = (decision.policy, decision.reason)
        decisions = self.decisions
        decisions[key] = decisions.get(key, 0) + 1
        self.feed.sent(rank, manager.dispatched(request, rank))
        self.dispatched[rank] += 1

    def _record(self, ids: Any, request: Request) -> None:
        """Hand *request* to the recorder, with block hashes even when the chain needs none."""
        if not request.block_hashes and ids is not None:
            bs = self.recorder.config.block_size  # type: ignore[union-attr]
            request = attrs.evolve(request, block_hashes=block_hashes(ids, bs))
        self.recorder.offer(request)  # type: ignore[union-attr]

    def _send_elsewhere(self, request: Request, frame: Any, rank: int, rid: Any, http_worker_ipc: str | None) -> int | None:
        """*rank*'s socket would block: wait for a first connection, or choose again."""
        workers = self.ctl.workers
        while True:
            sock = workers[rank]
            # A rank that has never taken a request may still be connecting (start-up):
            # wait for it as upstream would. Later, nobody connected means it died.
            if not self._connected[rank] and sock.poll(CONNECT_WAIT_MS, zmq.POLLOUT):
                sock.send(frame)
                return rank
            self._lost_peer(rank)
            try:
                rank = self.manager.select(request)  # among the others
            except RequestRejected as exc:
                self.reject(rid, http_worker_ipc, exc)
                return None
            try:
                workers[rank].send(frame, zmq.NOBLOCK)
                return rank
            except zmq.Again:
                continue

    def _lost_peer(self, rank: int) -> None:
        self._no_peer.add(rank)
        self._retry_at = time.monotonic() + PEER_RETRY_S
        self.lost_peers += 1
        log.warning(
            "dpcore: no scheduler is connected on rank %d; taking it out of rotation (retry in %g s)",
            rank,
            PEER_RETRY_S,
        )
        self._sync_active()

    def _retry_lost(self) -> None:
        # Optimistic: put them back; a send that still finds nobody takes a rank out again.
        self._no_peer.clear()
        self._sync_active()

    def dispatch_health_check(self, req: Any) -> None:
        """``ctl.dispatch_health_check``: SGLang's own, unless no rank can take it.

        Upstream then either raises (elastic EP: the server dies) or sends the probe to a
        rank its fault tolerance marked dead; answering it as failed is what it is.
        """
        ctl = self.ctl
        if ctl.status is not self._status or ctl._active_workers is not self._active:
            self._sync_active()
        try:
            if not self.ledger.active_ranks:
                msg = f"health check {req.rid!r}: all {len(ctl.workers)} ranks are inactive"
                raise NoActiveRankError(msg, rid=req.rid)
            self._upstream_health_check(req)
        except (RuntimeError, ValueError, AssertionError) as exc:
            msg = f"health check {req.rid!r} cannot be placed: {exc}"
            self.reject(req.rid, getattr(req, "http_worker_ipc", None), NoActiveRankError(msg, rid=req.rid))
        except RequestRejected as exc:
            self.reject(req.rid, getattr(req, "http_worker_ipc", None), exc)

    def reject(self, rid: Any, http_worker_ipc: str | None, exc: RequestRejected) -> None:
        """Fail request *rid*: count it, log it, answer its tokenizer (the one at
        *http_worker_ipc* with several) with SGLang's ``AbortReq``."""
        self.rejected[exc.code] += 1
        log.warning(
            "dpcore rejected request %s (%s, %d rejected so far): %s",
            rid,
            exc.code,
            sum(self.rejected.values()),
            exc,
        )
        message = str(exc)
        if self.recorder is not None:  # its line carries the budget, as dpcore serve's do
            self.recorder.ended(rid, -1)
        abort = AbortReq(
            rid=rid,
            abort_message=message,
            finished_reason={"type": "abort", "message": message, "status_code": exc.http_status},
            http_worker_ipc=http_worker_ipc,
        )
        sock_send(self._tokenizer(), abort)

    def _tokenizer(self) -> zmq.Socket:
        # The endpoint schedulers answer the tokenizer on (they connect a PUSH; so do we).
        if self._abort_sock is None:
            self._abort_sock = get_zmq_socket(
                self.ctl.context, zmq.PUSH, self.ctl.port_args.tokenizer_ipc_name, False
            )
        return self._abort_sock

    # ------------------------------------------------------------------ loads and liveness

    def update_budget(self, loads: Any) -> None:
        """``ctl.dp_budget.update_budget``: SGLang's fresh load snapshots, as dpcore reports."""
        ledger = self.ledger
        for report in self.feed.reports(loads):
            # SGLang's active-rank state is authoritative; a report must not revive a rank.
            if ledger.is_active(report.rank):
                self.manager.report(report)

    @property
    def total_requests(self) -> list[int]:
        """Effective requests per rank (the name ``DPBudget`` uses)."""
        return self.ledger.requests

    @property
    def total_tokens(self) -> list[int]:
        """Effective tokens per rank (the name ``DPBudget`` uses)."""
        return self.ledger.tokens

    def _sync_active(self) -> None:
        ctl = self.ctl
        status = ctl.status
        dp_active = getattr(ctl, "dp_active", None)
        for r, sock in enumerate(ctl.workers):
            alive = (
                sock is not None
                and bool(status[r])
                and (dp_active is None or bool(dp_active[r]))
                and r not in self._no_peer
            )
            if self.ledger.set_active(r, alive) and not alive:
                self.feed.forget(r)
        self._status = status
        self._active = ctl._active_workers

    def stats(self) -> dict[str, Any]:
        recv = self.ctl.recv_from_tokenizer
        return {
            "chain": list(self.manager.chain),
            "dispatched": list(self.dispatched),
            "rejected": dict(self.rejected),
            "decisions": {f"{p}/{r}": n for (p, r), n in self.decisions.items()},
            "bad_frames": getattr(recv, "bad_frames", 0),
            "lost_peers": self.lost_peers,
            "active": list(self.ledger.active_ranks),
            "block_size": self.block_size,
            "block_hashes": self.carried.stats() if self.carried.block_size else None,
            "forward": {
                "forwarded": self.forwarded,
                "decoded": self.decoded,
                "not_forwarded": dict(self.carried.not_forwarded),
            },
            "kv_events": self.kv_events.stats() if self.kv_events is not None else None,
            "record": {**self.recorder.stats(), "output_lengths": self.ended.stats()} if self.ended is not None else None,
        }


def _recorder(config: AdapterConfig, block_size: int) -> Any:
    """The started recorder of ``--dpcore-record`` (written until this process exits), or ``None``."""
    if not config.record:
        return None
    from dpcore.runtime.recorder import Recorder, RecordConfig

    # SGLang's controller never learns how many tokens a request generated; the tokenizer
    # process does, and sends them (dpcore_sglang.output_lengths) when it sends to us as is.
    # Otherwise lines carry the budget at once instead of waiting for an end that never comes.
    hold_s = config.record_hold_s if dp_controller_reads() else 0.0
    rec = Recorder(RecordConfig(path=config.record, block_size=block_size, sample=config.record_sample, hold_s=hold_s))
    rec.start()
    atexit.register(rec.close)
    log.info("dpcore recording requests to %s (block ids every %d tokens)", config.record, block_size)
    return rec


def install(ctl: Any, config: AdapterConfig, manager: PolicyManager | None = None) -> DpcoreDispatcher:
    """Put dpcore in charge of *ctl*'s dispatch; returns the adapter (also ``ctl.dpcore``)."""
    adapter = DpcoreDispatcher(ctl, config, manager)
    ctl.dispatching = adapter.dispatch
    ctl.dp_budget = adapter
    # Feed every policy the load snapshots, not only SGLang's load-aware methods.
    ctl.refresh_load_budget_on_dispatch = True
    ctl.dispatch_health_check = adapter.dispatch_health_check
    if not isinstance(ctl.recv_from_tokenizer, BlockingReceiver):
        timeout_ms = config.poll_timeout_ms
        watchdog_s = _soft_watchdog_timeout()
        if timeout_ms is not None and watchdog_s:  # wake often enough that SGLang's loop feeds its watchdog in time
            timeout_ms = max(1, min(timeout_ms, int(watchdog_s * 250)))
        ctl.recv_from_tokenizer = BlockingReceiver(ctl.recv_from_tokenizer, timeout_ms, adapter.carried)
    if adapter.ended is not None:
        ctl.recv_from_tokenizer.ended = adapter.ended.take
    recv = ctl.recv_from_tokenizer
    recv.forward = True
    if io_struct._USE_PICKLE_IPC:  # recv_pyobj hands SGLang's dispatcher the marker itself
        ctl._request_dispatcher += TypeBasedDispatcher([(Forwarded, adapter.forward)])
    else:  # SGLang's msgpack IPC decodes what recv() returns: bytes its decoder turns into a marker
        io_struct.hook_custom_types(DpcoreForwarded)
        recv.mark = io_struct.msgpack_encode(DpcoreForwarded())
        ctl._request_dispatcher += TypeBasedDispatcher([(DpcoreForwarded, adapter.forward)])
    ctl.dpcore = adapter
    if config.metrics_port is not None:
        try:
            adapter.metrics_port = serve_metrics(adapter, config.metrics_port, config.metrics_host)
        except OSError as exc:
            msg = f"dpcore-sglang cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}"
            raise SystemExit(msg) from exc
        log.info("dpcore metrics on http://%s:%d/metrics", config.metrics_host, adapter.metrics_port)
    log.info(
        "dpcore policy chain %s in SGLang's controller (%s; %d ranks, block hashes %s)",
        list(adapter.manager.chain),
        adapter.manager.resolution.reason,
        len(ctl.workers),
        f"every {adapter.block_size} tokens" if adapter.block_size else "off",
    )
    return adapter
