"""What repairing a KV event gap from SGLang's replay buffer costs, and what the buffer holds.

Runs SGLang's real ``ZmqEventPublisher`` (replay ROUTER on) and the adapter's
``SglangKvEvents`` on loopback, in the pinned SGLang venv. For each gap size G it publishes
one batch, G batches the subscriber discards on receipt (a lost stretch), and one more; then
it polls as the controller does (one ``poll`` per dispatch) and prints how long the repair
took from the poll that saw the gap, in how many polls, and the longest single poll. It also
prints the msgpack size of typical batches: the publisher keeps ``buffer_steps`` of them.
A run that does not repair a gap exits with an error.

    .venv/bin/python scripts/sglang_kv_replay.py --gaps 10 100 1000 5000

Run from the project's venv, it builds the pinned SGLang venv if needed (cached under
``~/.cache/dpcore``) and runs itself there with this checkout on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

if importlib.util.find_spec("sglang") is None:  # the project's venv: run again in SGLang's
    from dpcore_sglang.venv import ensure_venv, venv_python

    py = str(venv_python(ensure_venv(log=lambda m: print(m, file=sys.stderr))))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'adapters' / 'sglang'}", "PYTHONWARNINGS": "ignore"}
    os.execve(py, [py, __file__, *sys.argv[1:]], env)

import dpcore_sglang.testing  # noqa: E402, F401 - SGLang's GPU-only imports stood in for, as in the tests
import msgspec  # noqa: E402
from sglang.srt.disaggregation.kv_events import BlockStored, KVEventBatch, ZmqEventPublisher  # noqa: E402
from sglang.srt.mem_cache.utils import get_hash_str, hash_str_to_int64  # noqa: E402

from dpcore.cacheindex import CacheIndex  # noqa: E402
from dpcore_sglang.kv_events import SglangKvEvents  # noqa: E402
from dpcore_sglang.testing import free_port  # noqa: E402


def page_chain(n_batches: int, page: int) -> list[KVEventBatch]:
    """*n_batches* batches, each storing one *page*-token page extending the previous one."""
    out, parent_hash, parent_str = [], None, None
    for i in range(n_batches):
        tokens = list(range(i * page, (i + 1) * page))
        strs = get_hash_str(tokens, parent_str, page)
        hashes = [hash_str_to_int64(h) for h in strs]
        ev = BlockStored(block_hashes=hashes, parent_block_hash=parent_hash, token_ids=tokens, block_size=page, lora_id=None)
        out.append(KVEventBatch(ts=time.time(), events=[ev]))
        parent_hash, parent_str = hashes[-1], strs[-1]
    return out


def prompt_batch(tokens: int, page: int) -> KVEventBatch:
    """One prefill's batch: a *tokens*-token prompt stored as pages of *page* tokens."""
    ids = [(t * 7919) % 150_000 for t in range(tokens)]  # vocabulary-sized token ids
    strs = get_hash_str(ids, None, page)
    hashes = [hash_str_to_int64(h) for h in strs]
    ev = BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=ids, block_size=page, lora_id=None)
    return KVEventBatch(ts=time.time(), events=[ev])


class Lossy(SglangKvEvents):
    def __init__(self, *args, lose: range, **kwargs):  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.lose = lose

    def handle(self, rank, frames):  # noqa: ANN001, ANN201
        if int.from_bytes(frames[1], "big") in self.lose:
            return False
        return super().handle(rank, frames)


def one_gap(gap: int, page: int, buffer_steps: int) -> tuple[float, int, float, int]:
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    pub = ZmqEventPublisher(attn_dp_rank=0, endpoint=endpoint, replay_endpoint=replay, buffer_steps=buffer_steps, bind=True)
    index = CacheIndex(1)
    kv = Lossy(index, endpoint, 1, page, lose=range(1, gap + 1), replay_endpoint=replay, buffer_steps=buffer_steps, replay_wait_s=30.0)
    try:
        time.sleep(0.5)
        batches = page_chain(gap + 2, page)
        for b in batches:
            pub.publish(b)
        last = gap + 1
        while kv.gaps == 0:  # read until the batch after the lost stretch shows the gap
            kv.poll()
            time.sleep(0.001)
        t0 = time.perf_counter()
        polls, longest = 0, 0.0
        while (kv._next[0] or 0) <= last or kv.stats()["sglang"]["replays_in_flight"]:
            p0 = time.perf_counter()
            kv.poll()
            longest = max(longest, time.perf_counter() - p0)
            polls += 1
            time.sleep(0.001)  # requests arriving: one poll per dispatch
        took = time.perf_counter() - t0
        if kv.repaired != 1 or index.state(0) != "exact" or index.blocks(0) != gap + 2:
            raise SystemExit(f"gap {gap} not repaired: {kv.stats()}")
        return took, polls, longest, kv.replay_requests
    finally:
        pub.shutdown()
        kv.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gaps", type=int, nargs="+", default=[10, 100, 1000, 5000])
    ap.add_argument("--page", type=int, default=64, help="tokens per batch in the gap runs (one page each)")
    ap.add_argument("--buffer-steps", type=int, default=10_000)
    args = ap.parse_args(argv)
    print(f"load average {os.getloadavg()[0]:.2f}")
    encode = msgspec.msgpack.Encoder().encode
    for tokens, page in ((2048, 1), (2048, 16), (2048, 64), (256, 1)):
        size = len(encode(prompt_batch(tokens, page)))
        print(f"batch of one {tokens}-token prefill, page size {page}: {size:,} bytes ({size * 10_000 / 2**20:,.0f} MiB per 10,000 buffered)")
    for gap in args.gaps:
        took, polls, longest, requests = one_gap(gap, args.page, args.buffer_steps)
        print(
            f"gap of {gap:,} batches: repaired in {took * 1000:,.1f} ms over {polls} polls, {requests} replay request(s); "
            f"longest poll {longest * 1000:.2f} ms"
        )


if __name__ == "__main__":
    main()
