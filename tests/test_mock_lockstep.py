"""The lockstep gather of mock ranks on hand-computed timelines (model seconds, no clock)."""

from __future__ import annotations

import math

import pytest

from dpcore.mock.barrier import End, LocalClock, Sync
from dpcore.mock.lockstep import IDLE, Lockstep, StepWork
from dpcore.sim.stepmodel import StepModel

#: Round numbers, so every step time below can be checked by hand.
M = StepModel(
    overhead_s=0.010, graph_loss_s=0.005, extend_s_per_token=0.001, decode_s_per_request=0.002,
    moe_s_per_token=0.0001, chunked_prefill_size=2000,
)  # fmt: skip


def extend(n: int, **kw: float) -> StepWork:
    return StepWork(n, extend=True, max_steps=1, **kw)


def decode(n: int, steps: int = 15, **kw: float) -> StepWork:
    return StepWork(n, extend=False, max_steps=steps, **kw)


def group(*ranks: int, timeout: float = 1.0) -> Lockstep:
    g = Lockstep(M, step_timeout_s=timeout)
    for r in ranks:
        assert g.join(r, 0.0) == 0
    return g


def test_a_step_lasts_as_long_as_its_slowest_rank_plus_the_shared_part() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, extend(300), 0.0, 0.0)
    assert g.running is None  # rank 1 has not posted: the gather waits
    g.post(1, 0, 7, decode(10), 0.0, 0.0)
    run = g.running
    assert run is not None
    # overhead 10 ms + graph loss 5 ms (rank 0 extends) + slowest rank 300 × 1 ms
    # + MoE 0.1 ms × 310 gathered tokens / 2 ranks
    assert run.step_s == pytest.approx(0.010 + 0.005 + 0.300 + 0.0001 * 310 / 2)
    assert run.steps == 1  # an extend batch changes every step
    assert run.versions == {0: 1, 1: 7}
    assert g.tick(run.end - 1e-6) == (None, [])  # not yet
    ended, dropped = g.tick(run.end)
    assert ended is run and dropped == []
    assert g.run_id == 1 and g.running is None
    # Rank 1's decode waited for rank 0's prefill: 300 ms of other work, no CUDA graph.
    assert g.stats.graphless_steps == 1
    assert g.stats.waste_s == pytest.approx(0.300 - 10 * 0.002)


def test_an_idle_rank_runs_idle_batches_and_waits_for_the_step() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, decode(4, steps=5), 0.0, 0.0)
    g.post(1, 0, 1, IDLE, 0.0, 0.0)
    run = g.running
    assert run is not None and run.steps == 5  # the idle rank never limits a run
    assert run.step_s == pytest.approx(0.010 + 4 * 0.002 + 0.0001 * 4 / 2)
    ended, _ = g.tick(run.end)
    assert ended is not None and set(ended.versions) == {0, 1}  # both are told the step ended
    assert g.stats.idle_rank_steps == 5 and g.stats.steps == 5
    assert g.stats.waste_s == pytest.approx(5 * 4 * 0.002)


def test_no_step_runs_while_every_rank_is_idle_and_work_starts_one_at_its_arrival() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, IDLE, 0.0, 0.0)
    g.post(1, 0, 1, IDLE, 0.0, 0.0)
    assert g.running is None and g.due() is None  # nothing to wait for: no timer at all
    # A request reaches rank 1 at t = 3; its fresh plan replaces the idle one.
    g.post(1, 0, 2, extend(100), 3.0, 3.05)
    assert g.running is not None and g.running.start == 3.0
    assert g.stats.stall_s == 0.0  # an idle gap is not a stall


def test_a_run_of_decode_steps_ends_when_the_first_rank_changes() -> None:
    g = group(0, 1, 2)
    g.post(0, 0, 1, decode(4, steps=9), 0.0, 0.0)
    g.post(1, 0, 1, decode(2, steps=3), 0.0, 0.0)  # a request finishes after 3 steps
    g.post(2, 0, 1, decode(1, steps=15, wake_at=0.05), 0.0, 0.0)  # a report falls due
    run = g.running
    assert run is not None
    step = 0.010 + 4 * 0.002 + 0.0001 * 7 / 3
    assert run.step_s == pytest.approx(step)
    assert run.steps == math.ceil(0.05 / step) == 3


def test_new_work_on_a_rank_ends_the_run_at_the_next_step_boundary() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, decode(10, steps=15), 0.0, 0.0)
    g.post(1, 0, 1, decode(10, steps=15), 0.0, 0.0)
    run = g.running
    assert run is not None and run.steps == 15
    step = run.step_s
    g.wake(1, 0, 2.5 * step, 2.5 * step)  # a request arrived in the middle of step 3
    assert run.steps == 3 and run.end == pytest.approx(3 * step)
    g.wake(1, 0, 10 * step, 2.6 * step)  # a later wish never lengthens the run
    assert run.steps == 3
    g.wake(0, 99, 0.0, 2.6 * step)  # a wake for another run is ignored
    assert run.steps == 3


def test_a_rank_that_posted_idle_and_gets_work_cuts_the_run_it_idles_in() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, decode(10, steps=15), 0.0, 0.0)
    g.post(1, 0, 1, IDLE, 0.0, 0.0)
    run = g.running
    assert run is not None
    assert g.post(1, 0, 2, extend(50), 1.5 * run.step_s, 1.5 * run.step_s)
    assert run.steps == 2 and run.versions[1] == 1  # the run goes on with the idle plan


