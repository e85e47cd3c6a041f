"""Forged load reports without CURVE, against a controller with real rank processes.

The report socket is shared by every rank, so without CURVE any process that reaches it
can send a report for any rank. The controller believes a report only with evidence from
the rank's own dispatch socket (:mod:`dpcore.runtime.connwatch`): a new epoch for a live
rank needs a real reconnection there, and a report for a rank nobody is connected as is no
sign of life. A real restart (SIGKILL, start again) is still a new life at once.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

import pytest

from dpcore import wire
from dpcore.runtime.local import LocalCluster, wait_for

pytestmark = pytest.mark.e2e

#: Long enough that no rank goes inactive by silence during a test: whatever changes a
#: rank's life here is a report, a connection or its absence.
LONG_HEARTBEAT_TIMEOUT_S = 60.0
#: Requests stay this long on their rank, so a rank holds admitted (running) work.
DELAY_S = "2.0"

#: A separate process that sends load reports for a rank it is not, optionally while
#: holding a PULL connection of its own on that rank's dispatch socket.
FORGER = """
import sys, time
import zmq
from dpcore import wire
report, dispatch, rank, epoch, count, interval = sys.argv[1:7]
ctx = zmq.Context()
if dispatch != "-":
    pull = ctx.socket(zmq.PULL)
    pull.connect(dispatch)
    time.sleep(0.3)  # the connection is accepted and its handshake done before any report
push = ctx.socket(zmq.PUSH)
push.connect(report)
for i in range(int(count)):
    push.send(wire.encode_load(int(rank), epoch=int(epoch), seq=1_000_000 + i, ack=-1))
    time.sleep(float(interval))
