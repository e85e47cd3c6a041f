"""Hot policy swap: the manager's adopt contract, refusals, warm start, the admin credential,
and a swap under load through a real ``dpcore serve`` with rank processes and a sender."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import httpx
import pytest
import zmq

from dpcore import hookimpl
from dpcore.errors import ConfigError
from dpcore.ledger import LoadLedger
from dpcore.manager import CHAIN_STATE, PolicyManager
from dpcore.model import LoadReport, Request
from dpcore.runtime import admin, swap
from dpcore.runtime.local import start_rank_process, wait_for
from dpcore.runtime.status import StatusServer
from dpcore.sdk import Client



class Pin:
    """Every request to the highest active rank; counts what it was told."""

    def __init__(self, ctx):
        self.states = []
        self.reports = []

    @hookimpl
    def select_rank(self, request, ctx):
        ctx.explain("pin", "highest")
        return ctx.active_ranks[-1]

    @hookimpl
    def on_rank_state(self, rank, active, epoch, new_life, ctx):
        self.states.append((rank, active, epoch, new_life))

    @hookimpl
    def on_load_report(self, report, ctx):
        self.reports.append(report)


class Raises:
    def __init__(self, ctx):
        raise RuntimeError("no GPU here")

    @hookimpl
    def select_rank(self, request, ctx):
        return 0


class BadHook:
    def __init__(self, ctx):
        pass

    @hookimpl
    def select_rank(self, request, ctx, budget):  # dpcore passes no 'budget'
        return 0


class NoSelect:
    def __init__(self, ctx):
        pass

    @hookimpl
    def on_dispatch(self, request, rank, ctx):
        pass


class ColdStartFails(Pin):
    @hookimpl
    def on_rank_state(self, rank, active, epoch, new_life, ctx):
        raise KeyError(rank)


class Opts:
    def __init__(self, ctx, depth: int = 1):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")

    @hookimpl
    def select_rank(self, request, ctx):
        return ctx.active_ranks[0]


CLASSES = {"pin": Pin, "raises": Raises, "bad_hook": BadHook, "no_select": NoSelect, "cold": ColdStartFails,
           "opts": Opts}  # fmt: skip


def running(method="round_robin", dp_size=4):
    """A manager and a swapper whose 'loop' runs installs inline (no controller thread)."""
    manager = PolicyManager.from_method(method, dp_size=dp_size, classes=CLASSES)
    controller = types.SimpleNamespace(manager=manager, on_loop=lambda fn, timeout_s: fn())
    return manager, swap.Swapper(controller, classes=CLASSES)


def place(manager, n, prefix="q"):
    return [manager.route(Request(f"{prefix}{i}", num_tokens=10)) for i in range(n)]


def test_adopt_takes_every_chain_attribute_and_keeps_the_rest():
    a = PolicyManager.from_method("round_robin", dp_size=2)
    shared = {"ctx", "ledger", "cache"}
    # A manager attribute must be either the chain's (adopted) or the controller's (kept).
    assert set(vars(a)) == shared | set(CHAIN_STATE)


def test_swap_changes_the_next_decision_and_keeps_the_ledger():
    manager, swapper = running("round_robin")
    ledger, ctx = manager.ledger, manager.ctx
    assert place(manager, 4) == [0, 1, 2, 3]
    result = swapper.swap("pin")
    assert result["chain"] == ["pin"] and result["previous"] == ["round_robin"]
    assert manager.ledger is ledger and manager.ctx is ctx
    assert list(ledger.requests) == [1, 1, 1, 1]  # the unacknowledged dispatches carried over
    assert place(manager, 3) == [3, 3, 3]
    assert ledger.requests[3] == 4
    assert manager.last_decision.policy == "pin"
    swapper.swap("round_robin,pin")
    assert place(manager, 2) == [0, 1]  # a fresh round_robin: its counter starts at 0
    assert swapper.counts == {"ok": 2, "refused": 0}
    assert swapper.info()["chain"] == ["round_robin", "pin"]


def test_new_chain_starts_warm():
    manager, swapper = running("round_robin", dp_size=3)
    ledger = manager.ledger
    manager.report(LoadReport(rank=0, epoch=7, seq=1, num_running=2, num_tokens=50))
    manager.report(LoadReport(rank=2, epoch=9, seq=1, num_waiting=1, num_tokens=20))
    ledger.set_active(1, False)
    swapper.swap("pin")
    pin = manager.policies["pin"]
    assert pin.states == [(0, True, 7, False), (1, False, None, False), (2, True, 9, False)]
    assert [(r.rank, r.num_tokens) for r in pin.reports] == [(0, 50), (2, 20)]
    # After the swap the new chain hears what happens, through the same ledger.
    manager.report(LoadReport(rank=0, epoch=7, seq=2, num_running=1, num_tokens=10))
    ledger.set_active(1, True)
    assert pin.reports[-1].seq == 2 and pin.states[-1] == (1, True, None, False)


def test_what_changes_between_warm_up_and_install_reaches_the_new_chain():
    manager = PolicyManager.from_method("round_robin", dp_size=3)
    manager.report(LoadReport(rank=0, epoch=1, seq=1, num_tokens=5))

    def on_loop(fn, timeout_s):
        # The loop moves on while the new chain is being built and warmed off the loop.
        manager.report(LoadReport(rank=0, epoch=1, seq=2, num_tokens=7))
        manager.ledger.set_active(2, False)
        return fn()

    swapper = swap.Swapper(types.SimpleNamespace(manager=manager, on_loop=on_loop), classes=CLASSES)
    swapper.swap("pin")
    pin = manager.policies["pin"]
    assert [r.num_tokens for r in pin.reports] == [5, 7]  # the warm-up, then the newer report
    assert pin.states == [(0, True, 1, False), (1, True, None, False), (2, True, None, False), (2, False, None, False)]


@pytest.mark.parametrize(
    ("method", "options", "reason", "says"),
    [
        ("no_such_policy", None, swap.UNKNOWN_POLICY, "unknown load balance method 'no_such_policy'"),
        ("opts", {"opts": {"width": 2}}, swap.BAD_OPTIONS, "does not accept options"),
        ("opts", {"opts": {"depth": 0}}, swap.BAD_OPTIONS, "depth must be >= 1"),
        ("pin", {"round_robin": {}}, swap.BAD_OPTIONS, "not in the chain"),
        ("raises", None, swap.CONSTRUCTOR_FAILED, "RuntimeError: no GPU here"),
        ("bad_hook", None, swap.BROKEN_POLICY, "takes argument 'budget'"),
        ("no_select", None, swap.BROKEN_POLICY, "implements no select_rank"),
        ("pin,pin", None, swap.INVALID_CHAIN, "names a policy twice"),
        ("cold", None, swap.WARM_START_FAILED, "on_rank_state raised KeyError"),
    ],
)
def test_a_broken_swap_is_refused_and_the_old_chain_keeps_serving(method, options, reason, says):
    manager, swapper = running("round_robin")
    place(manager, 2)
    with pytest.raises(swap.SwapRefused, match=says) as err:
        swapper.swap(method, options)
    assert err.value.reason == reason
    assert manager.chain == ("round_robin",)
    assert place(manager, 2, "after") == [2, 3]  # the same round_robin, its state intact
    assert swapper.counts == {"ok": 0, "refused": 1} and swapper.refused_by_reason == {reason: 1}
    last = swapper.info()["last"]
    assert last["result"] == "refused" and last["reason"] == reason and says in last["error"]


def test_pd_prefill_refuses_a_swap_that_changes_the_pairing():
    manager = PolicyManager.from_method("follow_bootstrap_room", dp_size=2, disaggregation_mode="prefill")
    swapper = swap.Swapper(types.SimpleNamespace(manager=manager, on_loop=lambda fn, timeout_s: fn()))
    with pytest.raises(swap.SwapRefused) as err:
        swapper.swap("round_robin")
    assert err.value.reason == swap.PD_PAIRING
    assert manager.chain == ("follow_bootstrap_room",)


def test_an_install_the_loop_never_ran_does_not_happen_later():
    manager = PolicyManager.from_method("round_robin", dp_size=2)
    parked = []

    def on_loop(fn, timeout_s):
        parked.append(fn)  # the loop is stuck: it runs the install only after the wait ended
        raise TimeoutError

    swapper = swap.Swapper(types.SimpleNamespace(manager=manager, on_loop=on_loop), install_timeout_s=0.01)
    with pytest.raises(swap.SwapRefused) as err:
        swapper.swap("total_requests")
    assert err.value.reason == swap.LOOP_BUSY
    parked[0]()
    assert manager.chain == ("round_robin",)


# --------------------------------------------------------------------------- the credential


def test_token_file_is_private_and_checked(tmp_path):
    path = tmp_path / "admin.token"
    token = admin.create_token(path)
    assert len(token) >= 43 and os.stat(path).st_mode & 0o777 == 0o600
    assert admin.read_token(path) == token
    assert admin.create_token(path) != token  # a new one at every start
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="accessible by group or others"):
        admin.read_token(path)
    with pytest.raises(ConfigError, match="cannot read the admin token file"):
        admin.read_token(tmp_path / "missing")


def test_admin_commands_over_the_status_socket(tmp_path):
    manager, swapper = running("round_robin")
    token = admin.create_token(tmp_path / "admin.token")
    ep = f"ipc://{tmp_path}/status"
    cmds = admin.Admin(swapper, token)
    with StatusServer(ep, lambda: {}, admin=cmds.answer, curve=False):
        with pytest.raises(admin.AdminError) as err:
            admin.call(ep, "not-the-token", "swap", {"method": "pin"}, timeout_s=5)
        assert err.value.code == admin.UNAUTHORIZED and cmds.unauthorized == 1
        assert manager.chain == ("round_robin",)
        with pytest.raises(admin.AdminError) as err:
            admin.call(ep, token, "swap", {"method": "raises"}, timeout_s=5)
        assert err.value.code == swap.CONSTRUCTOR_FAILED and "no GPU here" in str(err.value)
        with pytest.raises(admin.AdminError) as err:
            admin.call(ep, token, "swap", {"method": 3}, timeout_s=5)
        assert err.value.code == admin.BAD_COMMAND
        with pytest.raises(admin.AdminError) as err:
            admin.call(ep, token, "reboot", timeout_s=5)
        assert err.value.code == admin.BAD_COMMAND
        done = admin.call(ep, token, "swap", {"method": "pin"}, timeout_s=5)
        assert done["chain"] == ["pin"] and manager.chain == ("pin",)
        shown = admin.call(ep, token, "show", timeout_s=5)
        assert shown["swaps"] == 1 and shown["refused"] == 1
    with StatusServer(ep, lambda: {}, admin=admin.Admin(swapper, None).answer, curve=False):
        with pytest.raises(admin.AdminError) as err:
            admin.call(ep, token, "show", timeout_s=5)
        assert err.value.code == admin.DISABLED


class FakeLink:
    def __init__(self):
        self.calls = []

    async def admin(self, token, op, args=None):
        self.calls.append((token, op, args))
        if token != "good":
            raise admin.AdminError(admin.UNAUTHORIZED, "missing or wrong admin token")
        if args and args.get("method") == "nope":
            raise admin.AdminError(swap.UNKNOWN_POLICY, "unknown load balance method 'nope'")
        return {"chain": ["x"]}


@pytest.mark.parametrize(("host", "allow", "peer_ok"), [("0.0.0.0", False, False), ("127.0.0.1", False, False),
                                                          ("0.0.0.0", True, True)])  # fmt: skip
def test_http_admin_route_is_loopback_only_unless_allowed(host, allow, peer_ok):
    from starlette.testclient import TestClient

    from dpcore.http.app import FrontConfig, create_app

    link = FakeLink()
    client = TestClient(create_app(link, FrontConfig(host=host, allow_remote_admin=allow)))  # peer: "testclient"
    auth = {"Authorization": "Bearer good"}
    r = client.post("/admin/policy", json={"method": "x"}, headers=auth)
    if not peer_ok:
        assert r.status_code == 403 and r.json()["error"] == "admin_loopback_only" and not link.calls
        return
    assert r.status_code == 200 and link.calls == [("good", "swap", {"method": "x", "options": {}})]
    assert client.get("/admin/policy", headers={"Authorization": "Bearer bad"}).status_code == 401
    assert client.get("/admin/policy").status_code == 401
    r = client.post("/admin/policy", json={"method": "nope"}, headers=auth)
    assert r.status_code == 409 and r.json()["error"] == "unknown_policy"
    assert client.post("/admin/policy", json={"policy": "x"}, headers=auth).status_code == 400


# --------------------------------------------------------------------------- under load


PIN_FILE = '''
from dpcore import hookimpl


class PinZero:
    """Every request to rank 0 (while it is active)."""

    def __init__(self, ctx):
        pass

    @hookimpl
    def select_rank(self, request, ctx):
        ctx.explain("pin_zero", "pinned")
        return 0
'''


def dpcore_cmd(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dpcore", *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.e2e
def test_swaps_under_load_keep_exact_books(tmp_path):
    """3,000 requests from a sender process's SDK client while the chain is swapped six
    times (one refused), through dpcore serve, the CLI and the HTTP admin route."""
    total = 3000
    pin = tmp_path / "pin.py"
    pin.write_text(PIN_FILE)
    run_dir = tmp_path / "run"
    eps_file = tmp_path / "eps.json"
    serve = subprocess.Popen(
        [sys.executable, "-m", "dpcore", "--log-json", "serve", "--dp-size", "3", "--load-balance-method", "round_robin",
         "--run-dir", str(run_dir), "--endpoints-file", str(eps_file), "--metrics-port", "0", "--http-port", "0",
         "--drain-timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    ranks: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(eps_file.exists, 30, "the endpoints file")
        eps = json.loads(eps_file.read_text())
        for r in range(3):
            ranks.append(start_rank_process(r, eps["dispatch"][r], eps["report"], "--delay-s", "0.002", heartbeat_s=0.05))

        def reporting() -> bool:
            try:
                loads = httpx.get(f"{eps['http']}/v1/loads").json()["loads"]
            except (httpx.HTTPError, KeyError):
                return False  # the HTTP front is still starting
            return all(r["reported"] and r["active"] for r in loads)

        wait_for(reporting, 30, "every rank reporting")
        replies: list = []
        sent = [0]
        done = [0]  # swaps answered (done or refused)
        swaps = [("cli", "total_requests"), ("cli", f"{pin}:PinZero"), ("cli", "no_such_policy"),
                 ("http", "cache_aware"), ("cli", f"{pin}:PinZero"), ("http", "round_robin,total_tokens")]  # fmt: skip
        phase = total // (len(swaps) + 1)
        stop = threading.Event()

        def sender() -> None:
            with Client(eps["ingress"]) as client:
                for i in range(total):
                    # Never more than half a phase ahead of the swaps: each swap lands mid-stream.
                    while i >= (done[0] + 1) * phase + phase // 2 and done[0] < len(swaps):
                        replies.extend(client.poll(0.005))
                    client.submit(f"r{i}", num_tokens=16 + i % 200)
                    sent[0] = i + 1
                    replies.extend(client.poll(0))
                replies.extend(client.wait_all(60))
            stop.set()

        t = threading.Thread(target=sender)
        t.start()
        token = (run_dir / admin.TOKEN_NAME).read_text().strip()
        for k, (how, method) in enumerate(swaps):
            wait_for(lambda: sent[0] >= (k + 1) * phase, 60, "requests in flight")
            if how == "cli":
                r = dpcore_cmd("policy", "swap", method, "--run-dir", str(run_dir), "--json")
                ok = r.returncode == 0
                detail = r.stdout + r.stderr
            else:
                h = httpx.post(f"{eps['http']}/admin/policy", json={"method": method},
                               headers={"Authorization": f"Bearer {token}"}, timeout=30)  # fmt: skip
                ok = h.status_code == 200
                detail = h.text
            done[0] += 1
            if method == "no_such_policy":
                assert not ok and "unknown_policy" in detail and "running chain is unchanged" in detail
            else:
                assert ok, detail
        t.join(120)
        assert stop.is_set() and not t.is_alive()
        # The pinned phases really ran on the new chain: rank 0 took requests only it could.
        info = httpx.get(f"{eps['http']}/server_info").json()
        assert info["load_balance_method"] == "round_robin,total_tokens"
        assert info["policy_swaps"]["swaps"] == 5 and info["policy_swaps"]["refused"] == 1
        assert info["shadow"] is None  # no --shadow-policy
        metrics = httpx.get(eps["metrics"]).text
        assert 'dpcore_policy_swaps_total{result="ok"} 5.0' in metrics
        assert 'dpcore_policy_swaps_refused_total{reason="unknown_policy"} 1.0' in metrics
        decisions = [line for line in metrics.splitlines() if line.startswith("dpcore_decisions_total")]
        assert any('policy="pin_zero",reason="pinned"' in line for line in decisions), decisions
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=60)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        for p in ranks:
            p.terminate()
            p.wait(10)
    assert serve.returncode == 0, err[-3000:]
    finals = [rep for rep in replies if rep.final]
    assert len(finals) == total and len({rep.rid for rep in finals}) == total  # none lost, none twice
    assert all(rep.kind == "out" for rep in finals), [(rep.kind, rep.code, rep.msg) for rep in finals if rep.kind != "out"][:5]
    stopped = [json.loads(line) for line in err.splitlines() if '"controller_stopped"' in line][0]
    assert stopped["received"] == stopped["dispatched"] == stopped["completed"] == total
    assert stopped["failed"] == stopped["rejected"] == stopped["redispatched"] == stopped["in_flight"] == 0
    assert stopped["balanced"] is True
    swapped = [json.loads(line) for line in err.splitlines() if '"policy_swapped"' in line]
    refused = [json.loads(line) for line in err.splitlines() if '"policy_swap_refused"' in line]
    assert len(swapped) == 5 and len(refused) == 1 and refused[0]["reason"] == "unknown_policy"
    assert not (run_dir / admin.TOKEN_NAME).exists()  # removed at exit
