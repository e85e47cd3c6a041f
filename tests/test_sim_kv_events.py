"""The simulator's KV events: ranks publish their real cache with the reports (profile
sglang-kv), lost batches (--kv-event-loss) are noticed and resynced."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpcore.cacheindex import CLEARED, REMOVED, STORED
from dpcore.ledger import LoadLedger
from dpcore.manager import PolicyManager
from dpcore.sim.config import EngineConfig
from dpcore.sim.routing import PluginRouter
from dpcore.sim.faults import Fault
from dpcore.sim.kvcache import RankKV
from dpcore.sim.lockstep import LockstepSimulation
from dpcore.sim.runner import RunSpec

MOONCAKE = str(Path(__file__).parent / "data" / "mooncake_conversation_head300.jsonl")


def test_rank_kv_records_what_it_stores_evicts_and_clears():
    kv = RankKV(capacity=40, block_size=10)
    kv.events = []
    assert kv.admit((1, 2), 20, 0) == 0
    kv.release((1, 2), 20, 0)
    assert kv.admit((1, 2, 3), 30, 0) == 20  # 1 and 2 were cached: only 3 is stored
    kv.release((1, 2, 3), 30, 0)
    assert kv.admit((7, 8), 20, 0) == 0  # 50 tokens > 40: evicts the LRU block (the tail, 3)
    kv.clear()
    assert kv.events == [
        (STORED, None, (1, 2)),
        (STORED, 2, (3,)),
        (STORED, None, (7, 8)),
        (REMOVED, (3,)),
        (CLEARED,),
    ]


class Recorder:
    def __init__(self, router):
        self.router = router
        self.batches = []
        self.select, self.dispatched, self.report = router.select, router.dispatched, router.report
        self.first_token, self.finished, self.rank_alive = router.first_token, router.finished, router.rank_alive

    @property
    def last_decision(self):
        return self.router.last_decision

    def kv_events(self, batch):
        self.batches.append(batch)
        return self.router.kv_events(batch)


def run(loss=0.0, profile="sglang-kv", faults=(), dp=4, limit=300, method="cache_aware"):
    cfg = EngineConfig(report_profile=profile, kv_event_loss=loss, kv_capacity_tokens=60_000)
    spec = RunSpec(trace_path=MOONCAKE, dp_size=dp, limit=limit, config=cfg, time_scale=4.0)
    sim = LockstepSimulation(spec.load_trace(), dp, cfg, faults=faults)
    manager = PolicyManager.from_method(method, dp_size=dp, ledger=LoadLedger(dp, clock=sim.clock))
    rec = Recorder(PluginRouter(manager))
    result = sim.run(rec, method)
    return sim, manager, rec, result


def test_the_index_mirrors_every_ranks_real_cache():
    sim, manager, rec, result = run()
    assert result.completed + result.rejected == 300 and result.completed > 250 and rec.batches
    idx = manager.cache
    assert idx.stats()["gaps"] == 0 and idx.stats()["overflows"] == 0
    for r, rank in enumerate(sim.ranks):
        assert idx.known(r)
        # Everything the rank holds, and nothing else (the last batch was delivered).
        held = set(rank.kv.blocks())
        assert idx.blocks(r) == len(held)
        assert all(idx.match(r, (h,)) == 1 for h in held)


def test_events_travel_with_the_reports():
    sim, _, rec, _ = run(limit=60)
    assert {b.capacity for b in rec.batches} == {60_000}
    assert all(b.seq == i for r in range(4) for i, b in enumerate(x for x in rec.batches if x.rank == r))


def test_without_the_profile_no_events_are_sent():
    _, manager, rec, _ = run(profile="sglang", limit=60)
    assert not rec.batches and manager.cache.known_mask == 0


def test_lost_batches_leave_gaps_that_a_resync_repairs():
    sim, manager, rec, result = run(loss=0.3)
    idx = manager.cache
    assert idx.stats()["gaps"] > 0
    resyncs = [b for b in rec.batches if b.resync]
    assert resyncs
    assert result.completed + result.rejected == 300
    # Every rank is known again at the end, or its last resync was lost too.
    assert sum(idx.known(r) for r in range(4)) >= 2


def test_a_restarted_rank_starts_a_new_exact_life():
    sim, manager, rec, result = run(faults=(Fault(1, 10.0, 20.0),))
    first = [b for b in rec.batches if b.rank == 1 and b.seq == 0]
    assert len({b.epoch for b in first}) == 2  # a sequence from 0 in each life
    assert manager.cache.known(1)
    assert manager.cache.blocks(1) == len(sim.ranks[1].kv.blocks())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--kv-event-loss", "0.1"], "needs a report profile with KV events"),
        (["--kv-event-loss", "1", "--report-profile", "sglang-kv"], "kv_event_loss must be in [0, 1)"),
        (["--report-profile", "sglang-kv", "--engine", "replicas"], "needs --engine lockstep"),
    ],
)
def test_bad_loss_and_profile_combinations_are_refused(args, says, capsys):
    import structlog

    from dpcore.cli import main

    try:
        assert main(["simulate", "--trace", MOONCAKE, "--limit", "5", "--policy", "cache_aware", *args]) == 2
    finally:
        structlog.reset_defaults()  # the CLI pointed logging at this test's captured stream
    assert says in capsys.readouterr().err
