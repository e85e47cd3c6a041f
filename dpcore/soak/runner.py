"""The soak's run: the controller and its ranks as processes, the chaos schedule, the traffic
(SDK, bad frames, HTTP streams left and asked again, ``/health`` polls) and the books it keeps.
"""

from __future__ import annotations

import itertools
import json
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dpcore.auto import baseline_policy
from dpcore.soak.config import (
    ADMISSION_TIMEOUT_S,
    NO_RANK,
    RESTART_AFTER_S,
    SCHEDULE,
    STUCK_FOR_S,
    Books,
    Disruption,
    HttpBooks,
    SoakConfig,
)
from dpcore.soak.front import http_client, poll_health
from dpcore.soak.report import figures

DPCORE = (sys.executable, "-m", "dpcore")
#: How long the end of a run waits for each of its threads to stop.
THREAD_JOIN_S = 30.0


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
        self.stalls: list[tuple[float, float]] = []
        #: The soak's own threads that raised or did not stop: a run with one is no pass (a chaos
        #: thread that died early would leave fewer disruptions, all of them passed).
        self.thread_errors: list[str] = []

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
                self.stalls.append((d.start, time.monotonic()))
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

    def _guarded(self, target: Callable[..., None], *args: Any) -> None:
        """Run *target* on this thread, keeping what it raised for the verdict (and raising it
        again, so the thread's traceback is printed as usual)."""
        try:
            target(*args)
        except BaseException as exc:
            self.thread_errors.append(f"{threading.current_thread().name}: {type(exc).__name__}: {exc}")
            raise

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
                url, stop = self.eps["http"], self._stop
                jobs = {
                    "soak-chaos": (self._chaos,),
                    "soak-memory": (self._watch_memory, controller.popen.pid),
                    "soak-http": (http_client, url, stop, self.http),
                    "soak-health": (poll_health, url, stop, self.health),
                }
                threads = [threading.Thread(target=self._guarded, args=job, name=name, daemon=True)
                           for name, job in jobs.items()]  # fmt: skip
                for t in threads:
                    t.start()
                try:
                    self._drive(client)
                finally:
                    self._stop.set()
                    for t in threads:
                        t.join(THREAD_JOIN_S)
                        if t.is_alive():
                            self.thread_errors.append(f"{t.name}: still running {THREAD_JOIN_S:g} s after the stop")
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
        return figures(self, counters, final, exit_code, shutdown_s, pending, stale, bad_replies)


def _final_line(log: Path) -> dict[str, Any] | None:
    for line in log.read_text(errors="replace").splitlines():
        if '"controller_stopped"' in line:
            try:
                return json.loads(line)  # type: ignore[no-any-return]
            except ValueError:
                return None
    return None
