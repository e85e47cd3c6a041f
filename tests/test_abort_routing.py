"""Aborts: routed to the one rank holding the request, and counted by reason and outcome.

The end-to-end tests run the controller in a thread of the test process and each rank as a
process of its own (``RANK`` below, on the worker SDK), which records every abort message
its socket delivers and tells it when asked (a request whose id starts with ``probe``).
The in-flight table's id index and the abort counters are tested on their own below.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from dpcore import wire
from dpcore.manager import PolicyManager
from dpcore.model import Request
from dpcore.runtime.books import Books
from dpcore.runtime.controller import Controller
from dpcore.runtime.inflight import InFlight, InFlightTable
from dpcore.runtime.local import wait_for
from dpcore.sdk import Client

#: A rank that records the request id of every abort message it receives, and of every
#: request it stopped because of one (the abort came after its dispatch). ``hold``: admits
#: each request and keeps it running until it is aborted (then finishes it, sending
#: nothing); ``stuck``: receives, never admits, ignores aborts. A request ``probe...`` is
#: answered at once with both lists.
RANK = r"""
import sys
from dpcore import wire
from dpcore.sdk.worker import Worker

rank, dispatch, report, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
seen, stopped = [], []

class Recording(Worker):
    def _control(self, ctl):
        if ctl.op == wire.ABORT:
            seen.append(wire.abort_target(ctl)[0])
        super()._control(ctl)

w = Recording(rank, dispatch_endpoint=dispatch, report_endpoint=report, heartbeat_interval_s=0.1)
if mode == "hold":
    def stop(work):
        stopped.append(work.rid)
        w.finish(work)
    w.on_abort = stop
while True:
    for work in w.recv(0.1):
        if work.rid.startswith("probe"):
            w.send(work, {"aborts": seen, "stopped": stopped})
        elif mode == "hold":
            w.admit(work)
    w.report(0, 0, 0)
