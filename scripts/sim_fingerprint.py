"""Fingerprint the simulator's raw results, to show that a refactor changes no number.

Runs a fixed matrix of small simulations (both engines, several policies including a peer and
a reference, every report profile, KV-event loss, faults, dp 4 and 8, both bundled traces) and
prints one line per run: the case and the SHA-256 of its whole :class:`RunResult` (every
per-request time as ``repr`` of the float, the load series, the sampled decisions). Run it
before and after a change and compare the two outputs::

    .venv/bin/python scripts/sim_fingerprint.py > before.txt
    # ... change the simulator ...
    .venv/bin/python scripts/sim_fingerprint.py > after.txt
    diff before.txt after.txt && echo identical

``--limit`` sets how many requests of each trace are replayed (default 2000).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import attrs

from dpcore.sim.config import EngineConfig
from dpcore.sim.faults import parse_faults
from dpcore.sim.runner import RunSpec, run_one

TRACES = ("traces/conversation_trace.jsonl", "traces/AzureLLMInferenceTrace_conv.csv")
POLICIES = ("round_robin", "total_requests", "cache_aware", "peer:vllm", "peer:smg_cache_aware", "ref:clairvoyant")


def cases() -> list[tuple[str, str, int, str, float, str]]:
    """(trace, engine, dp, report profile, KV event loss, faults) for every run."""
    out = []
    for trace in TRACES:
        for dp in (4, 8):
            out.append((trace, "replicas", dp, "sglang", 0.0, ""))
            out.append((trace, "replicas", dp, "full", 0.0, ""))
            out.append((trace, "lockstep", dp, "sglang", 0.0, ""))
            out.append((trace, "lockstep", dp, "full", 0.0, ""))
            out.append((trace, "lockstep", dp, "sglang-kv", 0.0, ""))
        # Fault times are fractions of the replayed span (filled in by main).
        out.append((trace, "lockstep", 8, "sglang-kv", 0.2, "1@0.2-0.5,5@0.3"))
        out.append((trace, "lockstep", 4, "sglang", 0.0, "random:2"))
    return out


def _scaled(faults: str, span: float) -> str | None:
    """``RANK@DOWN-UP`` with DOWN and UP as fractions of *span*, in seconds."""
    if not faults or faults.startswith("random:"):
        return faults or None
    out = []
    for part in faults.split(","):
        rank, _, when = part.partition("@")
        times = [f"{float(x) * span:.3f}" for x in when.split("-")]
        out.append(f"{rank}@{'-'.join(times)}")
    return ",".join(out)


def digest(result: object) -> str:
    return hashlib.sha256(repr(attrs.asdict(result)).encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=2000, help="requests per trace (default 2000)")
    args = p.parse_args(argv)
    for trace, engine, dp, prof, loss, faults in cases():
        span = 1.0
        if faults:
            arrivals = [r.arrival for r in RunSpec(trace_path=trace, dp_size=dp, limit=args.limit).load_trace().requests]
            span = arrivals[-1] - arrivals[0]
        spec = RunSpec(
            trace_path=trace,
            dp_size=dp,
            config=EngineConfig(report_profile=prof, kv_event_loss=loss),
            limit=args.limit,
            explain=5,
            engine=engine,
            faults=parse_faults(_scaled(faults, span), dp_size=dp, duration_s=span, seed=0),
        )
        for policy in POLICIES:
            t0 = time.perf_counter()
            result = run_one(spec, policy)
            case = f"{trace} {engine} dp={dp} {prof} loss={loss:g} faults={faults or '-'} {policy}"
            print(f"{case} {digest(result)}", flush=True)
            print(f"{case}: {time.perf_counter() - t0:.2f} s, {result.completed} completed, {result.failed} failed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
