"""The controller end to end: real rank processes, real ZMQ sockets, the client SDK.

Ranks are ``python -m dpcore.sdk.echo`` processes (the worker SDK's minimal rank). The
controller runs in a thread of the test process, except for the ``dpcore serve`` test.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque

import httpx
import msgpack
import pytest
import zmq

from dpcore import wire
from dpcore.errors import RequestRejected
from dpcore.manager import PolicyManager
from dpcore.runtime.controller import Controller
from dpcore.runtime.local import start_rank_process, wait_for
from dpcore.sdk import Client

pytestmark = pytest.mark.e2e

class Ranks:
    """Echo rank processes attached to one controller's endpoints."""

    def __init__(self, controller: Controller, heartbeat_s: float = 0.1) -> None:
        self.c = controller
        self.heartbeat_s = heartbeat_s
        self.procs: dict[int, subprocess.Popen] = {}

    def start(self, rank: int, *args: str) -> None:
        eps = self.c.endpoints
        self.procs[rank] = start_rank_process(rank, eps.dispatch[rank], eps.report, *args, heartbeat_s=self.heartbeat_s)

    def wait_ready(self, ranks=None, timeout_s=15.0) -> None:
        ledger = self.c.ledger
        ranks = list(self.procs) if ranks is None else ranks
        wait_for(lambda: all(ledger.reported[r] and ledger.is_active(r) for r in ranks), timeout_s, f"ranks {ranks}")

    def kill(self, rank: int) -> None:
        p = self.procs.pop(rank)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()


@contextlib.contextmanager
def cluster(method: str, dp_size: int = 4, rank_args=None, start_ranks=True, **kw):
    manager = PolicyManager.from_method(method, dp_size=dp_size, disaggregation_mode=kw.pop("mode", None))
    c = Controller(manager, **kw)
    c.start()
    ranks = Ranks(c)
    client = None
    try:
        if start_ranks:
            for r in range(dp_size):
                ranks.start(r, *((rank_args or {}).get(r, ())))
            ranks.wait_ready()
        client = Client(c.endpoints.ingress)
        yield c, ranks, client
    finally:
        if client is not None:
            client.close()
        if c._thread is not None and c._thread.is_alive():
            c.stop()
        else:
            c.close()
        ranks.stop()


def submit_all(client: Client, n: int, prefix: str = "r", **fields) -> list[str]:
    rids = [f"{prefix}{i}" for i in range(n)]
    for rid in rids:
        client.submit(rid, **fields)
    return rids


def by_rank(replies) -> collections.Counter:
    return collections.Counter(r.rank for r in replies if r.kind == "out")


def assert_balanced(stats) -> None:
    assert stats["balanced"] == {"received": True, "dispatched": True}, stats
    assert stats["internal_errors"] == 0
    for row in stats["per_rank"]:
        assert row["dispatched"] == row["completed"] + row["failed"] + row["redispatched"] + row["in_flight"], row


# --------------------------------------------------------------------------- policies


@pytest.mark.parametrize("method", ["round_robin", "total_requests", "total_tokens", "cache_aware", "follow_bootstrap_room"])
def test_every_first_party_policy_dispatches(method):
    with cluster(method) as (c, _, client):
        n = 40 if method == "cache_aware" else 200
        rooms = {}
        groups = {}
        replies = []
        for i in range(n):
            rid = f"r{i}"
            if method == "follow_bootstrap_room":
                rooms[rid] = (i * 7919) % 1000
                client.submit(rid, num_tokens=10 + i, bootstrap_room=rooms[rid])
            elif method == "cache_aware":
                g = i % 8  # 8 distinct 256-token prefixes, each followed by a unique tail
                groups[rid] = g
                client.submit(rid, token_ids=[g * 1000 + t for t in range(256)] + [i] * 64)
                if g == 7:  # rounds of one request per group, as turns of 8 conversations
                    replies += client.wait_all(10)
            else:
                client.submit(rid, num_tokens=10 + (i % 5) * 100)
        replies += client.wait_all(20)
        assert len(replies) == n and all(r.kind == "out" and r.final for r in replies)
        ranks = by_rank(replies)
        if method == "round_robin":
            assert ranks == {0: 50, 1: 50, 2: 50, 3: 50}
        elif method == "follow_bootstrap_room":
            assert all(r.rank == rooms[r.rid] % 4 for r in replies)
            client.submit("no-room", num_tokens=5)
            (rej,) = client.wait_all(5)
            assert (rej.kind, rej.code) == ("rej", "missing_bootstrap_room")
        elif method == "cache_aware":
            home = {groups[r.rid]: r.rank for r in replies[:8]}
            moved = [r.rid for r in replies[8:] if r.rank != home[groups[r.rid]]]
            assert not moved, (home, moved)  # every later request follows its cached prefix
            assert len(ranks) >= 2
        else:
            assert len(ranks) == 4 and min(ranks.values()) >= 25, ranks
        wait_for(lambda: c.stats()["in_flight"] == 0, 5, "completions reported")
        st = c.consistent_stats()
        assert st["completed"] == st["dispatched"] == n
        assert_balanced(st)
        assert sum(v for (p, _), v in c.books.decision_reasons.items() if p == method) >= n


