"""The engine model: hand-computed timelines, KV admission, reports, conservation, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import pytest

from dpcore.ledger import LoadLedger
from dpcore.manager import PolicyManager
from dpcore.sim.baselines import BASELINES
from dpcore.sim.config import EngineConfig
from dpcore.sim.engine import Simulation
from dpcore.sim.routing import PluginRouter
from dpcore.sim.report import build_json
from dpcore.sim.runner import RunSpec, run_all
from dpcore.sim.traces import Trace, TraceRequest

DATA = Path(__file__).parent / "data"
MOONCAKE = str(DATA / "mooncake_conversation_head300.jsonl")

# Round numbers: 1000 prompt tokens/s, decode step 10 ms + 1 ms per running request.
TINY = EngineConfig(
    prefill_tokens_per_s=1000.0,
    decode_step_s=0.010,
    decode_step_per_request_s=0.001,
    kv_capacity_tokens=100_000,
    report_interval_s=1.0,
    report_delay_s=0.0,
)


def tiny_trace(*rows: tuple[float, int, int, tuple[int, ...]], block_size: int = 10) -> Trace:
    return Trace(
        path="tiny",
        format="mooncake",
        block_size=block_size,
        requests=tuple(
            TraceRequest(index=i, arrival=a, input_length=n_in, output_length=n_out, hash_ids=h)
            for i, (a, n_in, n_out, h) in enumerate(rows)
        ),
    )


def plugin(sim: Simulation, method: str = "round_robin") -> PluginRouter:
    ledger = LoadLedger(sim.dp_size, clock=sim.clock)
    return PluginRouter(PolicyManager.from_method(method, dp_size=sim.dp_size, ledger=ledger))


def times(result, i: int) -> tuple[float, float, float]:
    a = result.arrival[i]
    return (result.first_token[i] - a, result.start[i] - a, result.finish[i] - a)


def test_single_rank_matches_a_hand_computed_timeline() -> None:
    # A: 100 tokens (blocks 1..10), 5 output tokens.  B shares A's first 5 blocks.
    # C arrives during a decode run: the step in flight finishes, then C is prefilled.
    trace = tiny_trace(
        (0.0, 100, 5, tuple(range(1, 11))),
        (0.05, 100, 2, (1, 2, 3, 4, 5, 11, 12, 13, 14, 15)),
        (0.168, 10, 1, (99,)),
    )
    sim = Simulation(trace, 1, TINY)
    r = sim.run(plugin(sim))
    # t=0    A prefill 100 tokens -> first token 0.100
    # t=0.1  B: 50 tokens cached, 50 computed -> first token 0.150 (queued 0.05)
    # t=0.15 decode A+B: tau = 0.012; B needs 1 step -> done 0.162
    # t=0.162 decode A: tau = 0.011, 3 steps planned -> C at 0.168 cuts it at 0.173
    # t=0.173 C prefill 10 tokens -> 0.183, one output token: done
    # t=0.183 A: 2 steps left at 0.011 -> 0.205
    assert times(r, 0) == pytest.approx((0.100, 0.0, 0.205))
    assert times(r, 1) == pytest.approx((0.100, 0.050, 0.112))
    assert times(r, 2) == pytest.approx((0.015, 0.005, 0.015))
    assert r.hit_tokens == 50 and r.input_tokens_admitted == 210
    assert (r.completed, r.rejected) == (3, 0)
    assert r.served_tokens == [210]


def test_kv_full_queues_until_a_request_finishes_and_evicts_lru() -> None:
    cfg = attrs.evolve(TINY, kv_capacity_tokens=150)
    trace = tiny_trace(
        (0.0, 100, 3, tuple(range(1, 11))),
        (0.05, 100, 2, tuple(range(21, 31))),
        (0.5, 100, 2, tuple(range(1, 11))),
    )
    sim = Simulation(trace, 1, cfg)
    r = sim.run(plugin(sim))
    # A: prefill to 0.1, 2 decode steps of 0.011 -> finishes 0.122.  B (needs 102 more
    # tokens) waits for A's 103 to be released, then prefills 0.122 -> 0.222.
    assert times(r, 0) == pytest.approx((0.1, 0.0, 0.122))
    assert r.start[1] == pytest.approx(0.122)
    assert r.first_token[1] == pytest.approx(0.222)
    # Admitting B evicted A's deepest blocks first; C finds only A's first 4 blocks.
    assert r.hit_tokens == 40


def test_a_request_larger_than_kv_is_rejected_not_lost() -> None:
    cfg = EngineConfig(kv_capacity_tokens=1000, report_delay_s=0.0)
    trace = tiny_trace((0.0, 50, 3, (1, 2, 3, 4, 5)), (0.1, 995, 10, tuple(range(100, 200))), (0.2, 20, 1, (7, 8)))
    sim = Simulation(trace, 2, cfg)
    r = sim.run(plugin(sim))
    assert (r.completed, r.rejected) == (2, 1)
    assert r.reject_reasons == {"engine_too_long": 1}
    assert math.isnan(r.finish[1])


def test_policy_rejections_are_counted_and_every_request_ends() -> None:
    # follow_bootstrap_room rejects requests without a room: nothing is lost.
    trace = tiny_trace(*((0.01 * i, 30, 2, (i, i + 1000, i + 2000)) for i in range(20)))
    sim = Simulation(trace, 2, TINY)
    r = sim.run(plugin(sim, "follow_bootstrap_room"))
    assert (r.completed, r.rejected) == (0, 20)
    assert r.reject_reasons == {"missing_bootstrap_room": 20}


@pytest.mark.parametrize("policy", ["round_robin", "total_tokens", "cache_aware", "peer:smg_cache_aware", "peer:dynamo"])
def test_conservation_on_a_real_slice(policy: str) -> None:
    spec = RunSpec(trace_path=MOONCAKE, dp_size=4, time_scale=3.0)
    r = run_all(spec, [policy])[policy]
    assert r.completed + r.rejected == 300
    finished = [f for f in r.finish if not math.isnan(f)]
    assert len(finished) == r.completed
    # causality per request: arrival <= prefill start <= first token <= finish
    for i in range(300):
        if not math.isnan(r.finish[i]):
            assert r.arrival[i] <= r.start[i] <= r.first_token[i] <= r.finish[i]


class Recorder:
    """Wraps a router; records what it was shown and when (simulated time)."""

    def __init__(self, inner, sim: Simulation) -> None:
        self.inner = inner
        self.sim = sim
        self.arrivals: list[tuple[str, float, int, tuple[int, ...]]] = []
        self.reports: list[tuple[float, object]] = []

    @property
    def last_decision(self):
        return self.inner.last_decision

    def select(self, request):
        self.arrivals.append((request.rid, self.sim.clock(), request.num_tokens, request.block_hashes))
        return self.inner.select(request)

    def dispatched(self, request, rank):
        return self.inner.dispatched(request, rank)

    def report(self, report):
        self.reports.append((self.sim.clock(), report))
        return self.inner.report(report)

    def first_token(self, request, rank):
        self.inner.first_token(request, rank)

    def finished(self, request, rank):
        self.inner.finished(request, rank)


def test_plugins_and_baselines_see_identical_arrivals() -> None:
    spec = RunSpec(trace_path=MOONCAKE, dp_size=4, limit=120)
    trace = spec.load_trace()
    seen = []
    for name in ("cache_aware", "total_requests", "peer:smg_cache_aware", "peer:vllm", "peer:dynamo"):
        sim = Simulation(trace, 4, spec.config, seed=spec.seed)
        if name.startswith("peer:"):
            inner = BASELINES[name](4, clock=sim.clock, seed=0, block_size=512, cached_blocks=sim.cached_blocks)
        else:
            inner = plugin(sim, name)
        rec = Recorder(inner, sim)
        sim.run(rec, name)
        seen.append(rec.arrivals)
    assert len(seen[0]) == 120
    assert all(s == seen[0] for s in seen[1:])
    assert [a[1] for a in seen[0]] == [r.arrival for r in trace.requests]


def test_reports_agree_with_the_request_timeline_and_arrive_late() -> None:
    cfg = EngineConfig(report_interval_s=0.1, report_delay_s=0.05, report_profile="full")
    spec = RunSpec(trace_path=MOONCAKE, dp_size=2, limit=60, config=cfg, time_scale=2.0)
    trace = spec.load_trace()
    sim = Simulation(trace, 2, cfg)
    rec = Recorder(plugin(sim, "total_tokens"), sim)
    r = sim.run(rec, "total_tokens")
    assert rec.reports
    checked = 0
    for delivered, rep in rec.reports:
        taken = delivered - 0.05
        mine = [i for i in range(60) if r.rank[i] == rep.rank]
        arrived = [i for i in mine if r.arrival[i] <= taken]
        # the report acknowledges exactly the dispatches the rank had received
        assert rep.acked_seq == len(arrived) - 1
        if any(abs(t - taken) < 1e-6 for i in mine for t in (r.arrival[i], r.start[i], r.first_token[i], r.finish[i])):
            continue  # a report at the same instant as a transition may see either side
        running = sum(1 for i in arrived if r.start[i] <= taken < r.finish[i])
        waiting = sum(1 for i in arrived if r.start[i] > taken)
        assert (rep.num_running, rep.num_waiting) == (running, waiting)
        assert rep.kv_used <= rep.kv_capacity == cfg.kv_capacity_tokens
        # prefill_tokens: what is left of the prefill in progress at the time it was taken
        prefilling = [i for i in arrived if r.start[i] <= taken < r.first_token[i]]
        left = sum(round((r.first_token[i] - taken) * cfg.prefill_tokens_per_s) for i in prefilling)
        assert abs(rep.prefill_tokens - left) <= 1
        assert rep.num_tokens == rep.kv_used + sum(trace.requests[i].input_length for i in arrived if r.start[i] > taken)
        checked += 1
    assert checked > 50


def test_step_triggered_reports_when_the_timer_is_slow() -> None:
    # Timer every 10 s, so during decode the "every 15 decode steps" rule must fire.
    cfg = EngineConfig(report_interval_s=10.0, report_delay_s=0.0, report_steps=15)
    trace = tiny_trace((0.0, 100, 200, tuple(range(1, 11))))
    sim = Simulation(trace, 1, cfg)
    rec = Recorder(plugin(sim), sim)
    sim.run(rec)
    # 199 decode steps at 25.08 ms: a report after every 15 steps, plus the timer's first.
    step = cfg.decode_step_s + cfg.decode_step_per_request_s
    decode_reports = [t for t, _ in rec.reports if t > 100 / 12000 + 1e-9]
    assert len(decode_reports) == 199 // 15
    gaps = [b - a for a, b in zip(decode_reports, decode_reports[1:])]
    assert all(g == pytest.approx(15 * step) for g in gaps)


def test_same_seed_same_json_and_independent_of_process_count() -> None:
    names = ["round_robin", "cache_aware", "peer:sglang_total_tokens", "peer:dynamo"]
    spec = RunSpec(trace_path=MOONCAKE, dp_size=4, seed=7, time_scale=2.0)

    def doc(jobs: int) -> dict:
        return build_json(run_all(spec, names, jobs=jobs), 0.0, 0.0)

    one = doc(1)
    assert one == doc(1)
    assert one == doc(2)
    other_seed = build_json(run_all(RunSpec(trace_path=MOONCAKE, dp_size=4, seed=8, time_scale=2.0), names), 0.0, 0.0)
    assert other_seed != one


def test_explaining_decisions_does_not_change_the_run() -> None:
    plain = RunSpec(trace_path=MOONCAKE, dp_size=4, limit=150)
    explained = RunSpec(trace_path=MOONCAKE, dp_size=4, limit=150, explain=5)
    a = run_all(plain, ["cache_aware"])["cache_aware"]
    b = run_all(explained, ["cache_aware"])["cache_aware"]
    assert build_json({"x": a}, 0, 0) == build_json({"x": b}, 0, 0)
    assert len(b.explained) == 5 and not a.explained
    assert all(d.policy == "cache_aware" and d.reason for d in b.explained)


def test_queued_prefill_is_what_is_left_of_the_prefill_plus_the_waiting_uncached() -> None:
    # A: 1000 tokens (1 s). B shares A's first 200 tokens: 300 uncached (0.3 s) once A holds
    # them. When C arrives at 0.5 s, A has 0.5 s left and B waits: 0.8 s ahead of C.
    trace = tiny_trace(
        (0.0, 1000, 2, tuple(range(1, 101))),
        (0.2, 500, 2, tuple(range(1, 21)) + tuple(range(201, 231))),
        (0.5, 100, 2, (900,) + tuple(range(901, 910))),
    )
    sim = Simulation(trace, 1, TINY)
    seen: list[float] = []

    class Probe:
        last_decision = None

        def select(self, request):
            seen.append(sim.queued_prefill_s(0))
            return 0

        def dispatched(self, request, rank):
            return 0

        def report(self, report):
            return False

        def first_token(self, request, rank):
            pass

        def finished(self, request, rank):
            pass

    sim.run(Probe())
    assert seen[0] == 0.0
    assert seen[1] == pytest.approx(0.8)  # A's remaining 0.8 s; B not queued yet
    assert seen[2] == pytest.approx(0.5 + 0.3)
