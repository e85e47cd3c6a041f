"""``dpcore simulate``: which policy, on my traffic, at my dp size?

Replays a trace through the engine model once per policy (dpcore policies through the
real hooks and ledger, ``peer:`` baselines re-implemented from the peers' documentation),
then prints one table row per policy next to the trace's prefix-hit ceiling and the
equal-capacity oracle; optionally writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import attrs

from dpcore.auto import compare_policies
from dpcore.cli import add_policy_option_argument
from dpcore.errors import ConfigError
from dpcore.extras import SAMPLE_TRACE as BUNDLED_SAMPLE
from dpcore.sim.config import ENGINES, add_engine_config_argument
from dpcore.sim.profiles import DEFAULT_PROFILE, PROFILES

#: Compared when no --policy is given, after the policies the installed distributions declare
#: for comparison (:func:`dpcore.auto.compare_policies`): the peers they compete with.
DEFAULT_PEERS = (
    "peer:smg_cache_aware",
    "peer:sglang_total_tokens",
    "peer:vllm",
    "peer:dynamo",
)


def default_policies() -> tuple[str, ...]:
    """What ``dpcore simulate`` compares when no ``--policy`` is given."""
    return (*compare_policies(), *DEFAULT_PEERS)


def bundled_trace() -> Path:
    """The Mooncake sample shipped in ``dpcore/data`` (distribution ``dpcore-data``)."""
    from dpcore.extras import sample_trace

    return sample_trace()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trace",
        metavar="PATH",
        help=f"Mooncake .jsonl or Azure .csv trace (default: the bundled {BUNDLED_SAMPLE})",
    )
    p.add_argument("--trace-format", choices=("mooncake", "azure"), help="trace format (default: from the file)")
    p.add_argument("--dp-size", type=int, default=8, metavar="N", help="data-parallel ranks (default 8)")
    p.add_argument(
        "--policy",
        action="append",
        metavar="NAME",
        help="an installed policy or chain (a,b), a baseline peer:NAME, or the reference "
        "ref:clairvoyant (reads the true queues and caches); repeatable (default: the policies "
        f"the installed distributions declare for comparison, then {' '.join(DEFAULT_PEERS)})",
    )
    add_policy_option_argument(p, "constructor option for a dpcore policy, e.g. cache_aware.balance_abs=32; repeatable")
    p.add_argument("--time-scale", type=float, default=1.0, metavar="X", help="divide inter-arrival times by X (default 1)")
    p.add_argument("--limit", type=int, metavar="N", help="replay only the first N requests")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed for tick spreading, report phases, random tie-breaks, random faults and lost KV events "
                        "(default 0)")  # fmt: skip
    p.add_argument(
        "--ticks",
        choices=("spread", "burst"),
        default="spread",
        help="quantized timestamps (Mooncake's 3 s ticks): spread evenly within the tick, or replay "
        "each tick as a burst (default spread)",
    )
    p.add_argument("--report-interval", type=float, metavar="S", help="load report period (default 0.1)")
    p.add_argument("--report-steps", type=int, metavar="N", help="also report every N steps (0: off; default 15)")
    p.add_argument("--report-delay", type=float, metavar="S", help="load report latency (default 0.05)")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="lockstep",
        help="engine model: lockstep = DP attention, all ranks step together (default); "
        "replicas = independent ranks, whole-prompt prefill",
    )
    add_engine_config_argument(p)
    p.add_argument(
        "--report-profile",
        choices=tuple(PROFILES),
        help="load-report fields the ranks send: "
        + "; ".join(f"{p.name} = {p.summary}" for p in PROFILES.values())
        + f" (default {DEFAULT_PROFILE})",
    )
    p.add_argument(
        "--kv-event-loss",
        type=float,
        metavar="P",
        help="fraction of KV event batches lost, in [0, 1) (with --report-profile sglang-kv; default 0)",
    )
    p.add_argument(
        "--faults",
        metavar="SPEC",
        help="rank faults: RANK@DOWN-UP[,...] in seconds from the first arrival (e.g. 2@60-120), "
        "or random:N drawn from --seed; a rank comes back with an empty cache (lockstep engine)",
    )
    p.add_argument(
        "--format",
        choices=("table", "markdown", "csv", "json"),
        default="table",
        help="how to print the results (default table; best value per column marked)",
    )
    p.add_argument("--json", metavar="PATH", help="write the metrics and the full run metadata as JSON")
    p.add_argument("--plot", metavar="PATH.png", help="write the TTFT and TPOT CDFs and the per-rank load plot")
    p.add_argument("--explain", type=int, default=0, metavar="N", help="print N sampled decisions per policy")
    p.add_argument(
        "--jobs", type=int, metavar="N", help="worker processes (default: one per policy, at most the CPU count)"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from dpcore.cli import parse_policy_options
    from dpcore.sim import oracle, report, tables
    from dpcore.sim.config import load_engine_config
    from dpcore.sim.faults import parse_faults
    from dpcore.sim.runner import RunSpec, check_policies, default_jobs, run_all

    if args.dp_size < 1:
        raise ConfigError(f"--dp-size must be at least 1, got {args.dp_size}")
    if args.explain < 0:
        raise ConfigError(f"--explain must be >= 0, got {args.explain}")
    overrides = {
        k: v
        for k, v in (
            ("report_interval_s", args.report_interval),
            ("report_delay_s", args.report_delay),
            ("report_steps", args.report_steps),
            ("report_profile", args.report_profile),
            ("kv_event_loss", args.kv_event_loss),
        )
        if v is not None
    }
    config = load_engine_config(args.engine_config, overrides)
    if PROFILES[config.report_profile].kv_events:
        if args.engine != "lockstep":
            raise ConfigError(f"--report-profile {config.report_profile} needs --engine lockstep")
    elif config.kv_event_loss:
        raise ConfigError("--kv-event-loss needs a report profile with KV events (--report-profile sglang-kv)")
    names = list(dict.fromkeys(args.policy or default_policies()))
    spec = RunSpec(
        trace_path=str(args.trace or bundled_trace()),
        dp_size=args.dp_size,
        config=config,
        time_scale=args.time_scale,
        limit=args.limit,
        seed=args.seed,
        ticks=args.ticks,
        fmt=args.trace_format,
        options=parse_policy_options(args.policy_option),
        explain=args.explain,
        engine=args.engine,
    )
    check_policies(names, spec)
    trace = spec.load_trace()  # errors (with line numbers) before any worker starts
    faults = parse_faults(args.faults, dp_size=args.dp_size, duration_s=trace.duration_s, seed=args.seed)
    if faults and args.engine != "lockstep":
        raise ConfigError("--faults needs --engine lockstep")
    spec = attrs.evolve(spec, faults=faults)

    # Off a terminal rich would squeeze tables into 80 columns; the tables are made for 100.
    # No emoji codes: a policy named "file.py:Boom" must not print as a bomb.
    console = Console(width=100 if not sys.stdout.isatty() and "COLUMNS" not in os.environ else None, emoji=False)
    jobs = args.jobs or default_jobs(len(names))
    with Progress(
        TextColumn("{task.description:<28}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True, emoji=False),
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
        run=run_metadata(spec, names, trace),
    )
    if args.format == "json":
        print(json.dumps(doc, indent=2))
    elif args.format == "csv":
        print(tables.csv_text(doc), end="")
    elif args.format == "markdown":
        print(tables.markdown(doc), end="")
    else:
        report.print_report(
            console,
            doc,
            trace_desc=trace.describe(),
            dp_size=args.dp_size,
            config=config,
            engine=args.engine,
            results=results,
        )
    err = Console(stderr=True, width=console.width, emoji=False)
    report.print_errors(err, results)
    if args.explain:
        report.print_explained(console, results)
    if args.json:
        report.write_json(args.json, doc)
        err.print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot, results, title=f"{trace.describe()}, dp {args.dp_size}, {args.engine}")
        err.print(f"wrote {args.plot}")
    return 0


def run_metadata(spec: Any, names: list[str], trace: Any) -> dict[str, Any]:
    """Everything needed to run the same simulation again."""
    import dpcore

    path = Path(spec.trace_path)
    return {
        "dpcore_version": getattr(dpcore, "__version__", None) or _dist_version(),
        "trace": {"path": str(path), "sha256": _sha256(path), "format": trace.format, "requests": len(trace)},
        "dp_size": spec.dp_size,
        "seed": spec.seed,
        "time_scale": spec.time_scale,
        "limit": spec.limit,
        "ticks": spec.ticks,
        "engine": spec.engine,
        "engine_parameters": attrs.asdict(spec.config),
        "report_profile": spec.config.report_profile,
        "kv_event_loss": spec.config.kv_event_loss,
        "faults": [attrs.asdict(f) for f in spec.faults],
        "policies": names,
        "policy_options": {k: dict(v) for k, v in spec.options.items()},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dist_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpcore")
    except PackageNotFoundError:
        return None