def test_a_silent_rank_is_dropped_after_the_timeout_and_may_rejoin() -> None:
    g = group(0, 1, timeout=2.0)
    g.post(0, 0, 1, decode(3), 0.0, 0.0)
    assert g.running is None and g.due() == 2.0  # waits for rank 1, but not for ever
    ended, dropped = g.tick(2.0)
    assert ended is None and dropped == [1]
    assert g.members == {0} and g.stats.dropped == 1
    run = g.running
    # The step starts when the gather gave up on rank 1: the others waited, as time passed.
    assert run is not None and run.start == 2.0 and set(run.versions) == {0}
    assert g.stats.stall_s == 0.0  # the first gather followed no run
    # Rank 1 wakes up and posts for a run that is over: it must join again.
    assert not g.post(1, 0, 1, decode(3), 0.5, 2.1)
    assert g.join(1, 2.1) == 1  # the run in progress goes on without it; it posts for the next
    assert g.stats.rejoined == 1
    g.post(1, 1, 2, decode(3), 2.1, 2.1)
    ended, _ = g.tick(run.end)
    assert ended is run and set(ended.versions) == {0}
    g.post(0, 1, 2, decode(3), run.end, run.end)
    assert g.running is not None and set(g.running.versions) == {0, 1}  # both again


def test_a_rank_that_leaves_is_not_waited_for() -> None:
    g = group(0, 1, timeout=100.0)
    g.post(0, 0, 1, decode(3), 0.0, 0.0)
    g.leave(1, 0.1)
    assert g.running is not None and g.stats.dropped == 0


def test_work_that_arrived_after_the_step_started_waits_for_the_next_step_boundary() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, decode(3, steps=1), 0.0, 0.0)
    g.post(1, 0, 1, decode(3, steps=1), 0.0, 0.0)
    first = g.running
    assert first is not None
    g.tick(first.end)
    g.post(0, 1, 2, decode(3, steps=5), first.end, first.end)
    # Rank 1's new request arrived 40 ms (model) after the step ended, while the processes
    # were still gathering: the step starts on time without it, rank 1 idles in it (its plan
    # did not run: version 0), and the run ends at the first boundary after the arrival.
    g.post(1, 1, 2, extend(10), first.end + 0.04, first.end + 0.041)
    run = g.running
    assert run is not None and run.start == first.end
    assert run.versions == {0: 2, 1: 0} and not run.work[1].busy
    assert run.step_s == pytest.approx(0.010 + 3 * 0.002 + 0.0001 * 3 / 2)
    assert run.steps == math.ceil(0.04 / run.step_s) == 3
    assert g.stats.stall_s == 0.0
    assert g.stats.lag_max_s == pytest.approx(0.041)  # the clock was 41 ms ahead of the start


def test_a_restarted_rank_is_not_told_about_the_run_its_old_life_posted_for() -> None:
    g = group(0, 1)
    g.post(0, 0, 1, decode(3), 0.0, 0.0)
    g.post(1, 0, 1, decode(3), 0.0, 0.0)
    run = g.running
    assert run is not None
    assert g.join(1, 0.01) == 1
    ended, _ = g.tick(run.end)
    assert ended is not None and set(ended.versions) == {0}


def test_a_rank_alone_that_rejoins_mid_run_is_not_told_of_that_run() -> None:
    # A post for a run that is over makes a rank alone join again while a run is going; the
    # run then ends without it (the mock rank once died here on a KeyError).
    clock = LocalClock(0, 1e6, M)
    clock.join()
    clock.post(0, 1, decode(3), 0.0)
    assert clock.lockstep.running is not None
    clock.post(7, 1, decode(3), 0.0)  # stale: joins again
    events: list[End | Sync] = []
    while clock.lockstep.run_id == 0:  # until run 0 ended
        events += clock.events()
    assert [(type(e), e.run) for e in events] == [(Sync, 0), (Sync, 1)], events  # no End for run 0


@pytest.mark.parametrize(
    "bad", [{"num_tokens": -1}, {"max_steps": 0}, {"num_tokens": 1.5}, {"wake_at": math.nan}]
)
def test_step_work_is_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        StepWork(**bad)


def test_a_rank_with_only_a_request_from_after_the_step_posts_it_ready_at_its_arrival() -> None:
    from dpcore.mock.engine import Job, MockEngine
    from dpcore.mock.stepper import Stepper

    posts: list[tuple[StepWork, float]] = []

    class Poster:
        def post(self, run: int, version: int, work: StepWork, at: float) -> None:
            posts.append((work, at))

        def wake(self, run: int, at: float) -> None:
            raise AssertionError("an idle rank posts afresh")

    s = Stepper(MockEngine(), Poster(), 0.1)
    s.sync(0, 1000, 0.0)
    assert posts[-1] == (IDLE, 0.0)
    # The step ended at t = 2; a request stamped a hair later was already received.
    s.engine.add(Job(None, "a", 100, (), 5, 2.0 + 1e-7))
    s.end(0, 1, 1, 2.0)
    work, at = posts[-1]
    assert work.busy and work.extend and at == 2.0 + 1e-7  # not an idle plan: it would wait for ever