def test_tcp_endpoints_on_random_loopback_ports():
    from dpcore.runtime.controller import ControllerEndpoints

    with cluster("round_robin", endpoints=ControllerEndpoints.tcp(4), curve=False) as (c, _, client):
        assert all(e.startswith("tcp://127.0.0.1:") and not e.endswith(":*") for e in c.endpoints.dispatch)
        assert client.reply_endpoint.startswith("tcp://127.0.0.1:")
        submit_all(client, 40, num_tokens=5)
        assert by_rank(client.wait_all(10)) == {0: 10, 1: 10, 2: 10, 3: 10}


@pytest.mark.parametrize("method", ["total_requests", "total_tokens"])
def test_load_reports_change_decisions(method):
    # Rank 0 reports 1,000 waiting requests (100k tokens) it was never sent by this controller.
    with cluster(method, rank_args={0: ("--extra-load", "1000")}) as (c, _, client):
        wait_for(lambda: c.ledger.requests[0] >= 1000, 5, "rank 0's report")
        submit_all(client, 200, num_tokens=50)
        ranks = by_rank(client.wait_all(20))
        assert ranks[0] == 0 and sum(ranks.values()) == 200, ranks


def test_burst_between_reports_spreads_evenly_then_shutdown():
    # --no-admit ranks keep reporting "empty, nothing admitted": the 1,000 dispatches are only
    # known to the ledger as unacknowledged, and must still spread 250 each.
    with cluster("total_requests", rank_args={r: ("--no-admit",) for r in range(4)}) as (c, _, client):
        submit_all(client, 1000, num_tokens=100)
        wait_for(lambda: c.stats()["dispatched"] == 1000, 10, "1000 dispatches")
        per = [row["dispatched"] for row in c.stats()["per_rank"]]
        assert max(per) - min(per) <= 1 and sum(per) == 1000, per

        c.request_stop(drain_timeout_s=0.5)
        client.submit("late", num_tokens=1)
        replies = client.wait_all(10)
        kinds = collections.Counter((r.kind, r.code) for r in replies)
        assert kinds == {("fail", "controller_shutdown"): 1000, ("rej", "shutting_down"): 1}, kinds
        c._thread.join(5)
        st = c.stats()
        assert st["failed"] == 1000 and st["rejected"] == 1 and st["in_flight"] == 0
        assert_balanced(st)


# --------------------------------------------------------------------------- bad input


