"""Shadow policies: agreement with the live chain, the load they would have produced, and a
shadow that raises or is slow never costing a live request (real rank processes, real
sockets, the client SDK; one test through ``dpcore serve`` and ``dpcore shadow-report``)."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time

import pytest

from dpcore import hookimpl
from dpcore.errors import ConfigError
from dpcore.hashing import block_hashes
from dpcore.manager import PolicyManager
from dpcore.model import LoadReport, Request
from dpcore.runtime import shadow as shadowmod
from dpcore.runtime.controller import Controller
from dpcore.runtime.local import start_rank_process
from dpcore.runtime.shadow import Shadow
from dpcore.sdk import Client

#: The shadow budget of the tests that judge time.
BUDGET_S = 0.002


class StepClock:
    """The clock the tests' shadows are timed with: it moves only when a shadow policy below
    says it took time, so whether a decision is over budget never hangs on the machine's load
    (a preempted decision is not slow, and a slow one is slow by exactly what it says)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def take(self, seconds: float) -> None:
        """Really spend *seconds* on the calling thread, and as much on this clock."""
        time.sleep(seconds)
        self.now += seconds


CLOCK = StepClock()


class Raises:
    def __init__(self, ctx):
        pass

    @hookimpl
    def select_rank(self, request, ctx):
        raise RuntimeError("shadow bug")


class Slow:
    def __init__(self, ctx):
        pass

    @hookimpl
    def select_rank(self, request, ctx):
        CLOCK.take(2 * BUDGET_S)
        return ctx.active_ranks[0]


class Stalls(Slow):
    @hookimpl
    def select_rank(self, request, ctx):
        CLOCK.take(100 * BUDGET_S)  # suspended at once
        return 0


class Counts:
    """Chooses like round_robin over two ranks; counts what it is told."""

    def __init__(self, ctx):
        self.reports = 0
        self.dispatches = []

    @hookimpl
    def select_rank(self, request, ctx):
        return len(self.dispatches) % 2

    @hookimpl
    def on_dispatch(self, request, rank, seq, ctx):
        self.dispatches.append((rank, seq))

    @hookimpl
    def on_load_report(self, report, ctx):
        self.reports += 1


CLASSES = {"raises": Raises, "slow": Slow, "stalls": Stalls, "counts": Counts}


