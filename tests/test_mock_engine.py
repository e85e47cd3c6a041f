"""The mock engine model on a fake clock: timings, prefix cache, KV admission."""

from __future__ import annotations

import pytest

from dpcore.mock.engine import EngineParams, Job, MockEngine, PrefixCache


def job(rid: str, n: int, blocks: tuple[int, ...] = (), out: int = 1, at: float = 0.0) -> Job:
    return Job(tag=rid, rid=rid, num_tokens=n, blocks=blocks, output_tokens=out, arrived=at)


def run_until_idle(engine: MockEngine, start: float = 0.0) -> tuple[float, list[Job]]:
    """Advance from iteration end to iteration end until nothing is left; returns (t, finished)."""
    t = start
    done: list[Job] = []
    done += engine.advance(t).finished
    while engine.busy_until is not None:
        t = engine.busy_until
        done += engine.advance(t).finished
    return t, done


P = EngineParams(block_size=100, max_prefill_tokens=10_000)


def test_prefill_time_is_proportional_to_uncached_tokens() -> None:
    e = MockEngine(P)
    e.add(job("a", 1200))
    e.advance(0.0)
    assert e.busy_until == pytest.approx(1200 / 12_000)
    e2 = MockEngine(P)
    e2.add(job("b", 3600))
    e2.advance(0.0)
    assert e2.busy_until == pytest.approx(3 * e.busy_until)


def test_reports_what_is_left_of_the_prefill_in_progress() -> None:
    e = MockEngine(P)
    assert e.prefill_tokens(0.0) == 0
    e.add(job("a", 1200))
    e.advance(0.0)
    assert e.prefill_tokens(0.0) == 1200
    assert e.prefill_tokens(0.05) == 600


def test_first_token_comes_from_prefill_and_one_token_needs_no_decode() -> None:
    e = MockEngine(P)
    a = job("a", 1200, out=1)
    e.add(a)
    t, done = run_until_idle(e)
    assert done == [a]
    assert a.first_token_at == a.finished_at == pytest.approx(0.1)
    assert e.decode_steps == 0


def test_decode_step_time_grows_with_batch_size() -> None:
    def decode_time(batch: int) -> float:
        e = MockEngine(P)
        for i in range(batch):
            e.add(job(f"r{i}", 120, out=11))  # prefill 1 token, then 10 decode steps
        e.advance(0.0)
        prefill_end = e.busy_until
        t, done = run_until_idle(e)
        assert len(done) == batch
        assert e.decode_steps == 10
        return t - prefill_end

    assert decode_time(1) == pytest.approx(10 * (0.025 + 0.00008))
    assert decode_time(50) == pytest.approx(10 * (0.025 + 50 * 0.00008))


def test_macro_steps_are_bounded_by_report_cadence() -> None:
    e = MockEngine(P)
    e.add(job("a", 100, out=200))
    e.advance(0.0)
    e.advance(e.busy_until)  # prefill done, first decode macro step starts
    step = 0.025 + 0.00008
    # 100 ms / step = 3 steps (fewer than report_every_steps = 15)
    assert e.busy_until - 100 / 12_000 == pytest.approx(3 * step)


def test_prefix_cache_hits_are_leading_blocks_only() -> None:
    e = MockEngine(P)
    a = job("a", 400, blocks=(1, 2, 3, 4), out=1)
    e.add(a)
    t, _ = run_until_idle(e)
    assert a.cached_tokens == 0
    b = job("b", 400, blocks=(1, 2, 9, 4), out=1, at=t)  # shares blocks 1, 2 (block 4 is after a miss)
    e.add(b)
    e.advance(t)
    assert b.cached_tokens == 200
    assert e.busy_until - t == pytest.approx(200 / 12_000)
    t, _ = run_until_idle(e, t)
    c = job("c", 400, blocks=(1, 2, 3, 4), out=1, at=t)  # a full hit still computes one token
    e.add(c)
    e.advance(t)
    assert c.cached_tokens == 399
    assert e.busy_until - t == pytest.approx(1 / 12_000)


