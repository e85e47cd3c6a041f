"""The ledger's estimate of work queued at each rank (dispatched or waiting, not started)."""

from __future__ import annotations

import pytest

from dpcore.ledger import MAX_REPLAY, LoadLedger, waiting_tokens
from dpcore.model import LoadReport


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Reporter:
    """Reports for one ledger, with increasing report sequence numbers per rank."""

    def __init__(self, led: LoadLedger) -> None:
        self.led = led
        self.seq = [0] * led.dp_size

    def __call__(self, rank: int, *, acked: int | None = None, waiting: int = 0, **fields: int) -> bool:
        self.seq[rank] += 1
        if acked is None:
            acked = self.led.next_dispatch_seq(rank) - 1
        fields.setdefault("num_waiting", 1 if waiting else 0)
        fields.setdefault("kv_used", 1_000)
        fields.setdefault("num_running", 1)
        return self.led.apply_report(
            LoadReport(rank=rank, seq=self.seq[rank], acked_seq=acked, num_tokens=fields["kv_used"] + waiting, **fields)
        )


def make_ledger(dp_size: int) -> tuple[LoadLedger, Clock, Reporter]:
    clock = Clock()
    led = LoadLedger(dp_size, clock=clock)
    return led, clock, Reporter(led)


def teach_rate(led: LoadLedger, clock: Clock, report: Reporter, rate: int, rank: int = 0) -> None:
    """Two reports one second apart, both with work waiting: *rate* tokens started between."""
    report(rank, waiting=rate + 500)
    clock.t += 1.0
    report(rank, waiting=500)


def test_dispatches_are_queued_until_a_report_says_they_started():
    led, clock, report = make_ledger(2)
    led.record_dispatch(0, 1_000)
    led.record_dispatch(0, 500)
    assert led.queued(0) == 1_500 and led.queued(1) == 0
    report(0)  # admitted both, nothing waiting: they started
    assert led.queued(0) == 0


def test_report_never_drops_unacknowledged_dispatches_from_the_queue():
    led, clock, report = make_ledger(1)
    led.record_dispatch(0, 1_000)
    led.record_dispatch(0, 700)
    report(0, acked=0, waiting=0)  # taken before the second one arrived
    assert led.queued(0) == 700
    led.refresh()
    assert led.queued_requests[0] == 1


def test_drain_rate_is_learned_from_intervals_with_work_waiting_at_both_ends():
    led, clock, report = make_ledger(2)
    report(0, waiting=10_000)
    clock.t += 0.5
    led.record_dispatch(0, 2_000)
    clock.t += 0.5
    report(0, waiting=4_000)  # 10,000 + 2,000 admitted - 4,000 left = 8,000 started in 1 s
    assert led.drain_rate == pytest.approx(8_000)


def test_an_interval_that_found_the_rank_idle_teaches_nothing():
    led, clock, report = make_ledger(1)
    report(0, waiting=0)
    clock.t += 1.0
    report(0, waiting=5_000)
    clock.t += 1.0
    report(0, waiting=0)
    assert led.drain_rate == 0.0


def test_queue_drains_between_reports_and_never_below_zero():
    led, clock, report = make_ledger(2)
    teach_rate(led, clock, report, 8_000)
    led.record_dispatch(1, 4_000)
    clock.t += 0.25
    assert led.queued(1) == pytest.approx(2_000)
    clock.t += 1.0
    assert led.queued(1) == 0.0


def test_queued_requests_count_a_started_request_in_part():
    led, clock, report = make_ledger(2)
    teach_rate(led, clock, report, 1_000)
    led.record_dispatch(1, 1_000)
    led.record_dispatch(1, 1_000)
    clock.t += 1.5
    led.refresh()
    assert led.queued_tokens[1] == pytest.approx(500)
    assert led.queued_requests[1] == pytest.approx(0.5)


def test_late_report_is_aged_by_the_dispatches_it_did_not_see():
    led, clock, report = make_ledger(2)
    teach_rate(led, clock, report, 500, rank=1)
    led.record_dispatch(0, 100)  # seq 0
    clock.t += 5.0
    led.record_dispatch(0, 3_000)  # seq 1
    clock.t += 5.0
    # Acknowledges seq 0 only: taken before seq 1 arrived, so at least 5 s ago. Its 2,000
    # waiting tokens had 5 s to drain at 500/s (done after 4 s), then seq 1 ran for 1 s.
    report(0, acked=0, waiting=2_000)
    assert led.queued(0) == pytest.approx(2_500)


def test_report_taken_after_every_dispatch_is_applied_as_current():
    led, clock, report = make_ledger(2)
    teach_rate(led, clock, report, 500, rank=1)
    led.record_dispatch(0, 100)
    clock.t += 5.0
    report(0, waiting=2_000)  # nothing unacknowledged bounds its age from below
    assert led.queued(0) == pytest.approx(2_000)


def test_prompt_being_computed_delays_the_queue_behind_it():
    led, clock, report = make_ledger(2)
    teach_rate(led, clock, report, 1_000, rank=1)
    led.record_dispatch(0, 300)
    led.record_dispatch(0, 700)
    report(0, acked=0, waiting=0, prefill_tokens=2_000)
    assert led.queued(0) == 2_700
    led.refresh()
    assert led.queued_requests[0] == 1  # the started prompt is running, not queued
    clock.t += 2.5  # the rest of that prompt, then half of the one behind it
    assert led.queued(0) == pytest.approx(200)


def test_replay_is_bounded_but_counts_every_unacknowledged_dispatch():
    led = LoadLedger(1, clock=Clock())
    report = Reporter(led)
    for _ in range(MAX_REPLAY + 100):
        led.record_dispatch(0, 10)
    report(0, acked=-1)
    assert led.queued(0) == (MAX_REPLAY + 100) * 10
    led.refresh()
    assert led.queued_requests[0] == MAX_REPLAY + 100


def test_forget_empties_the_queue():
    clock = Clock()
    led = LoadLedger(2, clock=clock)
    led.record_dispatch(1, 1_000)
    led.set_active(1, False)
    assert led.queued(1) == 0.0
    assert led.snapshot()[1]["queued_tokens"] == 0


def test_waiting_tokens_from_a_report():
    assert waiting_tokens(LoadReport(rank=0, num_waiting=0, num_tokens=5_000, kv_used=4_000)) == 0
    assert waiting_tokens(LoadReport(rank=0, num_running=2, num_waiting=1, num_tokens=5_000, kv_used=4_000)) == 1_000
    # No KV figure from the rank: its tokens are split by request count.
    assert waiting_tokens(LoadReport(rank=0, num_running=3, num_waiting=1, num_tokens=4_000)) == 1_000


def test_mean_prompt_tokens_follows_dispatches():
    led = LoadLedger(2)
    assert led.mean_prompt_tokens == 0.0
    led.record_dispatch(0, 100)
    led.record_dispatch(1, 300)
    assert led.mean_prompt_tokens == pytest.approx(200)
