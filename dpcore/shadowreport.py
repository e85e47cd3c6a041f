"""``dpcore shadow-report``: what a running controller's ``--shadow-policy`` chain would
have done, beside what the live chain did (:mod:`dpcore.runtime.shadow`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from dpcore.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    where = p.add_argument_group("which controller")
    where.add_argument("--run-dir", default=None, metavar="DIR", help="the --run-dir of dpcore serve (ipc)")
    where.add_argument("--endpoints-file", default=None, metavar="PATH", help="the --endpoints-file of dpcore serve")
    where.add_argument("--status", default=None, metavar="EP", help="the controller's status endpoint")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="wait up to S seconds (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def show(s: dict[str, Any]) -> None:
    """The report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    n = s["decisions"]
    console.print(f"[bold]shadow[/bold] {','.join(s['chain'])} beside [bold]live[/bold] {','.join(s['live_chain'])}: "
                  f"{n} decisions, agreement {_pct(s['agreed'], n)} ({s['agreed']}/{n})")  # fmt: skip
    console.print(f"cost: {s['us_per_decision']} µs per decision (max {s['max_decision_us']} µs; budget "
                  f"{s['budget_ms']:g} ms), {s['overruns']} overruns, {s['errors']} errors")  # fmt: skip
    if s["suspended"]:
        console.print(f"[bold red]suspended[/bold red]: {s['suspended']}; {s['skipped']} requests not shown to it since")
    rows = s["per_rank"]
    t = Table(title="per rank: shadow (would have) vs live (did)")
    for col in ("rank", "requests shadow", "live", "prompt tokens shadow", "live", "share shadow", "live",
                "prefix blocks claimed shadow", "live"):  # fmt: skip
        t.add_column(col, justify="right")
    tok_s = sum(r["shadow_prompt_tokens"] for r in rows)
    tok_l = sum(r["live_prompt_tokens"] for r in rows)
    for r in rows:
        t.add_row(str(r["rank"]), str(r["shadow_requests"]), str(r["live_requests"]), str(r["shadow_prompt_tokens"]),
                  str(r["live_prompt_tokens"]), _pct(r["shadow_prompt_tokens"], tok_s), _pct(r["live_prompt_tokens"], tok_l),
                  str(r["shadow_matched_blocks"]), str(r["live_matched_blocks"]))  # fmt: skip
    console.print(t)
    if s["reasons"] or s["rejected"]:
        t = Table(title="shadow decisions by reason")
        for col in ("policy", "reason", "decisions"):
            t.add_column(col, justify="left" if col != "decisions" else "right")
        for policy, reason, count in s["reasons"]:
            t.add_row(policy or "-", reason or "-", str(count))
        for code, count in sorted(s["rejected"].items()):
            t.add_row("(would reject)", code, str(count))
        console.print(t)


def run(args: argparse.Namespace) -> int:
    from dpcore.policycli import status_of, where

    endpoint, _ = where(args)
    st = status_of(endpoint, args.timeout)
    s = st.get("shadow")
    if not s:
        raise ConfigError("this controller runs no shadow chain: start dpcore serve with --shadow-policy NAME")
    if args.json:
        print(json.dumps(s, indent=2))
    else:
        show(s)
    return 0
