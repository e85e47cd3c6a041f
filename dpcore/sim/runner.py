"""Run several policies over one trace, each in its own simulation, optionally in parallel.

A run is fully described by a :class:`RunSpec` and a policy name, so a worker process can
rebuild it from scratch; results do not depend on how many processes share the work.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from typing import Any

import structlog
from attrs import field, frozen

from dpcore.errors import UnknownPolicyError
from dpcore.ledger import LoadLedger
from dpcore.manager import PolicyManager
from dpcore.sim.baselines import BASELINES, is_baseline
from dpcore.sim.config import EngineConfig
from dpcore.sim.engine import Simulation
from dpcore.sim.faults import Fault
from dpcore.sim.lockstep import LockstepSimulation
from dpcore.sim.result import RunResult
from dpcore.sim.routing import PluginRouter, Router
from dpcore.sim.traces import Trace, read_trace


@frozen
class RunSpec:
    """Everything but the policy: trace, how to read it, the cluster and the engine."""

    trace_path: str
    dp_size: int
    config: EngineConfig = field(factory=EngineConfig)
    time_scale: float = 1.0
    limit: int | None = None
    seed: int = 0
    ticks: str = "spread"
    fmt: str | None = None
    options: Mapping[str, Mapping[str, Any]] = field(factory=dict)
    explain: int = 0
    engine: str = "lockstep"
    faults: tuple[Fault, ...] = ()

    def load_trace(self) -> Trace:
        return read_trace(
            self.trace_path,
            fmt=self.fmt,
            time_scale=self.time_scale,
            limit=self.limit,
            seed=self.seed,
            ticks=self.ticks,
        )


def _chain_options(name: str, options: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    chain = {p.strip().lower() for p in name.split(",")}
    return {k: v for k, v in options.items() if k in chain}


def _baseline(name: str) -> Callable[..., Router]:
    factory = BASELINES.get(name.strip().lower())
    if factory is None:
        msg = f"unknown baseline {name!r}; the simulator ships {', '.join(BASELINES)}"
        raise UnknownPolicyError(msg, name=name, available=list(BASELINES))
    return factory


QUIET_LOG = structlog.wrap_logger(
    structlog.PrintLogger(open(os.devnull, "w")),  # noqa: SIM115 - lives as long as the process
    wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
    processors=[structlog.processors.KeyValueRenderer()],
)

def make_router(name: str, sim: Simulation | LockstepSimulation, spec: RunSpec) -> Router:
    """A baseline (``peer:...``), a reference (``ref:...``) or an installed dpcore policy
    chain on *sim*'s clock."""
    if is_baseline(name):
        return _baseline(name)(
            sim.dp_size,
            clock=sim.clock,
            seed=spec.seed,
            block_size=sim.block_size,
            cached_blocks=sim.cached_blocks,
            queued_prefill=sim.queued_prefill_s,
            prefill_tokens_per_s=sim.prefill_tokens_per_s,
            running=sim.running,
        )
    manager = PolicyManager.from_method(
        name,
        dp_size=sim.dp_size,
        ledger=LoadLedger(sim.dp_size, clock=sim.clock),
        options=_chain_options(name, spec.options),
        # A failing policy would log one line per request; the run counts each distinct
        # failure instead (RunResult.errors) and the report shows it once.
        log=QUIET_LOG,
    )
    return PluginRouter(manager)


def check_policies(names: Sequence[str], spec: RunSpec) -> None:
    """Build every router once on a dummy clock, so bad names fail before any work starts."""
    for name in names:
        if is_baseline(name):
            _baseline(name)
            continue
        PolicyManager.from_method(
            name,
            dp_size=spec.dp_size,
            ledger=LoadLedger(spec.dp_size, clock=lambda: 0.0),
            options=_chain_options(name, spec.options),
        )


_TRACES: dict[tuple[Any, ...], Trace] = {}
_PROGRESS: Any = None


def run_one(spec: RunSpec, name: str, progress: Callable[[float], None] | None = None) -> RunResult:
    """Simulate policy *name* on *spec*'s trace (read once per process)."""
    key = (spec.trace_path, spec.fmt, spec.time_scale, spec.limit, spec.seed, spec.ticks)
    trace = _TRACES.get(key)
    if trace is None:
        _TRACES.clear()  # one trace at a time is enough; do not grow without bound
        trace = _TRACES[key] = spec.load_trace()
    engine = Simulation if spec.engine == "replicas" else LockstepSimulation
    sim = engine(
        trace, spec.dp_size, spec.config, seed=spec.seed, explain=spec.explain, progress=progress, faults=spec.faults
    )
    return sim.run(make_router(name, sim, spec), name)


def _worker_init(q: Any, log_level: str | None) -> None:
    global _PROGRESS
    _PROGRESS = q
    if log_level is not None:
        # A spawned process starts with structlog's print-everything defaults.
        from dpcore import log

        log.configure(log_level)


def _worker_run(spec: RunSpec, name: str) -> RunResult:
    q = _PROGRESS
    return run_one(spec, name, (lambda f: q.put((name, f))) if q is not None else None)


def default_jobs(n_policies: int) -> int:
    return max(1, min(n_policies, os.cpu_count() or 1))


def run_all(
    spec: RunSpec,
    names: Sequence[str],
    *,
    jobs: int = 1,
    log_level: str | None = None,
    progress: Callable[[str, float], None] | None = None,
) -> dict[str, RunResult]:
    """Every policy in *names* on the same arrivals; ``jobs > 1`` uses worker processes."""
    if jobs <= 1 or len(names) <= 1:
        return {n: run_one(spec, n, (lambda f, n=n: progress(n, f)) if progress else None) for n in names}
    ctx = get_context("spawn")  # no fork: the caller may be running threads (progress bars)
    q = ctx.Queue()
    results: dict[str, RunResult] = {}
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init, initargs=(q, log_level)) as pool:
        futures: dict[Future[RunResult], str] = {pool.submit(_worker_run, spec, n): n for n in names}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            for fut in done:
                results[futures[fut]] = fut.result()
            while True:
                try:
                    name, frac = q.get_nowait()
                except queue.Empty:
                    break
                if progress is not None:
                    progress(name, frac)
    return {n: results[n] for n in names}