def test_lru_evicts_least_recently_used_unpinned_blocks() -> None:
    # Capacity for 5 blocks of 100 tokens; each request needs 2 blocks + 1 output token.
    e = MockEngine(EngineParams(block_size=100, kv_capacity=500))
    t = 0.0
    for rid, blocks in (("a", (1, 2)), ("b", (3, 4))):
        e.add(job(rid, 200, blocks, out=1, at=t))
        t, _ = run_until_idle(e, t)
    # Touch a's blocks again, so b's are the oldest.
    again = job("a2", 200, (1, 2), out=1, at=t)
    e.add(again)
    t, _ = run_until_idle(e, t)
    assert again.cached_tokens == 199
    # A new 2-block request needs room: b's blocks (3, 4) go, a's stay.
    e.add(job("c", 200, (5, 6), out=1, at=t))
    t, _ = run_until_idle(e, t)
    assert 1 in e.cache and 2 in e.cache
    assert 3 not in e.cache and 4 not in e.cache
    assert 5 in e.cache and 6 in e.cache


def test_kv_capacity_bounds_admission_and_queued_requests_wait() -> None:
    # 1,000 tokens of KV; each request reserves 400 prompt + 100 output = 500.
    e = MockEngine(EngineParams(block_size=100, kv_capacity=1000, max_prefill_tokens=10_000))
    jobs = [job(f"r{i}", 400, out=100) for i in range(3)]
    for j in jobs:
        e.add(j)
    e.advance(0.0)
    assert e.num_running == 2 and e.num_waiting == 1
    assert e.kv_used == 1000
    assert e.num_tokens == 1000 + 400  # KV in use + the waiting prompt
    t, done = run_until_idle(e)
    assert done[:2] == jobs[:2] and done[2] is jobs[2]
    # The third one could only start once the first two ended.
    assert jobs[2].first_token_at > jobs[0].finished_at
    assert e.kv_used == 0 and e.num_tokens == 0


def test_a_request_that_can_never_fit_ends_with_an_error() -> None:
    e = MockEngine(EngineParams(kv_capacity=1000))
    big = job("big", 5000, out=10)
    step = e.add(big)
    assert step.finished == (big,)
    assert "more than this rank's capacity" in big.error
    assert e.idle


def test_new_work_interrupts_a_macro_step_after_the_current_step() -> None:
    e = MockEngine(EngineParams(block_size=100, report_interval_s=10.0))
    a = job("a", 100, out=100)
    e.add(a)
    e.advance(0.0)
    prefill_end = e.busy_until
    e.advance(prefill_end)
    step = 0.025 + 0.00008
    assert e.busy_until == pytest.approx(prefill_end + 15 * step)
    now = prefill_end + 2.5 * step
    e.add(job("b", 100, out=5, at=now))
    e.interrupt(now)
    assert e.busy_until == pytest.approx(prefill_end + 3 * step)
    e.advance(e.busy_until)
    assert a.generated == 1 + 3
    assert e.num_running == 2  # b is in its prefill now, before a decodes further


def test_prefill_batches_respect_the_token_budget() -> None:
    e = MockEngine(EngineParams(block_size=100, max_prefill_tokens=1000))
    for i in range(3):
        e.add(job(f"r{i}", 600, out=1))
    e.advance(0.0)
    assert e.num_running == 1 and e.num_waiting == 2  # 600 + 600 > 1000
    run_until_idle(e)
    assert e.prefill_batches == 3


def test_prefix_cache_pins() -> None:
    c = PrefixCache()
    assert c.pin(1) and not c.pin(1)
    c.pin(2)
    assert c.pinned == 2
    assert not c.evict_one()
    c.unpin(1)
    assert not c.evict_one()  # 1 still held once
    c.unpin(1)
    assert c.evict_one() and 1 not in c and len(c) == 1


@pytest.mark.parametrize("bad", [{"prefill_tokens_per_s": 0}, {"kv_capacity": -1}, {"decode_step_s": 0}])
def test_params_are_validated(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineParams(**bad)