def test_router_ranks_followed_and_bad_input_rejected_while_serving():
    with cluster("round_robin") as (c, _, client):
        raw = zmq.Context.instance().socket(zmq.PUSH)
        raw.linger = 0
        raw.connect(c.endpoints.ingress)
        try:
            client.submit("a0", num_tokens=5)
            for r in range(4):
                client.submit(f"routed{r}", num_tokens=5, routed_dp_rank=r)
            client.submit("dep2", num_tokens=5, data_parallel_rank=2)
            client.submit("both", num_tokens=5, routed_dp_rank=1, data_parallel_rank=3)
            for i, bad in enumerate([7, -1, "x", 1.5, True]):
                client.submit(f"bad{i}", num_tokens=5, routed_dp_rank=bad)
            client.submit("baddep", num_tokens=5, data_parallel_rank=4)
            # garbage without a usable reply endpoint: counted, never answered
            raw.send(b"\x00garbage")
            raw.send_multipart([msgpack.packb({"v": 9, "t": "req"}), b""])
            raw.send_multipart([msgpack.packb({"v": 1, "t": "req", "rid": "x", "n": 1}), b""])
            # broken header that names its sender: rejected back
            raw.send_multipart([msgpack.packb({"v": 1, "t": "req", "rid": "neg", "n": -3, "reply": client.reply_endpoint}), b""])
            raw.send_multipart([wire.encode_request("3f", num_tokens=1, reply=client.reply_endpoint), b"", b"extra"])
            client.pending.update({"neg", "3f"})
            client.submit("a1", num_tokens=5)
            replies = {r.rid: r for r in client.wait_all(10)}
        finally:
            raw.close()
        assert not client.pending
        assert replies["a0"].kind == replies["a1"].kind == "out"
        for r in range(4):
            assert (replies[f"routed{r}"].kind, replies[f"routed{r}"].rank) == ("out", r)
        assert replies["dep2"].rank == 2 and replies["both"].rank == 1  # routed_dp_rank wins
        for rid in [f"bad{i}" for i in range(5)] + ["baddep"]:
            assert (replies[rid].kind, replies[rid].code) == ("rej", "invalid_rank"), replies[rid]
        assert "out of range [0, 4)" in replies["bad0"].msg and "not an integer" in replies["bad2"].msg
        assert replies["neg"].code == replies["3f"].code == "malformed_request"
        st = c.consistent_stats()
        assert st["bad_frames"] == 3 and st["rejected"] == 8 and st["received"] == 16
        wait_for(lambda: c.stats()["in_flight"] == 0, 5, "completions")
        assert_balanced(c.consistent_stats())


def test_full_rank_uses_backlog_then_rejects_busy_then_flushes():
    # Rank 3 is not running yet: its socket has no peer, so every send would block.
    with cluster("round_robin", backlog=2, heartbeat_timeout_s=30) as (c, ranks, client):
        ranks.kill(3)
        submit_all(client, 40, num_tokens=5)
        replies = []
        deadline = time.monotonic() + 10
        while len(replies) < 38 and time.monotonic() < deadline:  # rank 3's two stay pending
            replies += client.poll(0.1)
        kinds = collections.Counter((r.kind, r.code) for r in replies)
        assert kinds == {("out", ""): 30, ("rej", "rank_busy"): 8}, kinds
        assert c.stats()["per_rank"][3]["backlog"] == 2
        ranks.start(3)
        late = client.wait_all(10)
        assert [(r.kind, r.rank) for r in late] == [("out", 3), ("out", 3)]
        assert c.stats()["per_rank"][3]["rejected"] == 8
        assert_balanced(c.consistent_stats())


def test_control_messages_are_broadcast(tmp_path):
    from dpcore.sdk import Worker

    manager = PolicyManager.from_method("round_robin", dp_size=3)
    with Controller(manager) as c:
        c.start()
        seen = {r: [] for r in range(3)}
        workers = [
            Worker(r, dispatch_endpoint=c.endpoints.dispatch[r], report_endpoint=c.endpoints.report,
                   on_control=seen[r].append)
            for r in range(3)
        ]  # fmt: skip
        try:
            wait_for(lambda: all(c.ledger.reported), 5, "hello reports")
            with Client(c.endpoints.ingress) as client:
                client.control("flush_cache", {"reason": "test"})
                wait_for(lambda: c.stats()["controls"] == 1, 5, "the control message at the controller")
            c.broadcast("pause")
            deadline = time.monotonic() + 5
            while not all(len(s) == 2 for s in seen.values()) and time.monotonic() < deadline:
                for w in workers:
                    assert w.recv(0.01) == []
            assert all(s == [wire.Control("flush_cache", {"reason": "test"}), wire.Control("pause")] for s in seen.values()), seen
            assert c.stats()["controls"] == 2
        finally:
            for w in workers:
                w.close()


# --------------------------------------------------------------------------- liveness


