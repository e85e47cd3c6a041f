"""``dpcore mock-worker`` as a real process, driven over real sockets by a stand-in controller.

The test plays the controller: it binds the rank's dispatch PUSH and the report PULL, and a
reply PULL like a client's, and speaks the wire format directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

from dpcore import wire
from dpcore.mock.worker import generated_text
from dpcore.sim.stepmodel import StepModel

pytestmark = pytest.mark.e2e
#: The simulator's step-time model; a rank alone is a DP group of one (chunk budget 8,192).
M = StepModel()


class Harness:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.ctx = zmq.Context()
        self.dispatch = self.ctx.socket(zmq.PUSH)
        self.reports = self.ctx.socket(zmq.PULL)
        self.replies = self.ctx.socket(zmq.PULL)
        for s in (self.dispatch, self.reports, self.replies):
            s.linger = 0
        self.dispatch_ep = f"ipc://{tmp}/d0"
        self.report_ep = f"ipc://{tmp}/rep"
        self.reply_ep = f"ipc://{tmp}/reply"
        self.dispatch.bind(self.dispatch_ep)
        self.reports.bind(self.report_ep)
        self.replies.bind(self.reply_ep)
        self.seq = 0
        self.loads: list[dict] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dpcore", "--log-level", "warning", "mock-worker", "--rank", "0",
             "--dispatch", self.dispatch_ep, "--report", self.report_ep, *extra],
        )  # fmt: skip
        self.wait_report(lambda r: True)  # the hello heartbeat: the worker is connected

    def send(
        self, rid: str, n: int, blocks=(), out: int = 4, payload: bytes = b"", prefill_rank: int | None = None
    ) -> int:
        header = wire.encode_request(rid, num_tokens=n, reply=self.reply_ep, block_hashes=blocks, max_new_tokens=out)
        seq = self.seq
        self.seq += 1
        self.dispatch.send_multipart(wire.dispatch_frames(0, seq, header, payload, prefill_rank))
        return seq

    def drain_reports(self) -> None:
        while self.reports.poll(0):
            header = wire.decode_header(self.reports.recv(), (wire.LOAD,))
            self.loads.append(header)

    def wait_report(self, pred, timeout_s: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.reports.poll(50):
                header = wire.decode_header(self.reports.recv(), (wire.LOAD,))
                self.loads.append(header)
                if pred(header):
                    return header
        raise AssertionError(f"no matching load report in {timeout_s} s; last: {self.loads[-1:]}")

    def replies_until_final(self, count: int, timeout_s: float = 10.0) -> list[wire.Reply]:
        out: list[wire.Reply] = []
        finals = 0
        deadline = time.monotonic() + timeout_s
        while finals < count:
            left = deadline - time.monotonic()
            assert left > 0, f"only {finals}/{count} final replies in {timeout_s} s"
            if self.replies.poll(int(left * 1000)):
                r = wire.decode_reply(self.replies.recv_multipart())
                out.append(r)
                finals += r.final
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.ctx.destroy(linger=0)


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[type[Harness]]:
    made: list[Harness] = []

    def make(*extra: str) -> Harness:
        h = Harness(tmp_path, *extra)
        made.append(h)
        return h

    yield make  # type: ignore[misc]
    for h in made:
        h.close()


def test_prefix_cache_hits_come_back_in_meta(harness) -> None:
    h = harness("--speedup", "100", "--block-size", "64")
    h.send("a", 640, blocks=tuple(range(10)), out=3)
    (a,) = h.replies_until_final(1)
    assert a.meta["cached_tokens"] == 0
    # b shares the first 6 blocks, then diverges.
    h.send("b", 640, blocks=(*range(6), 100, 101, 102, 103), out=3)
    (b,) = h.replies_until_final(1)
    assert b.meta["cached_tokens"] == 6 * 64
    assert b.meta["prompt_tokens"] == 640
    assert b.meta["completion_tokens"] == 3
    assert b.meta["dp_rank"] == 0
    assert b.payload == generated_text("b", 0, 3)
    # Model time: one extend step of the uncached tokens only, then 2 decode steps of one request.
    assert a.meta["ttft_s"] == pytest.approx(M.step_time_s([640], [0]))
    assert b.meta["ttft_s"] == pytest.approx(M.step_time_s([640 - 384], [0]))
    assert b.meta["e2e_s"] - b.meta["ttft_s"] == pytest.approx(2 * M.step_time_s([0], [1]))


def test_timings_follow_the_speedup(harness) -> None:
    h = harness("--speedup", "40")
    t0 = time.monotonic()
    h.send("long", 24_000, out=41)  # 3 chunks of at most 8,192 tokens, then 40 decode steps
    (r,) = h.replies_until_final(1)
    wall = time.monotonic() - t0
    prefill = M.step_time_s([8192], [0]) * 2 + M.step_time_s([24_000 - 2 * 8192], [0])
    assert r.meta["ttft_s"] == pytest.approx(prefill)
    assert r.meta["e2e_s"] == pytest.approx(prefill + 40 * M.step_time_s([0], [1]))
    # Loose on purpose: this only shows the speed-up is applied at all (40x nominal).
    assert wall < r.meta["e2e_s"] / 4


def test_kv_capacity_queues_requests_and_reports_show_it(harness) -> None:
    # Each request reserves 1,000 prompt + 200 output tokens; two fit in 2,500.
    h = harness("--speedup", "50", "--kv-capacity", "2500")
    seqs = [h.send(f"r{i}", 1000, out=200) for i in range(3)]
    full = h.wait_report(lambda r: r["run"] == 2 and r["wait"] == 1)
    # KV in use: the two prompts and the tokens generated so far (not the reserved outputs).
    assert 2000 <= full["kvu"] <= 2000 + 2 * 200 and full["kvc"] == 2500
    assert full["tok"] == full["kvu"] + 1000  # KV in use + the waiting prompt
    assert full["ack"] == seqs[-1]  # queued requests are admitted (acknowledged) too
    replies = {r.rid: r for r in h.replies_until_final(3, timeout_s=20)}
    # r2 could start only after r0 and r1 freed their KV.
    assert replies["r2"].meta["ttft_s"] > replies["r0"].meta["e2e_s"]
    done = h.wait_report(lambda r: r["run"] == 0 and r["wait"] == 0)
    h.drain_reports()
    finished = [s for load in h.loads for s in load["done"]]
    assert sorted(finished) == seqs
    assert done["kvu"] == 0


def test_streaming_requests_get_chunks_that_add_up(harness) -> None:
    # Slow enough (decode ≈ 110 ms wall) that a busy machine still sees several chunks.
    h = harness("--speedup", "5", "--report-every-steps", "5")
    h.send("s", 300, out=23, payload=msgpack.packb({"stream": True}))
    h.send("plain", 300, out=23)
    replies = h.replies_until_final(2)
    chunks = [r for r in replies if r.rid == "s"]
    assert len(chunks) >= 3  # the first token(s), at least one macro step, the final
    assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert b"".join(c.payload for c in chunks) == generated_text("s", 0, 23)
    counts = [c.meta["completion_tokens"] for c in chunks]
    # Strictly growing; the first chunk has the first token (and more if the process woke late).
    assert all(a < b for a, b in zip(counts, counts[1:])) and counts[0] >= 1 and counts[-1] == 23
    plain = [r for r in replies if r.rid == "plain"]
    assert len(plain) == 1 and plain[0].payload == generated_text("plain", 0, 23)


def test_pd_prefill_rank_is_echoed_and_too_big_requests_fail_cleanly(harness) -> None:
    h = harness("--speedup", "100", "--kv-capacity", "10000")
    h.send("pd", 100, out=2, prefill_rank=3)
    h.send("huge", 20_000, out=2)
    replies = {r.rid: r for r in h.replies_until_final(2)}
    assert replies["pd"].meta["prefill_dp_rank"] == 3
    assert "capacity" in replies["huge"].meta["error"]
    assert replies["huge"].final


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads CPU time from /proc")
def test_an_idle_rank_does_not_spin(harness) -> None:
    h = harness("--speedup", "100")
    before = _cpu_seconds(h.proc.pid)
    time.sleep(1.0)
    used = _cpu_seconds(h.proc.pid) - before
    # A spinning loop burns ~1 s here; an idle one wakes only to heartbeat.
    assert used < 0.2
    h.wait_report(lambda r: r["run"] == 0)  # still alive and heartbeating
