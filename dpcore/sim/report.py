"""Metrics, tables, JSON and plots for a set of simulation runs.

The JSON written by ``--json`` has exactly this shape::

    {"ceiling_prefix_hit_ratio": float, "oracle_prefix_hit_ratio": float,
     "policies": {name: {"ttft_p50_s", "ttft_p99_s", "queue_p50_s", "queue_p99_s",
                         "e2e_p50_s", "e2e_p99_s", "throughput_tok_s", "prefix_hit_ratio",
                         "load_max_over_mean", "completed", "rejected"}}}

Latencies are over completed requests; ``null`` when none completed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpcore.sim.config import EngineConfig
from dpcore.sim.engine import RunResult

METRIC_KEYS = (
    "ttft_p50_s",
    "ttft_p99_s",
    "queue_p50_s",
    "queue_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "throughput_tok_s",
    "prefix_hit_ratio",
    "load_max_over_mean",
    "completed",
    "rejected",
)


def _pct(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 6) if values.size else None


def latencies(result: RunResult) -> dict[str, np.ndarray]:
    """Per completed request: ``ttft``, ``queue`` (arrival → prefill start) and ``e2e``, in s."""
    arrival = np.asarray(result.arrival)
    finish = np.asarray(result.finish)
    done = ~np.isnan(finish)
    a = arrival[done]
    return {
        "ttft": np.asarray(result.first_token)[done] - a,
        "queue": np.asarray(result.start)[done] - a,
        "e2e": finish[done] - a,
    }


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
    return {
        "ttft_p50_s": _pct(lat["ttft"], 50),
        "ttft_p99_s": _pct(lat["ttft"], 99),
        "queue_p50_s": _pct(lat["queue"], 50),
        "queue_p99_s": _pct(lat["queue"], 99),
        "e2e_p50_s": _pct(lat["e2e"], 50),
        "e2e_p99_s": _pct(lat["e2e"], 99),
        "throughput_tok_s": throughput,
        "prefix_hit_ratio": round(result.hit_tokens / result.input_tokens_admitted, 6)
        if result.input_tokens_admitted
        else 0.0,
        "load_max_over_mean": round(float(served.max() / mean), 6) if mean > 0 else None,
        "completed": result.completed,
        "rejected": result.rejected,
    }


def build_json(results: Mapping[str, RunResult], ceiling: float, oracle: float) -> dict[str, Any]:
    return {
        "ceiling_prefix_hit_ratio": round(ceiling, 6),
        "oracle_prefix_hit_ratio": round(oracle, 6),
        "policies": {name: summarize(r) for name, r in results.items()},
    }


def write_json(path: str | Path, doc: Mapping[str, Any]) -> None:
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# --------------------------------------------------------------------------- terminal


def _fmt(v: Any, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3f}{unit}" if abs(v) < 100 else f"{v:,.0f}{unit}"


def print_report(
    console: Any,
    doc: Mapping[str, Any],
    *,
    trace_desc: str,
    dp_size: int,
    config: EngineConfig,
    results: Mapping[str, RunResult] | None = None,
) -> None:
    """The config, the trace's references and one row per policy, as rich tables."""
    from rich.table import Table

    cfg = Table(title="engine model (pinned defaults; see dpcore.sim.config)", show_header=False)
    cfg.add_column("parameter", style="bold")
    cfg.add_column("value")
    cfg.add_row("trace", trace_desc)
    cfg.add_row("dp size", str(dp_size))
    for k, v in config.rows():
        cfg.add_row(k, v)
    console.print(cfg)

    ceiling, oracle = doc["ceiling_prefix_hit_ratio"], doc["oracle_prefix_hit_ratio"]
    t = Table(
        title=(
            f"policies — prefix-hit ceiling (one infinite cache) {ceiling:.3f}, "
            f"equal-capacity oracle ({dp_size} × {config.kv_capacity_tokens:,} tokens LRU) {oracle:.3f}"
        )
    )
    t.add_column("policy", style="bold")
    for col in (
        "TTFT p50 s", "TTFT p99 s", "queue p50 s", "queue p99 s", "e2e p50 s", "e2e p99 s",
        "out tok/s", "prefix hit", "hit/oracle", "load max/mean", "completed", "rejected",
    ):  # fmt: skip
        t.add_column(col, justify="right")
    for name, m in doc["policies"].items():
        hit = m["prefix_hit_ratio"]
        t.add_row(
            name,
            *(_fmt(m[k]) for k in ("ttft_p50_s", "ttft_p99_s", "queue_p50_s", "queue_p99_s", "e2e_p50_s", "e2e_p99_s")),
            _fmt(m["throughput_tok_s"]),
            _fmt(hit),
            _fmt(hit / oracle) if oracle else "-",
            _fmt(m["load_max_over_mean"]),
            _fmt(m["completed"]),
            _fmt(m["rejected"]),
        )
    console.print(t)
    if results:
        for name, r in results.items():
            if r.reject_reasons:
                why = ", ".join(f"{k}: {v}" for k, v in sorted(r.reject_reasons.items()))
                console.print(f"[yellow]{name}: rejected {r.rejected} ({why})[/]")


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
    """TTFT CDF per policy, then per-rank load (running + waiting requests) over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: Sequence[str] = list(results)
    ncols = min(4, max(1, len(names)))
    nrows = -(-len(names) // ncols)
    fig = plt.figure(figsize=(4 * ncols, 4.2 + 2.6 * nrows), layout="constrained")
    grid = fig.add_gridspec(1 + nrows, ncols, height_ratios=[1.6] + [1.0] * nrows)
    ax = fig.add_subplot(grid[0, :])
    for name in names:
        ttft = np.sort(latencies(results[name])["ttft"])
        if ttft.size:
            ax.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=name, linewidth=1.4)
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
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
    fig.savefig(path, dpi=90)
    plt.close(fig)
