"""One mock rank's scheduler without a clock: chunked prefill, prefill first, prefix cache, KV."""

from __future__ import annotations

import math

import pytest

from dpcore.mock.engine import EngineParams, Job, MockEngine
from dpcore.mock.lockstep import StepWork


def job(rid: str, n: int, blocks: tuple[int, ...] = (), out: int = 1, at: float = 0.0) -> Job:
    return Job(tag=rid, rid=rid, num_tokens=n, blocks=blocks, output_tokens=out, arrived=at)


def step(e: MockEngine, t: float, dt: float = 1.0) -> tuple[StepWork, float, list[Job]]:
    """Plan and run one run of the engine's plan (all its steps), each *dt* long."""
    work = e.plan()
    steps = work.max_steps if work.busy else 1
    t += steps * dt
    return work, t, list(e.apply(work, steps, t).finished)


def run_until_idle(e: MockEngine, t: float = 0.0) -> tuple[float, list[Job]]:
    done: list[Job] = []
    while not e.idle:
        _, t, fin = step(e, t)
        done += fin
    return t, done


P = EngineParams(block_size=100)


def test_a_long_prompt_takes_one_extend_step_per_chunk_then_its_first_token() -> None:
    e = MockEngine(P, chunk_tokens=1024)
    a = job("a", 10_000, out=3)
    e.add(a)
    works = []
    t = 0.0
    while a.first_token_at is None:
        work, t, _ = step(e, t)
        works.append(work)
    assert len(works) == math.ceil(10_000 / 1024) == 10
    assert all(w.extend and w.max_steps == 1 for w in works)
    assert [w.num_tokens for w in works] == [1024] * 9 + [10_000 - 9 * 1024]
    assert a.first_token_at == 10.0 and a.generated == 1
    assert e.extend_steps == 10 and e.decode_steps == 0


def test_an_extend_batch_packs_waiting_requests_up_to_the_budget_and_chunks_the_last() -> None:
    e = MockEngine(P, chunk_tokens=1000)
    for rid, n in (("a", 300), ("b", 300), ("c", 900)):
        e.add(job(rid, n))
    w = e.plan()
    assert w.extend and w.num_tokens == 1000  # a, b whole, 400 of c
    assert e.num_running == 3 and e.num_waiting == 0
    e.apply(w, 1, 1.0)
    assert [j.rid for j in e.prefilling] == ["c"]
    e.add(job("d", 200, at=1.0))
    w = e.plan()
    assert w.num_tokens == 500 + 200  # the chunked prompt continues first, then d


def test_prefill_comes_before_decode_and_the_rank_then_decodes_everyone() -> None:
    e = MockEngine(P, chunk_tokens=1000)
    a = job("a", 100, out=10)
    e.add(a)
    step(e, 0.0)  # a's extend: its first token
    e.add(job("b", 800, out=10, at=1.0))
    w = e.plan()
    assert w.extend  # b's prefill first ...
    e.apply(w, 1, 2.0)
    assert a.generated == 1  # ... while a, decoding, gets no token in that step
    w = e.plan()
    assert not w.extend and w.num_tokens == 2  # then one decode batch of both
    e.apply(w, 3, 5.0)
    assert a.generated == 4


def test_a_decode_run_ends_before_the_first_request_finishes_or_a_report_is_due() -> None:
    e = MockEngine(EngineParams(block_size=100, report_every_steps=15), chunk_tokens=1000)
    e.add(job("a", 10, out=40))
    e.add(job("b", 10, out=6))
    step(e, 0.0)
    w = e.plan(wake_at=7.5)
    assert w.max_steps == 5 and w.wake_at == 7.5  # b needs 5 more tokens
    e.apply(w, 5, 6.0)
    assert e.plan().max_steps == 15  # a alone: the report cadence bounds the run


def test_a_request_that_arrives_after_the_step_starts_waits_and_ends_the_run_on_arrival() -> None:
    e = MockEngine(P, chunk_tokens=1000)
    e.add(job("a", 100, out=50))
    step(e, 0.0)
    late = job("late", 100, at=4.5)
    e.add(late)  # received before the rank planned a step that starts at t = 4
    w = e.plan(4.0, wake_at=9.0)
    assert not w.extend and w.num_tokens == 1 and w.wake_at == 4.5  # a decodes until then
    assert e.num_waiting == 1
    e.apply(w, 1, 5.0)
    w = e.plan(5.0)
    assert w.extend and w.num_tokens == 100


