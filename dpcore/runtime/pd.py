"""PD disaggregation, mode (b): the prefill side records where each room went, decode asks.

The controller calls a :class:`PDHandler` at two points.

**Prefill** (``--disaggregation-mode prefill``): :meth:`PDHandler.on_prefill_dispatch`,
after the rank is chosen and before the request is sent. When the prefill chain does not
place by room (its first policy does not declare
:data:`~dpcore.policy.PLACES_BY_BOOTSTRAP_ROOM`, as ``follow_bootstrap_room`` does) and dp
size > 1, it registers ``room -> rank`` in the bootstrap registry: a direct call when the
registry lives in this process (``--bootstrap-port``, the registry's HTTP server then runs
in a thread here), else a batched HTTP call from a background thread (``--bootstrap-url``).
A chain that places by room registers nothing, because decode computes ``room %
prefill_dp_size``; a request pinned by a router to any other rank is therefore rejected
(decode would look on the wrong rank).

**Decode** (``--disaggregation-mode decode``): the prefill rank is resolved in this order

1. an explicit ``disagg_prefill_dp_rank`` (checked against the prefill dp size);
2. prefill dp size 1 → rank 0;
3. prefill places by room → ``room % prefill_dp_size``;
4. otherwise the registry is asked: :meth:`PDHandler.resolve_now` returns ``None``, the
   controller parks the request and calls :meth:`PDHandler.submit`. A background thread
   batches the rooms of all parked requests into ``POST /query_dp_ranks`` calls, retries
   the missing ones with exponential backoff, and gives up at the deadline. Answers come
   back through :attr:`PDHandler.socket` (an inproc socket the controller polls): when it
   is readable, :meth:`PDHandler.drain` returns ``(rid, prefill_rank)`` or
   ``(rid, RequestRejected)`` pairs, and the controller dispatches or rejects.

Prefill and decode dp sizes are independent. Decode learns the prefill dp size and policy
from ``--prefill-dp-size`` / ``--prefill-load-balance-method``, or else from the registry's
``GET /info``, so it never has to guess how prefill placed a request.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import zmq

from dpcore.auto import resolve
from dpcore.discovery import load_policy_class
from dpcore.errors import (
    ConfigError,
    InvalidRankError,
    MalformedRequestError,
    MissingBootstrapRoomError,
    PrefillRankUnresolvedError,
    RequestRejected,
)
from dpcore.policy import places_by_bootstrap_room
from dpcore.runtime.bootstrap import BootstrapRegistry, RegistryClient, RegistryError

if TYPE_CHECKING:
    from dpcore.model import Request
    from dpcore.runtime.bootstrap_server import RegistryServer

DEFAULT_RESOLVE_TIMEOUT_S = 60.0
#: First retry after this long; doubles per miss, up to the cap below.
BACKOFF_START_S = 0.005
BACKOFF_MAX_S = 0.5

Result = tuple[str, "int | RequestRejected"]


class RoomLookup(Protocol):
    """Anything that maps rooms to prefill ranks: a :class:`RegistryClient` over HTTP, or a
    :class:`BootstrapRegistry` in the same process."""

    def query(self, rooms: Iterable[int]) -> dict[int, int]: ...


def follows_bootstrap_room(method: str) -> bool:
    """Whether the prefill chain *method* places by ``room % dp_size``: its first policy (which
    decides every request it can place) declares :data:`~dpcore.policy.PLACES_BY_BOOTSTRAP_ROOM`."""
    first = resolve(method, "prefill").chain[0]
    return places_by_bootstrap_room(load_policy_class(first, " (the prefill side's policy)"))


class PDHandler:
    """The PD plug point of one controller (see the module doc).

    :param mode: ``"prefill"`` or ``"decode"``.
    :param dp_size: This controller's dp size.
    :param prefill_dp_size: The prefill side's dp size (equals *dp_size* on prefill).
    :param prefill_follows_room: Whether prefill places by ``room % prefill_dp_size``.
    :param registry: Prefill: an in-process registry to register into.
    :param registry_url: The registry's URL (prefill: when it is remote; decode: to ask it).
    :param lookup: Decode: ask this instead of *registry_url* (tests, in-process setups).
    :param resolve_timeout_s: Decode: deadline for a parked request.
    :param zmq_ctx: The controller's context (the inproc socket must share it).
    """

    def __init__(
        self,
        mode: str,
        *,
        dp_size: int,
        prefill_dp_size: int,
        prefill_follows_room: bool,
        registry: BootstrapRegistry | None = None,
        registry_url: str | None = None,
        lookup: RoomLookup | None = None,
        resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
        zmq_ctx: zmq.Context | None = None,  # type: ignore[type-arg]
        log: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("prefill", "decode"):
            msg = f"PD mode must be 'prefill' or 'decode', got {mode!r}"
            raise ConfigError(msg)
        if type(prefill_dp_size) is not int or prefill_dp_size < 1:
            msg = f"prefill dp size must be a positive integer, got {prefill_dp_size!r}"
            raise ConfigError(msg)
        if not resolve_timeout_s > 0:
            msg = f"PD resolve timeout must be positive, got {resolve_timeout_s!r}"
            raise ConfigError(msg)
        self.mode = mode
        self.dp_size = dp_size
        self.prefill_dp_size = prefill_dp_size
        self.prefill_follows_room = prefill_follows_room
        self.registry = registry
        self.registry_url = registry_url
        self.resolve_timeout_s = resolve_timeout_s
        self.log = log if log is not None else structlog.get_logger("dpcore")
        self._clock = clock
        self.server: RegistryServer | None = None
        self.stats = {
            "registered": 0,
            "register_failed": 0,
            "resolved_explicit": 0,
            "resolved_single": 0,
            "resolved_room": 0,
            "resolved_registry": 0,
            "timed_out": 0,
            "queries": 0,
            "query_errors": 0,
        }
        needs_registry = prefill_dp_size > 1 and not prefill_follows_room
        if mode == "decode" and needs_registry and lookup is None and registry_url is None and registry is None:
            msg = (
                "PD decode: the prefill side does not place by bootstrap_room, so decode must ask the "
                "bootstrap registry: give --bootstrap-url (or have the router set disagg_prefill_dp_rank)"
            )
            raise ConfigError(msg)
        if mode == "prefill" and needs_registry and registry is None and registry_url is None:
            msg = (
                "PD prefill with a policy that does not place by bootstrap_room must register each room's rank: give "
                "--bootstrap-port (host the registry here) or --bootstrap-url (a registry elsewhere)"
            )
            raise ConfigError(msg)
        self._lookup = lookup if lookup is not None else registry
        self._ctx = zmq_ctx or zmq.Context.instance()
        self._endpoint = f"inproc://dpcore-pd-{uuid.uuid4().hex}"
        #: The controller polls this; readable means :meth:`drain` has answers.
        self.socket = self._ctx.socket(zmq.PULL)
        self.socket.linger = 0
        self.socket.bind(self._endpoint)
        self._results: deque[Result] = deque()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._register_remote = mode == "prefill" and needs_registry and registry is None
        if (mode == "decode" and needs_registry) or self._register_remote:
            self._thread = threading.Thread(target=self._run, name=f"dpcore-pd-{mode}", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ prefill

    def on_prefill_dispatch(self, request: Request, rank: int) -> None:
        """*request* is about to go to prefill *rank*: make decode able to find it.

        Raises :class:`RequestRejected` (the request must then not be sent) when it has no
        usable room, or when a router pinned it to a rank the room does not map to while
        prefill places by room.
        """
        room = _room(request)
        P = self.prefill_dp_size
        if P == 1:
            return
        if self.prefill_follows_room:
            if room % P != rank:
                msg = (
                    f"request {request.rid!r}: follow_bootstrap_room conflict: dispatched to prefill rank "
                    f"{rank} but bootstrap_room {room} implies rank {room % P}, and decode computes the "
                    "latter; drop the pinned rank or run prefill with a policy that registers ranks"
                )
                raise InvalidRankError(msg, rid=request.rid)
            return
        if self.registry is not None:
            self.registry.register(room, rank)
            self.stats["registered"] += 1
        else:
            self._inbox.put((room, rank))

    # ------------------------------------------------------------------ decode

    def resolve_now(self, request: Request) -> int | None:
        """The prefill rank if known without asking anyone, else ``None`` (then :meth:`submit`).

        Raises :class:`RequestRejected` for an invalid explicit rank or a missing room.
        """
        pdr = request.disagg_prefill_dp_rank
        P = self.prefill_dp_size
        if pdr is not None:
            if type(pdr) is not int or not 0 <= pdr < P:
                msg = f"request {request.rid!r}: disagg_prefill_dp_rank={pdr!r} is not a rank in [0, {P})"
                raise InvalidRankError(msg, rid=request.rid)
            self.stats["resolved_explicit"] += 1
            return pdr
        if P == 1:
            self.stats["resolved_single"] += 1
            return 0
        room = _room(request)
        if self.prefill_follows_room:
            self.stats["resolved_room"] += 1
            return room % P
        return None

    def submit(self, request: Request) -> None:
        """Park *request* until the registry knows its room (or the deadline passes)."""
        room = _room(request)
        if self._thread is None:
            msg = "PDHandler.submit: this handler does not query a registry (resolve_now answers everything)"
            raise RuntimeError(msg)
        self._inbox.put((request.rid, room, self._clock() + self.resolve_timeout_s))

    def drain(self) -> list[Result]:
        """Answers for parked requests: ``(rid, prefill_rank)`` or ``(rid, RequestRejected)``."""
        sock = self.socket
        while True:
            try:
                sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        results = self._results
        while results:
            out.append(results.popleft())
        return out

    # ------------------------------------------------------------------ background thread

    def _run(self) -> None:
        signal = self._ctx.socket(zmq.PUSH)
        signal.linger = 0
        signal.connect(self._endpoint)
        lookup = self._lookup
        client: RegistryClient | None = None
        if lookup is None:
            client = RegistryClient(self.registry_url)  # type: ignore[arg-type]
            lookup = client
        try:
            if self.mode == "prefill":
                self._run_register(client)  # type: ignore[arg-type]
            else:
                self._run_resolve(lookup, signal)
        finally:
            if client is not None:
                client.close()
            signal.close(linger=0)

    def _run_register(self, client: RegistryClient) -> None:
        while not self._closing.is_set():
            try:
                first = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while True:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                client.register_many(batch)
            except RegistryError as exc:
                self.stats["register_failed"] += len(batch)
                self.log.warning("pd_register_failed", rooms=len(batch), error=str(exc))
            else:
                self.stats["registered"] += len(batch)

    def _run_resolve(self, lookup: RoomLookup, signal: zmq.Socket) -> None:  # type: ignore[type-arg]
        # rid -> [room, deadline, next_try, backoff]
        pending: dict[str, list[Any]] = {}
        last_error = ""
        while not self._closing.is_set():
            now = self._clock()
            # Sleep until the next retry or deadline, but wake at least every 100 ms to notice close().
            wake = min((min(p[1], p[2]) for p in pending.values()), default=now + 0.1)
            wait = min(0.1, max(0.0, wake - now))
            items = []
            try:
                if wait > 0:
                    items.append(self._inbox.get(timeout=wait))
                while True:
                    items.append(self._inbox.get_nowait())
            except queue.Empty:
                pass
            now = self._clock()
            for rid, room, deadline in items:
                pending[rid] = [room, deadline, now, BACKOFF_START_S]
            due = {rid: p for rid, p in pending.items() if p[2] <= now}
            answers: list[Result] = []
            if due:
                rooms = list({p[0] for p in due.values()})
                self.stats["queries"] += 1
                try:
                    found = lookup.query(rooms)
                except Exception as exc:  # whatever went wrong, retry: this thread must not die
                    found = {}
                    self.stats["query_errors"] += 1
                    if str(exc) != last_error:
                        self.log.warning("pd_registry_query_failed", error=str(exc))
                    last_error = str(exc)
                else:
                    last_error = ""
                now = self._clock()
                for rid, p in due.items():
                    rank = found.get(p[0])
                    if rank is not None:
                        del pending[rid]
                        answers.append((rid, self._checked(rid, p[0], rank)))
                    else:
                        p[2] = now + p[3]
                        p[3] = min(p[3] * 2, BACKOFF_MAX_S, self.resolve_timeout_s / 10)
            for rid, p in list(pending.items()):
                if p[1] <= now:
                    del pending[rid]
                    self.stats["timed_out"] += 1
                    why = f" (last registry error: {last_error})" if last_error else ""
                    msg = (
                        f"request {rid!r}: the prefill rank of bootstrap_room {p[0]} is unknown: not in the "
                        f"bootstrap registry after {self.resolve_timeout_s:g} s{why}; was the prefill leg "
                        "sent, and does prefill register its ranks?"
                    )
                    answers.append((rid, PrefillRankUnresolvedError(msg, rid=rid)))
            if answers:
                self._results.extend(answers)
                try:
                    signal.send(b"", zmq.NOBLOCK)
                except zmq.Again:
                    pass  # a wake-up is already queued; drain() takes every answer

    def _checked(self, rid: str, room: int, rank: int) -> int | RequestRejected:
        if type(rank) is not int or not 0 <= rank < self.prefill_dp_size:
            msg = (
                f"request {rid!r}: the registry says bootstrap_room {room} is on prefill rank {rank!r}, "
                f"outside [0, {self.prefill_dp_size}); is --prefill-dp-size right?"
            )
            return InvalidRankError(msg, rid=rid)
        self.stats["resolved_registry"] += 1
        return rank

    # ------------------------------------------------------------------ lifecycle

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "prefill_dp_size": self.prefill_dp_size,
            "prefill_follows_bootstrap_room": self.prefill_follows_room,
            "registry": self.server.url if self.server else self.registry_url,
            "resolve_timeout_s": self.resolve_timeout_s,
            "stats": dict(self.stats),
        }

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.socket.close(linger=0)


def _room(request: Request) -> int:
    room = request.bootstrap_room
    if room is None:
        msg = (
            f"request {request.rid!r} has no bootstrap_room, which PD disaggregation needs to pair its "
            "prefill and decode legs; send it through a PD router"
        )
        raise MissingBootstrapRoomError(msg, rid=request.rid)
    if type(room) is not int or room < 0:
        msg = f"request {request.rid!r}: bootstrap_room={room!r} is not a non-negative integer"
        raise MalformedRequestError(msg, rid=request.rid)
    return room
