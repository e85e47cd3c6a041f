"""The 23 fault cases of SGLang's DPC probe (upstream SGLang 0.5.23 dies on 10 of them), against dpcore.

SGLang 0.5.23's controller dies on 10 of these, runs attacker code on one, hangs on a dead
rank, leaks requests to a stolen socket and spins when idle. Each case here drives dpcore's
controller (a thread of this process, ``python -m dpcore.sdk.echo`` rank processes, real ZMQ
sockets) or its HTTP front (``dpcore serve`` + ``dpcore mock-worker`` + ``dpcore http-front``
processes) and ends the same way (:func:`ends_well`): no crash, no hang, the bad input
answered with a clear error where it has a sender, the next good request served, and the
books exact (the controller's counters and the client's replies agree).

====  ===============================================  ===========  =============================
case  input                                            SGLang       dpcore
====  ===============================================  ===========  =============================
1a    routed_dp_rank=7, dp 4                           DEAD         rej invalid_rank / HTTP 400
1b    routed_dp_rank=-1                                DEAD         rej invalid_rank / HTTP 400
2     follow_bootstrap_room, no bootstrap_room         DEAD         rej missing_bootstrap_room
3a    round_robin, every rank inactive                 DEAD         rej no_active_rank, rejoin
3b    every rank inactive, over HTTP                   DEAD         503 no_active_rank, rejoin
3c    total_requests, every rank inactive              survives     rej no_active_rank
4a    total_requests, ranks [T,F,T,F], burst 40        10/10/10/10  20/0/20/0 (none to inactive)
4b    total_tokens, same                               10/10/10/10  none to inactive
4c    cache_aware, same                                (n/a)        none to inactive
4d    round_robin, same                                20/0/20/0    20/0/20/0
4e    routed_dp_rank=1, rank 1 inactive                delivered    rej rank_inactive (503)
4f    data_parallel_rank / X-Data-Parallel-Rank: 1     DEAD         rej rank_inactive / HTTP 503
5a    garbage bytes                                    DEAD         counted bad frame
5b    truncated frame                                  DEAD         counted bad frame
5c    empty frame                                      DEAD         counted bad frame
5d    a valid msgpack map that is no dpcore message    to all ranks counted bad frame, to no rank
5e    no token count (input_ids=None)                  DEAD         rej malformed_request / 400
6     pickle with a __reduce__ payload                 code runs    never unpickled, no code runs
6m    msgpack ext types (PickleWrapper analogue)       code runs    inert, rejected
7     idle                                             100% core    a few % of a core
8     SIGKILL a rank mid-stream                        HANG, loss   no stall, nothing lost, rejoin
9     extra PULL on a rank's socket                    steals half  CURVE: refused, steals none
9b    unauthenticated sender / load reporter           (open)       CURVE: refused
====  ===============================================  ===========  =============================
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from dpcore import security, wire
from dpcore.runtime.controller import ControllerEndpoints
from dpcore.runtime.local import LocalCluster, cpu_seconds, fetch_status, wait_for
from dpcore.sdk import Client

pytestmark = pytest.mark.e2e

HEARTBEAT_TIMEOUT_S = 1.0
DP = 4


# --------------------------------------------------------------------------- the books


class Books:
    """Every request one client sent and the one final reply each got."""

    def __init__(self, lc: LocalCluster) -> None:
        self.lc = lc
        self.client: Client = lc.client  # type: ignore[assignment]
        self.finals: dict[str, wire.Reply] = {}
        self._n = 0
        ctx = zmq.Context.instance()
        self.raw = ctx.socket(zmq.PUSH)  # frames the SDK would never build
        self.raw.linger = 0
        self.raw.connect(lc.controller.endpoints.ingress)

    def rid(self, prefix: str = "r") -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    def submit(self, prefix: str = "r", **fields: Any) -> str:
        rid = self.rid(prefix)
        if "token_ids" not in fields:  # else the SDK counts them (hashes never outnumber blocks)
            fields.setdefault("num_tokens", 16)
        self.client.submit(rid, **fields)
        return rid

    def send_raw(self, *frames: bytes, expect: str | None = None) -> None:
        """Send *frames*; *expect*: the rid a reply must come back for."""
        self.raw.send_multipart(list(frames))
        if expect is not None:
            self.client.pending.add(expect)

    def header(self, rid: str, **h: Any) -> bytes:
        return msgpack.packb({"v": 1, "t": "req", "rid": rid, "n": 16, "reply": self.client.reply_endpoint, **h})

    def collect(self, timeout_s: float = 15.0) -> dict[str, wire.Reply]:
        """Wait for every pending request's final reply; return all finals so far."""
        deadline = time.monotonic() + timeout_s
        while self.client.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no final reply within {timeout_s}s for {sorted(self.client.pending)[:10]}")
            for r in self.client.poll(min(left, 0.2)):
                if r.final:
                    assert r.rid not in self.finals, f"two final replies for {r.rid}"
                    self.finals[r.rid] = r
        return self.finals

    def close(self) -> None:
        self.raw.close()


