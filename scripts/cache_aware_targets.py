"""Compare cache_aware with the peers across dp sizes and loads with `dpcore simulate`; print a markdown table.

    python scripts/cache_aware_targets.py [--trace PATH] [--out DIR] [--cells 8:1,1.5,2 ...] [--seed S] [--limit N]

For each (dp, time-scale) it runs one `dpcore simulate` with cache_aware and the five peers
(the exact command is printed), then compares cache_aware with the best peer, metric by
metric. Also prints the trace's TTFT floor: the p99 of (uncached prompt tokens with one
infinite cache) / prefill rate, i.e. what no router can beat on this engine; and the TTFT p99
of ``ref:clairvoyant`` (a router that reads the ranks' true queues and caches) over the best
peer's: how far placement alone gets on FCFS ranks.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

PEERS = ["peer:smg_cache_aware", "peer:dynamo", "peer:vllm", "peer:sglang_total_tokens", "peer:sglang_total_requests"]
# (dp, time-scales light/busy/heavy): dp 8 at 1, 1.5, 2; dp 4 and 16 scaled by dp/8.
GRID = [(8, (1.0, 1.5, 2.0)), (4, (0.5, 0.75, 1.0)), (16, (2.0, 3.0, 4.0))]


def floor_p99(trace: str, time_scale: float, seed: int = 0, limit: int | None = None) -> float:
    from dpcore.sim.config import EngineConfig
    from dpcore.sim.oracle import infinite_cache_hits
    from dpcore.sim.traces import read_trace

    rate = EngineConfig().prefill_tokens_per_s
    t = read_trace(trace, time_scale=time_scale, seed=seed, limit=limit)
    floors = sorted(max(1, q.input_length - hit) / rate for q, hit in zip(t.requests, infinite_cache_hits(t)))
    return floors[int(0.99 * len(floors))]


def parse_cell(text: str) -> tuple[int, tuple[float, float, float]]:
    try:
        dp, scales = text.split(":")
        light, busy, heavy = (float(x) for x in scales.split(","))
        return int(dp), (light, busy, heavy)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want DP:LIGHT,BUSY,HEAVY (e.g. 8:1,1.5,2), got {text!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="traces/conversation_trace.jsonl")
    ap.add_argument("--out", default="out/targets")
    ap.add_argument(
        "--cells",
        type=parse_cell,
        nargs="+",
        default=GRID,
        metavar="DP:L,B,H",
        help="dp size and its light, busy, heavy time-scales (default: nine cells: dp 4, 8 and 16 at three loads each)",
    )
    ap.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    ap.add_argument("--limit", type=int, metavar="N", help="replay only the first N requests (a quick look)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for dp, scales in args.cells:
        for load, ts in zip(("light", "busy", "heavy"), scales):
            path = out / f"dp{dp}_ts{ts}_s{args.seed}.json"
            cmd = [sys.executable, "-m", "dpcore", "simulate", "--trace", args.trace, "--dp-size", str(dp),
                   "--time-scale", str(ts), "--seed", str(args.seed), "--policy", "cache_aware"]
            for p in [*PEERS, "ref:clairvoyant"]:
                cmd += ["--policy", p]
            if args.limit:
                cmd += ["--limit", str(args.limit)]
            cmd += ["--json", str(path)]
            print("$", shlex.join(["dpcore", *cmd[3:]]), file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            doc = json.loads(path.read_text())
            pol = doc["policies"]
            best = {k: min(pol[p][k] for p in PEERS) for k in ("ttft_p50_s", "ttft_p99_s", "e2e_p99_s")}
            ca = pol["cache_aware"]
            r = {k: ca[k] / best[k] for k in best}
            hit = ca["prefix_hit_ratio"] / doc["oracle_prefix_hit_ratio"]
            p99_target = 1.05 if load == "light" else 0.8
            p50_target = 1.05 if load == "light" else 1.0
            ok = {
                "p50": r["ttft_p50_s"] <= p50_target,
                "p99": r["ttft_p99_s"] <= p99_target,
                "hit": hit >= 0.9,
                "load": ca["load_max_over_mean"] <= 1.2,
                "e2e": r["e2e_p99_s"] <= 1.05,
            }
            fl = floor_p99(args.trace, ts, args.seed, args.limit) / best["ttft_p99_s"]
            cv = pol["ref:clairvoyant"]["ttft_p99_s"] / best["ttft_p99_s"]
            mark = lambda k: "" if ok[k] else " ✗"  # noqa: E731
            rows.append(
                f"| {dp} | {ts:g} ({load}) | {r['ttft_p50_s']:.2f}{mark('p50')} | {r['ttft_p99_s']:.2f}{mark('p99')} "
                f"({ca['ttft_p99_s']:.2f} s vs {best['ttft_p99_s']:.2f} s; floor {fl:.2f}) | {cv:.2f} | {hit:.2f}{mark('hit')} "
                f"| {ca['load_max_over_mean']:.3f}{mark('load')} | {r['e2e_p99_s']:.2f}{mark('e2e')} |"
            )
    print(
        "| dp | time-scale | TTFT p50 / best peer | TTFT p99 / best peer | clairvoyant p99 / best peer "
        "| hits / oracle | load max/mean | e2e p99 / best peer |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
