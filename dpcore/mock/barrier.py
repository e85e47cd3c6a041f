"""``dpcore mock-barrier``: the step all-gather that keeps mock ranks in lockstep.

One process per DP group binds a ROUTER socket; every ``dpcore mock-worker --barrier EP``
connects a DEALER and speaks msgpack arrays (never pickle):

=========  ==============  =====================================================================
message    direction       fields
=========  ==============  =====================================================================
hello      rank → barrier  ``[0, rank]``: join (also a restarted or dropped rank)
post       rank → barrier  ``[1, rank, run, version, num_tokens, extend, max_steps, wake_at, at]``:
                           the plan for *run* (``wake_at`` ``None``: never)
wake       rank → barrier  ``[2, rank, run, at]``: end *run* at the first step boundary >= *at*
bye        rank → barrier  ``[3, rank]``: leaving; the gather stops waiting for it
sync       barrier → rank  ``[0, run, epoch, speedup, chunk]``: post for *run*; model time is
                           ``(time.monotonic() - epoch) × speedup`` in every process; *chunk*
                           is the per-rank prefill budget (global size // dp size)
end        barrier → rank  ``[1, run, version, steps, end]``: *run* ran *steps* steps of plan
                           *version* (0: none, the rank idled: its work arrived after the
                           run started) and ended at model time *end*; post for ``run + 1``
=========  ==============  =====================================================================

The barrier owns the model clock: :class:`~dpcore.mock.lockstep.Lockstep` decides when runs
start and end, and the process sleeps in one poll until the next run ends or a message
comes. ``time.monotonic`` is one system-wide clock on Linux and macOS, so every process on
the machine reads the same model time from the epoch.

:class:`LocalClock` plays the barrier inside a rank process for a rank that runs alone (no
``--barrier``): a DP group of one, with the same state machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq
from attrs import asdict, frozen

from dpcore.errors import ConfigError, WireError
from dpcore.mock.lockstep import Lockstep, StepWork
from dpcore.sim.config import add_engine_config_argument, load_engine_config
from dpcore.sim.stepmodel import StepModel

HELLO, POST, WAKE, BYE = range(4)
SYNC, END = range(2)
#: Wall seconds a gather waits for a rank's post before it goes on without the rank.
DEFAULT_STEP_TIMEOUT_S = 5.0


# --------------------------------------------------------------------------- wire


def _int(x: Any, what: str, lo: int = 0) -> int:
    if type(x) is not int or x < lo:
        raise WireError(f"{what} must be an integer >= {lo}, got {x!r}")
    return x


def _time(x: Any, what: str) -> float:
    if type(x) not in (int, float) or not math.isfinite(x):
        raise WireError(f"{what} must be a finite number, got {x!r}")
    return float(x)


def _fields(buf: bytes, what: str) -> list[Any]:
    try:
        msg = msgpack.unpackb(buf, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types; all mean "not ours"
        raise WireError(f"{what}: not a msgpack frame ({type(exc).__name__})") from None
    if type(msg) is not list or not msg or type(msg[0]) is not int:
        raise WireError(f"{what}: expected a msgpack array starting with a type tag")
    return msg


def encode_post(rank: int, run: int, version: int, work: StepWork, at: float) -> bytes:
    wake = None if work.wake_at == math.inf else work.wake_at
    return msgpack.packb(  # type: ignore[no-any-return]
        [POST, rank, run, version, work.num_tokens, work.extend, work.max_steps, wake, at]
    )


def decode_rank_message(buf: bytes) -> tuple[int, int, tuple[Any, ...]]:
    """``(type, rank, rest)`` of a rank's message; raises :class:`WireError`."""
    msg = _fields(buf, "lockstep message")
    kind = msg[0]
    sizes = {HELLO: 2, POST: 9, WAKE: 4, BYE: 2}
    if kind not in sizes or len(msg) != sizes[kind]:
        raise WireError(f"lockstep message: unknown type {kind!r} or wrong length {len(msg)}")
    rank = _int(msg[1], "rank")
    if kind == POST:
        _, _, run, ver, tokens, extend, steps, wake, at = msg
        if type(extend) is not bool:
            raise WireError("post: extend must be a boolean")
        try:
            work = StepWork(_int(tokens, "num_tokens"), extend, _int(steps, "max_steps", 1),
                            math.inf if wake is None else _time(wake, "wake_at"))  # fmt: skip
        except ValueError as exc:
            raise WireError(f"post: {exc}") from None
        return kind, rank, (_int(run, "run"), _int(ver, "version"), work, _time(at, "at"))
    if kind == WAKE:
        return kind, rank, (_int(msg[2], "run"), _time(msg[3], "at"))
    return kind, rank, ()


