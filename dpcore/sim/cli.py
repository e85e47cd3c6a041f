"""``dpcore simulate``: which policy, on my traffic, at my dp size?

Replays a trace through the engine model once per policy (dpcore policies through the
real hooks and ledger, ``peer:`` baselines re-implemented from the peers' documentation),
then prints one table row per policy next to the trace's prefix-hit ceiling and the
equal-capacity oracle; optionally writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dpcore.cli import add_policy_option_argument
from dpcore.errors import ConfigError

#: Compared when no --policy is given: our policies and the peers they compete with.
DEFAULT_POLICIES = (
    "round_robin",
    "total_requests",
    "total_tokens",
    "cache_aware",
    "peer:smg_cache_aware",
    "peer:sglang_total_tokens",
    "peer:vllm",
    "peer:dynamo",
)
BUNDLED_SAMPLE = "mooncake_conversation_2000.jsonl"


def bundled_trace() -> Path:
    """The Mooncake sample shipped in ``dpcore/data``."""
    import dpcore

    path = Path(dpcore.__file__).parent / "data" / BUNDLED_SAMPLE
    if not path.is_file():
        msg = f"this dpcore install has no bundled sample trace ({path}); pass --trace PATH"
        raise ConfigError(msg)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace",
        metavar="PATH",
        help=f"Mooncake .jsonl or Azure .csv trace (default: the bundled {BUNDLED_SAMPLE})",
    )
    p.add_argument("--format", choices=("mooncake", "azure"), help="trace format (default: from the file)")
    p.add_argument("--dp-size", type=int, default=8, metavar="N", help="data-parallel ranks (default 8)")
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help="an installed policy or chain (a,b), a baseline peer:NAME, or the reference "
        "ref:clairvoyant (reads the true queues and caches); repeatable "
        f"(default: {' '.join(DEFAULT_POLICIES)})",
    )
    add_policy_option_argument(p, "constructor option for a dpcore policy, e.g. cache_aware.balance_abs=32; repeatable")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X", help="divide inter-arrival times by X (default 1)")
    p.add_argument("--limit", type=int, metavar="N", help="replay only the first N requests")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed for tick spreading, report phases, ties (default 0)")
    p.add_argument(
        "--ticks",
        choices=("spread", "burst"),
        default="spread",
        help="quantized timestamps (Mooncake's 3 s ticks): spread evenly within the tick, or replay "
        "each tick as a burst (default spread)",
    )
    p.add_argument("--report-interval", type=float, default=0.1, metavar="S", help="load report period (default 0.1)")
    p.add_argument(
        "--report-steps", type=int, default=15, metavar="N", help="also report every N decode steps (0: off; default 15)"
    )
    p.add_argument("--report-delay", type=float, default=0.05, metavar="S", help="load report latency (default 0.05)")
    p.add_argument("--json", metavar="PATH", help="write the metrics as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write the TTFT CDF and per-rank load plot")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="print N sampled decisions per policy")
    p.add_argument(
        "--jobs", type=int, metavar="N", help="worker processes (default: one per policy, at most the CPU count)"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from dpcore.cli import parse_policy_options
    from dpcore.sim import oracle, report
    from dpcore.sim.config import EngineConfig
    from dpcore.sim.runner import RunSpec, check_policies, default_jobs, run_all

    if args.dp_size < 1:
        raise ConfigError(f"--dp-size must be at least 1, got {args.dp_size}")
    if args.explain < 0:
        raise ConfigError(f"--explain must be >= 0, got {args.explain}")
    try:
        config = EngineConfig(
            report_interval_s=args.report_interval,
            report_delay_s=args.report_delay,
            report_steps=args.report_steps,
        )
    except ValueError as exc:
        raise ConfigError(f"--report-*: {exc}") from None
    names = list(dict.fromkeys(args.policy or DEFAULT_POLICIES))
    spec = RunSpec(
        trace_path=str(args.trace or bundled_trace()),
        dp_size=args.dp_size,
        config=config,
        time_scale=args.time_scale,
        limit=args.limit,
        seed=args.seed,
        ticks=args.ticks,
        fmt=args.format,
        options=parse_policy_options(args.policy_option),
        explain=args.explain,
    )
    check_policies(names, spec)
    trace = spec.load_trace()  # errors (with line numbers) before any worker starts

    # Off a terminal rich would squeeze the table into 80 columns; logs can be wide.
    console = Console(width=200) if not sys.stdout.isatty() and "COLUMNS" not in os.environ else Console()
    jobs = args.jobs or default_jobs(len(names))
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks = {n: bar.add_task(n, total=1.0) for n in names}
        results = run_all(
            spec,
            names,
            jobs=jobs,
            log_level=args.log_level,
            progress=lambda n, f: bar.update(tasks[n], completed=f),
        )
    doc = report.build_json(
        results,
        oracle.ceiling_hit_ratio(trace),
        oracle.oracle_hit_ratio(trace, args.dp_size, config.kv_capacity_tokens),
    )
    report.print_report(
        console, doc, trace_desc=trace.describe(), dp_size=args.dp_size, config=config, results=results
    )
    if args.explain:
        report.print_explained(console, results)
    if args.json:
        report.write_json(args.json, doc)
        console.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, results, title=f"{trace.describe()}, dp {args.dp_size}")
        console.print(f"wrote {args.plot}")
    return 0