def test_killed_rank_goes_inactive_gets_nothing_and_rejoins():
    timeout = 1.0
    # Requests stay 1 s on their rank: rank 2 still holds the ones it admitted when it is
    # killed, however late this test gets to run after seeing them admitted.
    with cluster("round_robin", heartbeat_timeout_s=timeout, rank_args={r: ("--delay-s", "1.0") for r in range(4)}) as (c, ranks, client):
        sent = 0

        def send(n):
            nonlocal sent
            for _ in range(n):
                client.submit(f"r{sent}", num_tokens=10)
                sent += 1

        send(100)
        wait_for(lambda: c.ledger.reports[2] is not None and c.ledger.reports[2].acked_seq >= 0, 5, "rank 2 admitted")
        assert c.stats()["per_rank"][2]["in_flight"] > 0  # admitted, running requests
        t_kill = time.monotonic()
        ranks.kill(2)
        while c.ledger.is_active(2):
            send(5)
            time.sleep(0.02)
            assert time.monotonic() - t_kill < timeout + 0.5, "rank 2 not marked inactive within its deadline"
        detected = time.monotonic() - t_kill
        at_death = c.stats()["per_rank"][2]["dispatched"]
        send(100)
        replies = client.wait_all(10)
        assert not client.pending
        wait_for(lambda: c.stats()["in_flight"] == 0, 5, "completions reported")
        st = c.consistent_stats()
        assert st["per_rank"][2]["dispatched"] == at_death  # nothing went to the dead rank
        assert st["per_rank"][2]["in_flight"] == 0
        assert st["failed_by_code"].get("rank_died", 0) >= 1
        # Every request ended exactly once, and the controller's books agree with the client.
        assert len(replies) == len({r.rid for r in replies}) == sent
        assert st["completed"] + st["failed"] + st["rejected"] == sent
        assert sum(r.kind == "rej" for r in replies) == st["rejected"]
        assert_balanced(st)

        ranks.start(2, "--delay-s", "0.3")
        ranks.wait_ready([2])
        send(40)
        assert by_rank(client.wait_all(10))[2] == 10  # round robin includes it again
        print(f"rank 2 detected inactive {detected:.2f}s after SIGKILL (timeout {timeout}s)")


def test_unadmitted_requests_move_to_live_ranks_when_rank_dies():
    with cluster("round_robin", heartbeat_timeout_s=0.5, rank_args={3: ("--no-admit",)}) as (c, ranks, client):
        submit_all(client, 40, num_tokens=10)
        wait_for(lambda: c.stats()["per_rank"][3]["in_flight"] == 10, 5, "10 requests stuck on rank 3")
        ranks.kill(3)
        replies = client.wait_all(10)
        assert len(replies) == 40 and all(r.kind == "out" and r.rank != 3 for r in replies)
        wait_for(lambda: c.stats()["in_flight"] == 0, 5, "completions reported")
        st = c.consistent_stats()
        assert st["per_rank"][3]["redispatched"] == 10 and st["failed"] == 0
        assert st["completed"] == 40 and st["dispatched"] == 50
        assert_balanced(st)


def test_rank_restarted_before_its_deadline_is_a_new_life():
    # Rank 1 holds 10 admitted requests (1 s each), dies and is back well within the 3 s
    # deadline: its old requests fail once, the new life serves what comes next.
    with cluster("round_robin", heartbeat_timeout_s=3.0, rank_args={1: ("--delay-s", "1.0")}) as (c, ranks, client):
        submit_all(client, 40, prefix="a", num_tokens=10)
        wait_for(lambda: c.ledger.reports[1] is not None and c.ledger.reports[1].acked_seq >= 9, 5, "rank 1 admitted")
        ranks.kill(1)
        ranks.start(1)
        ranks.wait_ready([1])
        assert c.ledger.is_active(1)  # never declared dead: the restart was quicker
        submit_all(client, 40, prefix="b", num_tokens=10)
        replies = client.wait_all(15)
        assert not client.pending and len({r.rid for r in replies}) == len(replies) == 80
        fails = {r.rid for r in replies if r.kind == "fail"}
        assert len(fails) == 10 and all(rid.startswith("a") for rid in fails)
        assert by_rank(r for r in replies if r.rid.startswith("b"))[1] == 10
        wait_for(lambda: c.stats()["in_flight"] == 0, 5, "completions reported")
        st = c.consistent_stats()
        assert st["failed_by_code"] == {"rank_died": 10}
        assert_balanced(st)