@frozen
class Sync:
    run: int
    epoch: float
    speedup: float
    chunk_tokens: int


@frozen
class End:
    run: int
    version: int
    steps: int
    end: float


def decode_barrier_message(buf: bytes) -> Sync | End:
    msg = _fields(buf, "barrier message")
    if msg[0] == SYNC and len(msg) == 5:
        speedup = _time(msg[3], "speedup")
        if speedup <= 0:
            raise WireError(f"sync: speedup must be positive, got {speedup!r}")
        return Sync(_int(msg[1], "run"), _time(msg[2], "epoch"), speedup, _int(msg[4], "chunk", 1))
    if msg[0] == END and len(msg) == 5:
        return End(_int(msg[1], "run"), _int(msg[2], "version"), _int(msg[3], "steps", 1), _time(msg[4], "end"))
    raise WireError(f"barrier message: unknown type {msg[0]!r} or wrong length {len(msg)}")


# --------------------------------------------------------------------------- the rank's side


class RemoteClock:
    """A rank's connection to ``dpcore mock-barrier``."""

    def __init__(self, ctx: zmq.Context, endpoint: str, rank: int) -> None:  # type: ignore[type-arg]
        self.rank = rank
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(endpoint)
        self.epoch: float | None = None
        self.speedup = 1.0
        self.bad_frames = 0

    def now(self) -> float:
        if self.epoch is None:
            return 0.0
        return (time.monotonic() - self.epoch) * self.speedup

    def wall_until(self, model_t: float) -> float:
        return max(0.0, model_t - self.now()) / self.speedup

    def join(self) -> None:
        self.socket.send(msgpack.packb([HELLO, self.rank]))

    def post(self, run: int, version: int, work: StepWork, at: float) -> None:
        self.socket.send(encode_post(self.rank, run, version, work, at))

    def wake(self, run: int, at: float) -> None:
        self.socket.send(msgpack.packb([WAKE, self.rank, run, at]))

    def events(self) -> list[Sync | End]:
        out: list[Sync | End] = []
        while True:
            try:
                buf = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                ev = decode_barrier_message(buf)
            except WireError:
                self.bad_frames += 1
                continue
            if isinstance(ev, Sync):
                self.epoch, self.speedup = ev.epoch, ev.speedup
            out.append(ev)

    def due_wall_s(self) -> float | None:
        return None  # the barrier sends what is due

    def close(self) -> None:
        try:
            self.socket.send(msgpack.packb([BYE, self.rank]), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        self.socket.close(linger=100)


class LocalClock:
    """The lockstep of a rank that runs alone: a DP group of one, in-process."""

    def __init__(self, rank: int, speedup: float, model: StepModel) -> None:
        self.rank = rank
        self.socket = None
        self.speedup = speedup
        self.epoch = time.monotonic()
        self.chunk_tokens = model.chunk_budget(1)
        self.lockstep = Lockstep(model, step_timeout_s=math.inf)
        self._pending: list[Sync | End] = []

    def now(self) -> float:
        return (time.monotonic() - self.epoch) * self.speedup

    def wall_until(self, model_t: float) -> float:
        return max(0.0, model_t - self.now()) / self.speedup

    def join(self) -> None:
        run = self.lockstep.join(self.rank, self.now())
        self._pending.append(Sync(run, self.epoch, self.speedup, self.chunk_tokens))

    def post(self, run: int, version: int, work: StepWork, at: float) -> None:
        if not self.lockstep.post(self.rank, run, version, work, at, self.now()):
            self.join()

    def wake(self, run: int, at: float) -> None:
        self.lockstep.wake(self.rank, run, at, self.now())

    def events(self) -> list[Sync | End]:
        out, self._pending = self._pending, []
        while (due := self.lockstep.due()) is not None and due <= self.now():
            ended, _ = self.lockstep.tick(due)
            if ended is None:
                break
            version = ended.versions.get(self.rank)
            if version is not None:  # re-joined during the run: not told of it (as the barrier does)
                out.append(End(ended.run, version, ended.steps, ended.end))
        return out

    def due_wall_s(self) -> float | None:
        due = self.lockstep.due()
        return None if due is None else self.wall_until(due)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- the barrier process


class Barrier:
    """The barrier's event loop (the process body, separate for tests)."""

    def __init__(self, sock: zmq.Socket, dp_size: int, speedup: float, step_timeout_s: float,  # type: ignore[type-arg]
                 model: StepModel, log: Any) -> None:  # fmt: skip
        self.sock = sock
        self.dp_size = dp_size
        self.speedup = speedup
        self.epoch = time.monotonic()
        self.chunk_tokens = model.chunk_budget(dp_size)
        self.lockstep = Lockstep(model, step_timeout_s * speedup)
        self.log = log
        self.ident: dict[int, bytes] = {}
        self.bad_frames = 0
        self.stop = False

    def now(self) -> float:
        return (time.monotonic() - self.epoch) * self.speedup

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        lock = self.lockstep
        while not self.stop:
            due = lock.due()
            timeout = None if due is None else math.ceil(max(0.0, due - self.now()) / self.speedup * 1000)
            if poller.poll(timeout):
                self._drain()
            self._tick()

    def _drain(self) -> None:
        while True:
            try:
                ident, buf = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                self._bad("a message with the wrong number of frames")
                continue
            try:
                kind, rank, rest = decode_rank_message(buf)
            except WireError as exc:
                self._bad(str(exc))
                continue
            if rank >= self.dp_size:
                self._bad(f"rank {rank} is out of range for dp size {self.dp_size}")
                continue
            self._handle(ident, kind, rank, rest)

    def _handle(self, ident: bytes, kind: int, rank: int, rest: tuple[Any, ...]) -> None:
        lock = self.lockstep
        now = self.now()
        if kind == HELLO:
            self._sync(ident, rank, now)
        elif kind == POST:
            run, version, work, at = rest
            if self.ident.get(rank) != ident or not lock.post(rank, run, version, work, at, now):
                self._sync(ident, rank, now)
        elif kind == WAKE:
            lock.wake(rank, rest[0], rest[1], now)
        elif self.ident.get(rank) == ident:  # BYE from the current life of the rank
            lock.leave(rank, now)
            self.log.info("rank_left_lockstep", rank=rank)

    def _sync(self, ident: bytes, rank: int, now: float) -> None:
        lock = self.lockstep
        rejoin = rank in self.ident and rank not in lock.members
        self.ident[rank] = ident
        run = lock.join(rank, now)
        self.sock.send_multipart([ident, msgpack.packb([SYNC, run, self.epoch, self.speedup, self.chunk_tokens])])
        self.log.info("rank_rejoined_lockstep" if rejoin else "rank_joined_lockstep", rank=rank, run=run)

    def _tick(self) -> None:
        lock = self.lockstep
        while True:
            ended, dropped = lock.tick(self.now())
            for rank in dropped:
                self.log.warning(
                    "rank_dropped_from_lockstep", rank=rank, run=lock.run_id,
                    waited_s=lock.step_timeout_s / self.speedup, dropped_total=lock.stats.dropped,
                )  # fmt: skip
            if ended is None:
                if not dropped:
                    return
                continue
            for rank, version in ended.versions.items():
                ident = self.ident.get(rank)
                if ident is not None and rank in lock.members:
                    msg = msgpack.packb([END, ended.run, version, ended.steps, ended.end])
                    self.sock.send_multipart([ident, msg])

    def _bad(self, why: str) -> None:
        self.bad_frames += 1
        if self.bad_frames <= 10 or self.bad_frames % 1000 == 0:
            self.log.warning("lockstep_bad_frame", why=why, bad_frames=self.bad_frames)

    def summary(self) -> dict[str, Any]:
        s = asdict(self.lockstep.stats)
        s.update(dp_size=self.dp_size, speedup=self.speedup, members=sorted(self.lockstep.members),
                 bad_frames=self.bad_frames, model_s=self.now(), chunk_tokens=self.chunk_tokens,
                 step_model=asdict(self.lockstep.model))  # fmt: skip
        return s


# --------------------------------------------------------------------------- CLI


class _Stopped(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the loop."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", required=True, metavar="EP", help="ipc:///path or tcp://127.0.0.1:PORT to bind")
    p.add_argument("--dp-size", type=int, required=True, help="ranks in the DP group (ranks 0..N-1 may join)")
    p.add_argument("--speedup", type=float, default=1.0, help="model time runs this many times faster (default 1)")
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S, metavar="S",
                   help=f"wall seconds a step waits for a silent rank before going on without it "
                        f"(default {DEFAULT_STEP_TIMEOUT_S:g})")  # fmt: skip
    p.add_argument("--stats-file", default=None, metavar="PATH", help="write the lockstep counters as JSON on exit")
    add_engine_config_argument(p)