def ends_well(books: Books, **good_fields: Any) -> dict[str, Any]:
    """The common ending: alive, next good request served, books exact. Returns the stats."""
    c = books.lc.controller
    assert c._thread is not None and c._thread.is_alive(), "the controller loop died"
    good = books.submit("good", **good_fields)
    finals = books.collect()
    assert finals[good].kind == "out", finals[good]
    wait_for(lambda: c.stats()["in_flight"] == 0 and c.stats()["parked"] == 0, 10, "in-flight requests to settle")
    st = c.consistent_stats()
    assert st["internal_errors"] == 0
    assert st["balanced"] == {"received": True, "dispatched": True}, st
    # Every request the controller took ended exactly once, and the client saw the same.
    assert st["received"] == st["completed"] + st["failed"] + st["rejected"]
    kinds = collections.Counter(r.kind for r in finals.values())
    assert st["received"] == len(finals)
    assert st["rejected"] == kinds["rej"]
    assert st["completed"] + st["failed"] == kinds["out"] + kinds["fail"]
    return st


# --------------------------------------------------------------------------- clusters


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, tuple[LocalCluster, Books]]]:
    made: dict[str, tuple[LocalCluster, Books]] = {}
    yield made
    for lc, books in made.values():
        books.close()
        lc.close()


def cluster(clusters: dict[str, tuple[LocalCluster, Books]], name: str, method: str | None = None,
            dp_size: int = DP, **kw: Any) -> Books:  # fmt: skip
    """The running cluster *name* (made on first use, shared by this module's cases), every
    rank up. *method* defaults to *name*; *kw* go to :class:`LocalCluster`."""
    if name not in clusters:
        lc = LocalCluster(method or name, dp_size, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S, **kw)
        clusters[name] = (lc, Books(lc))
    lc, books = clusters[name]
    # A case that failed half-way must not break the next one.
    for r in range(dp_size):
        p = lc.procs.get(r)
        if p is None or p.poll() is not None:
            lc.start_rank(r)
        else:
            lc.resume(r)
    lc.wait_ready()
    books.client.pending.clear()
    return books


@pytest.fixture
def rr(clusters: dict[str, tuple[LocalCluster, Books]]) -> Books:
    return cluster(clusters, "round_robin")


def go_inactive(books: Books, ranks: list[int]) -> None:
    """SIGSTOP *ranks* and wait until the controller declares them inactive."""
    for r in ranks:
        books.lc.pause(r)
    for r in ranks:
        books.lc.wait_inactive(r, timeout_s=HEARTBEAT_TIMEOUT_S + 5)


def come_back(books: Books, ranks: list[int]) -> None:
    for r in ranks:
        books.lc.resume(r)
    books.lc.wait_ready(ranks)


def dispatched(books: Books) -> list[int]:
    return list(books.lc.controller.books.dispatched)


def reply(books: Books, rid: str) -> wire.Reply:
    return books.collect()[rid]


# --------------------------------------------------------------------------- 1, 2: bad ranks and rooms


@pytest.mark.parametrize(("case", "rank", "words"), [("1a", 7, "out of range [0, 4)"), ("1b", -1, "out of range")])
def test_case_1_out_of_range_rank(rr: Books, case: str, rank: int, words: str) -> None:
    before = dispatched(rr)
    rid = rr.submit(case, routed_dp_rank=rank)
    r = reply(rr, rid)
    assert (r.kind, r.code) == ("rej", "invalid_rank") and words in r.msg, r
    assert dispatched(rr) == before  # nothing went anywhere (never Python's negative indexing)
    ends_well(rr)


def test_case_2_follow_bootstrap_room_without_room(clusters: dict) -> None:
    books = cluster(clusters, "follow_bootstrap_room", dp_size=2)
    rid = books.submit("2")
    r = reply(books, rid)
    assert (r.kind, r.code) == ("rej", "missing_bootstrap_room"), r
    assert "bootstrap_room" in r.msg
    ok = books.submit("2-room", bootstrap_room=12345)
    assert (reply(books, ok).kind, reply(books, ok).rank) == ("out", 12345 % 2)
    ends_well(books, bootstrap_room=7)


# --------------------------------------------------------------------------- 3, 4: inactive ranks


def test_case_3a_round_robin_all_inactive_then_rejoin(rr: Books) -> None:
    go_inactive(rr, list(range(DP)))
    before = dispatched(rr)
    rid = rr.submit("3a")
    r = reply(rr, rid)
    assert (r.kind, r.code) == ("rej", "no_active_rank"), r
    assert dispatched(rr) == before
    come_back(rr, list(range(DP)))  # no operator action: the next heartbeat is enough
    ends_well(rr)


@pytest.mark.parametrize("method", ["total_requests"])
def test_case_3c_load_aware_all_inactive(clusters: dict, method: str) -> None:
    books = cluster(clusters, method)
    go_inactive(books, list(range(DP)))
    before = dispatched(books)
    rid = books.submit("3c")
    r = reply(books, rid)
    assert (r.kind, r.code) == ("rej", "no_active_rank"), r
    assert dispatched(books) == before  # not silently sent to dead ranks
    come_back(books, list(range(DP)))
    ends_well(books)


