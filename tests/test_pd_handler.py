"""The PD handler on its own: resolution order, the registry thread, deadlines, wiring."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import pytest
import zmq

from dpcore.errors import (
    ConfigError,
    InvalidRankError,
    MissingBootstrapRoomError,
    PrefillRankUnresolvedError,
)
from dpcore.manager import PolicyManager
from dpcore.model import Request
from dpcore.runtime import pd_setup
from dpcore.runtime.bootstrap import BootstrapRegistry
from dpcore.runtime.bootstrap_server import RegistryServer
from dpcore.runtime.pd import PDHandler, follows_bootstrap_room


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def req(rid: str, room: int | None = None, pdr: object = None) -> Request:
    return Request(rid, num_tokens=10, bootstrap_room=room, disagg_prefill_dp_rank=pdr)


def wait_results(h: PDHandler, n: int, timeout_s: float = 5.0) -> dict[str, object]:
    out: dict[str, object] = {}
    deadline = time.monotonic() + timeout_s
    while len(out) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)}/{n} answers: {out}"
        if h.socket.poll(int(left * 1000)):
            out.update(h.drain())
    return out


def decode(ctx: zmq.Context, lookup=None, **kw) -> PDHandler:
    kw.setdefault("prefill_dp_size", 4)
    kw.setdefault("prefill_follows_room", False)
    return PDHandler("decode", dp_size=2, lookup=lookup, zmq_ctx=ctx, **kw)


# --------------------------------------------------------------------------- resolution order


def test_resolution_order_before_any_query(ctx: zmq.Context) -> None:
    h = decode(ctx, BootstrapRegistry())
    try:
        assert h.resolve_now(req("a", room=7, pdr=2)) == 2  # explicit rank wins
        assert h.resolve_now(req("b", room=7)) is None  # then the registry must be asked
        with pytest.raises(InvalidRankError, match=r"not a rank in \[0, 4\)"):
            h.resolve_now(req("c", room=7, pdr=4))
        with pytest.raises(InvalidRankError):
            h.resolve_now(req("d", room=7, pdr="1"))
        with pytest.raises(MissingBootstrapRoomError):
            h.resolve_now(req("e"))
    finally:
        h.close()
    single = decode(ctx, prefill_dp_size=1)
    room = decode(ctx, prefill_follows_room=True)
    try:
        assert single.resolve_now(req("f", room=7)) == 0
        assert room.resolve_now(req("g", room=7)) == 7 % 4
        assert room.resolve_now(req("h", room=9, pdr=0)) == 0
        assert room._thread is None  # nothing to ask: no thread at all
    finally:
        single.close()
        room.close()


def test_decode_without_a_registry_is_a_config_error(ctx: zmq.Context) -> None:
    with pytest.raises(ConfigError, match="--bootstrap-url"):
        PDHandler("decode", dp_size=2, prefill_dp_size=4, prefill_follows_room=False, zmq_ctx=ctx)


# --------------------------------------------------------------------------- registry queries


def test_parked_requests_resolve_when_prefill_registers_later(ctx: zmq.Context) -> None:
    registry = BootstrapRegistry(dp_size=4)
    registry.register(1, 3)
    h = decode(ctx, registry)
    try:
        h.submit(req("known", room=1))
        h.submit(req("late", room=2))
        assert wait_results(h, 1) == {"known": 3}
        time.sleep(0.05)  # a few misses with backoff
        registry.register(2, 1)
        assert wait_results(h, 1) == {"late": 1}
        assert h.stats["resolved_registry"] == 2
        assert h.stats["queries"] >= 2  # "late" was asked again after its first miss
    finally:
        h.close()


def test_rooms_are_batched_and_backoff_bounds_the_query_rate(ctx: zmq.Context) -> None:
    class Counting(BootstrapRegistry):
        def __init__(self, **kw: object) -> None:
            super().__init__(**kw)  # type: ignore[arg-type]
            self.calls: list[int] = []

        def query(self, rooms):  # type: ignore[no-untyped-def]
            rooms = list(rooms)
            self.calls.append(len(rooms))
            return super().query(rooms)

    registry = Counting(dp_size=4)
    h = decode(ctx, registry, resolve_timeout_s=0.6)
    try:
        for i in range(50):
            h.submit(req(f"r{i}", room=i))
        out = wait_results(h, 50)
        assert all(isinstance(v, PrefillRankUnresolvedError) for v in out.values())
        # 50 rooms in few calls, and exponential backoff: far fewer than one call per ms.
        assert max(registry.calls) > 1
        assert len(registry.calls) < 30
    finally:
        h.close()


def test_an_unregistered_room_times_out_with_a_reason(ctx: zmq.Context) -> None:
    h = decode(ctx, BootstrapRegistry(), resolve_timeout_s=0.3)
    try:
        t0 = time.monotonic()
        h.submit(req("lost", room=42))
        out = wait_results(h, 1)
        waited = time.monotonic() - t0
        err = out["lost"]
        assert isinstance(err, PrefillRankUnresolvedError)
        assert err.code == "prefill_rank_unresolved" and err.rid == "lost"
        assert "bootstrap_room 42" in str(err) and "0.3 s" in str(err)
        assert waited >= 0.3
        assert h.stats["timed_out"] == 1
    finally:
        h.close()


def test_registry_down_times_out_naming_the_error(ctx: zmq.Context) -> None:
    server = RegistryServer(BootstrapRegistry()).start()
    url = server.url
    server.stop()  # nothing listens there now
    h = PDHandler(
        "decode", dp_size=2, prefill_dp_size=4, prefill_follows_room=False, registry_url=url,
        resolve_timeout_s=0.3, zmq_ctx=ctx,
    )  # fmt: skip
    try:
        h.submit(req("x", room=5))
        err = wait_results(h, 1)["x"]
        assert isinstance(err, PrefillRankUnresolvedError)
        assert "last registry error" in str(err) and "ConnectError" in str(err)
        assert h.stats["query_errors"] >= 1
    finally:
        h.close()


def test_a_rank_outside_the_prefill_dp_size_is_rejected(ctx: zmq.Context) -> None:
    registry = BootstrapRegistry()  # does not know the dp size, so accepts rank 9
    registry.register(3, 9)
    h = decode(ctx, registry)
    try:
        h.submit(req("odd", room=3))
        err = wait_results(h, 1)["odd"]
        assert isinstance(err, InvalidRankError) and "--prefill-dp-size" in str(err)
    finally:
        h.close()


# --------------------------------------------------------------------------- prefill side


def test_prefill_registers_in_process_or_refuses_conflicts(ctx: zmq.Context) -> None:
    registry = BootstrapRegistry(dp_size=4)
    h = PDHandler("prefill", dp_size=4, prefill_dp_size=4, prefill_follows_room=False, registry=registry, zmq_ctx=ctx)
    try:
        h.on_prefill_dispatch(req("a", room=100), 2)
        assert registry.query([100]) == {100: 2}
        with pytest.raises(MissingBootstrapRoomError):
            h.on_prefill_dispatch(req("b"), 1)
    finally:
        h.close()
    follow = PDHandler("prefill", dp_size=4, prefill_dp_size=4, prefill_follows_room=True, zmq_ctx=ctx)
    try:
        follow.on_prefill_dispatch(req("c", room=6), 2)  # 6 % 4 == 2: fine, nothing to register
        with pytest.raises(InvalidRankError, match="follow_bootstrap_room conflict"):
            follow.on_prefill_dispatch(req("d", room=6), 1)
    finally:
        follow.close()


def test_prefill_registers_remotely_in_batches(ctx: zmq.Context) -> None:
    registry = BootstrapRegistry(dp_size=4)
    with RegistryServer(registry) as server:
        h = PDHandler(
            "prefill", dp_size=4, prefill_dp_size=4, prefill_follows_room=False, registry_url=server.url, zmq_ctx=ctx
        )
        try:
            for room in range(200):
                h.on_prefill_dispatch(req(f"r{room}", room=room), room % 4)
            # The handler counts a batch once its HTTP answer is back, after the registry did.
            deadline = time.monotonic() + 10
            while h.stats["registered"] < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert h.stats["registered"] == 200 and h.stats["register_failed"] == 0
            assert registry.query(range(200)) == {room: room % 4 for room in range(200)}
            assert registry.stats["registered"] == 200
        finally:
            h.close()


# --------------------------------------------------------------------------- serve wiring


def args(**kw: object) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    pd_setup.add_arguments(p)
    ns = p.parse_args([])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_from_args_hosts_a_registry_and_decode_learns_prefill_from_it(ctx: zmq.Context) -> None:
    prefill_mgr = PolicyManager.from_method("total_tokens", dp_size=4, disaggregation_mode="prefill")
    prefill = pd_setup.from_args(args(bootstrap_port=0), prefill_mgr, ctx)
    assert prefill is not None and prefill.server is not None
    try:
        decode_mgr = PolicyManager.from_method("auto", dp_size=2, disaggregation_mode="decode")
        dec = pd_setup.from_args(args(bootstrap_url=prefill.server.url), decode_mgr, ctx)
        assert dec is not None
        try:
            assert dec.prefill_dp_size == 4 and not dec.prefill_follows_room
            prefill.on_prefill_dispatch(req("a", room=77), 3)
            assert dec.resolve_now(req("a", room=77)) is None
            dec.submit(req("a", room=77))
            assert wait_results(dec, 1) == {"a": 3}
        finally:
            dec.close()
    finally:
        prefill.close()
    auto_mgr = PolicyManager.from_method("auto", dp_size=4, disaggregation_mode="prefill")
    follow = pd_setup.from_args(args(bootstrap_port=0), auto_mgr, ctx)
    assert follow is not None and follow.prefill_follows_room
    follow.close()
    null_mgr = PolicyManager.from_method("auto", dp_size=4)
    assert pd_setup.from_args(args(), null_mgr, ctx) is None


def test_from_args_config_errors(ctx: zmq.Context) -> None:
    mgr = PolicyManager.from_method("total_tokens", dp_size=4, disaggregation_mode="prefill")
    with pytest.raises(ConfigError, match="--bootstrap-port"):
        pd_setup.from_args(args(), mgr, ctx)
    with pytest.raises(ConfigError, match="not both"):
        pd_setup.from_args(args(bootstrap_port=0, bootstrap_url="http://127.0.0.1:1"), mgr, ctx)
    dec = PolicyManager.from_method("auto", dp_size=2, disaggregation_mode="decode")
    with pytest.raises(ConfigError, match="--prefill-dp-size"):
        pd_setup.from_args(args(), dec, ctx)
    h = pd_setup.from_args(args(prefill_dp_size=4, prefill_load_balance_method="auto"), dec, ctx)
    assert h is not None and h.prefill_follows_room  # auto on prefill is follow_bootstrap_room
    h.close()


ROOM_MODULO = """
from dpcore import PLACES_BY_BOOTSTRAP_ROOM, hookimpl


