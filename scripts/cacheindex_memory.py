"""Memory and lookup cost of the controller's exact cache index (dpcore.cacheindex).

Fills a CacheIndex for --dp ranks with --blocks blocks in all (chains of --chain blocks, no
sharing between ranks: the worst case for memory), then prints the resident memory it added
and the time of one ``depths`` lookup for a --prompt-block prompt against every rank.

    .venv/bin/python scripts/cacheindex_memory.py --dp 16 --blocks 1000000
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import time
from pathlib import Path

from dpcore.cacheindex import STORED, CacheIndex, KvEventBatch


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), in bytes."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dp", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=1_000_000, help="blocks in all ranks together")
    ap.add_argument("--chain", type=int, default=64, help="blocks per stored chain")
    ap.add_argument("--prompt", type=int, default=64, help="blocks of the looked-up prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    gc.collect()
    before = rss_bytes()
    idx = CacheIndex(args.dp)
    per_rank = args.blocks // args.dp
    chains: list[list[int]] = []
    for r in range(args.dp):
        idx.apply(KvEventBatch(r, 1, 0, ()))
        seq = 1
        left = per_rank
        while left > 0:
            n = min(args.chain, left)
            keys = [rng.getrandbits(63) for _ in range(n)]
            idx.apply(KvEventBatch(r, 1, seq, ((STORED, None, keys),)))
            seq += 1
            left -= n
            if len(chains) < 1000:
                chains.append(keys)
    gc.collect()
    added = rss_bytes() - before
    held = len(idx)
    prompt = (chains[0] * (args.prompt // len(chains[0]) + 1))[: args.prompt]
    mask = (1 << args.dp) - 1
    reps = 20_000
    t0 = time.perf_counter()
    for _ in range(reps):
        idx.depths(prompt, mask)
    per = (time.perf_counter() - t0) / reps
    print(f"dp {args.dp}, {held:,} blocks held ({held // args.dp:,} per rank): RSS +{added / 2**20:.0f} MiB "
          f"({added / held:.0f} bytes per block)")  # fmt: skip
    print(f"depths() for a {len(prompt)}-block prompt over {args.dp} ranks: {per * 1e6:.1f} us")


if __name__ == "__main__":
    main()