def test_no_prefix_hit_claimed_on_a_killed_and_revived_rank():
    # cache_aware remembers which rank holds a prefix; after the rank is killed (its cache
    # is gone) and started again, the old prefix must not be called a hit there.
    old = tuple(range(100, 108))
    with cluster("cache_aware", dp_size=2, heartbeat_timeout_s=0.5) as (c, ranks, client):
        reasons = c.books.decision_reasons
        client.submit("warm", num_tokens=512, block_hashes=old)
        (first,) = client.wait_all(5)
        holder = first.rank
        client.submit("again", num_tokens=576, block_hashes=(*old, 1))
        (again,) = client.wait_all(5)
        assert again.rank == holder and reasons.get(("cache_aware", "prefix_hit")) == 1
        # (Completed in the books first: nothing is re-dispatched with the old prefix.)
        wait_for(lambda: c.stats()["in_flight"] == 0, 5, "completions reported")
        ranks.kill(holder)
        wait_for(lambda: not c.ledger.is_active(holder), 5, f"rank {holder} inactive")
        ranks.start(holder)
        ranks.wait_ready([holder])
        client.submit("after", num_tokens=576, block_hashes=(*old, 2))
        (after,) = client.wait_all(5)
        assert after.kind == "out"
        assert reasons.get(("cache_aware", "prefix_hit")) == 1, reasons
        # Whichever rank served it holds the old prefix now, and that is a hit again.
        client.submit("last", num_tokens=640, block_hashes=(*old, 2, 9))
        (last,) = client.wait_all(5)
        assert last.rank == after.rank and reasons.get(("cache_aware", "prefix_hit")) == 2, reasons


# --------------------------------------------------------------------------- PD


class FakePD:
    """A stand-in PD handler: even rooms resolve at once, odd ones when the test says."""

    def __init__(self, ctx: zmq.Context) -> None:
        ep = f"inproc://fake-pd-{uuid.uuid4().hex}"
        self.socket = ctx.socket(zmq.PULL)
        self.socket.bind(ep)
        self._signal = ctx.socket(zmq.PUSH)
        self._signal.connect(ep)
        self._results: deque = deque()
        self.submitted: list[str] = []
        self.registered: list[tuple[str, int]] = []

    def on_prefill_dispatch(self, request, rank):
        self.registered.append((request.rid, rank))

    def resolve_now(self, request):
        return None if request.bootstrap_room % 2 else 0

    def submit(self, request):
        self.submitted.append(request.rid)

    def answer(self, rid, result):  # test thread
        self._results.append((rid, result))
        self._signal.send(b"")

    def drain(self):
        while True:
            try:
                self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        while self._results:
            out.append(self._results.popleft())
        return out

    def close(self):
        self.socket.close(linger=0)
        self._signal.close(linger=0)


def test_pd_decode_mode_a_validates_and_carries_prefill_rank():
    with cluster("round_robin", dp_size=2, mode="decode", prefill_dp_size=3) as (c, _, client):
        for pdr in (0, 1, 2):
            client.submit(f"ok{pdr}", num_tokens=5, routed_dp_rank=pdr % 2, disagg_prefill_dp_rank=pdr, bootstrap_room=1)
        client.submit("bad", num_tokens=5, disagg_prefill_dp_rank=3)
        client.submit("none", num_tokens=5, bootstrap_room=4)
        replies = {r.rid: r for r in client.wait_all(10)}
        for pdr in (0, 1, 2):
            r = replies[f"ok{pdr}"]
            assert (r.kind, r.rank, r.meta["prefill_rank"]) == ("out", pdr % 2, pdr)
        assert (replies["bad"].code, "[0, 3)" in replies["bad"].msg) == ("invalid_rank", True)
        assert replies["none"].code == "prefill_rank_unknown"


def test_pd_handler_plug_point_decode_and_prefill():
    ctx = zmq.Context()
    pd = FakePD(ctx)
    try:
        with cluster("round_robin", dp_size=2, mode="decode", prefill_dp_size=4, pd=pd, zmq_ctx=ctx) as (c, _, client):
            for i in range(6):
                client.submit(f"d{i}", num_tokens=5, bootstrap_room=i)
            wait_for(lambda: len(pd.submitted) == 3, 5, "odd rooms parked")
            st = c.consistent_stats()
            assert st["parked"] == 3 and st["balanced"]["received"]
            pd.answer("d1", 3)
            pd.answer("d3", 2)
            pd.answer("d5", RequestRejected("room 5 not registered in time", rid="d5"))
            replies = {r.rid: r for r in client.wait_all(10)}
            assert {rid: r.meta["prefill_rank"] for rid, r in replies.items() if r.kind == "out"} == {
                "d0": 0, "d2": 0, "d4": 0, "d1": 3, "d3": 2,
            }  # fmt: skip
            assert (replies["d5"].kind, replies["d5"].code) == ("rej", "rejected")
            assert c.stats()["parked"] == 0
    finally:
        pd.close()
        ctx.term()

    ctx = zmq.Context()
    pd = FakePD(ctx)
    try:
        with cluster("total_requests", dp_size=2, mode="prefill", pd=pd, zmq_ctx=ctx) as (c, _, client):
            submit_all(client, 10, num_tokens=5, bootstrap_room=1)
            replies = client.wait_all(10)
            assert sorted(pd.registered) == sorted((r.rid, r.rank) for r in replies)
    finally:
        pd.close()
        ctx.term()