"""


class Cluster:
    """A round_robin controller and one ``RANK`` process per entry of *modes*."""

    def __init__(self, modes: list[str]) -> None:
        self.c = Controller(PolicyManager.from_method("round_robin", dp_size=len(modes)), heartbeat_timeout_s=1.0)
        self.procs: dict[int, subprocess.Popen] = {}
        eps = self.c.endpoints
        for r, mode in enumerate(modes):
            cmd = [sys.executable, "-c", RANK, str(r), eps.dispatch[r], eps.report, mode]
            self.procs[r] = subprocess.Popen(cmd)
        self.c.start()
        ledger = self.c.ledger
        wait_for(lambda: all(ledger.reported[r] and ledger.is_active(r) for r in self.procs), 20, "ranks up")
        self.client = Client(self.c.endpoints.ingress)

    def stats(self) -> dict:
        return self.c.consistent_stats()

    def probe(self, rank: int) -> dict[str, list[str]]:
        """The request ids of the aborts *rank* has received (``aborts``), and of the
        requests it stopped because of one (``stopped``)."""
        rid = f"probe{rank}-{time.monotonic_ns()}"
        self.client.submit(rid, num_tokens=1, routed_dp_rank=rank)
        replies = [r for r in self.client.wait_all(10) if r.rid == rid]
        assert replies and replies[-1].kind == "out", replies
        return {k: replies[-1].meta[k] for k in ("aborts", "stopped")}

    def kill(self, rank: int) -> None:
        p = self.procs.pop(rank)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def close(self) -> None:
        self.client.close()
        self.c.stop()
        for p in self.procs.values():
            p.kill()
            p.wait(10)


@pytest.fixture
def cluster(request: pytest.FixtureRequest):
    cl = Cluster(request.param)
    yield cl
    cl.close()


@pytest.mark.e2e
@pytest.mark.parametrize("cluster", [["hold", "hold", "hold"]], indirect=True)
def test_an_abort_reaches_only_the_rank_holding_its_request(cluster: Cluster) -> None:
    cl = cluster
    rids = [f"r{i}" for i in range(6)]  # round_robin: r0, r3 on rank 0; r1, r4 on 1; r2, r5 on 2
    for rid in rids:
        cl.client.submit(rid, num_tokens=10)
    wait_for(lambda: cl.stats()["in_flight"] == 6, 10, "six requests running")
    cl.client.abort("r1")  # reason: caller
    cl.client.abort("r5", wire.ABORT_TIMEOUT)
    cl.client.abort("never-sent", wire.ABORT_CLIENT_GONE)
    # An old sender's abort (no reason), and one from another sender: neither matches r3's
    # sender except the first.
    cl.client._tx.send(wire.encode_abort("r3", cl.client.reply_endpoint))
    cl.client._tx.send(wire.encode_abort("r0", "ipc:///tmp/another-sender"))
    # A request aborted right after it was sent: the controller reads both in order from the
    # one connection, and the rank gets the abort behind the dispatch.
    cl.client.submit("fast", num_tokens=10, routed_dp_rank=2)
    cl.client.abort("fast")
    # An abort that names no request is a bad frame: counted there, sent nowhere.
    bad0 = cl.stats()["bad_frames"]
    cl.client._tx.send(wire.encode_ctl(wire.ABORT, {"rid": 5}))
    st = wait_for(lambda: (s := cl.stats())["in_flight"] == 3 and s["aborts"]["total"] == 6 and s["bad_frames"] > bad0
                  and s, 10, "aborts settled")  # fmt: skip
    assert st["bad_frames"] == bad0 + 1 and st["controls"] == 6, st
    assert st["aborts"]["by_outcome"] == {"forwarded": 4, "unknown": 2}, st["aborts"]
    assert st["aborts"]["by_reason"] == {"caller": 2, "timeout": 1, "client_gone": 1, "unspecified": 2}, st["aborts"]
    # Each abort went to its request's rank, and to no other, after the request's dispatch.
    assert [cl.probe(r)["aborts"] for r in range(3)] == [["r3"], ["r1"], ["r5", "fast"]]
    assert [cl.probe(r)["stopped"] for r in range(3)] == [["r3"], ["r1"], ["r5", "fast"]]
    # The aborted requests ended on their ranks (acknowledged, nothing sent): completed.
    assert [row["completed"] for row in st["per_rank"]] == [1, 1, 2]
    assert st["failed"] == 0 and st["balanced"] == {"received": True, "dispatched": True}, st
    assert cl.client.wait_all(0.3) == []  # nothing came back for an aborted request


@pytest.mark.e2e
@pytest.mark.parametrize("cluster", [["hold", "stuck"]], indirect=True)
def test_an_aborted_request_is_not_dispatched_again_when_its_rank_dies(cluster: Cluster) -> None:
    """The abort went to the rank holding the request; that rank dies before admitting it:
    the request fails ``aborted`` instead of being re-dispatched to a rank that never got
    the abort. A second abort of it is counted ``repeated`` and sent nowhere."""
    cl = cluster
    cl.client.submit("kept", num_tokens=10)  # rank 0
    cl.client.submit("gone", num_tokens=10)  # rank 1, which never admits
    wait_for(lambda: cl.stats()["in_flight"] == 2, 10, "both dispatched")
    cl.client.abort("gone")
    cl.client.abort("gone", wire.ABORT_CLIENT_GONE)
    wait_for(lambda: cl.stats()["aborts"]["total"] == 2, 10, "both aborts at the controller")
    cl.kill(1)
    st = wait_for(lambda: (s := cl.stats())["failed"] == 1 and s, 10, "rank 1's request settled")
    assert st["failed_by_code"] == {"aborted": 1} and st["redispatched"] == 0, st
    assert st["aborts"]["by_outcome"] == {"forwarded": 1, "repeated": 1}, st["aborts"]
    assert cl.probe(0)["aborts"] == []  # rank 0 got neither abort
    assert st["in_flight"] == 1 and st["balanced"] == {"received": True, "dispatched": True}, st


# --------------------------------------------------------------------------- units


def _entry(rid: str, reply: str, rank: int) -> InFlight:
    return InFlight(Request(rid, num_tokens=1), reply, b"h", b"p", None, rank)


def test_the_in_flight_table_finds_a_request_by_id_and_sender() -> None:
    t = InFlightTable(2)
    a, b = _entry("x", "ipc:///a", 0), _entry("x", "ipc:///b", 1)
    t.add(0, 0, a)
    assert t.find("x", "ipc:///a") == [a] and t.find("x", "ipc:///b") == [] and t.find("y", "ipc:///a") == []
    t.add(1, 0, b)  # another sender's request of the same id
    assert t.find("x", "ipc:///a") == [a] and t.find("x", "ipc:///b") == [b]
    assert t.complete(0, [0]) == 0
    assert t.find("x", "ipc:///a") == [] and t.find("x", "ipc:///b") == [b]
    # Moved off a dead rank: the index follows the new entry.
    assert t.pop(1, 0) is b
    assert t.find("x", "ipc:///b") == []
    moved = _entry("x", "ipc:///b", 0)
    t.add(0, 1, moved)
    assert t.find("x", "ipc:///b") == [moved]
    seen: list[tuple[str, int]] = []
    t.ended = lambda rid, out: seen.append((rid, out))
    assert t.complete(0, [1, 7], [5, 5]) == 1 and seen == [("x", 5)]
    assert t.find("x", "ipc:///b") == []


def test_the_index_keeps_every_entry_of_a_shared_id() -> None:
    t = InFlightTable(3)
    es = [_entry("same", "ipc:///a", r) for r in range(3)]
    for e in es:
        t.add(e.rank, 0, e)
    assert t.find("same", "ipc:///a") == es
    t.pop(1, 0)
    assert t.find("same", "ipc:///a") == [es[0], es[2]]
    t.complete(0, [0])
    assert t.find("same", "ipc:///a") == [es[2]]
    t.add(1, 1, es[1])
    assert list(dict(t.drain())) == [1, 2] and t.find("same", "ipc:///a") == []


def test_abort_counters_by_reason_and_outcome() -> None:
    b = Books(1)
    assert b.abort_stats() == {"total": 0, "by_reason": {}, "by_outcome": {}}
    b.aborted("caller", "forwarded")
    b.aborted("caller", "unknown")
    b.aborted("other", "unknown")
    assert b.abort_stats() == {
        "total": 3, "by_reason": {"caller": 2, "other": 1}, "by_outcome": {"forwarded": 1, "unknown": 2},
    }  # fmt: skip
    assert b.metrics()["aborts_by_reason_outcome"] == {("caller", "forwarded"): 1, ("caller", "unknown"): 1,
                                                      ("other", "unknown"): 1}  # fmt: skip
