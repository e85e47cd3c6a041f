"""Find a trace's capacity on the engine model, and the light / busy / heavy load levels.

    python scripts/load_levels.py --trace traces/conversation_trace.jsonl --dp-size 4 8 16 [--json out/levels.json]

Load levels come from the model itself, never from one policy's results: for each dp size,
the capacity is the time-scale (``dpcore simulate --time-scale``) at which ``round_robin``'s
TTFT p50 diverges, i.e. first exceeds ``--diverge`` (default 4) times its value on a nearly
idle cluster. Past that rate the queues grow for as long as the trace lasts, so the jump is
steep and the exact factor moves the result by a few percent at most (the sweep is printed,
so the knee can be checked by eye). The levels are then ``--fractions`` of that time-scale
(default 0.5, 0.75 and 0.95: light, busy, heavy).

The search runs ``round_robin`` only: a geometric sweep (factor 2) until the p50 diverges,
then bisection on the log time-scale down to ``--tolerance`` (default 3%). Each point is one
full simulation, so ``--limit`` is for a quick look only: a prefix of the trace has other
load than the whole.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import attrs

from dpcore.sim.report import summarize
from dpcore.sim.runner import RunSpec, run_one

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simrun import LEVELS  # noqa: E402

#: Time-scale of the light-load reference run, as a fraction of the first sweep point (lower
#: fractions stretch the simulated time, and the report events with it, for no new information).
IDLE_FRACTION = 0.25


def p50(spec: RunSpec, policy: str) -> float:
    doc = summarize(run_one(spec, policy))
    value = doc["ttft_p50_s"]
    return math.inf if value is None else value


def find_capacity(
    spec: RunSpec,
    *,
    policy: str = "round_robin",
    start: float = 1.0,
    diverge: float = 4.0,
    tolerance: float = 0.03,
    log=print,
) -> tuple[float, float, list[tuple[float, float]]]:
    """(capacity time-scale, idle TTFT p50, [(time-scale, TTFT p50), ...] as measured)."""
    points: list[tuple[float, float]] = []

    def at(ts: float) -> float:
        t0 = time.monotonic()
        v = p50(attrs.evolve(spec, time_scale=ts), policy)
        points.append((ts, v))
        log(f"  time-scale {ts:8.4f}: {policy} TTFT p50 {v:9.3f} s  ({time.monotonic() - t0:.1f} s)")
        return v

    idle = at(start * IDLE_FRACTION)
    limit = diverge * idle
    lo, hi = None, start
    # Sweep up (or down) by factors of 2 until the knee is bracketed.
    while at(hi) <= limit:
        lo, hi = hi, hi * 2
        if hi > start * 1e4:
            raise RuntimeError(f"{policy} never diverges up to time-scale {hi:g}: is the trace empty?")
    if lo is None:
        lo = hi / 2
        while at(lo) > limit:
            hi, lo = lo, lo / 2
            if lo < start * IDLE_FRACTION:
                raise RuntimeError(f"{policy} diverges even at time-scale {lo:g}: the trace is past capacity at rest")
    while hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        if at(mid) <= limit:
            lo = mid
        else:
            hi = mid
    return lo, idle, sorted(points)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", required=True, metavar="PATH")
    ap.add_argument("--dp-size", type=int, nargs="+", default=[8], metavar="N")
    ap.add_argument("--policy", default="round_robin", help="the policy whose divergence defines capacity")
    ap.add_argument("--diverge", type=float, default=4.0, metavar="K", help="TTFT p50 over its idle value (default 4)")
    ap.add_argument("--fractions", type=float, nargs=3, default=(0.5, 0.75, 0.95), metavar=("LIGHT", "BUSY", "HEAVY"))
    ap.add_argument("--tolerance", type=float, default=0.03, help="relative width of the final bracket (default 0.03)")
    ap.add_argument(
        "--start", type=float, metavar="X", help="first time-scale of the sweep for dp 8 (default 1; scaled by dp / 8)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, metavar="N", help="replay only the first N requests (a quick look)")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="add {trace: {dp: {capacity, light, busy, heavy, sweep}}} to this JSON file "
        "(the results pages use docs/results/load_levels.json)",
    )
    args = ap.parse_args(argv)
    if args.diverge <= 1 or not 0 < args.tolerance < 1 or not all(0 < f <= 1 for f in args.fractions):
        ap.error("need --diverge > 1, 0 < --tolerance < 1 and fractions in (0, 1]")

    out: dict[str, dict] = {}
    for dp in args.dp_size:
        spec = RunSpec(trace_path=args.trace, dp_size=dp, limit=args.limit, seed=args.seed)
        print(f"dp {dp}: searching the time-scale where {args.policy}'s TTFT p50 diverges", file=sys.stderr)
        cap, idle, sweep = find_capacity(
            spec,
            policy=args.policy,
            start=(args.start or 1.0) * dp / 8,
            diverge=args.diverge,
            tolerance=args.tolerance,
            log=lambda s: print(s, file=sys.stderr),
        )
        levels = {name: round(cap * f, 3) for name, f in zip(LEVELS, args.fractions)}
        out[str(dp)] = {
            "capacity": round(cap, 6),
            "idle_ttft_p50_s": idle,
            **levels,
            "sweep": [(round(ts, 6), p) for ts, p in sweep],
        }
    print("| dp | capacity (time-scale) | light | busy | heavy |")
    print("|---:|---:|---:|---:|---:|")
    for dp, row in out.items():
        print(f"| {dp} | {row['capacity']:.3f} | {row['light']:g} | {row['busy']:g} | {row['heavy']:g} |")
    if args.json:
        # One file for every trace measured: {trace file name: {...}}; other traces are kept.
        path = Path(args.json)
        doc = json.loads(path.read_text()) if path.is_file() else {}
        entry = doc.setdefault(Path(args.trace).name, {"dp": {}})
        entry.update(
            policy=args.policy, diverge=args.diverge, fractions=list(args.fractions), seed=args.seed, limit=args.limit
        )
        entry["dp"].update(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
