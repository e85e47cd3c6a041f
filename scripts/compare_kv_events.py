"""Compare a policy with KV events against itself without them, as a table of ratios.

    python scripts/compare_kv_events.py [--trace traces/conversation_trace.jsonl] [--policy cache_aware]
        [--cells 8:L,B,H ...] [--load busy heavy] [--seeds 0 1] [--kv-event-loss 0.1]
        [--limit N] [--out DIR]

For each dp size, load level (time-scales measured by scripts/load_levels.py, or given with
--cells) and seed, it runs the policy alone through `dpcore simulate` with the ``sglang``
report profile (what the SGLang adapter sends without events), with ``sglang-kv`` (the same
plus SGLang's KV events), and, with --kv-event-loss, with ``sglang-kv`` losing that fraction
of event batches. The exact commands go to stderr. Each row divides the run with events by
the run without: TTFT p50/p99 and TPOT p99 (below 1 is better), output throughput (above 1 is
better), and gives prefix hits over the equal-capacity oracle's for both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simrun import add_cell_arguments, cells, simulate  # noqa: E402

#: Metric -> column title; each is the run with events over the run without.
RATIOS = {"ttft_p50_s": "TTFT p50", "ttft_p99_s": "TTFT p99", "tpot_p99_s": "TPOT p99", "throughput_tok_s": "output tok/s"}


def compare(without: dict, with_events: dict, policy: str) -> dict[str, float]:
    """The ratios of one row, and both runs' hits over the equal-capacity oracle."""
    a, b = without["policies"][policy], with_events["policies"][policy]
    out = {k: b[k] / a[k] for k in RATIOS}
    out["hits_over_oracle_without"] = a["prefix_hit_ratio"] / without["oracle_prefix_hit_ratio"]
    out["hits_over_oracle_with"] = b["prefix_hit_ratio"] / with_events["oracle_prefix_hit_ratio"]
    return out


def run(args: argparse.Namespace, dp: int, ts: float, seed: int, tag: str, extra: list[str]) -> dict:
    """One `dpcore simulate` of the policy alone; its JSON document."""
    out = args.out / f"{Path(args.trace).stem}_{args.policy}_dp{dp}_ts{ts:g}_s{seed}_{tag}.json"
    return simulate(args.trace, dp, ts, [args.policy], out, seed=seed, limit=args.limit, extra=extra)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="traces/conversation_trace.jsonl")
    ap.add_argument("--policy", default="cache_aware", help="the dpcore policy (or chain) to run (default cache_aware)")
    ap.add_argument("--kv-event-loss", type=float, metavar="P", help="also run with this fraction of event batches lost")
    add_cell_arguments(ap)
    args = ap.parse_args(argv)
    stem = Path(args.trace).stem
    variants = [("events", ["--report-profile", "sglang-kv"])]
    if args.kv_event_loss:
        variants.append((f"events, {args.kv_event_loss:g} lost",
                         ["--report-profile", "sglang-kv", "--kv-event-loss", f"{args.kv_event_loss:g}"]))  # fmt: skip
    rows, summary = [], []
    for dp, load, ts, seed in cells(args):
        cell = (args, dp, ts, seed)
        without = run(*cell, "sglang", ["--report-profile", "sglang"])
        for name, extra in variants:
            tag = "sglang-kv" if len(extra) == 2 else f"sglang-kv-loss{args.kv_event_loss:g}"
            r = compare(without, run(*cell, tag, extra), args.policy)
            cols = " | ".join(f"{r[k]:.2f}" for k in RATIOS)
            hits = f"{r['hits_over_oracle_without']:.3f} → {r['hits_over_oracle_with']:.3f}"
            rows.append(f"| {dp} | {ts:g} ({load}) | {seed} | {name} | {cols} | {hits} |")
            summary.append({"dp": dp, "load": load, "time_scale": ts, "seed": seed, "variant": name,
                            "requests": without["run"]["trace"]["requests"], "ratios": r})  # fmt: skip
    print(f"{args.policy} with KV events over without them, {Path(args.trace).name}")
    print("| dp | time-scale | seed | reports | " + " | ".join(RATIOS.values()) + " | hits / oracle (without → with) |")
    print("|---:|---|---:|---|" + "---:|" * len(RATIOS) + "---|")
    print("\n".join(rows))
    (args.out / f"{stem}_{args.policy}_kv_ratios.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