push.close(linger=2000)
ctx.destroy(linger=2000)
"""


def forge(lc: LocalCluster, rank: int, epoch: int, count: int, *, interval_s: float = 0.02,
          connect: bool = False) -> subprocess.Popen[bytes]:  # fmt: skip
    eps = lc.controller.endpoints
    args: Sequence[str] = (eps.report, eps.dispatch[rank] if connect else "-", str(rank), str(epoch), str(count),
                           str(interval_s))  # fmt: skip
    return subprocess.Popen([sys.executable, "-c", FORGER, *args], stdin=subprocess.DEVNULL)


def stat(lc: LocalCluster, key: str) -> int:
    return lc.controller.consistent_stats()[key]  # type: ignore[no-any-return]


def running_on(lc: LocalCluster, rank: int, n: int) -> None:
    """Until *rank* holds *n* requests, all admitted."""
    c = lc.controller

    def admitted() -> bool:
        return bool(c.on_loop(lambda: c.in_flight()[rank] == n and c.ledger.unacked(rank) == 0))

    wait_for(admitted, 15, f"rank {rank} to admit {n} requests")


def collect(lc: LocalCluster, rids: set[str], timeout_s: float = 30.0) -> dict[str, wire.Reply]:
    client = lc.client
    assert client is not None
    finals: dict[str, wire.Reply] = {}
    deadline = time.monotonic() + timeout_s
    while not rids <= finals.keys():
        assert time.monotonic() < deadline, f"no final reply for {sorted(rids - finals.keys())}"
        for r in client.poll(0.2):
            if r.final:
                assert r.rid not in finals, f"two final replies for {r.rid}"
                finals[r.rid] = r
    return finals


def test_forged_new_epoch_fails_nothing() -> None:
    # Rank 0 runs 8 admitted requests. Two other processes claim it restarted: one only
    # sends the report, one also connects to rank 0's dispatch socket first. Before the
    # controller asked for a reconnection, one such report failed all 8 (rank_died).
    with LocalCluster("round_robin", 2, rank_args={0: ("--delay-s", DELAY_S), 1: ("--delay-s", DELAY_S)},
                      heartbeat_timeout_s=LONG_HEARTBEAT_TIMEOUT_S) as lc:  # fmt: skip
        c, client = lc.controller, lc.client
        assert client is not None
        epoch = c.ledger.epoch(0)
        assert epoch is not None
        rids = {f"r{i}" for i in range(16)}
        for rid in sorted(rids):
            client.submit(rid, num_tokens=16)
        running_on(lc, 0, 8)
        for connect in (False, True):
            f = forge(lc, 0, epoch + 1, 5, connect=connect)
            assert f.wait(20) == 0
        wait_for(lambda: stat(lc, "unproven_restarts") >= 10, 10, "the forged restarts to be counted")
        assert c.ledger.epoch(0) == epoch
        finals = collect(lc, rids)
        assert all(r.kind == "out" for r in finals.values()), finals
        s = c.consistent_stats()
        assert s["failed"] == 0 and s["unproven_restarts"] == 10
        assert all(s["balanced"].values()), s


def test_real_restart_is_a_new_life_at_once() -> None:
    # SIGKILL rank 0 while it runs admitted requests and start it again: the new process's
    # connection proves the restart, so its new epoch is accepted while the old life is still
    # within its (long) heartbeat deadline; the old life's running requests fail rank_died.
    with LocalCluster("round_robin", 2, rank_args={0: ("--delay-s", DELAY_S)},
                      heartbeat_timeout_s=LONG_HEARTBEAT_TIMEOUT_S) as lc:  # fmt: skip
        c, client = lc.controller, lc.client
        assert client is not None
        epoch = c.ledger.epoch(0)
        rids = {f"a{i}" for i in range(8)}
        for rid in sorted(rids):
            client.submit(rid, num_tokens=16)
        running_on(lc, 0, 4)
        lc.kill(0)
        lc.start_rank(0, "--delay-s", "0")
        wait_for(lambda: c.ledger.epoch(0) != epoch, 20, "rank 0's new life to be accepted")
        finals = collect(lc, rids)
        kinds = sorted((r.rank, r.kind, r.code)
                       for r in finals.values())  # fmt: skip
        assert kinds == [(0, "fail", "rank_died")] * 4 + [(1, "out", "")] * 4, kinds
        more = {f"b{i}" for i in range(6)}
        for rid in sorted(more):
            client.submit(rid, num_tokens=16)
        served = collect(lc, more)
        assert {r.rank for r in served.values()} == {0, 1}
        assert all(r.kind == "out" for r in served.values())
        s = c.consistent_stats()
        assert s["unproven_restarts"] == 0 and s["failed_by_code"] == {"rank_died": 4}
        assert all(s["balanced"].values()), s


def test_forged_heartbeats_do_not_keep_a_dead_rank_active() -> None:
    # Rank 1 is SIGKILLed; another process keeps sending its heartbeats (its own epoch, so
    # no restart is claimed). Nobody is connected to rank 1's dispatch socket, so they are
    # no sign of life: rank 1 goes inactive on time and requests go to rank 0.
    with LocalCluster("round_robin", 2, heartbeat_timeout_s=1.0) as lc:
        c, client = lc.controller, lc.client
        assert client is not None
        epoch = c.ledger.epoch(1)
        assert epoch is not None
        lc.kill(1)
        f = forge(lc, 1, epoch, 150, interval_s=0.05)  # 7.5 s of heartbeats, 20 a second
        try:
            lc.wait_inactive(1, 6)
            wait_for(lambda: stat(lc, "unconnected_reports") >= 5, 5, "the forged heartbeats to be counted")
            assert not c.ledger.is_active(1)
            rids = {f"h{i}" for i in range(6)}
            for rid in sorted(rids):
                client.submit(rid, num_tokens=16)
            finals = collect(lc, rids)
            assert {(r.rank, r.kind) for r in finals.values()} == {(0, "out")}
        finally:
            f.kill()
            f.wait(10)
        assert all(c.consistent_stats()["balanced"].values())


def test_ranks_that_start_late_get_the_startup_timeout() -> None:
    # The ranks come up 2.5 heartbeat timeouts after the controller (a busy host, an engine
    # loading its model): they were never silent, they had not spoken yet. Requests sent
    # meanwhile wait for them instead of failing no_active_rank.
    with LocalCluster("round_robin", 2, start_ranks=False, heartbeat_timeout_s=1.0, startup_timeout_s=30.0) as lc:
        client = lc.client
        assert client is not None
        rids = {f"e{i}" for i in range(10)}
        for rid in sorted(rids):
            client.submit(rid, num_tokens=16)
        time.sleep(2.5)
        assert lc.controller.ledger.active_ranks == (0, 1)
        for r in range(2):
            lc.start_rank(r)
        finals = collect(lc, rids)
        assert {(r.rank, r.kind) for r in finals.values()} == {(0, "out"), (1, "out")}
        assert all(lc.controller.consistent_stats()["balanced"].values())
