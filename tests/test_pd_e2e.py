"""PD disaggregation mode (b) end to end: two ``dpcore serve`` processes (prefill dp 4, decode
dp 2), six ``dpcore mock-worker`` ranks, the bootstrap registry served over HTTP by the
prefill controller, and client SDKs on both legs. Every process is real and stopped by pid."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dpcore.http.launch import DPCORE, Group, wait_for
from dpcore.sdk.client import Client

pytestmark = pytest.mark.e2e

PREFILL_DP = 4
DECODE_DP = 2
RESOLVE_TIMEOUT_S = 1.0


class PD:
    def __init__(self, log_dir: Path, prefill_method: str) -> None:
        self.group = Group(log_dir)
        try:
            self.prefill = self._controller("prefill", PREFILL_DP, "--load-balance-method", prefill_method,
                                            "--bootstrap-port", "0")  # fmt: skip
            self.registry = self.prefill["bootstrap"]
            self.decode = self._controller("decode", DECODE_DP, "--bootstrap-url", self.registry,
                                           "--pd-resolve-timeout", str(RESOLVE_TIMEOUT_S))  # fmt: skip
            self.p_client = Client(self.prefill["ingress"])
            self.d_client = Client(self.decode["ingress"])
        except BaseException:
            self.group.close()
            raise

    def _controller(self, mode: str, dp: int, *extra: str) -> dict:
        eps_file = self.group.log_dir / f"{mode}-endpoints.json"
        ctl = self.group.start(f"{mode}-controller", [
            *DPCORE, "--log-json", "serve", "--disaggregation-mode", mode, "--dp-size", str(dp),
            "--endpoints-file", str(eps_file), *extra,
        ])  # fmt: skip
        eps = wait_for(f"{mode} endpoints", lambda: eps_file.exists() and eps_file.read_text(), [ctl], 30)
        import json

        eps = json.loads(eps)
        for r in range(dp):
            self.group.start(f"{mode}-rank{r}", [
                *DPCORE, "mock-worker", "--rank", str(r), "--dispatch", eps["dispatch"][r],
                "--report", eps["report"], "--speedup", "100", "--exit-with-parent",
            ])  # fmt: skip
        return eps

    def collect(self, client: Client, n: int, timeout_s: float = 20.0) -> dict:
        out = {}

        def more() -> bool:
            for r in client.poll(0.05):
                if r.final:
                    out[r.rid] = r
            return len(out) >= n

        wait_for(f"{n} replies", more, self.group.procs, timeout_s)
        return out

    def close(self) -> None:
        self.p_client.close()
        self.d_client.close()
        self.group.close()


@pytest.fixture(scope="module")
def registry_pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    pd = PD(tmp_path_factory.mktemp("pd-registry"), "total_tokens")
    yield pd
    pd.close()


@pytest.fixture(scope="module")
def room_pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    pd = PD(tmp_path_factory.mktemp("pd-room"), "auto")
    yield pd
    pd.close()


def test_decode_learns_registered_prefill_ranks(registry_pd: PD) -> None:
    pd = registry_pd
    rng = random.Random(7)
    rooms = [rng.randrange(2**63) for _ in range(40)]
    # Decode legs of the first half go out before their prefill legs: decode must wait for
    # the registration (backoff), not fail.
    early, late = rooms[:20], rooms[20:]
    for room in early:
        pd.d_client.submit(f"d{room}", num_tokens=300, bootstrap_room=room, max_new_tokens=3)
    for i, room in enumerate(rooms):
        # Uneven prompt sizes, so total_tokens does not simply follow room % 4.
        pd.p_client.submit(f"p{room}", num_tokens=100 + 997 * (i % 7), bootstrap_room=room, max_new_tokens=1)
    prefill = pd.collect(pd.p_client, len(rooms))
    for room in late:
        pd.d_client.submit(f"d{room}", num_tokens=300, bootstrap_room=room, max_new_tokens=3)
    decode = pd.collect(pd.d_client, len(rooms))

    placed = {room: prefill[f"p{room}"].meta["dp_rank"] for room in rooms}
    assert all(prefill[f"p{room}"].kind == "out" for room in rooms)
    assert set(placed.values()) == set(range(PREFILL_DP))
    assert any(rank != room % PREFILL_DP for room, rank in placed.items())  # the registry was needed
    for room in rooms:
        r = decode[f"d{room}"]
        assert r.kind == "out", (r.code, r.msg)
        assert r.meta["prefill_dp_rank"] == placed[room]
        assert 0 <= r.rank < DECODE_DP
    stats = httpx.get(f"{pd.registry}/info").json()["stats"]
    assert stats["registered"] >= len(rooms) and stats["found"] >= len(rooms)


def test_unregistered_room_times_out_cleanly(registry_pd: PD) -> None:
    pd = registry_pd
    pd.d_client.submit("lost", num_tokens=10, bootstrap_room=123456789, max_new_tokens=2)
    pd.d_client.submit("explicit", num_tokens=10, bootstrap_room=5, disagg_prefill_dp_rank=3, max_new_tokens=2)
    pd.d_client.submit("bad", num_tokens=10, bootstrap_room=5, disagg_prefill_dp_rank=PREFILL_DP, max_new_tokens=2)
    pd.d_client.submit("noroom", num_tokens=10, max_new_tokens=2)
    replies = pd.collect(pd.d_client, 4, timeout_s=RESOLVE_TIMEOUT_S + 10)
    lost = replies["lost"]
    assert (lost.kind, lost.code) == ("rej", "prefill_rank_unresolved")
    assert "bootstrap_room 123456789" in lost.msg and f"{RESOLVE_TIMEOUT_S:g} s" in lost.msg
    assert replies["explicit"].kind == "out" and replies["explicit"].meta["prefill_dp_rank"] == 3
    assert (replies["bad"].kind, replies["bad"].code) == ("rej", "invalid_rank")
    assert (replies["noroom"].kind, replies["noroom"].code) == ("rej", "missing_bootstrap_room")
    # The decode controller kept serving.
    pd.p_client.submit("p-after", num_tokens=10, bootstrap_room=99, max_new_tokens=1)
    rank = pd.collect(pd.p_client, 1)["p-after"].meta["dp_rank"]
    pd.d_client.submit("d-after", num_tokens=10, bootstrap_room=99, max_new_tokens=1)
    assert pd.collect(pd.d_client, 1)["d-after"].meta["prefill_dp_rank"] == rank


def _counters(status_endpoint: str) -> dict:
    """The decode controller's counters, read from its status endpoint."""
    import asyncio

    import zmq.asyncio

    from dpcore.runtime.status import AsyncStatusClient

    async def get() -> dict:
        ctx = zmq.asyncio.Context()
        client = AsyncStatusClient(status_endpoint, ctx=ctx, max_age_s=0)
        try:
            return (await client.get(5))["counters"]  # type: ignore[no-any-return]
        finally:
            client.close()
            ctx.term()

    return asyncio.run(get())


