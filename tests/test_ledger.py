from __future__ import annotations

import pytest

from dpcore.errors import InvalidReportError
from dpcore.ledger import MAX_PENDING_PER_RANK, LoadLedger
from dpcore.model import LoadReport


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_dispatch_counts_until_acknowledged():
    led = LoadLedger(2)
    assert led.record_dispatch(0, 100) == 0
    assert led.record_dispatch(0, 50) == 1
    assert (led.requests, led.tokens) == ([2, 0], [150, 0])
    # The rank admitted seq 0 only; its report counts that one, we keep counting seq 1.
    assert led.apply_report(LoadReport(rank=0, seq=1, acked_seq=0, num_running=1, num_tokens=100))
    assert led.requests[0] == 2 and led.tokens[0] == 150
    assert led.unacked(0) == 1


def test_stale_report_cannot_erase_newer_dispatches():
    led = LoadLedger(2)
    led.apply_report(LoadReport(rank=0, seq=1, acked_seq=-1))
    for _ in range(10):
        led.record_dispatch(0, 10)
    # A report taken before any of the ten was admitted says "idle".
    led.apply_report(LoadReport(rank=0, seq=2, acked_seq=-1, num_running=0))
    assert led.requests[0] == 10 and led.tokens[0] == 100


def test_older_report_is_ignored():
    led = LoadLedger(1)
    assert led.apply_report(LoadReport(rank=0, seq=5, num_running=7))
    assert not led.apply_report(LoadReport(rank=0, seq=4, num_running=1))
    assert not led.apply_report(LoadReport(rank=0, seq=5, num_running=1))
    assert led.requests[0] == 7


def test_new_epoch_restarts_the_sequence():
    led = LoadLedger(1)
    led.apply_report(LoadReport(rank=0, epoch=1, seq=50, num_running=3))
    assert led.apply_report(LoadReport(rank=0, epoch=2, seq=0, num_running=1))
    assert led.requests[0] == 1


def test_partial_report_touches_only_its_rank():
    led = LoadLedger(3)
    led.apply_report(LoadReport(rank=0, seq=1, num_running=5, num_tokens=150))
    led.apply_report(LoadReport(rank=1, seq=1, num_running=6, num_tokens=80))
    led.apply_report(LoadReport(rank=1, seq=2, num_running=1, num_waiting=1, num_tokens=20))
    assert led.requests == [5, 2, 0]
    assert led.tokens == [150, 20, 0]
    assert led.reported == [True, True, False]


def test_report_for_unknown_rank_is_a_typed_error():
    led = LoadLedger(2)
    with pytest.raises(InvalidReportError, match="ranks are 0..1"):
        led.apply_report(LoadReport(rank=2, seq=1))
    with pytest.raises(InvalidReportError):
        led.apply_report(LoadReport(rank=-1, seq=1))


def test_never_reported_rank_is_unknown_not_zero():
    led = LoadLedger(2)
    snap = led.snapshot()
    assert [s["reported"] for s in snap] == [False, False]
    led.apply_report(LoadReport(rank=1, seq=1))
    assert [s["reported"] for s in led.snapshot()] == [False, True]


def test_liveness_expiry_and_rejoin():
    clock = Clock()
    led = LoadLedger(3, clock=clock)
    led.record_dispatch(1, 10)
    clock.t += 2
    led.heard_from(0)
    led.heard_from(2)
    clock.t += 2
    assert led.expire(3.0) == [1]
    assert led.active_ranks == (0, 2)
    assert not led.is_active(1)
    assert led.requests[1] == 0 and led.unacked(1) == 0  # its work is gone with it
    assert led.apply_report(LoadReport(rank=1, epoch=9, seq=0))
    assert led.active_ranks == (0, 1, 2)


def test_pending_is_bounded():
    led = LoadLedger(1)
    for _ in range(MAX_PENDING_PER_RANK + 10):
        led.record_dispatch(0, 1)
    assert led.unacked(0) == MAX_PENDING_PER_RANK
    assert led.requests[0] == MAX_PENDING_PER_RANK
    assert led.tokens[0] == MAX_PENDING_PER_RANK


def test_dp_size_validated():
    with pytest.raises(ValueError, match="positive integer"):
        LoadLedger(0)
