"""``dpcore mock-worker``: one mock engine rank as a process, speaking only the worker SDK.

The rank runs :class:`~dpcore.mock.engine.MockEngine` in lockstep with the other ranks of its
DP group: before every step it posts its part to ``dpcore mock-barrier --endpoint EP``
(``--barrier EP``), which all-gathers the ranks' work, sets the step's length with the
simulator's step-time model, and tells every rank when the step (or run of identical decode
steps) ends. Without ``--barrier`` the rank is a DP group of one and keeps its own step
clock. Model time = wall time × the barrier's ``--speedup`` (or this rank's, alone); the rank
sleeps in one poll over the controller's socket and the barrier's, so an idle or decoding
rank costs almost no CPU.

Per request it sends its sender one final ``out`` (meta: ``dp_rank``, ``prompt_tokens``,
``completion_tokens``, ``cached_tokens``, ``ttft_s`` and ``e2e_s`` in model seconds, and
``prefill_dp_rank`` for PD decode; payload: deterministic generated text). A streaming
request also gets a non-final ``out`` after its prefill and after each decode run, whose
payloads are the new text (the final payload then carries only the rest).

A request asks to stream with ``"stream": true`` in its header or in its payload, when the
payload is a msgpack map (the mock engine's own payload format; any other payload is an
opaque prompt). ``max_new_tokens`` sets the output length.

Load goes to the controller after every step that changed something (so at most every
``--report-every-steps`` decode steps or ``--report-interval-ms``), carrying the fields of
``--report-profile``, and the SDK heartbeats while idle.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import msgpack

import structlog

from dpcore.cacheindex import REMOVED, STORED
from dpcore.mock.barrier import DEFAULT_STEP_TIMEOUT_S, LocalClock, RemoteClock, Sync
from dpcore.mock.engine import EngineParams, Job, MockEngine, Step
from dpcore.mock.stepper import Stepper
from dpcore.sim.config import EngineConfig, add_engine_config_argument, load_engine_config
from dpcore.sim.profiles import DEFAULT_PROFILE, PROFILES, profile
from dpcore.wire import KV_RESYNC, Control

if TYPE_CHECKING:
    from dpcore.sdk.worker import Work, Worker

log = structlog.get_logger("dpcore")
Clock = LocalClock | RemoteClock
#: Wall seconds without a step end, while this rank has work, before it says the barrier is
#: silent and joins again: a gather never waits longer than its step timeout for a rank.
BARRIER_SILENCE_S = 3 * DEFAULT_STEP_TIMEOUT_S

_WORDS = (
    "the of and to in is that for it as with was on be by this are at from or an which not have "
    "one data rank cache token prefix batch decode prefill model load route queue block"
).split()


def generated_text(rid: str, start: int, end: int) -> bytes:
    """Output tokens ``[start, end)`` of request *rid*, as text: the same in every run."""
    seed = int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=4).digest(), "little")
    n = len(_WORDS)
    return "".join(" " + _WORDS[(seed + 7 * i) % n] for i in range(start, end)).encode()


def _payload_map(payload: bytes) -> dict[str, Any]:
    """The payload as a msgpack map, or ``{}`` (an opaque payload is not ours to judge)."""
    if payload[:1] and (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):  # a msgpack map
        try:
            body = msgpack.unpackb(payload, raw=False)
        except Exception:  # an opaque payload that happens to look like a map
            return {}
        return body if isinstance(body, dict) else {}
    return {}


def wants_stream(header: Any, payload: bytes) -> bool:
    return header.get("stream") is True or _payload_map(payload).get("stream") is True


def eos_after(payload: bytes) -> int | None:
    """The payload's ``eos_after``: after this many tokens the mock's output ends, as a real
    model's does at an end-of-sequence token before ``max_new_tokens`` (a count >= 0, else ``None``)."""
    n = _payload_map(payload).get("eos_after")
    return n if type(n) is int and n >= 0 else None


def add_report_profile_argument(p: argparse.ArgumentParser) -> None:
    """``--report-profile``: the simulator's profiles, so a live mock rank and a simulated one
    show a policy the same fields."""
    names = "; ".join(f"{n} = {pr.summary}" for n, pr in PROFILES.items())
    p.add_argument("--report-profile", choices=list(PROFILES), default=None,
                   help=f"load-report fields the mock ranks send: {names} "
                        f"(default: the --engine-config file's report_profile, else {DEFAULT_PROFILE})")  # fmt: skip


