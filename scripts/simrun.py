"""Helpers the measurement scripts share: run one `dpcore simulate`, read the load levels.

Each script prints the exact `dpcore simulate` command of every run to stderr, so any number
it prints can be reproduced by hand.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LEVELS = ("light", "busy", "heavy")
#: Where scripts/load_levels.py writes the measured levels that the results pages use.
DEFAULT_LEVELS = Path(__file__).resolve().parent.parent / "docs" / "results" / "load_levels.json"


def simulate(
    trace: str,
    dp: int,
    time_scale: float,
    policies: list[str],
    out: Path,
    *,
    seed: int = 0,
    limit: int | None = None,
    jobs: int | None = None,
    extra: list[str] = (),
) -> dict[str, Any]:
    """Run `dpcore simulate` once and return its JSON document."""
    cmd = [
        "dpcore", "simulate", "--trace", trace, "--dp-size", str(dp), "--time-scale", f"{time_scale:g}",
        "--seed", str(seed),
    ]  # fmt: skip
    for p in policies:
        cmd += ["--policy", p]
    cmd += list(extra)
    if limit:
        cmd += ["--limit", str(limit)]
    if jobs:
        cmd += ["--jobs", str(jobs)]
    cmd += ["--json", str(out)]
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "dpcore", *cmd[1:]], check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def parse_cell(text: str) -> tuple[int, tuple[float, float, float]]:
    """``DP:LIGHT,BUSY,HEAVY`` (time-scales) -> ``(dp, (light, busy, heavy))``."""
    try:
        dp, scales = text.split(":")
        light, busy, heavy = (float(x) for x in scales.split(","))
        return int(dp), (light, busy, heavy)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want DP:LIGHT,BUSY,HEAVY (e.g. 8:1,1.5,2), got {text!r}") from None


def read_levels(path: Path, trace: str) -> list[tuple[int, tuple[float, float, float]]]:
    """The (dp, (light, busy, heavy)) cells that scripts/load_levels.py measured for *trace*."""
    doc = json.loads(Path(path).read_text())
    entry = doc.get(Path(trace).name)
    if entry is None:
        known = ", ".join(sorted(doc)) or "none"
        raise SystemExit(f"{path} has no load levels for {Path(trace).name} (has: {known}); "
                         f"run scripts/load_levels.py --trace {trace} --json {path}, or pass --cells")
    return [(int(dp), tuple(row[k] for k in LEVELS)) for dp, row in sorted(entry["dp"].items(), key=lambda x: int(x[0]))]


def cells(args: argparse.Namespace) -> Iterator[tuple[int, str, float, int]]:
    """``(dp, load, time_scale, seed)`` of every run the cell arguments ask for, in order."""
    for dp, scales in args.cells or read_levels(args.levels, args.trace):
        for load, ts in zip(LEVELS, scales):
            if load in args.load:
                for seed in args.seeds:
                    yield dp, load, ts, seed


def add_cell_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--cells",
        type=parse_cell,
        nargs="+",
        metavar="DP:L,B,H",
        help="dp size and its light, busy, heavy time-scales (default: the measured load levels)",
    )
    ap.add_argument("--levels", type=Path, default=DEFAULT_LEVELS, help="load levels JSON from scripts/load_levels.py")
    ap.add_argument("--load", nargs="+", choices=LEVELS, default=list(LEVELS), help="load levels to run (default all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], metavar="S", help="simulation seeds (default 0 1)")
    ap.add_argument("--limit", type=int, metavar="N", help="replay only the first N requests (a quick look)")
    ap.add_argument("--jobs", type=int, metavar="N", help="worker processes per simulation")
    ap.add_argument("--out", type=Path, default=Path("out/compare"), help="where the JSON of each run goes")
