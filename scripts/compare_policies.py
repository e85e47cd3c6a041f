"""Compare a policy with every peer and the references, metric by metric, as a table of ratios.

    python scripts/compare_policies.py [--trace traces/conversation_trace.jsonl] [--policy cache_aware]
        [--cells 8:L,B,H ...] [--load light busy heavy] [--seeds 0 1] [--report-profile sglang]
        [--limit N] [--jobs N] [--plot PATH.png]

For each dp size, load level (light, busy, heavy: time-scales measured by
scripts/load_levels.py, or given with --cells) and seed, it runs one `dpcore simulate` with
the policy, the six peers and ``ref:clairvoyant`` (the exact command goes to stderr), then
divides the policy's numbers by the best peer's, metric by metric: the lowest TTFT p50/p99,
TPOT p99 and straggler waste, the highest output throughput (below 1 is better, except
throughput). Prefix hits are divided by the equal-capacity oracle's (one LRU holding the whole
cluster's KV), and TTFT p99 also by ``ref:clairvoyant``'s (true queues and caches), which
shows how much room placement leaves. Every run's JSON and a summary of the ratios go to
--out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simrun import add_cell_arguments, cells, simulate  # noqa: E402

from dpcore.sim.baselines import BASELINES, PREFIX  # noqa: E402

#: Every peer the simulator ships: the "best peer" is the best of them, metric by metric.
PEERS = [name for name in BASELINES if name.startswith(PREFIX)]
CLAIRVOYANT = "ref:clairvoyant"
#: Metric -> True when lower is better.
LOWER = {"ttft_p50_s": True, "ttft_p99_s": True, "tpot_p99_s": True, "straggler_waste": True,
         "throughput_tok_s": False}  # fmt: skip


def ratios(doc: dict, policy: str) -> dict[str, float]:
    """*policy* over the best peer per metric, plus the reference ratios."""
    pol = doc["policies"]
    ours = pol[policy]
    out: dict[str, float] = {}
    for key, lower in LOWER.items():
        values = [pol[p][key] for p in PEERS if pol[p].get(key) is not None]
        best = min(values) if lower else max(values)
        out[key] = ours[key] / best if best else (1.0 if ours[key] == best else float("inf"))
    best_p99 = min(pol[p]["ttft_p99_s"] for p in PEERS)
    cv = pol[CLAIRVOYANT]["ttft_p99_s"]
    out["clairvoyant_p99"] = cv / best_p99
    out["p99_over_clairvoyant"] = ours["ttft_p99_s"] / cv
    out["hits_over_oracle"] = ours["prefix_hit_ratio"] / doc["oracle_prefix_hit_ratio"]
    return out


COLUMNS = [
    ("TTFT p50", "ttft_p50_s"),
    ("TTFT p99", "ttft_p99_s"),
    ("ref:clairvoyant p99", "clairvoyant_p99"),
    ("p99 / clairvoyant", "p99_over_clairvoyant"),
    ("TPOT p99", "tpot_p99_s"),
    ("output tok/s", "throughput_tok_s"),
    ("hits / oracle", "hits_over_oracle"),
    ("straggler waste", "straggler_waste"),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", default="traces/conversation_trace.jsonl")
    ap.add_argument("--policy", default="cache_aware", help="the dpcore policy (or chain) to compare (default cache_aware)")
    ap.add_argument("--report-profile", default="sglang", help="what the simulated ranks report (default sglang)")
    ap.add_argument("--policy-option", action="append", default=[], metavar="POLICY.KEY=VALUE",
                    help="passed to dpcore simulate (to try an option)")  # fmt: skip
    ap.add_argument("--plot", metavar="PATH.png", help="also draw the ratios of every run as grouped bars")
    add_cell_arguments(ap)
    args = ap.parse_args(argv)
    extra = ["--report-profile", args.report_profile]
    for opt in args.policy_option:
        extra += ["--policy-option", opt]
    rows, summary = [], []
    for dp, load, ts, seed in cells(args):
        out = args.out / f"{Path(args.trace).stem}_dp{dp}_ts{ts:g}_s{seed}.json"
        doc = simulate(args.trace, dp, ts, [args.policy, *PEERS, CLAIRVOYANT], out, seed=seed,
                       limit=args.limit, jobs=args.jobs, extra=extra)  # fmt: skip
        r = ratios(doc, args.policy)
        rows.append(f"| {dp} | {ts:g} ({load}) | {seed} | " + " | ".join(f"{r[k]:.2f}" for _, k in COLUMNS) + " |")
        summary.append({"dp": dp, "load": load, "time_scale": ts, "seed": seed, "policy": args.policy,
                        "requests": doc["run"]["trace"]["requests"], "ratios": r})  # fmt: skip
    print("| dp | time-scale | seed | " + " | ".join(name for name, _ in COLUMNS) + " |")
    print("|---:|---|---:|" + "---:|" * len(COLUMNS))
    print("\n".join(rows))
    (args.out / f"{Path(args.trace).stem}_{args.policy}_ratios.json").write_text(json.dumps(summary, indent=2) + "\n")
    if args.plot:
        plot(summary, args.plot, Path(args.trace).name, args.policy)
    return 0


def plot(summary: list[dict], path: str, title: str, policy: str = "cache_aware") -> None:
    """One panel per dp size; in each, one group of bars per metric and one bar per run (load
    level and seed); a line at 1, the best peer (hits: the equal-capacity oracle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(name, k) for name, k in COLUMNS if k != "clairvoyant_p99"]
    sizes = sorted({run["dp"] for run in summary})
    fig, axes = plt.subplots(len(sizes), 1, figsize=(10, 2.6 * len(sizes) + 0.6), sharex=True, squeeze=False)
    for ax, dp in zip(axes[:, 0], sizes):
        runs = [run for run in summary if run["dp"] == dp]
        width = 0.8 / max(len(runs), 1)
        for i, run in enumerate(runs):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(keys))]
            label = f"{run['load']} (x{run['time_scale']:g}), seed {run['seed']}"
            ax.bar(xs, [run["ratios"][k] for _, k in keys], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        top = max(run["ratios"][k] for run in runs for _, k in keys)
        ax.set_ylim(0, max(top, 1.0) * 1.3)  # room for the legend above the bars
        ax.set_ylabel(f"dp {dp}")
        ax.legend(fontsize=6, ncol=3, loc="upper left")
    axes[-1, 0].set_xticks(range(len(keys)), [name for name, _ in keys], fontsize=8)
    fig.suptitle(f"{policy} over the best peer (hits: over the equal-capacity oracle), {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