def drive(live: PolicyManager, shadow: Shadow, n: int, seed: int = 1) -> None:
    """The controller's order for each request: live select, shadow decide, live dispatch,
    shadow told; a load report per rank every 16 requests (a rank's own view)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(256)] for _ in range(6)]
    seqs = [-1] * live.ctx.dp_size
    for i in range(n):
        tokens = prefixes[i % 6] + [rng.randrange(50_000) for _ in range(rng.randrange(16, 200))]
        req = Request(f"q{i}", num_tokens=len(tokens), block_hashes=tuple(block_hashes(tokens, 64)))
        rank = live.select(req)
        shadow.decide(req, rank)
        seq = live.dispatched(req, rank)
        shadow.dispatched(req, rank, seq)
        seqs[rank] = seq
        if i % 16 == 15:
            for r in range(live.ctx.dp_size):
                rep = LoadReport(rank=r, seq=i, acked_seq=seqs[r], num_running=live.ledger.requests[r] // 2,
                                 num_tokens=live.ledger.tokens[r] // 2, kv_capacity=100_000)  # fmt: skip
                if live.report(rep):
                    shadow.report(rep)


@pytest.mark.parametrize("method", ["cache_aware", "total_tokens", "round_robin,total_requests"])
def test_a_shadow_equal_to_the_live_chain_agrees_on_every_request(method):
    live = PolicyManager.from_method(method, dp_size=4)
    shadow = Shadow(live, method, clock=CLOCK)
    shadow.attach()
    drive(live, shadow, 600)
    s = shadow.summary()
    assert s["decisions"] == 600 and s["agreement"] == 1.0 and s["errors"] == 0
    assert [r["shadow_requests"] for r in s["per_rank"]] == [r["live_requests"] for r in s["per_rank"]]
    assert [r["shadow_prompt_tokens"] for r in s["per_rank"]] == [r["live_prompt_tokens"] for r in s["per_rank"]]
    if method == "cache_aware":  # it claims prefix hits in its explanation, the same as live
        assert sum(r["shadow_matched_blocks"] for r in s["per_rank"]) > 0
        assert [r["shadow_matched_blocks"] for r in s["per_rank"]] == [r["live_matched_blocks"] for r in s["per_rank"]]


def test_a_different_shadow_disagrees_and_shows_the_load_it_would_have_made():
    live = PolicyManager.from_method("round_robin", dp_size=4)
    shadow = Shadow(live, "cache_aware", clock=CLOCK)
    shadow.attach()
    drive(live, shadow, 600)
    s = shadow.summary()
    assert s["decisions"] == 600 and s["agreement"] < 0.9
    assert [r["live_requests"] for r in s["per_rank"]] == [150] * 4
    assert sum(r["shadow_requests"] for r in s["per_rank"]) == 600
    assert sum(r["shadow_matched_blocks"] for r in s["per_rank"]) > 0  # cache_aware claims hits
    assert sum(r["live_matched_blocks"] for r in s["per_rank"]) == 0  # round_robin never does
    assert {p for p, _, _ in s["reasons"]} == {"cache_aware"}


def test_the_shadow_follows_reality_not_its_own_choices():
    # round_robin in the shadow: it is told where requests went, but its counter moves only
    # with its own decisions; total_requests in the shadow reads the live ledger, which holds
    # the live chain's dispatches, so with everything sent to rank 0 it says rank 1 from the
    # second request on.
    live = PolicyManager.from_method("round_robin", dp_size=2)
    shadow = Shadow(live, "total_requests", clock=CLOCK)
    shadow.attach()
    for i in range(10):
        req = Request(f"p{i}", num_tokens=5, routed_dp_rank=None)
        shadow.decide(req, 0)
        shadow.dispatched(req, 0, live.ledger.record_dispatch(0, 5))
    rows = shadow.summary()["per_rank"]
    assert [r["shadow_requests"] for r in rows] == [1, 9] and [r["live_requests"] for r in rows] == [10, 0]


def test_rank_states_and_reports_reach_the_shadow():
    seen = []

    class Watch:
        def __init__(self, ctx):
            pass

        @hookimpl
        def select_rank(self, request, ctx):
            return ctx.active_ranks[0]

        @hookimpl
        def on_rank_state(self, rank, active, epoch, new_life, ctx):
            seen.append(("state", rank, active))

        @hookimpl
        def on_load_report(self, report, ctx):
            seen.append(("report", report.rank))

    live = PolicyManager.from_method("round_robin", dp_size=2)
    live.report(LoadReport(rank=1, epoch=3, seq=0))
    shadow = Shadow(live, "watch", classes={"watch": Watch}, clock=CLOCK)
    shadow.attach()  # warm: rank 1's life and report
    assert seen == [("state", 1, True), ("report", 1)]
    live.ledger.set_active(0, False)
    assert seen[-1] == ("state", 0, False)


@pytest.mark.parametrize(
    ("method", "says", "counter"),
    [("raises", "select_rank raised RuntimeError: shadow bug", "errors"),
     ("slow", "over the 2 ms budget", "overruns"),
     ("stalls", "over 50 times the 2 ms budget", "overruns")],
)  # fmt: skip
def test_a_failing_or_slow_shadow_is_suspended_and_stops_costing(method, says, counter):
    live = PolicyManager.from_method("round_robin", dp_size=2)
    shadow = Shadow(live, method, classes=CLASSES, budget_s=BUDGET_S, clock=CLOCK)
    shadow.attach()
    for i in range(40):
        req = Request(f"s{i}", num_tokens=3)
        rank = live.select(req)
        shadow.decide(req, rank)
        shadow.dispatched(req, rank, live.dispatched(req, rank))
    s = shadow.summary()
    assert s["suspended"] and says in s["suspended"], s["suspended"]
    assert s[counter] >= 1 and s["skipped"] > 0
    assert s[counter] <= shadowmod.MAX_STRIKES  # it stopped being asked
    assert [r["live_requests"] for r in s["per_rank"]] == [r["live_requests"] for r in s["per_rank"]]


def test_shadow_options_are_checked():
    live = PolicyManager.from_method("round_robin", dp_size=2)
    with pytest.raises(ConfigError, match="does not accept options"):
        Shadow(live, "cache_aware", {"cache_aware": {"nope": 1}})
    with pytest.raises(ConfigError, match="shadow-budget-ms"):
        Shadow(live, "round_robin", budget_s=0)


# --------------------------------------------------------------------------- real processes


@contextlib.contextmanager
def controller_with_ranks(live_method: str, shadow_method: str, dp_size: int = 2):
    manager = PolicyManager.from_method(live_method, dp_size=dp_size, classes=CLASSES)
    shadow = Shadow(manager, shadow_method, classes=CLASSES, budget_s=BUDGET_S, clock=CLOCK)
    c = Controller(manager, shadow=shadow)
    c.start()
    procs = []
    try:
        for r in range(dp_size):
            procs.append(start_rank_process(r, c.endpoints.dispatch[r], c.endpoints.report, heartbeat_s=0.05))
        deadline = time.monotonic() + 30
        while not all(manager.ledger.reported):
            assert time.monotonic() < deadline, "ranks did not report"
            time.sleep(0.02)
        yield c, shadow
    finally:
        if c._thread is not None and c._thread.is_alive():
            c.stop()
        for p in procs:
            p.terminate()
            p.wait(10)


@pytest.mark.e2e
@pytest.mark.parametrize("shadow_method", ["raises", "slow"])
def test_a_bad_shadow_leaves_the_live_books_exact(shadow_method):
    n = 400
    with controller_with_ranks("round_robin", shadow_method) as (c, shadow):
        with Client(c.endpoints.ingress) as client:
            for i in range(n):
                client.submit(f"b{i}", num_tokens=20)
            replies = client.wait_all(60)
        stats = c.stop(drain_timeout_s=10)
        s = c.on_loop(shadow.summary)
    assert len(replies) == n and all(r.kind == "out" for r in replies)
    assert stats["received"] == stats["dispatched"] == stats["completed"] == n
    assert stats["failed"] == stats["rejected"] == 0 and all(stats["balanced"].values())
    assert [row["dispatched"] for row in stats["per_rank"]] == [n // 2, n // 2]  # the live round_robin
    assert s["suspended"], s
    assert s["decisions"] + s["skipped"] + s["errors"] == n


@pytest.mark.e2e
def test_the_shadow_hears_the_live_dispatches_and_the_ranks_reports():
    with controller_with_ranks("counts", "counts") as (c, shadow):
        with Client(c.endpoints.ingress) as client:
            for i in range(100):
                client.submit(f"c{i}", num_tokens=20)
            assert len(client.wait_all(60)) == 100
        time.sleep(0.2)  # a few more heartbeats
        stats = c.stop(drain_timeout_s=10)
        s = c.on_loop(shadow.summary)
    counts, live = shadow.manager.policies["counts"], c.manager.policies["counts"]
    assert s["suspended"] is None, s
    assert stats["completed"] == 100 and s["agreement"] == 1.0
    assert sorted(counts.dispatches) == sorted((r, q) for r in range(2) for q in range(50))  # live ranks and seqs
    assert counts.dispatches == live.dispatches
    assert counts.reports > 0 and counts.reports == live.reports  # every report the live chain heard


@pytest.mark.e2e
def test_serve_with_a_shadow_and_shadow_report(tmp_path):
    run_dir = tmp_path / "run"
    eps_file = tmp_path / "eps.json"
    # Agreement, not time: a budget no pause of a loaded machine reaches, so the shadow is
    # never suspended and decides all 300 requests.
    serve = subprocess.Popen(
        [sys.executable, "-m", "dpcore", "--log-json", "serve", "--dp-size", "2", "--load-balance-method", "cache_aware",
         "--shadow-policy", "cache_aware", "--shadow-budget-ms", "1000", "--run-dir", str(run_dir), "--endpoints-file", str(eps_file),
         "--metrics-port", "0", "--http-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs = []
    try:
        deadline = time.monotonic() + 30
        while not eps_file.exists():
            assert time.monotonic() < deadline and serve.poll() is None, "serve did not start"
            time.sleep(0.05)
        eps = json.loads(eps_file.read_text())
        for r in range(2):
            procs.append(start_rank_process(r, eps["dispatch"][r], eps["report"], "--delay-s", "0.005", heartbeat_s=0.05))
        from dpcore.policycli import status_of

        while not all(row["reported"] and row["active"] for row in status_of(eps["status"], 10)["loads"]):
            assert time.monotonic() < deadline + 30, "ranks did not report"
            time.sleep(0.05)
        with Client(eps["ingress"]) as client:
            rng = random.Random(3)
            prefixes = [[rng.randrange(50_000) for _ in range(512)] for _ in range(5)]
            for i in range(300):  # shared prefixes: cache_aware's state matters
                client.submit(f"s{i}", token_ids=prefixes[i % 5] + [rng.randrange(50_000) for _ in range(i % 90)])
                if i % 20 == 19:
                    time.sleep(0.1)  # reports arrive between requests
            replies = client.wait_all(60)
        assert len(replies) == 300
        r = subprocess.run([sys.executable, "-m", "dpcore", "shadow-report", "--run-dir", str(run_dir), "--json"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stderr
        s = json.loads(r.stdout)
        # A request moved off a rank that went silent is decided again, by both chains.
        assert s["decisions"] >= 300 and s["agreement"] == 1.0 and s["chain"] == ["cache_aware"]
        text = subprocess.run([sys.executable, "-m", "dpcore", "shadow-report", "--run-dir", str(run_dir)],
                              capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        text = " ".join(text.split())  # rich wraps to the terminal width
        assert f"agreement 100.0% ({s['decisions']}/{s['decisions']})" in text and "µs per decision" in text
        import httpx

        metrics = httpx.get(eps["metrics"]).text
        assert f"dpcore_shadow_agreements_total {s['decisions']:.1f}" in metrics
        assert 'dpcore_shadow_rank_requests_total{chain="shadow",rank="0"}' in metrics
        for _ in range(300):  # the HTTP front's process may still be starting
            with contextlib.suppress(httpx.TransportError):
                info = httpx.get(f"{eps['http']}/server_info").json()
                break
            time.sleep(0.1)
        assert info["shadow"]["agreement"] == 1.0 and info["shadow"]["decisions"] == s["decisions"]
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.communicate(timeout=60)
        for p in procs:
            p.terminate()
            p.wait(10)


def test_serve_refuses_a_bad_shadow(dpcore_exe):
    r = subprocess.run([*dpcore_exe, "serve", "--dry-run", "--shadow-policy", "no_such_policy"], capture_output=True,
                       text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "--shadow-policy 'no_such_policy'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([*dpcore_exe, "serve", "--dry-run", "--shadow-policy-option", "cache_aware.x=1"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 2 and "needs --shadow-policy" in r.stderr