def params_from_args(args: argparse.Namespace, config: EngineConfig | None = None) -> EngineParams:
    """The rank's numbers: a command-line flag wins, then the engine config (the simulator's
    ``--engine-config`` file, so a live and a simulated rank can share it), then the pinned
    defaults."""
    config = config or EngineConfig()
    interval_ms = args.report_interval_ms
    return EngineParams(
        kv_capacity=config.kv_capacity_tokens if args.kv_capacity is None else args.kv_capacity,
        block_size=args.block_size,
        default_output_tokens=args.default_output_tokens,
        # The simulator's 0 ("by time only") has no mock equivalent: the mock reports by steps too.
        report_every_steps=(config.report_steps or EngineParams().report_every_steps) if args.report_every_steps is None
        else args.report_every_steps,
        report_interval_s=config.report_interval_s if interval_ms is None else interval_ms / 1000,
    )  # fmt: skip


class MockRank:
    """The event loop of one mock rank (the process body, separate for tests).

    :param clock: The lockstep: a :class:`~dpcore.mock.barrier.RemoteClock` to the DP
        group's barrier, or a :class:`~dpcore.mock.barrier.LocalClock` for a rank alone.
    :param report_profile: Which load fields the rank reports: a name in
        :data:`dpcore.sim.profiles.PROFILES`, the simulator's profiles.
    """

    def __init__(
        self, worker: Worker, params: EngineParams, clock: Clock, report_profile: str = DEFAULT_PROFILE
    ) -> None:
        self.worker = worker
        self.rank = worker.rank
        self.engine = MockEngine(params)
        self.params = params
        self.clock = clock
        self.profile = profile(report_profile)
        self.stepper = Stepper(self.engine, clock, params.report_interval_s)
        self._stream: set[int] = set()
        self.stop = False
        self.completed = 0
        #: Jobs in the engine by dispatch seq, for aborts; and those aborted, sent nothing.
        self._jobs: dict[int, Job] = {}
        self._aborted: set[int] = set()
        worker.on_abort = self._abort
        self._heard = time.monotonic()
        self.barrier_silences = 0

    def _abort(self, work: Work) -> None:
        job = self._jobs.pop(work.seq, None)
        if job is None or not self.engine.abort(job, self.clock.now()):
            return
        self._stream.discard(id(job))
        if job.finished_at is not None:
            self.worker.finish(work)
        else:  # inside the prefill in progress: it ends with it, silently
            self._aborted.add(id(job))

    def run(self, parent_pid: int | None = None) -> None:
        worker = self.worker
        clock = self.clock
        # Say the KV capacity at once: fronts use it to refuse requests no rank can hold.
        worker.report(0, 0, 0, 0, self.params.kv_capacity)
        if clock.socket is not None:
            worker.watch(clock.socket)
        clock.join()
        self._events()  # a rank alone is in sync at once
        while not self.stop:
            wait = worker.heartbeat_interval_s
            due = clock.due_wall_s()
            if due is not None:
                # Round up to whole ms: the poller takes ms, and rounding down would spin.
                wait = min(wait, math.ceil(due * 1000) / 1000 + 1e-6)
            items = worker.recv(wait)
            changed = bool(items) and self._arrive(items)
            changed |= self._events()
            if changed:
                e = self.engine
                if e.kv.events:
                    self._publish(e.kv.events)
                worker.report(e.num_running, e.num_waiting, e.num_tokens, e.kv_used, self.params.kv_capacity,
                              prefill_tokens=self.profile.prefill_tokens(e.prefill_tokens))  # fmt: skip
            if self.stepper.waiting_for_the_group and time.monotonic() - self._heard > BARRIER_SILENCE_S:
                self._barrier_silent()
            if parent_pid is not None and os.getppid() != parent_pid:
                break  # whoever started us is gone: do not linger as an orphan

    # ------------------------------------------------------------------ KV events

    def _publish(self, events: list[tuple]) -> None:
        """Send the cache's changes since the last report as one KV event batch (so they
        reach the controller with the report, as SGLang publishes them per step)."""
        w = self.worker
        for ev in events:
            if ev[0] == STORED:
                w.kv_stored(ev[2], ev[1])
            elif ev[0] == REMOVED:
                w.kv_removed(ev[1])
            else:
                w.kv_cleared()
        events.clear()
        w.kv_flush()

    def on_control(self, ctl: Control) -> None:
        """The controller lost track of this rank's cache: send all of it."""
        if ctl.op == KV_RESYNC and isinstance(ctl.data, dict) and ctl.data.get("rank") == self.worker.rank:
            events = self.engine.kv.events
            if events is not None:
                events.clear()
                self.worker.kv_resync([(None, (b,)) for b in self.engine.kv.blocks()])

    # ------------------------------------------------------------------ lockstep

    def _arrive(self, items: list[Work]) -> bool:
        now = self.clock.now()
        default_out = self.params.default_output_tokens
        for work in items:
            req = work.request
            out = req.max_new_tokens if req.max_new_tokens is not None else default_out
            eos = eos_after(work.payload)
            if eos is not None:
                out = min(out, eos)
            job = Job(work, work.rid, req.num_tokens, req.block_hashes, out, now)
            if wants_stream(work.header, work.payload):
                self._stream.add(id(job))
            self._jobs[work.seq] = job
            self.worker.admit(work)
            refused = self.engine.add(job)
            if refused:
                self._emit(Step(refused, refused))
        self.stepper.arrived(now)
        return True

    def _events(self) -> bool:
        """Apply what the lockstep says; whether the load changed (a report is due)."""
        changed = False
        stepper = self.stepper
        for ev in self.clock.events():
            self._heard = time.monotonic()
            if isinstance(ev, Sync):
                if stepper.run_id is not None:
                    log.warning("lockstep_resynchronised", rank=self.rank, run=ev.run)
                stepper.sync(ev.run, ev.chunk_tokens, self.clock.now())
            elif (done := stepper.end(ev.run, ev.version, ev.steps, ev.end)) is not None:
                # A load report goes out after every run this rank worked in; a run lasts at
                # most report_every_steps steps or report_interval_s.
                self._emit(done[0])
                changed |= done[1].busy
        return changed

    def _barrier_silent(self) -> None:
        """No step end for a long time while this rank has work: the barrier died or lost
        this rank. Say so, and join again (a restarted barrier takes the rank back)."""
        self.barrier_silences += 1
        log.warning("lockstep_barrier_silent", rank=self.rank, silent_s=round(time.monotonic() - self._heard, 1),
                    times=self.barrier_silences)  # fmt: skip
        self._heard = time.monotonic()
        self.clock.join()

    def _emit(self, step: Step) -> bool:
        if not step.progress:
            return False
        send = self.worker.send
        for job in step.progress:
            work: Work = job.tag
            stream = id(job) in self._stream
            final = job.finished_at is not None
            if final:
                self._jobs.pop(work.seq, None)
            if id(job) in self._aborted:
                if final:
                    self._aborted.discard(id(job))
                    self.worker.finish(work, job.generated)
                continue
            if not final and not stream:
                continue
            meta: dict[str, Any] = {
                "dp_rank": self.rank,
                "prompt_tokens": job.num_tokens,
                "completion_tokens": job.generated,
                "cached_tokens": job.cached_tokens,
            }
            if work.prefill_rank is not None:
                meta["prefill_dp_rank"] = work.prefill_rank
            if job.error:
                meta["error"] = job.error
                payload = b""
            elif final:
                start = job.emitted if stream else 0
                meta["ttft_s"] = (job.first_token_at or job.arrived) - job.arrived
                meta["e2e_s"] = job.finished_at - job.arrived  # type: ignore[operator]
                payload = generated_text(job.rid, start, job.generated)
            else:
                payload = generated_text(job.rid, job.emitted, job.generated)
            job.emitted = job.generated
            send(work, meta, payload, final=final, output_tokens=job.generated if final else None)
            if final:
                self._stream.discard(id(job))
                self.completed += 1
        return True


