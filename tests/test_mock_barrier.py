"""Mock ranks in lockstep as real processes: ``dpcore mock-barrier`` and two ``dpcore mock-worker
--barrier`` ranks on ipc sockets, driven by a stand-in controller that speaks the wire format.

Model-time results only (what the ranks report in their replies and the barrier's counters);
wall time bounds the tests, it is never asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from dpcore import wire
from dpcore.mock.worker import generated_text
from dpcore.sim.stepmodel import StepModel

pytestmark = pytest.mark.e2e
DPCORE = [sys.executable, "-m", "dpcore", "--log-level", "warning"]
M = StepModel()
#: Output tokens of the request that decodes beside a long prefill: about 2 s of wall time
#: (20 ms model steps at speed-up 20), against the few steps the prefill takes to start.
SHORT_OUT = 2000


class Group:
    """A DP group of *dp* mock ranks behind one barrier, and the controller's sockets."""

    def __init__(self, tmp: Path, dp: int = 2, speedup: float = 20, step_timeout: float = 1.0,
                 engine_config: Path | None = None) -> None:  # fmt: skip
        self.tmp = tmp
        self.ctx = zmq.Context()
        self.dispatch = [self._sock(zmq.PUSH, f"ipc://{tmp}/d{r}") for r in range(dp)]
        self.reports = self._sock(zmq.PULL, f"ipc://{tmp}/rep")
        self.replies = self._sock(zmq.PULL, f"ipc://{tmp}/reply")
        self.seq = [0] * dp
        self.stats_file = tmp / "lockstep.json"
        self.barrier_ep = f"ipc://{tmp}/barrier"
        config = [] if engine_config is None else ["--engine-config", str(engine_config)]
        self.barrier = subprocess.Popen(
            [*DPCORE, "mock-barrier", "--endpoint", self.barrier_ep, "--dp-size", str(dp), "--speedup", str(speedup),
             "--step-timeout", str(step_timeout), "--stats-file", str(self.stats_file), *config],
        )  # fmt: skip
        self.ranks = [
            subprocess.Popen(
                [*DPCORE, "mock-worker", "--rank", str(r), "--dispatch", f"ipc://{tmp}/d{r}",
                 "--report", f"ipc://{tmp}/rep", "--barrier", self.barrier_ep, "--block-size", "64", *config],
            )  # fmt: skip
            for r in range(dp)
        ]
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while len(seen) < dp:  # every rank said hello to the controller
            assert time.monotonic() < deadline, f"ranks {set(range(dp)) - seen} never reported"
            if self.reports.poll(100):
                seen.add(wire.decode_header(self.reports.recv(), (wire.LOAD,))["rank"])

    def _sock(self, kind: int, ep: str) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        s.bind(ep)
        return s

    def send(self, rank: int, rid: str, n: int, out: int, stream: bool = False) -> None:
        header = wire.encode_request(rid, num_tokens=n, reply=f"ipc://{self.tmp}/reply", max_new_tokens=out)
        payload = msgpack.packb({"stream": True}) if stream else b""
        self.dispatch[rank].send_multipart(wire.dispatch_frames(rank, self.seq[rank], header, payload, None))
        self.seq[rank] += 1

    def wait_report(self, rank: int, pred, timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.reports.poll(50):
                r = wire.decode_header(self.reports.recv(), (wire.LOAD,))
                if r["rank"] == rank and pred(r):
                    return r
        raise AssertionError(f"no matching load report from rank {rank} in {timeout_s} s")

    def finals(self, count: int, timeout_s: float = 30.0) -> dict[str, wire.Reply]:
        out: dict[str, wire.Reply] = {}
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {sorted(out)} answered in {timeout_s} s"
            if self.replies.poll(int(left * 1000)):
                r = wire.decode_reply(self.replies.recv_multipart())
                if r.final:
                    out[r.rid] = r
        return out

    def stop_barrier(self) -> dict:
        self.barrier.terminate()
        self.barrier.wait(10)
        return dict(json.loads(self.stats_file.read_text()))

    def close(self) -> None:
        for p in [*self.ranks, self.barrier]:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ctx.destroy(linger=0)


@pytest.fixture
def group(tmp_path: Path) -> Iterator[type[Group]]:
    made: list[Group] = []

    def make(**kw: Any) -> Group:
        g = Group(tmp_path, **kw)
        made.append(g)
        return g

    yield make  # type: ignore[misc]
    for g in made:
        g.close()


def test_one_ranks_long_prefill_slows_every_ranks_decode(group) -> None:
    g = group()
    g.send(1, "short", 100, out=SHORT_OUT)
    g.wait_report(1, lambda r: r["run"] == 1)  # rank 1 is decoding it
    g.send(0, "long", 40_000, out=2)  # 10 extend steps of at most 8192 // 2 = 4096 tokens
    r = g.finals(2)
    assert list(r) == ["long", "short"], "the host stalled so long that 'short' ended before the prefill"
    short, long = r["short"].meta, r["long"].meta
    assert r["short"].payload == generated_text("short", 0, SHORT_OUT)
    # Rank 1's steps are rank 0's steps: ten of its decode steps lasted a whole chunk of rank
    # 0's prefill each, the last chunk being what is left of the prompt. Ranks on their own
    # clocks would decode in exactly (SHORT_OUT - 1) * alone; a busy host only adds time.
    alone = M.step_time_s([0, 0], [0, 1])  # a decode step with rank 0 idle
    busy = M.step_time_s([4096, 0], [0, 1])  # the same step while rank 0 extends a chunk
    last = M.step_time_s([40_000 - 9 * 4096, 0], [0, 1])
    decode = short["e2e_s"] - short["ttft_s"]
    assert decode >= (SHORT_OUT - 1 - 10) * alone + 9 * busy + last - 1e-6, (decode, (SHORT_OUT - 1) * alone)
    # And rank 0's prefill took at least its ten chunks (rank 1's work only adds to a step).
    chunks = 9 * M.step_time_s([4096, 0], [0, 0]) + M.step_time_s([40_000 - 9 * 4096, 0], [0, 0])
    assert long["ttft_s"] >= chunks - 1e-6
    s = g.stop_barrier()
    # Each extend step had rank 1's decode beside it, without CUDA graphs.
    assert s["extend_steps"] >= 10 and s["graphless_steps"] >= 10
    assert s["waste_s"] > 0 and s["dropped"] == 0 and s["bad_frames"] == 0


def test_a_stopped_rank_delays_a_step_by_the_timeout_only_and_rejoins(group) -> None:
    g = group(step_timeout=1.0)
    g.send(0, "warm0", 10, out=2)  # both ranks answer: both are in the lockstep
    g.send(1, "warm1", 10, out=2)
    g.finals(2)
    os.kill(g.ranks[1].pid, signal.SIGSTOP)
    g.send(0, "a", 100, out=20)
    a = g.finals(1, timeout_s=20)["a"]  # served, after one step waited for rank 1 (below)
    assert a.meta["completion_tokens"] == 20
    os.kill(g.ranks[1].pid, signal.SIGCONT)
    g.send(1, "b", 100, out=5)  # back in the group: it serves again
    assert g.finals(1, timeout_s=20)["b"].meta["completion_tokens"] == 5
    s = g.stop_barrier()
    assert s["dropped"] == 1 and s["rejoined"] == 1, s
    assert s["stall_s"] >= 1.0 * 20 * 0.9  # the wait shows in model time (speed-up 20)
    assert s["members"] == [0, 1]


def test_garbage_on_the_barrier_socket_is_counted_and_changes_nothing(group) -> None:
    g = group()
    bad = g.ctx.socket(zmq.DEALER)
    bad.linger = 0
    bad.connect(g.barrier_ep)
    for frame in (b"\x00junk", msgpack.packb([1, 0, 0]), msgpack.packb([0, 99]), msgpack.packb({"t": "x"})):
        bad.send(frame)
    g.send(0, "a", 100, out=3)
    g.send(1, "b", 100, out=3)
    assert len(g.finals(2)) == 2
    s = g.stop_barrier()
    assert s["bad_frames"] == 4 and s["members"] == [0, 1]


def test_the_engine_config_file_sets_the_groups_step_model_and_kv(group, tmp_path: Path) -> None:
    # The file `dpcore simulate --engine-config` reads: a smaller chunk, a smaller KV cache.
    cfg = tmp_path / "engine.toml"
    cfg.write_text("kv_capacity_tokens = 20000\n[step]\nchunked_prefill_size = 2048\n")
    g = group(engine_config=cfg)
    g.send(0, "long", 4_000, out=2)  # ceil(4,000 / (2,048 // 2)) = 4 extend steps (1 with the default 8,192)
    g.send(1, "huge", 30_000, out=2)  # can never fit in 20,000 tokens of KV (it would with the default)
    r = g.finals(2)
    assert r["long"].meta["completion_tokens"] == 2
    assert "error" in r["huge"].meta and r["huge"].meta["completion_tokens"] == 0
    s = g.stop_barrier()
    assert s["chunk_tokens"] == 1024 and s["step_model"]["chunked_prefill_size"] == 2048
    assert s["extend_steps"] == 4
