"""Compare total_tokens and total_requests with the upstream policies they replace, with fresh
and with late load reports, as a table of ratios.

    python scripts/compare_load_balancing.py [--trace traces/AzureLLMInferenceTrace_conv.csv] [--dp 8]
        [--level busy] [--seeds 0 1] [--report-profile sglang] [--limit N] [--jobs N]

Two `dpcore simulate` runs per seed at the chosen load level (time-scale from
scripts/load_levels.py, or --time-scale): one with the default load reports, one with late
reports (``--report-interval 1 --report-delay 5``: a report a second, five seconds old).
Each row prints, for one pair: TPOT p99 and straggler waste over the upstream policy's
(fresh reports), TTFT p99 over the upstream policy's (late reports), and our late TTFT p99
over our fresh one. Below 1 is better.

Pairs: ``total_tokens`` against ``peer:sglang_total_tokens``; ``total_requests`` against
``peer:sglang_total_requests`` and ``peer:vllm``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simrun import DEFAULT_LEVELS, LEVELS, read_levels, simulate  # noqa: E402

PAIRS = [
    ("total_tokens", "peer:sglang_total_tokens"),
    ("total_requests", "peer:sglang_total_requests"),
    ("total_requests", "peer:vllm"),
]
LATE = ["--report-interval", "1", "--report-delay", "5"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="traces/AzureLLMInferenceTrace_conv.csv")
    ap.add_argument("--dp", type=int, default=8)
    ap.add_argument("--level", choices=LEVELS, default="busy", help="load level from --levels (default busy)")
    ap.add_argument("--time-scale", type=float, help="instead of a measured level")
    ap.add_argument("--levels", type=Path, default=DEFAULT_LEVELS)
    ap.add_argument("--report-profile", default="sglang")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--limit", type=int)
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--out", type=Path, default=Path("out/compare"))
    args = ap.parse_args(argv)
    ts = args.time_scale
    if ts is None:
        cells = dict(read_levels(args.levels, args.trace))
        if args.dp not in cells:
            raise SystemExit(f"no measured load levels for dp {args.dp} in {args.levels}; pass --time-scale")
        ts = cells[args.dp][LEVELS.index(args.level)]
    policies = sorted({p for pair in PAIRS for p in pair})
    base = ["--report-profile", args.report_profile]
    rows, summary = [], []
    for seed in args.seeds:
        stem = f"{Path(args.trace).stem}_dp{args.dp}_ts{ts:g}_s{seed}"
        fresh = simulate(args.trace, args.dp, ts, policies, args.out / f"{stem}_fresh.json", seed=seed,
                         limit=args.limit, jobs=args.jobs, extra=base)["policies"]  # fmt: skip
        late = simulate(args.trace, args.dp, ts, policies, args.out / f"{stem}_late.json", seed=seed,
                        limit=args.limit, jobs=args.jobs, extra=base + LATE)["policies"]  # fmt: skip
        for ours, peer in PAIRS:
            r = {
                "tpot_p99": fresh[ours]["tpot_p99_s"] / fresh[peer]["tpot_p99_s"],
                "waste": fresh[ours]["straggler_waste"] / fresh[peer]["straggler_waste"],
                "late_ttft_p99": late[ours]["ttft_p99_s"] / late[peer]["ttft_p99_s"],
                "late_over_fresh": late[ours]["ttft_p99_s"] / fresh[ours]["ttft_p99_s"],
            }
            cells = " | ".join(f"{v:.2f}" for v in r.values())
            rows.append(f"| {ours} | {peer} | {seed} | {cells} |")
            summary.append({"policy": ours, "peer": peer, "seed": seed, "time_scale": ts, "ratios": r})
    print(f"dp {args.dp}, time-scale {ts:g} ({args.level if args.time_scale is None else 'given'})")
    print("| policy | against | seed | TPOT p99 | straggler waste | late TTFT p99 | late / fresh TTFT p99 |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    (args.out / f"{Path(args.trace).stem}_load_ratios.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
