"""The report intake of the rank lifecycle, on a stand-in socket: what one drain of several
reports applies and counts, whatever the loop's timing made arrive together."""

from __future__ import annotations

import structlog
import zmq

from dpcore import wire
from dpcore.manager import PolicyManager
from dpcore.runtime.books import Books
from dpcore.runtime.inflight import InFlightTable
from dpcore.runtime.lifecycle import RankLifecycle


class Queued:
    """The report socket with *frames* waiting in it."""

    def __init__(self, *frames: bytes) -> None:
        self.frames = list(frames)

    def recv(self, flags: int = 0) -> bytes:
        if not self.frames:
            raise zmq.Again
        return self.frames.pop(0)


def lifecycle() -> RankLifecycle:
    manager = PolicyManager.from_method("round_robin", dp_size=2)
    books = Books(2)
    life = RankLifecycle(
        manager, InFlightTable(2), None, books, heartbeat_timeout_s=1.0,  # type: ignore[arg-type]
        redispatch=lambda e, r: None, fail=lambda *a: None, log=structlog.get_logger(),
    )  # fmt: skip
    life.drain_reports(Queued(wire.encode_load(0, epoch=7, seq=5)))
    assert manager.ledger.reports[0].seq == 5
    return life


def test_an_old_report_is_stale_also_when_a_newer_one_came_in_the_same_drain():
    for order in ((3, 9), (9, 3)):  # before or after the newer one
        life = lifecycle()
        life.drain_reports(Queued(*(wire.encode_load(0, epoch=7, seq=s) for s in order)))
        assert life.ledger.reports[0].seq == 9
        assert life.books.stale_reports == 1, order


def test_a_report_newer_than_the_applied_one_but_superseded_in_its_drain_is_not_stale():
    life = lifecycle()
    life.drain_reports(Queued(wire.encode_load(0, epoch=7, seq=6), wire.encode_load(0, epoch=7, seq=8)))
    assert life.ledger.reports[0].seq == 8
    assert life.books.stale_reports == 0
    life.drain_reports(Queued(wire.encode_load(0, epoch=7, seq=8)))  # a duplicate, alone: stale
    assert life.books.stale_reports == 1