# --------------------------------------------------------------------------- CLI


class _Stopped(Exception):
    """Raised by the SIGTERM/SIGINT handler to leave the loop."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = EngineParams()
    p.add_argument("--rank", type=int, required=True, help="this rank's index")
    p.add_argument("--dispatch", required=True, metavar="EP", help="controller dispatch endpoint for this rank")
    p.add_argument("--report", required=True, metavar="EP", help="controller load-report endpoint")
    p.add_argument("--barrier", default=None, metavar="EP",
                   help="the DP group's dpcore mock-barrier endpoint: run in lockstep with the group's other ranks "
                        "(default: none, this rank is a DP group of one)")  # fmt: skip
    p.add_argument("--speedup", type=float, default=None,
                   help="model time runs this many times faster (default 1; with --barrier the barrier's)")  # fmt: skip
    p.add_argument("--kv-capacity", type=int, default=None,
                   help=f"KV cache tokens (default: the --engine-config file's kv_capacity_tokens, else {d.kv_capacity:,})")  # fmt: skip
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens per block hash; match the sender (client SDK 64, Mooncake traces 512)")  # fmt: skip
    p.add_argument("--default-output-tokens", type=int, default=d.default_output_tokens,
                   help="output length when a request has no max_new_tokens")  # fmt: skip
    p.add_argument("--report-every-steps", type=int, default=None,
                   help=f"decode steps per load report at most (default: the --engine-config file's report_steps, "
                        f"else {d.report_every_steps})")  # fmt: skip
    p.add_argument("--report-interval-ms", type=float, default=None,
                   help=f"model ms between load reports at most, while busy (default: the --engine-config file's "
                        f"report_interval_s, else {d.report_interval_s * 1000:g})")  # fmt: skip
    add_report_profile_argument(p)
    add_engine_config_argument(p)
    p.add_argument("--heartbeat-s", type=float, default=0.25, help="wall seconds between heartbeats when idle")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process goes away")
    p.add_argument("--kv-events", action="store_true",
                   help="publish the prefix cache's stored/evicted blocks to the controller (KV events)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import zmq

    from dpcore.errors import ConfigError
    from dpcore.sdk import endpoints
    from dpcore.sdk.worker import Worker
    if args.barrier is not None and args.speedup is not None:
        raise ConfigError("--speedup: with --barrier the model clock is the barrier's; set --speedup there")
    speedup = 1.0 if args.speedup is None else args.speedup
    if not speedup > 0 or not math.isfinite(speedup):
        raise ConfigError(f"--speedup must be a positive number, got {speedup!r}")
    if args.rank < 0:
        raise ConfigError(f"--rank must be >= 0, got {args.rank}")
    if not args.heartbeat_s > 0:
        raise ConfigError(f"--heartbeat-s must be positive, got {args.heartbeat_s!r}")
    config = load_engine_config(args.engine_config)
    report_profile = args.report_profile or config.report_profile
    try:
        params = params_from_args(args, config)
    except ValueError as exc:
        raise ConfigError(f"mock-worker: {exc}") from exc
    endpoints.check(args.dispatch, "--dispatch")
    endpoints.check(args.report, "--report")
    if args.barrier is not None:
        endpoints.check(args.barrier, "--barrier")
    parent = os.getppid() if args.exit_with_parent else None
    rlog = log.bind(rank=args.rank)
    ctx = zmq.Context()
    worker = Worker(args.rank, dispatch_endpoint=args.dispatch, report_endpoint=args.report, zmq_ctx=ctx,
                    heartbeat_interval_s=args.heartbeat_s)  # fmt: skip
    clock: Clock = (RemoteClock(ctx, args.barrier, args.rank) if args.barrier is not None
                    else LocalClock(args.rank, speedup, config.step))  # fmt: skip
    rank = MockRank(worker, params, clock, report_profile)
    if args.kv_events:
        # Publish the cache's changes with each load report (so with the report delay).
        rank.engine.kv.events = []
        worker.kv_capacity_blocks = params.kv_capacity // params.block_size
        worker.on_control = rank.on_control

    def _stop(*_: object) -> None:
        # Raising interrupts the wait in recv() at once; whatever is running is lost either way.
        rank.stop = True
        raise _Stopped

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    rlog.info("mock_worker_started", pid=os.getpid(), barrier=args.barrier, kv_capacity=params.kv_capacity,
              report_profile=report_profile)  # fmt: skip
    try:
        rank.run(parent)
    except _Stopped:
        pass
    finally:
        clock.close()
        worker.close()
        ctx.term()
        e = rank.engine
        rlog.info("mock_worker_stopped", completed=rank.completed, decode_steps=e.decode_steps,
                  extend_steps=e.extend_steps)  # fmt: skip
    return 0
