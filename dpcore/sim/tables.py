"""The simulator's results as text: rich tables (fit 100 columns), Markdown and CSV.

Each rendering marks the best value of every metric column (``*`` in tables, bold in
Markdown); CSV carries raw values for other tools. Which way is better per metric is
:data:`dpcore.sim.report.HIGHER_IS_BETTER`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from dpcore.sim.report import HIGHER_IS_BETTER, METRIC_KEYS

#: (title, [(metric key, two-line header)]): three narrow tables rather than one wide one.
GROUPS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    (
        "time to first token, queueing and end to end (s)",
        (
            ("ttft_p50_s", "TTFT\np50"), ("ttft_p99_s", "TTFT\np99"), ("queue_p50_s", "queue\np50"),
            ("queue_p99_s", "queue\np99"), ("e2e_p50_s", "e2e\np50"), ("e2e_p99_s", "e2e\np99"),
        ),
    ),
    (
        "decoding and throughput",
        (
            ("tpot_p50_s", "TPOT\np50 s"), ("tpot_p99_s", "TPOT\np99 s"), ("itl_p50_s", "ITL\np50 s"),
            ("itl_p99_s", "ITL\np99 s"), ("throughput_tok_s", "output\ntok/s"), ("straggler_waste", "straggler\nwaste"),
        ),
    ),
    (
        "prefix cache, balance and outcome",
        (
            ("prefix_hit_ratio", "prefix\nhit"), ("hit_over_oracle", "hit /\noracle"),
            ("load_max_over_mean", "load\nmax/mean"), ("completed", "completed"), ("rejected", "rejected"),
            ("failed", "failed"),
        ),
    ),
)  # fmt: skip
#: Also better when higher; computed here, not stored in the JSON.
_HIGHER = HIGHER_IS_BETTER | {"hit_over_oracle"}


def rows(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per policy, the JSON metrics plus ``hit_over_oracle``."""
    oracle = doc.get("oracle_prefix_hit_ratio") or 0.0
    out = {}
    for name, m in doc["policies"].items():
        r = dict(m)
        r["hit_over_oracle"] = round(m["prefix_hit_ratio"] / oracle, 6) if oracle else None
        out[name] = r
    return out


def best(table: Mapping[str, Mapping[str, Any]], key: str) -> float | None:
    """The best value of *key* over the policies (``None`` if none has one, or all tie)."""
    values = [m.get(key) for m in table.values()]
    values = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if len(values) < 2 or len(set(values)) == 1:
        return None
    return max(values) if key in _HIGHER else min(values)


def fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"


def print_tables(console: Any, doc: Mapping[str, Any], title: str) -> None:
    """The three metric tables, best value per column marked with ``*``."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    table = rows(doc)
    for group_title, cols in GROUPS:
        t = Table(title=f"{title}: {group_title}" if title else group_title, box=box.SIMPLE_HEAD, pad_edge=False)
        t.add_column("policy", style="bold", no_wrap=True)
        marks = {}
        for key, header in cols:
            t.add_column(header, justify="right")
            marks[key] = best(table, key)
        for name, m in table.items():
            cells = []
            for key, _ in cols:
                v = m.get(key)
                text = fmt(v)
                if marks[key] is not None and v == marks[key]:
                    text = f"[bold green]{text}*[/]"
                cells.append(text)
            t.add_row(escape(name), *cells)
        console.print(t)
    console.print("* best in its column", style="dim")


def markdown(doc: Mapping[str, Any], keys: Sequence[str] | None = None) -> str:
    """One Markdown table, policies as rows, best values in bold."""
    table = rows(doc)
    keys = list(keys or [k for _, cols in GROUPS for k, _ in cols])
    headers = {k: h.replace("\n", " ") for _, cols in GROUPS for k, h in cols}
    lines = [
        "| policy | " + " | ".join(headers.get(k, k) for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    marks = {k: best(table, k) for k in keys}
    for name, m in table.items():
        cells = []
        for k in keys:
            v = m.get(k)
            cells.append(f"**{fmt(v)}**" if marks[k] is not None and v == marks[k] else fmt(v))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_text(doc: Mapping[str, Any]) -> str:
    """CSV, one row per policy, raw values (empty when unknown)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    keys = [*METRIC_KEYS, "hit_over_oracle"]
    w.writerow(["policy", *keys])
    for name, m in rows(doc).items():
        w.writerow([name, *("" if m.get(k) is None else m[k] for k in keys)])
    return buf.getvalue()
