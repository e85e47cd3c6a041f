"""``dpcore soak``: a bounded fault soak of a real controller with real mock ranks.

``dpcore serve`` and ``--dp-size`` ``dpcore mock-worker`` processes run on loopback (ipc
sockets in a private directory). A driver sends requests at a steady ``--rate`` through the
client SDK, with ``--bad-fraction`` of them bad (an out-of-range rank, a broken header that
still names its sender, a frame that is not msgpack at all), while a chaos schedule

* SIGKILLs a rank and restarts it a moment later (a crash),
* SIGTERMs a rank and restarts it at once (a controlled restart),
* SIGSTOPs a rank for longer than ``--heartbeat-timeout`` and then SIGCONTs it (a stall),
* SIGSTOPs the controller itself for 2.5 heartbeat timeouts (a loop stall: no healthy rank
  may be declared dead for it),
* floods the load-report channel with broken, out-of-range and stale reports, from this
  process, and then from two other processes at once,
* replaces a rank for a while by a stuck one (it heartbeats but never admits a request:
  what it is sent fails ``rank_stuck`` after ``--admission-timeout``).

``dpcore serve`` also runs its HTTP front. Meanwhile an HTTP client opens streams and
leaves each after its first chunk (the front aborts the request on its rank), then asks
again under the same request id until it is answered, and checks that the answer is the new
request's own; and ``/health`` is polled throughout.

At the end the driver stops sending, waits for every reply, SIGTERMs the controller and
checks the books: every request got exactly one final reply; the controller's counters add
up (received = completed + failed + rejected, dispatched = completed + failed +
redispatched); rejections are exactly the bad requests; failures are ``rank_died`` on a
rank that was being disrupted at the time; every disrupted rank served again without anyone
doing anything; every HTTP request that was left got its own answer when asked again;
``/health`` answered every poll, 200 whenever the controller was not stopped; the
controller exits 0. It prints latency percentiles of the good requests
and the controller's memory over time (the checks are about the books, not speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
from attrs import define, field, frozen

from dpcore.auto import baseline_policy
from dpcore.errors import ConfigError
from dpcore.quantile import percentile

DPCORE = (sys.executable, "-m", "dpcore")
#: Chaos cycle: one event per slot, spread evenly over the run.
SCHEDULE = ("kill", "flood", "pause", "stuck", "stall", "term", "kill", "flood2", "pause", "kill")
#: Disruptions that hit no rank (their ``rank`` is -1).
NO_RANK = ("flood", "flood2", "stall")
#: How long a killed rank stays down before it is restarted.
RESTART_AFTER_S = 1.5
#: The controller's ``--admission-timeout`` in the soak, and how long a stuck rank stays.
ADMISSION_TIMEOUT_S = 2.0
STUCK_FOR_S = 2.5 * ADMISSION_TIMEOUT_S
#: The HTTP client: pause between two requests, answers awaited per request, request timeout.
HTTP_EVERY_S = 0.3
HTTP_ATTEMPTS = 10
#: Pause before asking again: the front frees a request id once it has seen the client that
#: held it leave (until then the id is ``400 duplicate_rid``, answered by the front alone).
HTTP_RETRY_AFTER_S = 0.1
HTTP_TIMEOUT_S = 30.0
#: /health polls: how often, and how long one may take to be answered.
HEALTH_EVERY_S = 0.25
HEALTH_TIMEOUT_S = 10.0
#: A /health poll this soon after the controller resumed may still see the stall.
HEALTH_STALL_MARGIN_S = 1.0
#: Error codes of the HTTP front that the controller counts as rejected, and as failed.
REJ_CODES = frozenset({"no_active_rank", "rank_inactive", "rank_busy", "shutting_down"})
FAIL_CODES = frozenset({"rank_died", "rank_stuck", "controller_shutdown"})


@frozen
class SoakConfig:
    duration_s: float = 60.0
    rate: float = 100.0
    dp_size: int = 4
    #: ``--load-balance-method``; ``None``: the load-aware baseline the installed distributions
    #: declare (:func:`dpcore.auto.baseline_policy`).
    method: str | None = None
    heartbeat_timeout_s: float = 1.0
    bad_fraction: float = 0.05
    flood_frames: int = 20_000
    speedup: float = 50.0
    seed: int = 0

    def check(self) -> None:
        if not 20 <= self.duration_s <= 3600:
            raise ConfigError(f"--duration must be in 20..3600 seconds, got {self.duration_s}")
        if not 1 <= self.rate <= 2000:
            raise ConfigError(f"--rate must be in 1..2000 requests/s, got {self.rate}")
        if self.dp_size < 2:
            raise ConfigError(f"--dp-size must be at least 2 (one rank is disrupted at a time), got {self.dp_size}")
        if not 0 <= self.bad_fraction <= 0.5:
            raise ConfigError(f"--bad-fraction must be in 0..0.5, got {self.bad_fraction}")
        if not self.heartbeat_timeout_s > 0:
            raise ConfigError(f"--heartbeat-timeout must be positive, got {self.heartbeat_timeout_s}")


@define
class Disruption:
    kind: str
    rank: int
    start: float
    #: When the rank was running again (restart or SIGCONT); ``None`` for floods.
    back: float | None = None
    #: First request submitted after ``back`` that this rank served, seconds after ``back``.
    rejoined_after_s: float | None = None


@define
class HttpBooks:
    """What the HTTP client did: requests (each left once, then asked until answered) and
    the outcome of every attempt."""

    requests: int = 0
    left: int = 0  # streams left after their first chunk
    ok: int = 0
    wrong_output: int = 0  # an answer that was not the request's own
    gave_up: int = 0
    rejected: int = 0  # answered with a controller rejection code (asked again)
    rid_in_use: int = 0  # 400 duplicate_rid: the front had not seen the client leave yet
    failed: int = 0  # answered with a controller failure code (asked again)
    other: dict[str, int] = field(factory=dict)  # any other status or error


@define
class Books:
    """What the driver sent and got back."""

    sent_at: dict[str, float] = field(factory=dict)
    good: set[str] = field(factory=set)
    bad_answered: dict[str, str] = field(factory=dict)  # rid -> expected rejection code
    bad_unanswered: int = 0
    finals: dict[str, Any] = field(factory=dict)  # rid -> Reply
    ended_at: dict[str, float] = field(factory=dict)


class Soak:
    """One soak run in *workdir* (logs of every process are kept there)."""

    def __init__(self, cfg: SoakConfig, workdir: Path) -> None:
        from dpcore.http.launch import Group

        if cfg.method is None:
            cfg = attrs.evolve(cfg, method=baseline_policy("dpcore soak's default --load-balance-method"))
        self.cfg = cfg
        self.workdir = workdir
        self.group = Group(workdir)
        self.rng = random.Random(cfg.seed)
        self.books = Books()
        self.disruptions: list[Disruption] = []
        self.rss: list[tuple[float, int]] = []
        self.flooded: Counter[str] = Counter()
        # Open for the whole run: a closing peer's frames still queued at the controller would
        # be dropped by ZMQ, and the books count every flooded frame.
        self._flood_sock: Any = None
        self.ranks: dict[int, Any] = {}
        self.eps: dict[str, Any] = {}
        self.t0 = 0.0
        self._stop = threading.Event()
        self._rank_lock = threading.Lock()
        self.controller: Any = None
        self._flooders: list[Any] = []
        self.http = HttpBooks()
        #: /health polls: (sent, answered, status; 0: no answer).
        self.health: list[tuple[float, float, int]] = []
        #: When the controller was stopped (SIGSTOP .. SIGCONT).
        self._stalls: list[tuple[float, float]] = []

    # ------------------------------------------------------------------ processes

    def _start_controller(self) -> Any:
        from dpcore.http.launch import wait_for

        eps_file = self.workdir / "endpoints.json"
        cfg = self.cfg
        proc = self.group.start("controller", [
            *DPCORE, "--log-json", "serve", "--dp-size", str(cfg.dp_size), "--load-balance-method", cfg.method,
            "--heartbeat-timeout", str(cfg.heartbeat_timeout_s), "--drain-timeout", "5",
            "--admission-timeout", str(ADMISSION_TIMEOUT_S), "--endpoints-file", str(eps_file), "--http-port", "0",
        ])  # fmt: skip

        def read() -> dict[str, Any] | None:
            try:
                return json.loads(eps_file.read_text())  # type: ignore[no-any-return]
            except (OSError, ValueError):
                return None

        self.eps = wait_for("the controller's endpoints", read, [proc], 30)
        return proc

    def _start_rank(self, rank: int, stuck: bool = False) -> None:
        where = ["--rank", str(rank), "--dispatch", self.eps["dispatch"][rank], "--report", self.eps["report"],
                 "--heartbeat-s", "0.1"]  # fmt: skip
        if stuck:  # heartbeats, never admits
            cmd = [sys.executable, "-m", "dpcore.sdk.echo", *where, "--no-admit"]
        else:
            cmd = [*DPCORE, "--log-json", "mock-worker", *where, "--speedup", str(self.cfg.speedup), "--exit-with-parent"]
        proc = self.group.start(f"rank{rank}-{len(self.group.procs)}", cmd)
        with self._rank_lock:
            self.ranks[rank] = proc

    def _signal(self, rank: int, sig: int) -> Any:
        with self._rank_lock:
            proc = self.ranks[rank]
        proc.popen.send_signal(sig)
        return proc

    # ------------------------------------------------------------------ status

    def status(self, timeout_s: float = 3.0) -> dict[str, Any]:
        from dpcore.runtime.local import fetch_status

        return fetch_status(self.eps["status"], timeout_s)

    def _settled_counters(self, timeout_s: float = 15.0) -> dict[str, Any]:
        """The controller's counters once the last completions have been reported (a rank
        answers its sender before its next load report tells the controller)."""
        from dpcore.runtime.status import StatusUnavailableError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                counters: dict[str, Any] = self.status()["counters"]
            except StatusUnavailableError:  # busy (a loaded host): ask again until the deadline
                if time.monotonic() > deadline:
                    raise
                continue
            if counters["in_flight"] == 0 and counters["parked"] == 0 or time.monotonic() > deadline:
                return counters
            time.sleep(0.1)

    def _wait_all_reported(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._all_up():
                return
            time.sleep(0.1)
        raise RuntimeError(f"ranks did not all report within {timeout_s:g}s; logs in {self.workdir}")

    # ------------------------------------------------------------------ chaos

    def _chaos(self) -> None:
        cfg = self.cfg
        # Quiet margins at both ends: a warm start, and time for the last rank to rejoin.
        start, end = 0.1 * cfg.duration_s, cfg.duration_s - max(4.0, 3 * cfg.heartbeat_timeout_s)
        slot = (end - start) / len(SCHEDULE)
        for i, kind in enumerate(SCHEDULE):
            at = self.t0 + start + i * slot
            if self._sleep_until(at):
                return
            # One rank disrupted at a time: wait until the last one is back. (A flood's stale
            # reports must meet live ranks: for a rank declared dead, a report from an unknown
            # life is that rank's new life.)
            while not self._all_up():
                if self._sleep_until(time.monotonic() + 0.1):
                    return
            if time.monotonic() > self.t0 + end:
                return  # too late to see this rank come back before the traffic stops
            rank = -1 if kind in NO_RANK else i % cfg.dp_size
            d = Disruption(kind, rank, time.monotonic())
            self.disruptions.append(d)
            if kind == "kill":
                self._signal(rank, signal.SIGKILL).popen.wait(10)
                if self._sleep_until(time.monotonic() + RESTART_AFTER_S):
                    return
                self._start_rank(rank)
            elif kind == "term":
                proc = self._signal(rank, signal.SIGTERM)
                proc.popen.wait(10)
                self._start_rank(rank)
            elif kind == "pause":
                self._signal(rank, signal.SIGSTOP)
                stopped = self._sleep_until(time.monotonic() + 2.5 * cfg.heartbeat_timeout_s)
                self._signal(rank, signal.SIGCONT)
                if stopped:
                    return
            elif kind == "stuck":
                self._signal(rank, signal.SIGTERM).popen.wait(10)
                self._start_rank(rank, stuck=True)
                stopped = self._sleep_until(time.monotonic() + STUCK_FOR_S)
                self._signal(rank, signal.SIGTERM).popen.wait(10)
                self._start_rank(rank)
                if stopped:
                    return
            elif kind == "stall":
                self.controller.popen.send_signal(signal.SIGSTOP)
                stopped = self._sleep_until(time.monotonic() + 2.5 * cfg.heartbeat_timeout_s)
                self.controller.popen.send_signal(signal.SIGCONT)
                self._stalls.append((d.start, time.monotonic()))
                if stopped:
                    return
            elif kind == "flood2":
                self._flood_processes(min(slot * 0.5, 3.0))
            else:
                self._flood(min(slot * 0.5, 3.0))
            d.back = time.monotonic() if kind not in NO_RANK else None

    def _all_up(self) -> bool:
        from dpcore.runtime.status import StatusUnavailableError

        try:
            return all(x["reported"] and x["active"] for x in self.status()["loads"])
        except StatusUnavailableError:  # the controller is busy: ask again
            return False

    def _sleep_until(self, t: float) -> bool:
        """Sleep until *t*; True if the run is being stopped."""
        return self._stop.wait(max(0.0, t - time.monotonic()))

    def _flood(self, seconds: float) -> None:
        """Broken, out-of-range and stale reports, as fast as the socket takes them."""
        import msgpack
        import zmq

        from dpcore import wire

        assert self._flood_sock is not None  # made by run()
        n = self.cfg.dp_size
        frames = [
            (b"\x00not msgpack", "bad"),
            (msgpack.packb({"v": 1, "t": "load", "rank": n + 3, "epoch": 1, "seq": 1, "ack": -1,
                            "run": 0, "wait": 0, "tok": 0, "kvu": 0, "kvc": 0}), "bad"),  # fmt: skip
            (msgpack.packb({"v": 1, "t": "load", "rank": 0, "epoch": 1, "seq": -5}), "bad"),
            (msgpack.packb({"v": 9, "t": "load"}), "bad"),
            # Well-formed but from a life long gone (epoch 1): counted stale, never applied.
            *((wire.encode_load(r, epoch=1, seq=10**9, ack=10**9, run=10**6, wait=10**6, tok=10**12), "stale")
              for r in range(n)),
        ]  # fmt: skip
        push = self._flood_sock
        end = time.monotonic() + seconds
        sent: Counter[str] = Counter()
        try:
            for frame, kind in itertools.cycle(frames):
                if sent.total() >= self.cfg.flood_frames or time.monotonic() > end or self._stop.is_set():
                    break
                while True:
                    try:
                        push.send(frame, zmq.NOBLOCK)
                        break
                    except zmq.Again:  # the controller reads reports at its own pace
                        time.sleep(0.001)
                sent[kind] += 1
        finally:
            self.flooded.update(sent)

    def _flood_processes(self, seconds: float, n: int = 2) -> None:
        """Well-formed stale reports from *n* other processes at once, as fast as they can."""
        import subprocess

        code = (
            "import sys, time, zmq\n"
            "from dpcore import wire\n"
            "s = zmq.Context().socket(zmq.PUSH); s.linger = 10000; s.connect(sys.argv[1])\n"
            "frames = [wire.encode_load(r, epoch=1, seq=10**9, ack=10**9) for r in range(int(sys.argv[3]))]\n"
            "sent, end = 0, time.monotonic() + float(sys.argv[2])\n"
            "while time.monotonic() < end:\n"
            "    try:\n"
            "        s.send(frames[sent % len(frames)], zmq.NOBLOCK); sent += 1\n"
            "    except zmq.Again:\n"
            "        time.sleep(0.001)\n"
            "print(sent, flush=True)\n"
            # Stay connected until told: ZMQ drops the frames a peer had queued at the
            # controller when that peer disconnects, and the books count every one.
            "sys.stdin.read()\n"
        )
        args = [self.eps["report"], str(seconds), str(self.cfg.dp_size)]
        procs = [subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True) for _ in range(n)]  # fmt: skip
        self._flooders.extend(procs)
        for p in procs:
            self.flooded["stale"] += int(p.stdout.readline().strip() or 0)  # type: ignore[union-attr]

    def _stop_flooders(self) -> None:
        for p in self._flooders:
            if p.poll() is None:
                p.stdin.close()
                try:
                    p.wait(10)
                except Exception:  # subprocess.TimeoutExpired: it must not outlive the soak
                    p.kill()
                    p.wait()
        self._flooders.clear()

    def _http_client(self) -> None:
        """Streams left after their first chunk, each asked again under the same id until
        answered: the answer must be the new request's own (4 tokens, not the 100,000 of the
        request that was left)."""
        import httpx

        h = self.http
        with httpx.Client(base_url=self.eps["http"], timeout=HTTP_TIMEOUT_S) as c:
            for i in itertools.count():
                if self._stop.wait(HTTP_EVERY_S):
                    return
                rid = f"h{i}"
                h.requests += 1
                leave = {"text": "soak", "rid": rid, "stream": True, "sampling_params": {"max_new_tokens": 100_000}}
                try:
                    with c.stream("POST", "/generate", json=leave) as r:
                        if r.status_code == 200:
                            next(r.iter_lines())
                            h.left += 1
                        else:
                            r.read()
                            self._http_outcome(r.status_code, r.json())
                except (httpx.HTTPError, StopIteration, ValueError) as exc:
                    h.other[type(exc).__name__] = h.other.get(type(exc).__name__, 0) + 1
                for _ in range(HTTP_ATTEMPTS):
                    ask = {"text": "soak again", "rid": rid, "sampling_params": {"max_new_tokens": 4}}
                    try:
                        r = c.post("/generate", json=ask)
                        body = r.json()
                    except (httpx.HTTPError, ValueError) as exc:
                        h.other[type(exc).__name__] = h.other.get(type(exc).__name__, 0) + 1
                        continue
                    if r.status_code == 200:
                        h.ok += 1
                        meta = body.get("meta_info", {}) if isinstance(body, dict) else {}
                        if meta.get("id", rid) != rid or meta.get("completion_tokens") != 4:
                            h.wrong_output += 1
                        break
                    self._http_outcome(r.status_code, body)
                    time.sleep(HTTP_RETRY_AFTER_S)
                else:
                    h.gave_up += 1

    def _http_outcome(self, status: int, body: Any) -> None:
        h = self.http
        code = body.get("error") if isinstance(body, dict) else None
        if status == 400 and code == "duplicate_rid":
            h.rid_in_use += 1
        elif status == 503 and code in REJ_CODES:
            h.rejected += 1
        elif status == 503 and code in FAIL_CODES:
            h.failed += 1
        else:
            key = f"{status} {code}"
            h.other[key] = h.other.get(key, 0) + 1

    def _poll_health(self) -> None:
        import httpx

        with httpx.Client(base_url=self.eps["http"], timeout=HEALTH_TIMEOUT_S) as c:
            while not self._stop.wait(HEALTH_EVERY_S):
                sent = time.monotonic()
                try:
                    status = c.get("/health").status_code
                except httpx.HTTPError:
                    status = 0
                self.health.append((sent, time.monotonic(), status))

    def _watch_memory(self, pid: int) -> None:
        from dpcore.runtime.local import rss_bytes

        while not self._stop.wait(0.5):
            try:
                self.rss.append((time.monotonic() - self.t0, rss_bytes(pid)))
            except OSError:
                return

    # ------------------------------------------------------------------ driving

    def _send_bad(self, client: Any, raw: Any, rid: str) -> None:
        import msgpack

        kind = self.rng.randrange(4)
        b = self.books
        if kind == 0:
            client.submit(rid, num_tokens=10, routed_dp_rank=self.cfg.dp_size + 5)
            b.bad_answered[rid] = "invalid_rank"
        elif kind == 1:
            client.submit(rid, num_tokens=10, data_parallel_rank="two")
            b.bad_answered[rid] = "invalid_rank"
        elif kind == 2:
            header = msgpack.packb({"v": 1, "t": "req", "rid": rid, "n": -7, "reply": client.reply_endpoint})
            raw.send_multipart([header, b""])
            client.pending.add(rid)
            b.bad_answered[rid] = "malformed_request"
        else:
            raw.send(b"\xc1 not a dpcore frame " + rid.encode())
            b.bad_unanswered += 1
            return
        b.sent_at[rid] = time.monotonic()

    def _collect(self, client: Any, timeout_s: float) -> None:
        now_ = time.monotonic
        for r in client.poll(timeout_s):
            if r.final:
                self.books.finals[r.rid] = r
                self.books.ended_at[r.rid] = now_()

    def _drive(self, client: Any) -> None:
        import zmq

        raw = zmq.Context.instance().socket(zmq.PUSH)  # frames the SDK would never build
        raw.linger = 1000
        raw.connect(self.eps["ingress"])
        cfg = self.cfg
        b = self.books
        interval = 1.0 / cfg.rate
        n = int(cfg.duration_s * cfg.rate)
        try:
            for i in range(n):
                due = self.t0 + i * interval
                while True:  # collect replies while waiting for the next send
                    left = due - time.monotonic()
                    if left <= 0:
                        break
                    self._collect(client, left)
                rid = f"s{i}"
                if self.rng.random() < cfg.bad_fraction:
                    self._send_bad(client, raw, rid)
                    continue
                tokens = self.rng.randint(32, 2048)
                client.submit(rid, num_tokens=tokens, max_new_tokens=self.rng.randint(2, 24))
                b.sent_at[rid] = time.monotonic()
                b.good.add(rid)
            deadline = time.monotonic() + 30
            while client.pending and time.monotonic() < deadline:
                self._collect(client, 0.2)
        finally:
            raw.close()

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        import zmq

        from dpcore.sdk.client import Client

        cfg = self.cfg
        controller = self.controller = self._start_controller()
        ctx = zmq.Context()
        self._flood_sock = ctx.socket(zmq.PUSH)
        self._flood_sock.linger = 0
        self._flood_sock.connect(self.eps["report"])
        try:
            for r in range(cfg.dp_size):
                self._start_rank(r)
            self._wait_all_reported()
            with Client(self.eps["ingress"]) as client:
                self.t0 = time.monotonic()
                threads = [
                    threading.Thread(target=self._chaos, name="soak-chaos", daemon=True),
                    threading.Thread(target=self._watch_memory, args=(controller.popen.pid,), daemon=True),
                    threading.Thread(target=self._http_client, name="soak-http", daemon=True),
                    threading.Thread(target=self._poll_health, name="soak-health", daemon=True),
                ]
                for t in threads:
                    t.start()
                try:
                    self._drive(client)
                finally:
                    self._stop.set()
                    for t in threads:
                        t.join(30)
                pending = sorted(client.pending)
                stale = client.stale
                bad_replies = client.bad_replies
            counters = self._settled_counters()
            self._stop_flooders()
            t_term = time.monotonic()
            controller.popen.send_signal(signal.SIGTERM)
            exit_code = controller.popen.wait(30)
            shutdown_s = time.monotonic() - t_term
        finally:
            self._stop_flooders()
            self._flood_sock.close()
            ctx.term()
            self.group.close()
        final = _final_line(controller.log)
        return self._figures(counters, final, exit_code, shutdown_s, pending, stale, bad_replies)

    # ------------------------------------------------------------------ figures

    def _figures(self, counters: dict[str, Any], final: dict[str, Any] | None, exit_code: int,
                 shutdown_s: float, pending: list[str], stale: int, bad_replies: int) -> dict[str, Any]:  # fmt: skip
        b = self.books
        kinds = Counter(r.kind for r in b.finals.values())
        good_rej = Counter(r.code for rid, r in b.finals.items() if rid in b.good and r.kind == "rej")
        bad_ok = sum(1 for rid, code in b.bad_answered.items() if rid in b.finals and b.finals[rid].code == code)
        fails = [(rid, r) for rid, r in b.finals.items() if r.kind == "fail"]
        latencies = sorted(
            1000 * (b.ended_at[rid] - b.sent_at[rid]) for rid in b.good if rid in b.finals and b.finals[rid].kind == "out"
        )
        self._rejoins()
        unexplained = [rid for rid, r in fails if not self._explained(r, b.ended_at[rid])]
        warm = [v for t, v in self.rss if t >= 0.25 * self.cfg.duration_s]
        rss = {
            "start_mb": round(warm[0] / 2**20, 1) if warm else None,
            "end_mb": round(warm[-1] / 2**20, 1) if warm else None,
            "max_mb": round(max(warm) / 2**20, 1) if warm else None,
            "samples": len(self.rss),
        }
        disrupted = [d for d in self.disruptions if d.kind not in NO_RANK]
        c = counters
        figures: dict[str, Any] = {
            "config": attrs.asdict(self.cfg),
            "sent": {"good": len(b.good), "bad_answered": len(b.bad_answered), "bad_unanswered": b.bad_unanswered},
            "replies": {"out": kinds["out"], "fail": kinds["fail"], "rej": kinds["rej"], "pending": len(pending),
                        "duplicates_dropped": stale, "undecodable": bad_replies,
                        "good_rejected": dict(good_rej), "bad_rejected_as_expected": bad_ok,
                        "fail_codes": dict(Counter(r.code for _, r in fails)), "fails_unexplained": len(unexplained),
                        "unexplained": [(r.code, r.rank, round(b.ended_at[rid] - self.t0, 2))
                                        for rid, r in fails if rid in unexplained][:10]},  # fmt: skip
            "controller": {k: c.get(k) for k in ("received", "dispatched", "redispatched", "completed", "failed",
                                                 "rejected", "in_flight", "parked", "bad_frames", "reports", "bad_reports",
                                                 "stale_reports", "unknown_done", "internal_errors", "balanced",
                                                 "loop_stalls",
                                                 "rejected_by_code", "failed_by_code")},  # fmt: skip
            "final": final,
            "disruptions": [
                {"kind": d.kind, "rank": d.rank, "at_s": round(d.start - self.t0, 2),
                 "rejoined_after_s": None if d.rejoined_after_s is None else round(d.rejoined_after_s, 2)}
                for d in self.disruptions
            ],  # fmt: skip
            "kills": sum(d.kind == "kill" for d in disrupted),
            "restarts": sum(d.kind in ("kill", "term") for d in disrupted),
            "pauses": sum(d.kind == "pause" for d in disrupted),
            "controller_stalls": sum(d.kind == "stall" for d in self.disruptions),
            "loop_stalls_counted": c.get("loop_stalls"),
            "rejoined": sum(d.rejoined_after_s is not None for d in disrupted),
            "disrupted": len(disrupted),
            "flood_frames": {"bad": self.flooded["bad"], "stale": self.flooded["stale"]},
            "stuck": sum(d.kind == "stuck" for d in disrupted),
            "http": attrs.asdict(self.http),
            "health": self._health_figures(),
            "latency_ms": _percentiles(latencies),
            "rss": rss,
            "shutdown": {"exit_code": exit_code, "seconds": round(shutdown_s, 2)},
        }
        figures["checks"] = checks(figures)
        return figures

    def _health_figures(self) -> dict[str, Any]:
        """/health polls: answered at all, and 200 whenever the controller was not stopped."""
        polls = self.health
        margin = HEALTH_STALL_MARGIN_S

        def in_stall(sent: float, answered: float) -> bool:
            return any(sent <= end + margin and answered >= start for start, end in self._stalls)

        free = [code for sent, answered, code in polls if not in_stall(sent, answered)]
        slowest = max((answered - sent for sent, answered, _ in polls), default=None)
        return {"polls": len(polls), "unanswered": sum(code == 0 for _, _, code in polls),
                "outside_stalls": len(free), "outside_stalls_not_200": sum(code != 200 for code in free),
                "codes": dict(Counter(str(code) for _, _, code in polls)),
                "slowest_s": None if slowest is None else round(slowest, 2)}  # fmt: skip

    def _rejoins(self) -> None:
        """For each disruption: how soon the rank served a request sent after it was back."""
        b = self.books
        served: dict[int, list[tuple[float, float]]] = {}
        for rid, r in b.finals.items():
            if r.kind == "out" and r.rank is not None:
                served.setdefault(r.rank, []).append((b.sent_at[rid], b.ended_at[rid]))
        for d in self.disruptions:
            if d.back is None:
                continue
            after = [end for sent, end in served.get(d.rank, ()) if sent >= d.back]
            if after:
                d.rejoined_after_s = min(after) - d.back

    def _explained(self, reply: Any, at: float) -> bool:
        """A failure is explained by a disruption of its rank that began before it (and
        that the controller noticed within a heartbeat timeout or so)."""
        if reply.code == "rank_stuck":
            # Only the stuck rank: what it was sent until it was replaced fails an admission
            # timeout later (a controller stall may come in between).
            slack = ADMISSION_TIMEOUT_S + 2.5 * self.cfg.heartbeat_timeout_s + 3.0
            return any(d.rank == reply.rank and d.kind == "stuck" and d.start <= at <= (d.back or at) + slack
                       for d in self.disruptions)  # fmt: skip
        if reply.code != "rank_died":
            return False
        limit = 2 * self.cfg.heartbeat_timeout_s + RESTART_AFTER_S + 3.0
        return any(d.rank == reply.rank and d.kind not in NO_RANK and d.start <= at <= d.start + limit
                   for d in self.disruptions)  # fmt: skip


def _final_line(log: Path) -> dict[str, Any] | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"controller_stopped"' in line:
            try:
                return json.loads(line)  # type: ignore[no-any-return]
            except ValueError:
                return None
    return None


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": len(values), "p50": round(percentile(values, 0.5), 2), "p99": round(percentile(values, 0.99), 2),
            "max": round(max(values), 2)}  # fmt: skip


def checks(f: dict[str, Any]) -> dict[str, bool]:
    """The soak's verdicts: the books, not the speed."""
    s, r, c, fin, h, hl = f["sent"], f["replies"], f["controller"], f["final"] or {}, f["http"], f["health"]
    answered = s["good"] + s["bad_answered"]
    # Every HTTP attempt reached the controller and ended there: left (aborted on its rank,
    # counted completed), answered, rejected or failed.
    http_ended = h["left"] + h["ok"] + h["failed"]
    http_sent = http_ended + h["rejected"]
    return {
        "every request got exactly one final reply": r["pending"] == 0 and r["out"] + r["fail"] + r["rej"] == answered,
        "controller: received = completed + failed + rejected": c["in_flight"] == 0 and c["parked"] == 0
        and c["received"] == c["completed"] + c["failed"] + c["rejected"] == answered + http_sent,
        "controller: dispatched = completed + failed + redispatched": c["dispatched"]
        == c["completed"] + c["failed"] + c["redispatched"] and c["balanced"] == {"received": True, "dispatched": True},
        "controller and clients agree": c["rejected"] == r["rej"] + h["rejected"]
        and c["completed"] + c["failed"] == r["out"] + r["fail"] + http_ended,
        "HTTP: each request left after its first chunk got its own answer when asked again": h["requests"] > 0
        and h["ok"] == h["requests"] and h["left"] > 0 and not h["wrong_output"] and not h["gave_up"] and not h["other"],
        "/health answered every poll, 200 while the controller ran": hl["polls"] > 0 and hl["unanswered"] == 0
        and hl["outside_stalls"] > 0 and hl["outside_stalls_not_200"] == 0,
        "rejections are exactly the bad requests": r["bad_rejected_as_expected"] == s["bad_answered"] and not r["good_rejected"],
        "failures only rank_died on a disrupted rank, rank_stuck on the stuck one": r["fails_unexplained"] == 0,
        "bad frames all counted": c["bad_frames"] == s["bad_unanswered"],
        "every flooded report counted, none applied": c["bad_reports"] == f["flood_frames"]["bad"]
        and c["stale_reports"] >= f["flood_frames"]["stale"],
        "every disrupted rank rejoined by itself": f["rejoined"] == f["disrupted"] > 0,
        "a controller stall was counted as the loop's own, not the ranks'": f["controller_stalls"] == 0 or (f["loop_stalls_counted"] or 0) >= 1,
        "no internal errors": c["internal_errors"] == 0,
        # A leak grows with traffic; 16 MiB is far above the noise of a flat process.
        "controller memory flat": f["rss"]["end_mb"] is not None and f["rss"]["end_mb"] - f["rss"]["start_mb"] < 16,
        "clean shutdown (exit 0, books balanced)": f["shutdown"]["exit_code"] == 0 and fin.get("balanced") is True,
    }