class RoomModulo:
    capabilities = frozenset({PLACES_BY_BOOTSTRAP_ROOM})

    def __init__(self, ctx):
        pass

    @hookimpl
    def select_rank(self, request, ctx):
        return request.bootstrap_room % ctx.dp_size
"""


def test_placing_by_room_is_what_the_first_policy_declares(tmp_path, ctx: zmq.Context) -> None:
    """A policy dpcore has never heard of places by room because it says so, and pairs PD
    prefill with decode without the registry; a chain it does not lead does not."""
    path = tmp_path / "room_modulo.py"
    path.write_text(ROOM_MODULO)
    room = str(path)
    assert follows_bootstrap_room(room) and follows_bootstrap_room(f"{room},round_robin")
    assert not follows_bootstrap_room("round_robin") and not follows_bootstrap_room(f"round_robin,{room}")
    pre = PolicyManager.from_method(room, dp_size=4, disaggregation_mode="prefill")
    assert pre.places_by_bootstrap_room
    h = pd_setup.from_args(args(), pre, ctx)  # no registry needed: decode computes the rank
    assert h is not None and h.prefill_follows_room
    h.close()
    dec = PolicyManager.from_method("round_robin", dp_size=2, disaggregation_mode="decode")
    h = pd_setup.from_args(args(prefill_dp_size=4, prefill_load_balance_method=room), dec, ctx)
    assert h is not None and h.prefill_follows_room
    h.close()
