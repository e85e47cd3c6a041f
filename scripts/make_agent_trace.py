"""Write a synthetic tool-agent trace in Mooncake's format, for checking policies off the bundled traces.

    python scripts/make_agent_trace.py [--out PATH] [--requests N] [--rate R] [--agents A] [--seed S]

Shape (not a recording of anyone's traffic): ``--agents`` agents, each with its own tool
prompt of 2k–16k tokens; agent popularity is Zipf-like (the top agent gets about a fifth of
sessions), so a few tool prompts are very hot. Sessions run up to 8 turns; every turn
re-sends the whole conversation so far plus 0.5–5k new tokens (log-normal), and outputs are
short (median 150 tokens). Arrivals are Poisson at ``--rate`` requests per second. Block
ids are chained over 512-token blocks exactly as in Mooncake's traces, so ``dpcore
simulate`` replays it like theirs. Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

BLOCK = 512
MAX_TURNS = 8
MAX_CONTEXT = 100_000
OPEN_SESSIONS = 200


def generate(n: int, rate: float, agents: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    next_id = 0

    def fresh(count: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + count))
        next_id += count
        return ids

    prompts = []
    for _ in range(agents):
        length = int(rng.uniform(2_000, 16_000))
        prompts.append((length, fresh(math.ceil(length / BLOCK))))
    popularity = [1 / (i + 1) ** 1.1 for i in range(agents)]
    sessions: list[dict] = []
    rows = []
    t = 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        if sessions and rng.random() < 0.6:
            s = rng.choice(sessions)
        else:
            length, ids = prompts[rng.choices(range(agents), weights=popularity)[0]]
            s = {"len": length, "ids": list(ids), "full": length // BLOCK, "turns": 0}
            sessions.append(s)
            if len(sessions) > OPEN_SESSIONS:
                sessions.pop(0)
        length = s["len"] + int(rng.lognormvariate(math.log(1_500), 0.8))
        blocks = math.ceil(length / BLOCK)
        # Full blocks of the previous prompt are shared; a partial last block changes, so it
        # and everything after it get new ids (chained hashes).
        keep = min(s["full"], blocks)
        ids = s["ids"][:keep] + fresh(blocks - keep)
        out = max(1, int(rng.lognormvariate(math.log(150), 0.7)))
        rows.append({"timestamp": int(t * 1000), "input_length": length, "output_length": out, "hash_ids": ids})
        s.update(len=length + out, ids=ids, full=length // BLOCK, turns=s["turns"] + 1)
        if s["turns"] >= MAX_TURNS or s["len"] > MAX_CONTEXT:
            sessions.remove(s)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/agent_trace.jsonl", help="where to write (default out/agent_trace.jsonl)")
    ap.add_argument("--requests", type=int, default=10_000, help="requests (default 10000)")
    ap.add_argument("--rate", type=float, default=6.0, help="mean arrivals per second (default 6)")
    ap.add_argument("--agents", type=int, default=40, help="distinct tool prompts (default 40)")
    ap.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    args = ap.parse_args()
    if args.requests < 1 or args.rate <= 0 or args.agents < 1:
        ap.error("--requests and --agents must be >= 1 and --rate > 0")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in generate(args.requests, args.rate, args.agents, args.seed):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {args.requests:,} requests to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
