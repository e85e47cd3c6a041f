"""Metrics, tables, JSON and plots for a set of simulation runs.

The JSON written by ``--json`` (and printed by ``--format json``) has this shape::

    {"run": {...everything needed to reproduce the run, see dpcore.sim.cli...},
     "ceiling_prefix_hit_ratio": float, "oracle_prefix_hit_ratio": float,
     "policies": {name: {"ttft_p50_s", "ttft_p99_s", "queue_p50_s", "queue_p99_s",
                         "e2e_p50_s", "e2e_p99_s", "tpot_p50_s", "tpot_p99_s",
                         "itl_p50_s", "itl_p99_s", "throughput_tok_s", "prefix_hit_ratio",
                         "load_max_over_mean", "straggler_waste", "completed", "rejected",
                         "failed"}}}

Latencies are over completed requests; ``null`` when none completed (or, for ITL and
straggler waste, under the replicas engine, which has no global steps). TPOT is a request's
``(finish - first token) / (output tokens - 1)``; ITL is every gap between two tokens of a
request. Straggler waste is the share of rank-step time spent idle or padded while the
slowest rank of the step finished its own work.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpcore.quantile import percentile
from dpcore.sim.config import EngineConfig
from dpcore.sim.result import RunResult

METRIC_KEYS = (
    "ttft_p50_s",
    "ttft_p99_s",
    "queue_p50_s",
    "queue_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "itl_p50_s",
    "itl_p99_s",
    "throughput_tok_s",
    "prefix_hit_ratio",
    "load_max_over_mean",
    "straggler_waste",
    "completed",
    "rejected",
    "failed",
)
#: Metrics where more is better; for every other one, less is better.
HIGHER_IS_BETTER = frozenset({"throughput_tok_s", "prefix_hit_ratio", "completed"})


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(percentile(values.tolist(), q / 100), 6) if values.size else None


def latencies(result: RunResult) -> dict[str, np.ndarray]:
    """Per completed request: ``ttft``, ``queue`` (arrival → prefill start), ``e2e`` and, for
    requests with more than one output token, ``tpot``; in s."""
    arrival = np.asarray(result.arrival)
    finish = np.asarray(result.finish)
    done = ~np.isnan(finish)
    a = arrival[done]
    first = np.asarray(result.first_token)[done]
    out = np.asarray(result.output_tokens)[done]
    many = out > 1
    return {
        "ttft": first - a,
        "queue": np.asarray(result.start)[done] - a,
        "e2e": finish[done] - a,
        "tpot": (finish[done][many] - first[many]) / (out[many] - 1),
    }


def _weighted_pct(pairs: Sequence[tuple[float, int]], qs: Sequence[float]) -> list[float | None]:
    """Percentiles of values given as (value, count) pairs (the lower value at a tie)."""
    if not pairs:
        return [None] * len(qs)
    arr = np.asarray(pairs, dtype=float)
    order = np.argsort(arr[:, 0], kind="stable")
    values, counts = arr[order, 0], arr[order, 1]
    cum = np.cumsum(counts)
    total = cum[-1]
    if total <= 0:
        return [None] * len(qs)
    out: list[float | None] = []
    for q in qs:
        idx = int(np.searchsorted(cum, q / 100 * total, side="left"))
        out.append(round(float(values[min(idx, len(values) - 1)]), 6))
    return out


def summarize(result: RunResult) -> dict[str, Any]:
    """The JSON metrics of one run."""
    lat = latencies(result)
    finish = np.asarray(result.finish)
    done = ~np.isnan(finish)
    if done.any():
        span = float(finish[done].max() - min(result.arrival))
        out_tokens = float(np.asarray(result.output_tokens)[done].sum())
        throughput = round(out_tokens / span, 3) if span > 0 else None
    else:
        throughput = None
    served = np.asarray(result.served_tokens, dtype=float)
    mean = served.mean()
    itl50, itl99 = _weighted_pct(result.itl, (50, 99))
    return {
        "ttft_p50_s": _pct(lat["ttft"], 50),
        "ttft_p99_s": _pct(lat["ttft"], 99),
        "queue_p50_s": _pct(lat["queue"], 50),
        "queue_p99_s": _pct(lat["queue"], 99),
        "e2e_p50_s": _pct(lat["e2e"], 50),
        "e2e_p99_s": _pct(lat["e2e"], 99),
        "tpot_p50_s": _pct(lat["tpot"], 50),
        "tpot_p99_s": _pct(lat["tpot"], 99),
        "itl_p50_s": itl50,
        "itl_p99_s": itl99,
        "throughput_tok_s": throughput,
        "prefix_hit_ratio": round(result.hit_tokens / result.input_tokens_admitted, 6)
        if result.input_tokens_admitted
        else 0.0,
        "load_max_over_mean": round(float(served.max() / mean), 6) if mean > 0 else None,
        "straggler_waste": round(result.waste_s / result.rank_time_s, 6) if result.rank_time_s > 0 else None,
        "completed": result.completed,
        "rejected": result.rejected,
        "failed": result.failed,
    }


def build_json(
    results: Mapping[str, RunResult], ceiling: float, oracle: float, run: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "run": dict(run or {}),
        "ceiling_prefix_hit_ratio": round(ceiling, 6),
        "oracle_prefix_hit_ratio": round(oracle, 6),
        "policies": {name: summarize(r) for name, r in results.items()},
    }


def write_json(path: str | Path, doc: Mapping[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------- terminal


def engine_rows(engine: str, config: EngineConfig, dp_size: int) -> list[tuple[str, str, str]]:
    """(parameter, value, source) of the engine a run used, for the printed report."""
    common = [
        ("KV capacity", f"{config.kv_capacity_tokens:,} tokens per rank, shared with the LRU prefix cache", "pinned"),
        (
            "load reports",
            f"every {config.report_steps} steps or {config.report_interval_s * 1e3:g} ms, "
            f"{config.report_delay_s * 1e3:g} ms late; profile {config.report_profile}"
            + (f", {config.kv_event_loss:.0%} of KV event batches lost" if config.kv_event_loss else ""),
            "--report-*",
        ),
    ]
    if engine == "replicas":
        own = [(k, v, "pinned (independent replicas)") for k, v in config.rows()[:2]]
    else:
        own = config.step.rows(dp_size)
    return [("engine", engine, "--engine"), *own, *common]


def print_report(
    console: Any,
    doc: Mapping[str, Any],
    *,
    trace_desc: str,
    dp_size: int,
    config: EngineConfig,
    engine: str = "lockstep",
    results: Mapping[str, RunResult] | None = None,
) -> None:
    """The engine, the trace's references and the policies' metrics, as rich tables."""
    from rich.table import Table

    from dpcore.sim.tables import print_tables

    cfg = Table(title="run", show_header=False)
    cfg.add_column("parameter", style="bold", no_wrap=True)
    cfg.add_column("value")
    cfg.add_column("source", style="dim")
    cfg.add_row("trace", trace_desc, "")
    cfg.add_row("dp size", str(dp_size), "")
    for k, v, src in engine_rows(engine, config, dp_size):
        cfg.add_row(k, v, src)
    console.print(cfg)
    ceiling, oracle = doc["ceiling_prefix_hit_ratio"], doc["oracle_prefix_hit_ratio"]
    console.print(
        f"prefix-hit ceiling (one infinite cache) {ceiling:.3f}; equal-capacity oracle "
        f"({dp_size} x {config.kv_capacity_tokens:,} tokens, one LRU) {oracle:.3f}"
    )
    print_tables(console, doc, "")
    if results:
        for name, r in results.items():
            if r.reject_reasons or r.fail_reasons:
                why = ", ".join(f"{k}: {v}" for k, v in sorted({**r.reject_reasons, **r.fail_reasons}.items()))
                console.print(f"{name}: rejected {r.rejected}, failed {r.failed} ({why})", style="yellow", markup=False)


def print_errors(console: Any, results: Mapping[str, RunResult]) -> None:
    """Each distinct policy failure once: the exception and where it was raised, or the bad
    return value, with how many requests it rejected."""
    for name, r in results.items():
        for what, count in r.errors.items():
            line = f"{name}: policy failed on {count:,} request(s): {what}"
            console.print(line, style="red", highlight=False, markup=False, emoji=False, soft_wrap=True)


def print_explained(console: Any, results: Mapping[str, RunResult]) -> None:
    """The sampled decisions of ``--explain N``: who chose, why, and the scores compared."""
    for name, r in results.items():
        console.print(f"[bold]{name}[/]: {len(r.explained)} sampled decisions")
        for d in r.explained:
            scores = json.dumps(d.scores, default=str) if d.scores else "{}"
            console.print(
                f"  {d.rid} at {d.time_s:.3f} s -> rank {d.rank}  "
                f"policy={d.policy or '-'} reason={d.reason or '-'} scores={scores}",
                markup=False,
                highlight=False,
            )


# --------------------------------------------------------------------------- plot


def plot(path: str | Path, results: Mapping[str, RunResult], *, title: str) -> None:
    """TTFT and TPOT CDFs per policy, then per-rank load (running + waiting requests) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: Sequence[str] = list(results)
    ncols = min(4, max(1, len(names)))
    nrows = -(-len(names) // ncols)
    fig = plt.figure(figsize=(4 * ncols, 4.2 + 2.6 * nrows), layout="constrained")
    grid = fig.add_gridspec(1 + nrows, ncols, height_ratios=[1.6] + [1.0] * nrows)
    half = max(ncols // 2, 1)
    panels = (
        (fig.add_subplot(grid[0, :half] if ncols > 1 else grid[0, 0]), "ttft", "time to first token"),
        (fig.add_subplot(grid[0, half:]) if ncols > 1 else None, "tpot", "time per output token"),
    )
    for ax, key, label in panels:
        if ax is None:
            continue
        for name in names:
            values = np.sort(latencies(results[name])[key])
            if values.size:
                ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name, linewidth=1.4)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (s, log scale)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(title if key == "ttft" else f"{label}; straggler waste in the legend", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        if key == "tpot":
            handles, labels = ax.get_legend_handles_labels()
            waste = {n: summarize(results[n])["straggler_waste"] for n in names}
            labels = [f"{n} ({waste[n]:.2f})" if waste.get(n) is not None else n for n in labels]
            ax.legend(handles, labels, fontsize=7, loc="lower right")
        else:
            ax.legend(fontsize=7, loc="lower right")
    top = max((max((p[1] for s in r.series for p in s), default=0) for r in results.values()), default=0)
    for i, name in enumerate(names):
        sub = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        for rank, series in enumerate(results[name].series):
            if series:
                t, load = zip(*((p[0], p[1]) for p in series))
                sub.plot(t, load, linewidth=0.6, label=str(rank))
        sub.set_title(name, fontsize=9)
        sub.set_ylim(0, max(top, 1) * 1.05)
        sub.tick_params(labelsize=7)
        if i % ncols == 0:
            sub.set_ylabel("requests on rank", fontsize=8)
        sub.set_xlabel("simulated time (s)", fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