# --------------------------------------------------------------------------- dpcore serve


def test_serve_process_metrics_and_sigterm(tmp_path):
    eps_file = tmp_path / "eps.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpcore", "--log-json", "serve", "--dp-size", "2", "--load-balance-method",
         "total_requests", "--endpoints-file", str(eps_file), "--metrics-port", "0", "--drain-timeout", "10"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = []
    try:
        wait_for(eps_file.exists, 15, "the endpoints file")
        eps = json.loads(eps_file.read_text())
        for r in range(2):
            procs.append(start_rank_process(r, eps["dispatch"][r], eps["report"], "--delay-s", "0.5"))
        with Client(eps["ingress"]) as client:
            wait_for(lambda: 'dpcore_rank_active{rank="1"} 1.0' in httpx.get(eps["metrics"]).text, 10, "ranks up")
            submit_all(client, 50, num_tokens=20)
            wait_for(lambda: "dpcore_rank_in_flight_requests{rank=\"0\"} 25.0" in httpx.get(eps["metrics"]).text, 5, "dispatches")
            text = httpx.get(eps["metrics"]).text
            assert 'dpcore_rank_dispatched_total{rank="0"} 25.0' in text
            assert 'dpcore_rank_dispatched_total{rank="1"} 25.0' in text
            decisions = re.findall(r'dpcore_decisions_total\{policy="total_requests",reason="\w+"\} ([0-9.]+)', text)
            assert sum(map(float, decisions)) == 50
            assert "dpcore_decision_latency_seconds_count 50.0" in text
            assert 'dpcore_load_imbalance{load="requests"} 1.0' in text
            client.abort("never-sent")  # an abort of a request the controller does not hold
            wait_for(lambda: 'dpcore_aborts_total{outcome="unknown",reason="caller"} 1.0' in httpx.get(eps["metrics"]).text,
                     5, "the abort counted")  # fmt: skip
            proc.send_signal(signal.SIGTERM)  # requests are still running: they must drain
            replies = client.wait_all(10)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err
        assert len(replies) == 50 and all(r.kind == "out" for r in replies)
        assert "final counters" in out and "True" in out
        assert "aborts 1: by reason {'caller': 1}, by outcome {'unknown': 1}" in out, out
        stopped = [json.loads(line) for line in err.splitlines() if '"controller_stopped"' in line]
        assert stopped and stopped[0]["completed"] == 50 and stopped[0]["balanced"] is True
        assert not eps_file.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in procs:
            p.terminate()
            p.wait(5)


def test_serve_rejects_bad_runtime_options(dpcore_exe):
    r = subprocess.run([*dpcore_exe, "serve", "--heartbeat-timeout", "0"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "heartbeat-timeout must be > 0" in r.stderr
    r = subprocess.run(
        [*dpcore_exe, "serve", "--transport", "tcp", "--port-base", "70000"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "--port-base" in r.stderr


def test_idle_loop_does_not_spin():
    # Informational bound, generous on a shared 2-core box: a spinning loop burns ~100%.
    with cluster("round_robin", dp_size=2) as (c, _, _client):
        tid = c._thread.native_id
        before = _thread_cpu(tid)
        time.sleep(1.0)
        used = _thread_cpu(tid) - before
        assert used < 0.2, f"controller thread used {used:.3f}s CPU in 1s idle"


def _thread_cpu(tid: int) -> float:
    with open(f"/proc/{os.getpid()}/task/{tid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(parts[11]) + int(parts[12])) / tick


def test_a_metrics_scrape_reads_the_controller_on_its_loop_thread():
    """Prometheus gets one snapshot taken by the loop, never counters read from its own thread."""
    from prometheus_client import generate_latest

    from dpcore.runtime.local import LocalCluster
    from dpcore.runtime.metrics import make_registry

    with LocalCluster("round_robin", 2, client=False) as lc:
        c = lc.controller
        readers = []
        stats = c.stats

        def stats_seen_from() -> dict:
            readers.append(threading.current_thread())
            return stats()

        c.stats = stats_seen_from
        text = generate_latest(make_registry(c)).decode()
        loop = c._thread
    assert 'dpcore_rank_active{rank="1"} 1.0' in text
    assert readers and all(t is loop for t in readers)
