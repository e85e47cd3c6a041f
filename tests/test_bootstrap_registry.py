"""The PD bootstrap registry: the table itself, and its HTTP API served by uvicorn."""

from __future__ import annotations

import httpx
import pytest

from dpcore.runtime.bootstrap import (
    MAX_QUERY_ROOMS,
    BadRegistryInput,
    BootstrapRegistry,
    RegistryClient,
    RegistryError,
)
from dpcore.runtime.bootstrap_server import RegistryServer


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


# --------------------------------------------------------------------------- the table


def test_register_then_query_returns_only_known_rooms() -> None:
    reg = BootstrapRegistry()
    reg.register(7, 3)
    reg.register(2**63 - 1, 0)
    assert reg.query([7, 8, 2**63 - 1]) == {7: 3, 2**63 - 1: 0}


def test_reregistering_a_room_moves_it_and_renews_it() -> None:
    clock = FakeClock()
    reg = BootstrapRegistry(ttl_s=120, clock=clock)
    reg.register(1, 0)
    clock.t += 100
    reg.register(1, 2)
    clock.t += 100  # 200 s after the first registration, 100 s after the second
    assert reg.query([1]) == {1: 2}


def test_entries_expire_after_ttl() -> None:
    clock = FakeClock()
    reg = BootstrapRegistry(ttl_s=120, clock=clock)
    reg.register(1, 0)
    clock.t += 60
    reg.register(2, 1)
    clock.t += 60.5
    assert reg.query([1, 2]) == {2: 1}
    assert reg.stats["expired"] == 1
    clock.t += 60
    assert reg.query([1, 2]) == {}
    assert len(reg) == 0


def test_size_bound_drops_the_oldest() -> None:
    reg = BootstrapRegistry(max_entries=3)
    for room in range(5):
        reg.register(room, room % 2)
    assert len(reg) == 3
    assert reg.query(range(5)) == {2: 0, 3: 1, 4: 0}
    assert reg.stats["evicted"] == 2


@pytest.mark.parametrize(
    ("room", "rank"), [(-1, 0), (1.5, 0), ("3", 0), (True, 0), (2**64, 0), (1, -2), (1, None), (1, 4)]
)
def test_bad_values_are_refused(room: object, rank: object) -> None:
    reg = BootstrapRegistry(dp_size=4)
    with pytest.raises(BadRegistryInput):
        reg.register(room, rank)
    assert len(reg) == 0


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
def server() -> RegistryServer:
    reg = BootstrapRegistry(dp_size=4, info={"load_balance_method": "total_tokens"})
    with RegistryServer(reg) as srv:
        yield srv


def test_http_round_trip_with_the_client(server: RegistryServer) -> None:
    with RegistryClient(server.url) as client:
        assert client.health() == {"status": "ok", "entries": 0}
        client.register(11, 2)
        client.register(12, 3)
        assert client.query([11, 12, 13]) == {11: 2, 12: 3}
        info = client.info()
        assert info["dp_size"] == 4
        assert info["load_balance_method"] == "total_tokens"
        assert info["stats"]["registered"] == 2


def test_http_answers_use_string_room_keys(server: RegistryServer) -> None:
    server.registry.register(5, 1)
    resp = httpx.post(f"{server.url}/query_dp_ranks", json={"bootstrap_rooms": [5, 6]})
    assert resp.status_code == 200
    assert resp.json() == {"5": 1}


def test_client_splits_large_queries(server: RegistryServer) -> None:
    rooms = list(range(MAX_QUERY_ROOMS + 10))
    for r in rooms[-3:]:
        server.registry.register(r, r % 4)
    with RegistryClient(server.url) as client:
        assert client.query(rooms) == {r: r % 4 for r in rooms[-3:]}
    assert server.registry.stats["queried"] == len(rooms)


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/register_dp_rank", b"not json", 400, "invalid_json"),
        ("/register_dp_rank", b"[1, 2]", 400, "invalid_body"),
        ("/register_dp_rank", b'{"bootstrap_room": 1}', 400, "missing_field"),
        ("/register_dp_rank", b'{"bootstrap_room": -1, "dp_rank": 0}', 400, "invalid_field"),
        ("/register_dp_rank", b'{"bootstrap_room": 1, "dp_rank": 9}', 400, "invalid_field"),
        ("/query_dp_ranks", b'{"bootstrap_rooms": 5}', 400, "invalid_field"),
        ("/query_dp_ranks", b'{"bootstrap_rooms": [1, "x"]}', 400, "invalid_field"),
        ("/query_dp_ranks", b'{"bootstrap_rooms": [%s]}' % b",".join([b"1"] * (MAX_QUERY_ROOMS + 1)),
         413, "too_many_rooms"),
        ("/nope", b"{}", 404, "not_found"),
    ],
)
def test_bad_http_input_gets_a_json_4xx(
    server: RegistryServer, path: str, body: bytes, status: int, code: str
) -> None:
    resp = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status
    data = resp.json()
    assert data["error"] == code
    assert data["detail"]
    assert len(server.registry) == 0  # nothing half-registered


def test_wrong_method_is_405_json(server: RegistryServer) -> None:
    resp = httpx.get(f"{server.url}/register_dp_rank")
    assert resp.status_code == 405
    assert resp.json()["error"] == "method_not_allowed"


def test_client_raises_typed_errors(server: RegistryServer) -> None:
    with RegistryClient(server.url) as client:
        with pytest.raises(RegistryError, match="HTTP 400"):
            client.register(1, 99)
    dead = RegistryServer(BootstrapRegistry()).start()
    url = dead.url
    dead.stop()
    with RegistryClient(url, timeout_s=1.0) as client, pytest.raises(RegistryError, match="ConnectError"):
        client.health()


def test_client_reuses_its_connection(server: RegistryServer) -> None:
    with RegistryClient(server.url) as client:
        client.health()
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        first = list(pool.connections)
        for i in range(20):
            client.register(i, i % 4)
        assert list(pool.connections) == first
        assert len(first) == 1


def test_batch_registration_is_all_or_nothing(server: RegistryServer) -> None:
    with RegistryClient(server.url) as client:
        client.register_many([(1, 0), (2, 3)])
        assert client.query([1, 2]) == {1: 0, 2: 3}
        with pytest.raises(RegistryError, match="dp_rank"):
            client.register_many([(3, 1), (4, 7)])  # rank 7 is outside dp size 4
        assert client.query([3, 4]) == {}
    resp = httpx.post(f"{server.url}/register_dp_ranks", json={"entries": [1, 2]})
    assert resp.status_code == 400 and resp.json()["error"] == "invalid_field"