@pytest.mark.parametrize(
    ("case", "method"), [("4a", "total_requests"), ("4b", "total_tokens"), ("4c", "cache_aware"), ("4d", "round_robin")]
)
def test_case_4_inactive_ranks_get_nothing(clusters: dict, case: str, method: str) -> None:
    books = cluster(clusters, method)
    go_inactive(books, [1, 3])
    before = dispatched(books)
    for i in range(40):
        if method == "cache_aware":
            books.submit(case, token_ids=[i] * 128)  # 40 different prefixes
        else:
            books.submit(case, num_tokens=100 + i)
    finals = books.collect()
    per = [a - b for a, b in zip(dispatched(books), before)]
    assert per[1] == per[3] == 0 and per[0] + per[2] == 40, per
    assert min(per[0], per[2]) >= 10, per  # still spread over the live ranks
    if method == "round_robin":
        assert per == [20, 0, 20, 0]
    assert all(r.kind == "out" for rid, r in finals.items() if rid.startswith(case))
    come_back(books, [1, 3])
    ends_well(books)


@pytest.mark.parametrize(("case", "field"), [("4e", "routed_dp_rank"), ("4f", "data_parallel_rank")])
def test_case_4ef_pinned_to_inactive_rank(rr: Books, case: str, field: str) -> None:
    go_inactive(rr, [1])
    before = dispatched(rr)
    rid = rr.submit(case, **{field: 1})
    r = reply(rr, rid)
    assert (r.kind, r.code) == ("rej", "rank_inactive") and "inactive" in r.msg, r
    assert dispatched(rr) == before
    come_back(rr, [1])
    pinned = rr.submit(case, **{field: 1})
    assert (reply(rr, pinned).kind, reply(rr, pinned).rank) == ("out", 1)
    ends_well(rr)


# --------------------------------------------------------------------------- 5, 6: bad frames