def print_figures(f: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    cfg = f["config"]
    t = Table(title=f"dpcore soak: {cfg['duration_s']:g}s at {cfg['rate']:g} req/s, {cfg['dp_size']} mock ranks, {cfg['method']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    s, r, c, lat, rss = f["sent"], f["replies"], f["controller"], f["latency_ms"], f["rss"]
    rows = [
        ("requests sent (good / bad answered / bad frames)", f"{s['good']} / {s['bad_answered']} / {s['bad_unanswered']}"),
        ("controller received", c["received"]),
        ("dispatched (incl. re-dispatches)", c["dispatched"]),
        ("completed", c["completed"]),
        ("failed (rank died)", c["failed"]),
        ("re-dispatched (unadmitted on a dead rank)", c["redispatched"]),
        ("rejected", f"{c['rejected']} {c['rejected_by_code']}"),
        ("client finals out / fail / rej", f"{r['out']} / {r['fail']} / {r['rej']}"),
        ("late duplicate outputs dropped by the client", r["duplicates_dropped"]),
        ("ranks killed / SIGTERM-restarted / paused", f"{f['kills']} / {f['restarts'] - f['kills']} / {f['pauses']}"),
        ("controller stalled (SIGSTOP) / loop stalls it counted", f"{f['controller_stalls']} / {f['loop_stalls_counted']}"),
        ("disrupted ranks that rejoined by themselves", f"{f['rejoined']} / {f['disrupted']}"),
        ("report flood: bad / stale frames sent", f"{f['flood_frames']['bad']} / {f['flood_frames']['stale']}"),
        ("stuck rank stood in (times)", f["stuck"]),
        ("HTTP requests left after one chunk / answered when asked again", f"{f['http']['left']} / {f['http']['ok']}"),
        ("HTTP attempts rejected / failed on the way (asked again)", f"{f['http']['rejected']} / {f['http']['failed']}"),
        ("HTTP attempts while the id was still in use (400, asked again)", f["http"]["rid_in_use"]),
        ("/health polls / unanswered / not 200 while the controller ran",
         f"{f['health']['polls']} / {f['health']['unanswered']} / {f['health']['outside_stalls_not_200']}"),
        ("controller counted bad / stale reports", f"{c['bad_reports']} / {c['stale_reports']}"),
        ("latency of good requests p50 / p99 / max (ms)", f"{lat['p50']} / {lat['p99']} / {lat['max']}"),
        ("controller RSS from 25% of the run: start / end / max (MB)", f"{rss['start_mb']} / {rss['end_mb']} / {rss['max_mb']}"),
        ("SIGTERM to exit (s), exit code", f"{f['shutdown']['seconds']}, {f['shutdown']['exit_code']}"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    for name, ok in f["checks"].items():
        console.print(f"[{'green' if ok else 'bold red'}]{'PASS' if ok else 'FAIL'}[/] {name}")


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    p.add_argument("--duration", type=float, default=d.duration_s, help=f"seconds of traffic (default {d.duration_s:g})")
    p.add_argument("--rate", type=float, default=d.rate, help=f"requests per second (default {d.rate:g})")
    p.add_argument("--dp-size", type=int, default=d.dp_size, help=f"mock ranks (default {d.dp_size})")
    p.add_argument("--load-balance-method", default=d.method,
                   help="policy (default: the load-aware baseline the installed distributions declare)")  # fmt: skip
    p.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout_s,
                   help=f"controller's rank heartbeat deadline, seconds (default {d.heartbeat_timeout_s:g})")  # fmt: skip
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction, help=f"share of bad requests (default {d.bad_fraction})")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--workdir", default=None, metavar="DIR", help="keep the processes' logs here (default: a temporary dir)")


def run(args: argparse.Namespace) -> int:
    cfg = SoakConfig(
        duration_s=args.duration, rate=args.rate, dp_size=args.dp_size, method=args.load_balance_method,
        heartbeat_timeout_s=args.heartbeat_timeout, bad_fraction=args.bad_fraction, seed=args.seed,
    )  # fmt: skip
    cfg.check()
    with tempfile.TemporaryDirectory(prefix="dpcore-soak-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        figures = Soak(cfg, workdir).run()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print_figures(figures)
    return 0 if all(figures["checks"].values()) else 1
