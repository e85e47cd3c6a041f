"""The DP-attention (lockstep) engine on hand-computed timelines, report profiles, faults."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dpcore.ledger import LoadLedger
from dpcore.manager import PolicyManager
from dpcore.sim.config import EngineConfig
from dpcore.sim.routing import PluginRouter
from dpcore.sim.faults import Fault, parse_faults
from dpcore.sim.lockstep import LockstepSimulation
from dpcore.sim.report import summarize
from dpcore.sim.runner import QUIET_LOG, RunSpec, run_all
from dpcore.sim.stepmodel import StepModel
from dpcore.sim.traces import Trace, TraceRequest
from dpcore.errors import ConfigError

DATA = Path(__file__).parent / "data"
MOONCAKE = str(DATA / "mooncake_conversation_head300.jsonl")

# Round numbers: 10 ms per step, 5 ms graph loss, 1 ms per extend token, 2 ms per decoding
# request, 0.5 ms per gathered token over dp; chunk budget 200 // dp.
STEP = StepModel(
    overhead_s=0.010,
    graph_loss_s=0.005,
    extend_s_per_token=0.001,
    decode_s_per_request=0.002,
    moe_s_per_token=0.0005,
    chunked_prefill_size=200,
)
TINY = EngineConfig(kv_capacity_tokens=100_000, report_interval_s=100.0, report_delay_s=0.0, report_steps=0, step=STEP)


def trace_of(*rows: tuple[float, int, int], block_size: int = 10) -> Trace:
    return Trace(
        path="tiny",
        format="mooncake",
        block_size=block_size,
        requests=tuple(
            TraceRequest(index=i, arrival=a, input_length=n_in, output_length=n_out, hash_ids=())
            for i, (a, n_in, n_out) in enumerate(rows)
        ),
    )


def run(trace: Trace, dp: int, cfg: EngineConfig = TINY, method: str = "round_robin", **kw):
    sim = LockstepSimulation(trace, dp, cfg, **kw)
    ledger = LoadLedger(dp, clock=sim.clock)
    router = PluginRouter(PolicyManager.from_method(method, dp_size=dp, ledger=ledger, log=QUIET_LOG))
    return sim, sim.run(router, method)


def test_a_step_lasts_as_long_as_its_slowest_rank_and_an_idle_rank_waits() -> None:
    # A (100 tokens) runs alone on rank 0 while rank 1 idles; B (10 tokens, rank 1) and
    # C (30 tokens, rank 0) then extend in the same step, which lasts as long as C's.
    trace = trace_of((0.0, 100, 1), (0.05, 10, 1), (0.06, 30, 1))
    _, r = run(trace, 2)
    step1 = 0.010 + 0.005 + 0.100 + 0.0005 * 100 / 2
    step2 = 0.010 + 0.005 + 0.030 + 0.0005 * 40 / 2
    assert r.first_token[0] == pytest.approx(step1)
    assert r.first_token[1] == pytest.approx(step1 + step2)  # B waited for C's 30 ms
    assert r.first_token[2] == pytest.approx(step1 + step2)
    assert r.steps == 2
    # The idle rank waits through step 1 (100 ms); rank 1 waits 20 ms for rank 0 in step 2.
    assert r.waste_s == pytest.approx(0.100 + 0.020)
    assert r.busy_s == pytest.approx(0.100 + 0.030 + 0.010)
    assert r.rank_time_s == pytest.approx(2 * (step1 + step2))


def test_a_10k_prompt_takes_ceil_10k_over_the_per_rank_chunk_extend_steps() -> None:
    cfg = EngineConfig(kv_capacity_tokens=100_000, report_interval_s=100.0, report_delay_s=0.0, report_steps=0,
                       step=StepModel(chunked_prefill_size=2048))  # fmt: skip
    sim, r = run(trace_of((0.0, 10_000, 1)), 2, cfg)
    chunk = 1024
    assert sim.budget == chunk
    assert r.steps == math.ceil(10_000 / chunk) == 10
    sm = cfg.step
    full = sm.step_time_s([chunk, 0], [0, 0])
    last = sm.step_time_s([10_000 - 9 * chunk, 0], [0, 0])
    assert r.first_token[0] == pytest.approx(9 * full + last)


def test_an_extend_batch_packs_several_requests_up_to_the_budget() -> None:
    # dp 1: budget 200. Three 60-token prompts arrive while a 100-token one extends; the next
    # step packs all three (180 tokens) rather than one per step.
    trace = trace_of((0.0, 100, 1), (0.01, 60, 1), (0.01, 60, 1), (0.01, 60, 1))
    _, r = run(trace, 1)
    step1 = 0.010 + 0.005 + 0.100 + 0.0005 * 100
    step2 = 0.010 + 0.005 + 0.180 + 0.0005 * 180
    assert r.steps == 2
    assert r.first_token[1:] == [pytest.approx(step1 + step2)] * 3


def test_cuda_graph_loss_applies_only_while_some_rank_extends() -> None:
    # A (10 tokens, 3 output tokens) on rank 0: one extend step, then two decode steps. B
    # (20 tokens) arrives during A's first decode step and extends on rank 1 during A's second,
    # which therefore runs eagerly and pays the 5 ms graph loss; A's first decode step does not.
    trace = trace_of((0.0, 10, 3), (0.03, 20, 1))
    _, r = run(trace, 2)
    extend_a = 0.010 + 0.005 + 0.010 + 0.0005 * 10 / 2
    decode = 0.010 + 0.002 + 0.0005 * 1 / 2
    mixed = 0.010 + 0.005 + 0.020 + 0.0005 * 21 / 2
    assert r.first_token[0] == pytest.approx(extend_a)
    assert r.finish[0] == pytest.approx(extend_a + decode + mixed)
    assert r.first_token[1] == pytest.approx(extend_a + decode + mixed)
    # Inter-token latencies of A: one plain decode step, one mixed step.
    assert sorted(v for v, w in r.itl for _ in range(w)) == [pytest.approx(decode), pytest.approx(mixed)]


def test_prefill_comes_before_decode_on_a_rank() -> None:
    # dp 1: A decodes; B arrives; the next step extends B and A gets no token in it.
    trace = trace_of((0.0, 10, 3), (0.035, 50, 1))
    _, r = run(trace, 1)
    extend_a = 0.010 + 0.005 + 0.010 + 0.0005 * 10
    decode = 0.010 + 0.002 + 0.0005
    extend_b = 0.010 + 0.005 + 0.050 + 0.0005 * 50
    assert r.first_token[1] == pytest.approx(extend_a + decode + extend_b)
    assert r.finish[0] == pytest.approx(extend_a + decode + extend_b + decode)


class Recorder(PluginRouter):
    def __init__(self, inner: PluginRouter) -> None:
        super().__init__(inner.manager)
        self.reports = []
        self.report = self._record

    def _record(self, rep):
        self.reports.append(rep)
        return self.manager.report(rep)


@pytest.mark.parametrize(("name", "hidden"), [("sglang", True), ("full", False)])
def test_the_report_profile_hides_what_it_should(name: str, hidden: bool) -> None:
    cfg = EngineConfig(report_interval_s=0.05, report_delay_s=0.0, report_profile=name)
    spec = RunSpec(trace_path=MOONCAKE, dp_size=2, limit=40, config=cfg)
    trace = spec.load_trace()
    sim = LockstepSimulation(trace, 2, cfg)
    manager = PolicyManager.from_method("round_robin", dp_size=2, ledger=LoadLedger(2, clock=sim.clock), log=QUIET_LOG)
    rec = Recorder(PluginRouter(manager))
    sim.run(rec, "round_robin")
    values = {rep.prefill_tokens for rep in rec.reports}
    assert rec.reports
    if hidden:
        assert values == {-1}
    else:
        assert -1 not in values and max(values) > 0
    # Everything else the SGLang adapter sends is there in both profiles.
    assert max(rep.num_tokens for rep in rec.reports) > 0
    assert max(rep.kv_used for rep in rec.reports) > 0


def test_same_seed_same_numbers_whatever_the_jobs() -> None:
    spec = RunSpec(trace_path=MOONCAKE, dp_size=4, limit=120, seed=3, faults=(Fault(1, 5.0, 30.0),))
    names = ["round_robin", "peer:sglang_total_tokens", "ref:clairvoyant"]
    one = run_all(spec, names, jobs=1)
    two = run_all(spec, names, jobs=2)
    for n in names:
        assert summarize(one[n]) == summarize(two[n])
        assert one[n].finish == pytest.approx(two[n].finish, nan_ok=True)


@pytest.mark.parametrize("method", ["round_robin", "cache_aware", "peer:sglang_round_robin", "peer:vllm"])
def test_requests_are_conserved_under_faults(method: str) -> None:
    spec = RunSpec(trace_path=MOONCAKE, dp_size=4, limit=200, time_scale=2.0, faults=(Fault(1, 10.0, 40.0), Fault(2, 20.0)))
    r = run_all(spec, [method])[method]
    n = len(r.arrival)
    assert r.completed + r.rejected + r.failed == n
    assert r.failed > 0 and r.fail_reasons.get("rank_down") == r.failed
    done = [i for i in range(n) if not math.isnan(r.finish[i])]
    assert len(done) == r.completed


def test_a_dead_rank_gets_no_work_from_dpcore_once_noticed_and_returns_empty() -> None:
    # Rank 1 dies at 1 s (noticed one report interval later) and comes back at 3 s.
    rows = [(0.1 * i, 100, 2) for i in range(60)]
    cfg = EngineConfig(kv_capacity_tokens=100_000, report_interval_s=0.1, report_delay_s=0.0, report_steps=0, step=STEP)
    _, r = run(trace_of(*rows), 2, cfg, faults=(Fault(1, 1.0, 3.0),))
    to_1 = [i for i in range(60) if r.rank[i] == 1]
    assert not [i for i in to_1 if 1.2 <= r.arrival[i] < 3.0]  # skipped while down
    assert [i for i in to_1 if r.arrival[i] >= 3.2]  # used again after its first report
    assert r.completed + r.failed == 60


def test_fault_schedules_parse_and_bad_ones_are_named() -> None:
    assert parse_faults("2@60-120,0@5", dp_size=4, duration_s=100, seed=0) == (Fault(2, 60.0, 120.0), Fault(0, 5.0))
    a = parse_faults("random:3", dp_size=4, duration_s=100, seed=7)
    assert a == parse_faults("random:3", dp_size=4, duration_s=100, seed=7) and len(a) == 3
    for bad, words in [("9@1-2", "ranks are 0..3"), ("1@5-2", "down < up"), ("x", "RANK@DOWN-UP"), ("random:z", "whole number")]:
        with pytest.raises(ConfigError, match=words):
            parse_faults(bad, dp_size=4, duration_s=100, seed=0)


def test_a_seed_changes_random_tie_breaks_but_not_a_deterministic_policy_on_exact_timestamps() -> None:
    # Report timers start at a phase drawn from the seed, but every rank's first report by
    # steps moves it to the end of the same global step (SGLang's DP-attention schedulers
    # publish their load from the step loop, all ranks in the same step). Azure timestamps are
    # exact (nothing to spread), so total_tokens decides alike for every seed; peer:dynamo's
    # random tie-break does follow the seed.
    azure = str(Path(__file__).resolve().parent.parent / "traces" / "AzureLLMInferenceTrace_conv.csv")
    names = ["total_tokens", "peer:dynamo"]
    s0, s1 = (run_all(RunSpec(trace_path=azure, dp_size=8, limit=600, time_scale=3.0, seed=s), names) for s in (0, 1))
    assert s0["total_tokens"].rank == s1["total_tokens"].rank
    assert s0["total_tokens"].first_token == s1["total_tokens"].first_token
    assert s0["peer:dynamo"].rank != s1["peer:dynamo"].rank