def test_an_abort_ends_a_request_waiting_for_its_prefill_rank(registry_pd: PD) -> None:
    """Aborted while parked (its room is not registered yet): it ends at once, ``rej``
    ``aborted``, instead of waiting out the resolve timeout; nothing reaches a rank."""
    from dpcore import wire

    pd = registry_pd
    status = pd.decode["status"]
    before = _counters(status)
    pd.d_client.submit("parked-then-aborted", num_tokens=10, bootstrap_room=424242, max_new_tokens=2)
    wait_for("the request parked", lambda: _counters(status)["parked"] == 1, pd.group.procs, 10)
    pd.d_client.abort("parked-then-aborted", wire.ABORT_CLIENT_GONE)
    st = wait_for("the parked request ended", lambda: (s := _counters(status))["parked"] == 0 and s, pd.group.procs, 10)

    def grew(key: str, sub: str) -> int:
        return st[key].get(sub, 0) - before[key].get(sub, 0)  # type: ignore[no-any-return]

    assert grew("rejected_by_code", "aborted") == 1 and grew("rejected_by_code", "prefill_rank_unresolved") == 0, st
    assert st["aborts"]["by_outcome"].get("parked_ended", 0) - before["aborts"]["by_outcome"].get("parked_ended", 0) == 1
    assert st["aborts"]["by_reason"].get("client_gone", 0) - before["aborts"]["by_reason"].get("client_gone", 0) == 1
    assert st["dispatched"] == before["dispatched"] and st["balanced"] == {"received": True, "dispatched": True}, st


def test_follow_bootstrap_room_needs_no_registry_queries(room_pd: PD) -> None:
    pd = room_pd
    info = httpx.get(f"{pd.registry}/info").json()
    assert info["follow_bootstrap_room"] is True and info["dp_size"] == PREFILL_DP
    rooms = list(range(1000, 1024)) + [2**63 - 1]
    for room in rooms:
        pd.p_client.submit(f"p{room}", num_tokens=200, bootstrap_room=room, max_new_tokens=1)
        pd.d_client.submit(f"d{room}", num_tokens=200, bootstrap_room=room, max_new_tokens=2)
    prefill = pd.collect(pd.p_client, len(rooms))
    decode = pd.collect(pd.d_client, len(rooms))
    for room in rooms:
        assert prefill[f"p{room}"].meta["dp_rank"] == room % PREFILL_DP
        assert decode[f"d{room}"].meta["prefill_dp_rank"] == room % PREFILL_DP
    stats = httpx.get(f"{pd.registry}/info").json()["stats"]
    assert stats["registered"] == 0 and stats["queried"] == 0


def test_prefill_refuses_what_decode_could_not_pair(registry_pd: PD, room_pd: PD) -> None:
    # total_tokens on prefill: a request without a room could never be found by decode.
    registry_pd.p_client.submit("p-noroom", num_tokens=50, max_new_tokens=1)
    r = registry_pd.collect(registry_pd.p_client, 1)["p-noroom"]
    assert (r.kind, r.code) == ("rej", "missing_bootstrap_room")
    # follow_bootstrap_room on prefill: a router pin that contradicts the room is refused,
    # since decode would look for the KV on room % dp_size.
    room_pd.p_client.submit("p-pin", num_tokens=50, bootstrap_room=8, routed_dp_rank=1, max_new_tokens=1)
    room_pd.p_client.submit("p-pin-ok", num_tokens=50, bootstrap_room=9, routed_dp_rank=1, max_new_tokens=1)
    replies = room_pd.collect(room_pd.p_client, 2)
    assert (replies["p-pin"].kind, replies["p-pin"].code) == ("rej", "invalid_rank")
    assert "follow_bootstrap_room conflict" in replies["p-pin"].msg
    assert replies["p-pin-ok"].kind == "out" and replies["p-pin-ok"].meta["dp_rank"] == 1
