"""``dpcore mock-worker``: one mock engine rank as a process, speaking only the worker SDK.

The process runs :class:`~dpcore.mock.engine.MockEngine` on model time = wall time ×
``--speedup``, sleeping in :meth:`Worker.recv` until the current iteration ends or work
arrives, so an idle or decoding rank costs almost no CPU.

Per request it sends its sender one final ``out`` (meta: ``dp_rank``, ``prompt_tokens``,
``completion_tokens``, ``cached_tokens``, ``ttft_s`` and ``e2e_s`` in model seconds, and
``prefill_dp_rank`` for PD decode; payload: deterministic generated text). A streaming
request also gets a non-final ``out`` after its prefill and after each decode macro step,
whose payloads are the new text (the final payload then carries only the rest).

A request asks to stream with ``"stream": true`` in its header or in its payload, when the
payload is a msgpack map (the mock engine's own payload format; any other payload is an
opaque prompt). ``max_new_tokens`` sets the output length.

Load goes to the controller after every iteration that changed something (so at most every
``--report-every-steps`` decode steps or ``--report-interval-ms``), and the SDK heartbeats
while idle.
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

from dpcore.cacheindex import STORED
from dpcore.mock.engine import EngineParams, Job, MockEngine, Step
from dpcore.wire import KV_RESYNC, Control

if TYPE_CHECKING:
    from dpcore.sdk.worker import Work, Worker

_WORDS = (
    "the of and to in is that for it as with was on be by this are at from or an which not have "
    "one data rank cache token prefix batch decode prefill model load route queue block"
).split()


def generated_text(rid: str, start: int, end: int) -> bytes:
    """Output tokens ``[start, end)`` of request *rid*, as text: the same in every run."""
    seed = int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=4).digest(), "little")
    n = len(_WORDS)
    return "".join(" " + _WORDS[(seed + 7 * i) % n] for i in range(start, end)).encode()


def wants_stream(header: Any, payload: bytes) -> bool:
    if header.get("stream") is True:
        return True
    if payload[:1] and (0x80 <= payload[0] <= 0x8F or payload[0] in (0xDE, 0xDF)):  # a msgpack map
        try:
            body = msgpack.unpackb(payload, raw=False)
        except Exception:  # not ours to judge: an opaque payload that happens to look like a map
            return False
        return isinstance(body, dict) and body.get("stream") is True
    return False


def params_from_args(args: argparse.Namespace) -> EngineParams:
    return EngineParams(
        prefill_tokens_per_s=args.prefill_tps,
        decode_step_s=args.decode_step_ms / 1000,
        decode_step_per_req_s=args.decode_step_per_req_ms / 1000,
        kv_capacity=args.kv_capacity,
        block_size=args.block_size,
        max_prefill_tokens=args.max_prefill_tokens,
        default_output_tokens=args.default_output_tokens,
        report_every_steps=args.report_every_steps,
        report_interval_s=args.report_interval_ms / 1000,
    )


class MockRank:
    """The event loop of one mock rank (the process body, separate for tests)."""

    def __init__(self, worker: Worker, params: EngineParams, speedup: float = 1.0) -> None:
        self.worker = worker
        self.rank = worker.rank
        self.engine = MockEngine(params)
        self.params = params
        self.speedup = speedup
        self._t0 = time.monotonic()
        self._stream: set[int] = set()
        self.stop = False
        self.completed = 0

    def now(self) -> float:
        """Model time: wall seconds since start × speed-up."""
        return (time.monotonic() - self._t0) * self.speedup

    def run(self, parent_pid: int | None = None) -> None:
        engine = self.engine
        worker = self.worker
        while not self.stop:
            changed = self._emit(engine.advance(self.now()))
            if engine.busy_until is None:
                wait = worker.heartbeat_interval_s
            else:
                # Round up to whole ms: the poller takes ms, and rounding down would spin.
                wait = math.ceil(max(0.0, engine.busy_until - self.now()) / self.speedup * 1000) / 1000 + 1e-6
            items = worker.recv(wait)
            if items:
                now = self.now()
                default_out = self.params.default_output_tokens
                for work in items:
                    req = work.request
                    out = req.max_new_tokens if req.max_new_tokens is not None else default_out
                    job = Job(work, work.rid, req.num_tokens, req.block_hashes, out, now)
                    if wants_stream(work.header, work.payload):
                        self._stream.add(id(job))
                    worker.admit(work)
                    self._emit(engine.add(job))
                engine.interrupt(now)
                changed |= self._emit(engine.advance(now))
                changed = True
            if changed:
                if engine.cache.events:
                    self._publish(engine.cache.events)
                worker.report(engine.num_running, engine.num_waiting, engine.num_tokens,
                              engine.kv_used, self.params.kv_capacity,
                              prefill_tokens=engine.prefill_tokens(now))  # fmt: skip
            if parent_pid is not None and os.getppid() != parent_pid:
                break  # whoever started us is gone: do not linger as an orphan

    def _publish(self, events: list[tuple]) -> None:
        """Send the cache's changes since the last report as one KV event batch."""
        w = self.worker
        for ev in events:
            if ev[0] == STORED:
                w.kv_stored(ev[2], ev[1])
            else:
                w.kv_removed(ev[1])
        events.clear()
        w.kv_flush()

    def on_control(self, ctl: Control) -> None:
        """The controller lost track of this rank's cache: send all of it."""
        if ctl.op == KV_RESYNC and isinstance(ctl.data, dict) and ctl.data.get("rank") == self.worker.rank:
            if self.engine.cache.events is not None:
                self.engine.cache.events.clear()
                self.worker.kv_resync(self.engine.cache.chains())

    def _emit(self, step: Step) -> bool:
        if not step.progress:
            return False
        send = self.worker.send
        for job in step.progress:
            work: Work = job.tag
            stream = id(job) in self._stream
            final = job.finished_at is not None
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
            send(work, meta, payload, final=final)
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
    p.add_argument("--speedup", type=float, default=1.0, help="model time runs this many times faster (default 1)")
    p.add_argument("--prefill-tps", type=float, default=d.prefill_tokens_per_s, help="uncached prefill tokens/s")
    p.add_argument("--decode-step-ms", type=float, default=d.decode_step_s * 1000, help="decode step base time")
    p.add_argument("--decode-step-per-req-ms", type=float, default=d.decode_step_per_req_s * 1000,
                   help="decode step time added per running request")  # fmt: skip
    p.add_argument("--kv-capacity", type=int, default=d.kv_capacity, help="KV cache tokens")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens per block hash; match the sender (client SDK 64, Mooncake traces 512)")  # fmt: skip
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens, help="per prefill batch")
    p.add_argument("--default-output-tokens", type=int, default=d.default_output_tokens,
                   help="output length when a request has no max_new_tokens")  # fmt: skip
    p.add_argument("--report-every-steps", type=int, default=d.report_every_steps, help="decode steps per report")
    p.add_argument("--report-interval-ms", type=float, default=d.report_interval_s * 1000,
                   help="model ms between reports while busy")  # fmt: skip
    p.add_argument("--heartbeat-s", type=float, default=0.25, help="wall seconds between heartbeats when idle")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process goes away")
    p.add_argument("--kv-events", action="store_true",
                   help="publish the prefix cache's stored/evicted blocks to the controller (KV events)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import structlog

    from dpcore.errors import ConfigError
    from dpcore.sdk import endpoints
    from dpcore.sdk.worker import Worker

    if not args.speedup > 0 or not math.isfinite(args.speedup):
        raise ConfigError(f"--speedup must be a positive number, got {args.speedup!r}")
    if args.rank < 0:
        raise ConfigError(f"--rank must be >= 0, got {args.rank}")
    if not args.heartbeat_s > 0:
        raise ConfigError(f"--heartbeat-s must be positive, got {args.heartbeat_s!r}")
    try:
        params = params_from_args(args)
    except ValueError as exc:
        raise ConfigError(f"mock-worker: {exc}") from exc
    endpoints.check(args.dispatch, "--dispatch")
    endpoints.check(args.report, "--report")
    parent = os.getppid() if args.exit_with_parent else None
    log = structlog.get_logger("dpcore").bind(rank=args.rank)
    worker = Worker(args.rank, dispatch_endpoint=args.dispatch, report_endpoint=args.report,
                    heartbeat_interval_s=args.heartbeat_s)  # fmt: skip
    rank = MockRank(worker, params, args.speedup)
    if args.kv_events:
        # Publish the cache's changes with each load report (so with the report delay).
        rank.engine.cache.events = []
        worker.kv_capacity_blocks = params.kv_capacity // params.block_size
        worker.on_control = rank.on_control

    def _stop(*_: object) -> None:
        # Raising interrupts the wait in recv() at once; whatever is running is lost either way.
        rank.stop = True
        raise _Stopped

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("mock_worker_started", pid=os.getpid(), speedup=args.speedup, kv_capacity=params.kv_capacity)
    try:
        rank.run(parent)
    except _Stopped:
        pass
    finally:
        worker.close()
        log.info("mock_worker_stopped", completed=rank.completed, decode_steps=rank.engine.decode_steps)
    return 0