def test_a_formed_batch_is_kept_until_it_runs() -> None:
    e = MockEngine(P, chunk_tokens=1000)
    e.add(job("a", 600))
    first = e.plan()
    e.add(job("b", 600))
    assert e.plan() == first  # b waits for the next batch: the posted plan must stay valid
    e.apply(StepWork(), 1, 1.0)  # the lockstep ran an idle plan posted before: nothing happens
    assert e.plan() == first


def test_prefix_cache_hits_are_leading_blocks_only() -> None:
    e = MockEngine(P)
    a = job("a", 400, blocks=(1, 2, 3, 4))
    e.add(a)
    t, _ = run_until_idle(e)
    assert a.cached_tokens == 0
    b = job("b", 400, blocks=(1, 2, 9, 4), at=t)  # shares blocks 1, 2 (block 4 is after a miss)
    e.add(b)
    assert e.plan().num_tokens == 200
    t, _ = run_until_idle(e, t)
    assert b.cached_tokens == 200
    c = job("c", 400, blocks=(1, 2, 3, 4), at=t)  # a full hit still computes one token
    e.add(c)
    assert e.plan().num_tokens == 1
    run_until_idle(e, t)
    assert c.cached_tokens == 400


def test_lru_evicts_least_recently_used_unpinned_blocks() -> None:
    # Capacity for 5 blocks of 100 tokens; each request needs 2 blocks + 1 output token.
    e = MockEngine(EngineParams(block_size=100, kv_capacity=500))
    t = 0.0
    for rid, blocks in (("a", (1, 2)), ("b", (3, 4))):
        e.add(job(rid, 200, blocks, at=t))
        t, _ = run_until_idle(e, t)
    again = job("a2", 200, (1, 2), at=t)  # touch a's blocks again, so b's are the oldest
    e.add(again)
    t, _ = run_until_idle(e, t)
    assert again.cached_tokens == 200
    e.add(job("c", 200, (5, 6), at=t))  # needs room: b's blocks (3, 4) go, a's stay
    run_until_idle(e, t)
    cached = {b for b in range(1, 7) if e.kv.cached_blocks([b])}
    assert cached == {1, 2, 5, 6}


def test_kv_capacity_bounds_admission_and_queued_requests_wait() -> None:
    # 1,000 tokens of KV; each request reserves 400 prompt + 100 output = 500.
    e = MockEngine(EngineParams(block_size=100, kv_capacity=1000), chunk_tokens=10_000)
    jobs = [job(f"r{i}", 400, out=100) for i in range(3)]
    for j in jobs:
        e.add(j)
    w = e.plan()
    assert e.num_running == 2 and e.num_waiting == 1  # the third does not fit: it waits
    # Reported KV is the prompts held plus the tokens generated so far (as SGLang counts it),
    # not the outputs reserved at admission.
    assert e.kv_used == 800
    assert e.num_tokens == 800 + 400  # KV in use + the waiting prompt
    assert e.prefill_tokens == 800
    e.apply(w, 1, 1.0)
    e.apply(e.plan(), 5, 2.0)
    assert e.kv_used == 800 + 2 * 6 and e.prefill_tokens == 0
    t, done = run_until_idle(e)
    assert done[:2] == jobs[:2] and done[2] is jobs[2]
    assert jobs[2].first_token_at > jobs[0].finished_at  # it started once the first two ended
    assert e.kv_used == 0 and e.num_tokens == 0 and e.prefill_tokens == 0


def test_a_request_that_can_never_fit_ends_with_an_error() -> None:
    e = MockEngine(EngineParams(kv_capacity=1000))
    big = job("big", 5000, out=10)
    assert e.add(big) == (big,)
    assert "more than this rank's capacity" in big.error
    assert e.idle and not e.plan().busy


@pytest.mark.parametrize("bad", [{"kv_capacity": 0}, {"block_size": 1.5}, {"report_interval_s": 0}])
def test_params_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineParams(**bad)
