"""The mock ranks and ``dpcore simulate`` run one model: the same requests give the same times.

Two checks. First, the mock ranks' own code (engine, rank-side protocol, lockstep gather)
driven on a virtual clock reproduces ``dpcore simulate --engine lockstep`` request for
request. Second, ``dpcore demo`` (real processes, real sockets, wall time × speed-up) agrees
with ``dpcore simulate`` on the same requests within the tolerance ``docs/guides/demo.md``
states. Only model-time results are compared.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.demo import percentile, sample_path
from dpcore.mock.engine import EngineParams, Job, MockEngine
from dpcore.mock.lockstep import Lockstep, StepWork
from dpcore.mock.stepper import Stepper
from dpcore.sim.runner import RunSpec, run_one
from dpcore.sim.stepmodel import StepModel
from dpcore.sim.traces import read_trace

DP = 4
REQUESTS = 150
RATE = 0.25
#: The demo/simulator tolerance stated in docs/guides/demo.md (relative, per metric).
TOLERANCE = 0.15


class _Poster:
    def __init__(self, group: VirtualGroup, rank: int) -> None:
        self.group, self.rank = group, rank

    def post(self, run: int, version: int, work: StepWork, at: float) -> None:
        self.group.lockstep.post(self.rank, run, version, work, at, self.group.now)

    def wake(self, run: int, at: float) -> None:
        self.group.lockstep.wake(self.rank, run, at, self.group.now)


class VirtualGroup:
    """*dp* mock ranks in lockstep, as the processes run them, on a virtual clock."""

    def __init__(self, dp: int, block_size: int) -> None:
        model = StepModel()
        self.now = 0.0
        self.lockstep = Lockstep(model, step_timeout_s=math.inf)
        params = EngineParams(block_size=block_size)
        self.ranks = [Stepper(MockEngine(params), _Poster(self, r), params.report_interval_s) for r in range(dp)]
        for r, s in enumerate(self.ranks):
            s.sync(self.lockstep.join(r, 0.0), model.chunk_budget(dp), 0.0)

    def advance(self, t: float) -> None:
        """Run every step that ends by model time *t*."""
        while (due := self.lockstep.due()) is not None and due <= t:
            self.now = due
            ended, _ = self.lockstep.tick(due)
            assert ended is not None
            for r, s in enumerate(self.ranks):
                s.end(ended.run, ended.versions[r], ended.steps, ended.end)

    def arrive(self, rank: int, job: Job) -> None:
        self.advance(job.arrived)
        self.now = job.arrived
        self.ranks[rank].engine.add(job)
        self.ranks[rank].arrived(job.arrived)


def test_mock_ranks_reproduce_the_simulator_request_for_request() -> None:
    trace = read_trace(sample_path(), time_scale=RATE, limit=REQUESTS)
    sim = run_one(RunSpec(str(sample_path()), DP, time_scale=RATE, limit=REQUESTS), "round_robin")
    group = VirtualGroup(DP, trace.block_size)
    t0 = trace.requests[0].arrival
    jobs = []
    for i, q in enumerate(trace.requests):
        job = Job(None, str(i), q.input_length, q.hash_ids, max(q.output_length, 1), q.arrival - t0)
        jobs.append(job)
        group.arrive(sim.rank[i], job)  # the rank round_robin chose in the simulation
    group.advance(math.inf)
    assert sim.completed == REQUESTS
    for i, job in enumerate(jobs):
        arrival = sim.arrival[i] - t0
        assert job.first_token_at - job.arrived == pytest.approx(sim.first_token[i] - t0 - arrival, abs=1e-9)
        assert job.finished_at - job.arrived == pytest.approx(sim.finish[i] - t0 - arrival, abs=1e-9)
    assert sum(j.cached_tokens for j in jobs) == sim.hit_tokens
    s = group.lockstep.stats
    assert s.steps == sim.steps
    assert s.waste_s == pytest.approx(sim.waste_s) and s.rank_s == pytest.approx(sim.rank_time_s)


@pytest.mark.e2e
def test_demo_agrees_with_the_simulator_on_the_same_requests(tmp_path: Path) -> None:
    common = ["--dp-size", str(DP)]
    demo_json, sim_json = tmp_path / "demo.json", tmp_path / "sim.json"
    demo = subprocess.run(
        [sys.executable, "-m", "dpcore", "demo", "--no-live", *common, "--requests", str(REQUESTS),
         "--rate", str(RATE), "--speedup", "20", "--json", str(demo_json)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    sim = subprocess.run(
        [sys.executable, "-m", "dpcore", "simulate", *common, "--limit", str(REQUESTS), "--time-scale", str(RATE),
         "--policy", "round_robin", "--json", str(sim_json)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    d = json.loads(demo_json.read_text())
    s = json.loads(sim_json.read_text())["policies"]["round_robin"]
    assert d["completed"] == s["completed"] == REQUESTS
    for metric in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s"):
        assert d[metric] == pytest.approx(s[metric], rel=TOLERANCE), metric
    assert d["prefix_hit_ratio"] == pytest.approx(s["prefix_hit_ratio"], rel=0.01)
    ls = d["lockstep"]
    assert ls["waste_s"] / ls["rank_s"] == pytest.approx(s["straggler_waste"], rel=TOLERANCE)


def test_percentiles_are_the_simulators() -> None:
    # The demo's percentile and the simulator's report must mean the same thing.
    import numpy as np

    xs = [5.0, 1.0, 3.0, 2.0, 10.0]
    for q in (0.5, 0.99):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q * 100)))