def check_arguments(args: argparse.Namespace) -> None:
    if args.dp_size < 1:
        raise ConfigError(f"--dp-size must be at least 1, got {args.dp_size}")
    if not (args.speedup > 0 and math.isfinite(args.speedup)):
        raise ConfigError(f"--speedup must be a positive number, got {args.speedup!r}")
    if not (args.step_timeout > 0 and math.isfinite(args.step_timeout)):
        raise ConfigError(f"--step-timeout must be a positive number of seconds, got {args.step_timeout!r}")


def run(args: argparse.Namespace) -> int:
    import structlog

    from dpcore import security
    from dpcore.sdk import endpoints

    check_arguments(args)
    model = load_engine_config(args.engine_config).step  # before binding: a bad file starts nothing
    ep = endpoints.check(args.endpoint, "--endpoint")
    if security.is_tcp(ep) and not security.is_loopback(ep[6:].rsplit(":", 1)[0]):
        raise ConfigError(f"--endpoint {ep}: the mock barrier binds loopback only (127.0.0.1 or ipc://)")
    log = structlog.get_logger("dpcore").bind(role="mock-barrier")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.linger = 0
    endpoints.bind(sock, ep)
    barrier = Barrier(sock, args.dp_size, args.speedup, args.step_timeout, model, log)

    def _stop(*_: object) -> None:
        barrier.stop = True
        raise _Stopped

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("mock_barrier_started", pid=os.getpid(), endpoint=ep, dp_size=args.dp_size, speedup=args.speedup)
    try:
        barrier.run()
    except _Stopped:
        pass
    finally:
        summary = barrier.summary()
        if args.stats_file:
            Path(args.stats_file).write_text(json.dumps(summary, indent=2))
        log.info("mock_barrier_stopped", **summary)
        sock.close(linger=0)
        ctx.term()
    return 0


__all__: Sequence[str] = ["Barrier", "End", "LocalClock", "RemoteClock", "Sync"]