def test_case_5abcd_undecodable_frames_are_counted_and_go_nowhere(rr: Books) -> None:
    c = rr.lc.controller
    before = dispatched(rr)
    bad0, controls0 = c.books.bad_frames, c.books.controls
    good_header = rr.header("never")
    frames = [
        (b"\x00garbage\xff\xfe" * 10,),  # 5a garbage
        (good_header[: len(good_header) // 2], b"payload"),  # 5b truncated header
        (good_header[:1],),  # 5b truncated to one byte
        (b"",),  # 5c empty frame
        (b"", b""),  # 5c empty header and payload
        (msgpack.packb({"input_ids": [1, 2, 3], "rid": "x"}),),  # 5d a map, no version
        (msgpack.packb({"v": 1, "t": "hello", "rid": "x"}),),  # 5d unknown message type
        (msgpack.packb([1, 2, 3]),),  # 5d not a map
        (msgpack.packb({"v": 2, "t": "req", "rid": "x", "n": 1, "reply": "ipc:///nowhere"}),),  # future version
    ]
    for f in frames:
        rr.send_raw(*f)
    wait_for(lambda: c.books.bad_frames - bad0 == len(frames), 5, "every bad frame counted")
    assert c.books.controls == controls0 and dispatched(rr) == before  # 5d: to no rank at all
    ends_well(rr)


def test_case_5e_request_without_token_count(rr: Books) -> None:
    # SGLang: input_ids=None reaches len() in total_tokens and kills the controller.
    for n in (None, "12", -5, 1.5):
        rid = rr.rid("5e")
        rr.send_raw(rr.header(rid, n=n), b"", expect=rid)
        r = reply(rr, rid)
        assert (r.kind, r.code) == ("rej", "malformed_request") and "'n' (num_tokens)" in r.msg, r
    with pytest.raises(ValueError, match="give token_ids or num_tokens"):
        rr.client.submit("5e-sdk")  # the SDK refuses before anything is sent
    ends_well(rr)


class _Evil:
    """A pickle that would run a shell command in whoever unpickles it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"echo $PPID > {self.marker}",))


def test_case_6_pickle_payload_never_runs(rr: Books, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker))
    c = rr.lc.controller
    bad0 = c.books.bad_frames
    rr.send_raw(evil, b"")  # as the header: not msgpack, dropped and counted
    wait_for(lambda: c.books.bad_frames == bad0 + 1, 5, "the pickle header counted")
    rid = rr.submit("6", payload=evil)  # as the opaque payload: forwarded, never decoded
    r = reply(rr, rid)
    assert r.kind == "out" and r.payload == evil  # the echo rank got the exact bytes back
    time.sleep(0.2)
    assert not marker.exists(), "the pickle ran"
    ends_well(rr)


def test_case_6m_msgpack_ext_types_are_inert(rr: Books, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Evil(marker))
    ext = msgpack.ExtType(42, evil)  # SGLang's msgpack mode unpickles its PickleWrapper
    c = rr.lc.controller
    bad0 = c.books.bad_frames
    rr.send_raw(msgpack.packb(ext), b"")  # a top-level ext: not a map
    rid = rr.rid("6m")
    rr.send_raw(rr.header(rid, n=ext), b"", expect=rid)  # an ext where an int belongs
    # An ext as the request id, and no reply endpoint to answer: counted, dropped.
    rr.send_raw(msgpack.packb({"v": 1, "t": "req", "rid": ext, "n": 1}), b"")
    r = reply(rr, rid)
    assert (r.kind, r.code) == ("rej", "malformed_request") and "ExtType" in r.msg, r
    wait_for(lambda: c.books.bad_frames == bad0 + 2, 5, "the two ext frames counted")
    ok = rr.rid("6m")  # an ext in a field the controller does not read is forwarded as bytes
    rr.send_raw(rr.header(ok, extra=ext), evil, expect=ok)
    assert reply(rr, ok).kind == "out"
    time.sleep(0.2)
    assert not marker.exists(), "the pickle ran"
    ends_well(rr)


# --------------------------------------------------------------------------- 7, 8: idle, dead rank


def test_case_7_idle_controller_does_not_spin(rr: Books) -> None:
    c = rr.lc.controller
    tid = c._thread.native_id  # type: ignore[union-attr]
    t0, cpu0 = time.monotonic(), cpu_seconds(tid=tid)
    time.sleep(2.0)  # four ranks heartbeat every 0.1 s meanwhile
    share = (cpu_seconds(tid=tid) - cpu0) / (time.monotonic() - t0)
    print(f"case 7: idle controller loop used {100 * share:.2f}% of a core (SGLang: 100%)")
    assert share < 0.2, f"idle loop used {100 * share:.1f}% of a core"  # a spin is ~100%; bench measures it exactly
    ends_well(rr)


def test_case_8_sigkill_rank_mid_stream(clusters: dict) -> None:
    # Requests stay 50 ms on their rank, so the killed rank holds admitted work.
    slow = {r: ("--delay-s", "0.05") for r in range(DP)}
    books = cluster(clusters, "slow", "round_robin", rank_args=slow)
    lc, c = books.lc, books.lc.controller
    n, rate, kill_at = 3000, 2000.0, 1000
    t0 = time.monotonic()
    at_kill: list[int] = []
    t_kill = 0.0
    for i in range(n):
        if i == kill_at:
            lc.kill(2)
            t_kill = time.monotonic()
        if i == kill_at + 50:
            at_kill = dispatched(books)
        books.submit("8", num_tokens=10)
        delay = t0 + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    lc.wait_inactive(2, timeout_s=HEARTBEAT_TIMEOUT_S + 5)
    detected = time.monotonic() - t_kill
    finals = books.collect(30)
    mine = {rid: r for rid, r in finals.items() if rid.startswith("8-")}
    assert len(mine) == n  # nothing lost: every request ended exactly once
    kinds = collections.Counter((r.kind, r.code) for r in mine.values())
    fails = [r for r in mine.values() if r.kind == "fail"]
    assert all(r.code == "rank_died" and r.rank == 2 for r in fails), fails[:3]
    assert kinds[("out", "")] + len(fails) + kinds[("rej", "rank_busy")] == n, kinds
    after = dispatched(books)
    assert all(after[r] > at_kill[r] for r in (0, 1, 3)), (at_kill, after)  # the others never stalled
    st = c.consistent_stats()
    print(f"case 8: rank 2 declared dead {detected:.2f}s after SIGKILL; outcomes {dict(kinds)}; "
          f"re-dispatched from rank 2: {st['per_rank'][2]['redispatched']}")  # fmt: skip
    lc.start_rank(2)  # a restarted rank rejoins by itself
    lc.wait_ready([2])
    rid = books.submit("8-back", routed_dp_rank=2)
    assert (reply(books, rid).kind, reply(books, rid).rank) == ("out", 2)
    ends_well(books)


# --------------------------------------------------------------------------- 9: stolen socket, CURVE


def _env_without_keys() -> dict[str, str]:
    return {key: v for key, v in os.environ.items() if not key.startswith("DPCORE_CURVE")}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[security.CurveKeys, dict[str, str]]:
    """The controller's keys of a role key set, and an environment that hands the set to
    rank processes (each reads its own rank key pair)."""
    d = tmp_path_factory.mktemp("keys")
    return security.generate(d), {**_env_without_keys(), security.ENV_DIR: str(d)}


def sender_keys(env: dict[str, str]) -> security.CurveKeys:
    return security.load_dir(env[security.ENV_DIR], security.SENDER)


def _thieves(ctx: zmq.Context, endpoint: str, server_key: bytes | None, kind: int = zmq.PULL) -> list[zmq.Socket]:
    """A socket without keys, and one with keys of its own (knowing the server's public key)."""
    out = []
    for own in (False, True):
        s = ctx.socket(kind)
        s.linger = 0
        if own and server_key is not None:
            pub, sec = zmq.curve_keypair()
            s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_key, pub, sec
        s.connect(endpoint)
        out.append(s)
    return out


def _keyed(ctx: zmq.Context, endpoint: str, keys: security.CurveKeys, kind: int = zmq.PUSH) -> zmq.Socket:
    """A socket with a real key pair of this cluster (of some role)."""
    s = ctx.socket(kind)
    s.linger = 0
    security.client(s, endpoint, keys)
    s.connect(endpoint)
    return s


def _drain(sock: zmq.Socket, wait_ms: int = 300) -> int:
    n = 0
    while sock.poll(wait_ms):
        sock.recv_multipart()
        n += 1
    return n


def test_case_9_stolen_rank_socket(keys: tuple[security.CurveKeys, dict[str, str]]) -> None:
    k, env = keys
    ctx = zmq.Context()
    # Without CURVE (plain TCP) a stranger on rank 1's socket takes part of its requests: the
    # threat is real, and this test would see it.
    with LocalCluster("round_robin", DP, endpoints=ControllerEndpoints.tcp(DP), curve=False,
                      env=_env_without_keys(), client_kw={"curve": False}) as lc:  # fmt: skip
        plain = _thieves(ctx, lc.controller.endpoints.dispatch[1], None)[0]
        stolen_open = 0
        for batch in range(20):  # until its connection is up (fast, unless the machine is busy)
            for i in range(8):
                lc.client.submit(f"open{batch}-{i}", num_tokens=5)  # type: ignore[union-attr]
            stolen_open += _drain(plain, 250)
            if stolen_open:
                break
        plain.close()
    assert stolen_open > 0
    # With CURVE the same strangers are refused at the handshake and get nothing.
    with LocalCluster("round_robin", DP, endpoints=ControllerEndpoints.tcp(DP), curve=k, env=env,
                      client_kw={"curve": sender_keys(env)}, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S) as lc:  # fmt: skip
        c = lc.controller
        thieves = _thieves(ctx, c.endpoints.dispatch[1], k.server_public)
        # A sender of this cluster, with its real sender key, is no rank: refused too.
        thieves.append(_keyed(ctx, c.endpoints.dispatch[1], sender_keys(env), zmq.PULL))
        wait_for(lambda: c.transport.zap.denied >= 1, 5, "the keyed stranger to be refused")  # type: ignore[union-attr]
        books = Books(lc)
        try:
            rids = [books.submit("9") for _ in range(40)]
            finals = books.collect()
            assert collections.Counter(finals[r].rank for r in rids) == {0: 10, 1: 10, 2: 10, 3: 10}
            assert [_drain(t) for t in thieves] == [0, 0, 0]
            print(f"case 9: without CURVE a stranger took {stolen_open} of rank 1's requests; with CURVE 0 "
                  f"({c.transport.zap.denied} handshakes refused)")  # type: ignore[union-attr]  # fmt: skip
            ends_well(books)
        finally:
            books.close()
            for t in thieves:
                t.close()
    ctx.term()


def test_case_9b_unauthenticated_sender_and_reporter(keys: tuple[security.CurveKeys, dict[str, str]]) -> None:
    k, env = keys
    ctx = zmq.Context()
    with LocalCluster("round_robin", DP, endpoints=ControllerEndpoints.tcp(DP), curve=k, env=env,
                      client_kw={"curve": sender_keys(env)}, heartbeat_timeout_s=HEARTBEAT_TIMEOUT_S) as lc:  # fmt: skip
        c = lc.controller
        books = Books(lc)
        senders = _thieves(ctx, c.endpoints.ingress, k.server_public, zmq.PUSH)
        reporters = _thieves(ctx, c.endpoints.report, k.server_public, zmq.PUSH)
        # Keys of the wrong role: a rank cannot send requests, a sender cannot report load.
        senders.append(_keyed(ctx, c.endpoints.ingress, security.load_dir(env[security.ENV_DIR], security.RANK)))
        reporters.append(_keyed(ctx, c.endpoints.report, sender_keys(env)))
        try:
            epoch0 = c.ledger.epoch(0)
            received0, bad0 = c.books.received, c.books.bad_frames
            forged = wire.encode_load(0, epoch=epoch0 + 1, seq=1)  # would "restart" rank 0
            for i in range(5):  # queued on the strangers' side, never delivered
                for s in senders:
                    s.send_multipart([books.header(f"inject{i}"), b""], zmq.NOBLOCK)
                for s in reporters:
                    s.send(forged, zmq.NOBLOCK)
            wait_for(lambda: c.transport.zap.denied >= 4, 5, "the strangers and the wrong-role peers refused")  # type: ignore[union-attr]
            ends_well(books)
            assert c.books.received == received0 + 1 and c.books.bad_frames == bad0  # only the good request
            assert c.ledger.epoch(0) == epoch0 and c.stats()["failed"] == 0
        finally:
            books.close()
            for s in senders + reporters:
                s.close()
    ctx.term()


def test_ipc_run_dir_is_private(rr: Books) -> None:
    # ipc sockets are files: only this user can connect to a rank's socket.
    path = rr.lc.controller.endpoints.dispatch[1][len("ipc://") :]
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("uvicorn")
    from dpcore.http.launch import launch

    with launch(2, log_dir=tmp_path_factory.mktemp("faults-http"), serve_args=("--heartbeat-timeout", "1")) as s:
        yield s


def _http_ends_well(stack: Any, http: Any) -> None:
    assert stack.serve.alive()  # the controller (the front is its child, checked by the request below)
    r = http.post("/generate", json={"text": "good", "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text

    def settled() -> dict | None:
        st = http.get("/server_info").json()["counters"]
        return st if st["in_flight"] == 0 else None

    st = wait_for(settled, 10, "in-flight requests to settle", poll_s=0.1)
    assert st["balanced"] == {"received": True, "dispatched": True} and st["internal_errors"] == 0
    assert st["received"] == st["completed"] + st["failed"] + st["rejected"]


def _http_error(resp: Any, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    return str(body["detail"])


def _stack_ranks(stack: Any) -> list[Any]:
    return [p for p in stack.group.procs if "-rank" in p.name]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "code"),
    [
        ("1a", {"routed_dp_rank": 7}, {}, 400, "invalid_rank"),
        ("1b", {"routed_dp_rank": -1}, {}, 400, "invalid_rank"),
        ("1a-header", {}, {"X-Data-Parallel-Rank": "7"}, 400, "invalid_rank"),
        ("5e", {"text": None, "input_ids": None}, {}, 400, "invalid_field"),
        ("5e-list", {"text": None, "input_ids": [1, None]}, {}, 400, "invalid_field"),
    ],
)
def test_http_bad_fields(stack: Any, case: str, body: dict, headers: dict, status: int, code: str) -> None:
    import httpx

    with httpx.Client(base_url=stack.url, timeout=10) as http:
        resp = http.post("/generate", json={"text": "x", **body}, headers=headers)
        assert _http_error(resp, status, code)
        _http_ends_well(stack, http)


def test_case_3b_4f_http_inactive_ranks(stack: Any) -> None:
    import httpx

    ranks = _stack_ranks(stack)
    with httpx.Client(base_url=stack.url, timeout=10) as http:
        try:
            ranks[1].popen.send_signal(signal.SIGSTOP)
            wait_for(lambda: http.get("/health").json().get("active_ranks") == [0], 10, "rank 1 inactive", poll_s=0.1)
            detail = _http_error(http.post("/generate", json={"text": "x"}, headers={"X-Data-Parallel-Rank": "1"}),
                                 503, "rank_inactive")  # fmt: skip
            assert "inactive" in detail  # 4f: SGLang's elastic path raises here and dies
            ranks[0].popen.send_signal(signal.SIGSTOP)
            wait_for(lambda: http.get("/health").status_code == 503, 10, "every rank inactive", poll_s=0.1)
            _http_error(http.post("/generate", json={"text": "x"}), 503, "no_active_rank")  # 3b
        finally:
            for p in ranks:
                p.popen.send_signal(signal.SIGCONT)
        wait_for(lambda: http.get("/health").status_code == 200, 10, "ranks back", poll_s=0.1)
        _http_ends_well(stack, http)


# --------------------------------------------------------------------------- shutdown and restarts


def test_sigterm_drains_then_fails_the_rest_and_exits_0(tmp_path: Path, dpcore_exe: list[str]) -> None:
    """SIGTERM: intake stops (late requests rejected ``shutting_down``), in-flight requests
    finish within ``--drain-timeout`` or fail ``controller_shutdown``, sockets close, exit 0."""
    eps_file = tmp_path / "eps.json"
    proc = subprocess.Popen(
        [*dpcore_exe, "--log-json", "serve", "--dp-size", "2", "--transport", "tcp", "--endpoints-file",
         str(eps_file), "--drain-timeout", "1.5", "--heartbeat-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ranks = []
    try:
        eps = wait_for(lambda: eps_file.exists() and json.loads(eps_file.read_text()), 15, "endpoints")
        for r, delay in ((0, "0.3"), (1, "60")):  # rank 1's requests cannot finish in time
            ranks.append(subprocess.Popen(
                [sys.executable, "-m", "dpcore.sdk.echo", "--rank", str(r), "--dispatch", eps["dispatch"][r],
                 "--report", eps["report"], "--delay-s", delay, "--heartbeat-s", "0.1"], stdout=subprocess.DEVNULL,
            ))  # fmt: skip
        with Client(eps["ingress"]) as client:
            wait_for(lambda: all(x["reported"] for x in fetch_status(eps["status"])["loads"]), 20, "both ranks' hello")
            for i in range(20):
                client.submit(f"r{i}", num_tokens=5)
            time.sleep(0.2)  # all dispatched and admitted
            t_term = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            client.submit("late", num_tokens=5)
            replies = {r.rid: r for r in client.wait_all(10)}
            ended = time.monotonic() - t_term
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        kinds = collections.Counter((r.kind, r.code) for r in replies.values())
        assert kinds == {("out", ""): 10, ("fail", "controller_shutdown"): 10, ("rej", "shutting_down"): 1}, kinds
        assert ended < 1.5 + 5.0, f"the drain deadline was not kept ({ended:.1f}s)"
        stopped = [json.loads(line) for line in err.splitlines() if '"controller_stopped"' in line][0]
        assert stopped["balanced"] and stopped["in_flight"] == 0
        assert not eps_file.exists()
        for ep in (eps["ingress"], eps["report"], eps["status"], *eps["dispatch"]):  # no listener left
            host, port = ep[len("tcp://") :].rsplit(":", 1)
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, LISTEN is not
                s.bind((host, int(port)))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for p in ranks:
            p.kill()
            p.wait()


def test_controlled_rank_restart_rejoins_without_operator(rr: Books) -> None:
    lc, c = rr.lc, rr.lc.controller
    epoch = c.ledger.epoch(2)
    assert lc.terminate(2) == 0  # SIGTERM: the rank exits cleanly
    lc.start_rank(2)
    wait_for(lambda: c.ledger.epoch(2) not in (None, epoch), 10, "rank 2's new life")
    lc.wait_ready([2])
    rid = rr.submit("restart", routed_dp_rank=2)
    assert (reply(rr, rid).kind, reply(rr, rid).rank) == ("out", 2)
    ends_well(rr)


def test_oversized_frame_is_refused_and_others_keep_going(clusters: dict) -> None:
    limit = 64 * 1024
    books = cluster(clusters, "limited", "round_robin", dp_size=2, max_message_bytes=limit,
                    client_kw={"max_message_bytes": limit})  # fmt: skip
    from dpcore.sdk.client import MessageTooLargeError

    with pytest.raises(MessageTooLargeError, match="over the ingress limit of 65536 bytes"):
        books.client.submit("big", num_tokens=1, payload=b"x" * (64 * 1024 + 1))
    c = books.lc.controller
    received = c.books.received
    other = zmq.Context.instance().socket(zmq.PUSH)  # a raw sender the SDK cannot stop
    other.linger = 0
    other.connect(c.endpoints.ingress)
    rid = books.rid("big-raw")
    other.send_multipart([books.header(rid), b"x" * (256 * 1024)])
    other.close()
    ends_well(books)  # the transport dropped it; the good client is unaffected
    assert c.books.received == received + 1 and rid not in books.finals
    ok = books.submit("fits", payload=b"y" * (60 * 1024))
    assert reply(books, ok).payload == b"y" * (60 * 1024)


def test_rank_survives_an_unconnectable_reply_endpoint() -> None:
    # The controller refuses such requests (wire.valid_reply); a rank must not die on one either.
    from dpcore.model import Request
    from dpcore.sdk.worker import Work, Worker

    ctx = zmq.Context()
    w = Worker(0, dispatch_endpoint="inproc://fault-d", report_endpoint="inproc://fault-r", zmq_ctx=ctx)
    try:
        for bad in ("tcp://", "ipc://", "tcp://a b:1"):
            work = Work("r", 0, {}, b"", bad, None, Request("r", 1))
            assert w.send(work, {"x": 1}) is False
        assert w.dropped_outputs == 3
        assert not wire.valid_reply("tcp://") and wire.valid_reply("tcp://127.0.0.1:5555")
    finally:
        w.close()
        ctx.term()


def test_restarted_rank_with_a_clock_behind_rejoins(rr: Books) -> None:
    """A rank restarted on a host whose clock is behind has a smaller epoch than its dead
    previous life; once that life is declared dead, the new one is taken, not ignored as stale."""
    import threading

    from dpcore.sdk.worker import Worker

    lc, c = rr.lc, rr.lc.controller
    old = c.ledger.epoch(3)
    assert old is not None
    lc.kill(3)
    lc.wait_inactive(3, timeout_s=HEARTBEAT_TIMEOUT_S + 5)
    stop = threading.Event()

    def rank3() -> None:
        with Worker(3, dispatch_endpoint=c.endpoints.dispatch[3], report_endpoint=c.endpoints.report,
                    epoch=old - 5 * 10**9, heartbeat_interval_s=0.1) as w:  # fmt: skip
            while not stop.is_set():
                for work in w.recv(0.05):
                    w.admit(work)
                    w.send(work, {"clock": "behind"})
                    w.report(0, 0, 0)

    t = threading.Thread(target=rank3, daemon=True)
    t.start()
    try:
        wait_for(lambda: c.ledger.epoch(3) == old - 5 * 10**9 and c.ledger.is_active(3), 5, "the new life to be taken")
        rid = rr.submit("clock", routed_dp_rank=3)
        r = reply(rr, rid)
        assert (r.kind, r.rank, r.meta) == ("out", 3, {"clock": "behind"})
    finally:
        stop.set()
        t.join(5)
    lc.wait_inactive(3, timeout_s=HEARTBEAT_TIMEOUT_S + 5)
    lc.start_rank(3)
    lc.wait_ready([3])
    ends_well(rr)


# --------------------------------------------------------------------------- stalls, floods, bounds


def test_a_loop_stall_fails_no_request_on_a_healthy_rank(rr: Books) -> None:
    """The controller's loop is held for four heartbeat timeouts (as a slow policy, swap or
    CPU starvation would) while requests run and arrive: the ranks kept heartbeating, so
    none may be declared dead and every request must be served."""
    import threading

    lc, c = rr.lc, rr.lc.controller
    stalls0 = c.books.loop_stalls
    stalled = threading.Event()

    def stall() -> None:
        stalled.set()
        time.sleep(4 * HEARTBEAT_TIMEOUT_S)

    before = [rr.submit("pre-stall") for _ in range(8)]
    c.call_soon(stall)
    # The loop may take the requests already queued before the command: send the next ones
    # once it is certainly held, so that they wait out the stall.
    assert stalled.wait(30), "the loop never ran the stall"
    during = [rr.submit("in-stall") for _ in range(8)]
    finals = rr.collect(30)
    assert all(finals[r].kind == "out" for r in before + during), [finals[r] for r in before + during]
    assert c.books.loop_stalls > stalls0
    assert list(c.ledger.active_ranks) == list(range(DP))
    st = ends_well(rr)
    assert st["failed"] == 0 and "rank_died" not in st["failed_by_code"]


def test_stale_reports_are_counted_and_an_ack_of_an_unsent_dispatch_is_refused(rr: Books) -> None:
    c = rr.lc.controller
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(c.endpoints.report)
    try:
        epoch = c.ledger.epoch(2)
        stale0, bad0 = c.books.stale_reports, c.books.bad_reports
        push.send(wire.encode_load(2, epoch=epoch, seq=0))  # seq 0: older than what rank 2 sent
        wait_for(lambda: c.books.stale_reports > stale0, 5, "the stale report counted")
        sent = c.ledger.next_dispatch_seq(2)
        push.send(wire.encode_load(2, epoch=epoch, seq=1 << 40, ack=sent + 5))
        wait_for(lambda: c.books.bad_reports > bad0, 5, "the impossible ack refused")
        assert c.ledger.reports[2] is None or c.ledger.reports[2].seq < 1 << 40  # never applied
    finally:
        push.close()
    ends_well(rr)


def test_a_report_flood_from_two_processes_does_not_starve_requests_or_status(rr: Books) -> None:
    """Two processes flood the report socket (well-formed stale reports, as fast as they can)
    for a few seconds; meanwhile each request is answered within 2 s and the status snapshot
    within 2 s. Reports get a bounded share of each loop turn."""
    c = rr.lc.controller
    flood = (
        "import sys, time, zmq\n"
        "from dpcore import wire\n"
        "s = zmq.Context().socket(zmq.PUSH); s.sndhwm = 100000; s.connect(sys.argv[1])\n"
        "f = wire.encode_load(1, epoch=1, seq=1)\n"
        "print('go', flush=True)\n"
        "end = time.monotonic() + 5\n"
        "while time.monotonic() < end:\n"
        "    try: s.send(f, zmq.NOBLOCK)\n"
        "    except zmq.Again: time.sleep(0.001)\n"
    )
    floods = [subprocess.Popen([sys.executable, "-c", flood, c.endpoints.report], stdout=subprocess.PIPE, text=True)
              for _ in range(2)]  # fmt: skip
    worst_req = worst_status = 0.0
    counted0 = c.books.stale_reports + c.books.bad_reports
    try:
        for p in floods:
            assert p.stdout is not None and p.stdout.readline().strip() == "go"
        time.sleep(0.3)  # the flood is on
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            t0 = time.monotonic()
            rid = rr.submit("flood")
            assert reply(rr, rid).kind == "out"
            worst_req = max(worst_req, time.monotonic() - t0)
            t0 = time.monotonic()
            c.consistent_stats(5)
            worst_status = max(worst_status, time.monotonic() - t0)
        flooded = c.books.stale_reports + c.books.bad_reports - counted0
    finally:
        for p in floods:
            p.kill()
            p.wait()
    assert worst_req < 2.0 and worst_status < 2.0, (worst_req, worst_status)
    assert flooded > 1000, flooded  # the flood did arrive while requests were measured
    ends_well(rr)


def test_policy_calls_over_budget_are_counted() -> None:
    with LocalCluster("round_robin", 2, policy_budget_s=1e-9) as lc:
        for i in range(10):
            lc.client.submit(f"b{i}", num_tokens=4)  # type: ignore[union-attr]
        assert len(lc.client.wait_all(10)) == 10  # type: ignore[union-attr]
        assert lc.controller.consistent_stats()["policy_overruns"] == 10


def test_one_hostile_request_cannot_delay_others_beyond_a_bound() -> None:
    """Under cache_aware, requests carrying the most block hashes the wire allows (16,384,
    for 1M tokens) are mixed with small ones: every small one is served within 1 s, and a
    hostile header with more hashes is refused at the door."""
    with LocalCluster("cache_aware", 2) as lc:
        client = lc.client
        big = list(range(1 << 14))
        worst = 0.0
        for i in range(6):
            client.submit(f"hostile{i}", num_tokens=1 << 20, block_hashes=[h + i for h in big])  # type: ignore[union-attr]
            t0 = time.monotonic()
            client.submit(f"small{i}", token_ids=list(range(64)))  # type: ignore[union-attr]
            deadline = time.monotonic() + 10
            got: dict[str, Any] = {}
            while f"small{i}" not in got and time.monotonic() < deadline:
                got.update((r.rid, r) for r in client.poll(0.05) if r.final)  # type: ignore[union-attr]
            worst = max(worst, time.monotonic() - t0)
        assert worst < 1.0, worst
        client.submit("too-many", num_tokens=1 << 20, block_hashes=list(range((1 << 14) + 1)))  # type: ignore[union-attr]
        refused = [r for r in client.wait_all(10) if r.rid == "too-many"]  # type: ignore[union-attr]
        assert refused and refused[0].kind == "rej" and refused[0].code == "malformed_request"
        assert "16384" in refused[0].msg


def test_a_rank_that_reports_but_never_admits_fails_its_requests_rank_stuck() -> None:
    """Rank 1 heartbeats but never admits (a stuck scheduler): its requests end ``rank_stuck``
    once the admission timeout passes, instead of hanging until shutdown; rank 0 serves."""
    with LocalCluster("round_robin", 2, rank_args={1: ("--no-admit",)}, admission_timeout_s=1.0) as lc:
        books = Books(lc)
        try:
            rids = [books.submit("adm") for _ in range(8)]
            t0 = time.monotonic()
            finals = books.collect(15)
            took = time.monotonic() - t0
            kinds = collections.Counter((finals[r].kind, finals[r].code, finals[r].rank) for r in rids)
            assert kinds == {("out", "", 0): 4, ("fail", "rank_stuck", 1): 4}, kinds
            assert took < 1.0 + 5.0
            assert lc.controller.ledger.is_active(1)  # it is alive, only stuck
            st = lc.controller.consistent_stats()
            assert st["failed_by_code"] == {"rank_stuck": 4} and st["balanced"] == {"received": True, "dispatched": True}
        finally:
            books.close()
