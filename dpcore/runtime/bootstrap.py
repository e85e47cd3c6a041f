"""The PD bootstrap registry: which prefill rank holds the KV of a bootstrap room.

In PD disaggregation mode (b) the prefill controller picks a rank with any policy and
records ``room -> rank`` here; the decode side asks for the ranks of the rooms it has to
pull KV for. The HTTP API is the one SGLang's bootstrap server speaks (upstream #19168):

* ``POST /register_dp_rank {"bootstrap_room": int, "dp_rank": int}`` → ``{"ok": true}``
* ``POST /register_dp_ranks {"entries": [{"bootstrap_room", "dp_rank"}, ...]}`` (a dpcore
  extension: one call per batch, for a prefill controller that registers remotely)
* ``POST /query_dp_ranks {"bootstrap_rooms": [int, ...]}`` → ``{"<room>": rank, ...}``;
  unknown or expired rooms are left out, so the caller asks again later.
* ``GET /health`` → ``{"status": "ok", "entries": n}``
* ``GET /info`` → what the prefill side configured (``dp_size``, ``load_balance_method``,
  ``follow_bootstrap_room``), so decode does not have to guess how prefill places requests.

Entries expire ``ttl_s`` (120 s) after their last registration and the table is bounded:
when full, the oldest entry goes first (it is also the closest to expiry). Bad input is a
4xx answer with a JSON ``{"error": code, "detail": message}`` body, never a 500.

The registry is a plain thread-safe object, so the prefill controller that hosts the HTTP
server in a thread registers in-process, without a round trip.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from dpcore.errors import DpcoreError

if TYPE_CHECKING:
    import httpx

DEFAULT_TTL_S = 120.0
DEFAULT_MAX_ENTRIES = 200_000
#: Rooms per ``/query_dp_ranks`` call; the client splits larger batches.
MAX_QUERY_ROOMS = 4096
#: Request bodies above this are refused (a query of MAX_QUERY_ROOMS 20-digit rooms is ~90 kB).
MAX_BODY_BYTES = 1 << 20
#: The ``GET /info`` key saying whether prefill places by ``bootstrap_room % dp_size`` (then
#: decode computes the rank and nothing is registered).
FOLLOWS_KEY = "follow_bootstrap_room"
#: SGLang draws rooms from [0, 2**63); accept any unsigned 64-bit value.
_ROOM_LIMIT = 1 << 64


class RegistryError(DpcoreError):
    """The bootstrap registry could not be reached or answered with an error."""


class BadRegistryInput(DpcoreError, ValueError):
    """A registry call carried invalid data; the message says which field and why."""


def _check_uint(value: Any, field: str, limit: int = _ROOM_LIMIT) -> int:
    if type(value) is not int or not 0 <= value < limit:  # bool is refused too
        msg = f"{field} must be an integer in [0, {limit}), got {value!r}"
        raise BadRegistryInput(msg)
    return value


class BootstrapRegistry:
    """Thread-safe ``room -> (rank, registered_at)`` table with expiry and a size bound.

    :param ttl_s: Seconds an entry lives after its last registration.
    :param max_entries: Size bound; registering past it drops the oldest entry.
    :param dp_size: Prefill dp size, when known: ranks outside ``[0, dp_size)`` are refused.
    :param info: Extra facts served on ``GET /info`` (e.g. the prefill policy name).
    :param clock: Monotonic clock, injectable for tests.
    """

    def __init__(
        self,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        dp_size: int | None = None,
        info: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl_s > 0:
            msg = f"ttl_s must be positive, got {ttl_s!r}"
            raise ValueError(msg)
        if max_entries < 1:
            msg = f"max_entries must be at least 1, got {max_entries!r}"
            raise ValueError(msg)
        self.ttl_s = float(ttl_s)
        self.max_entries = max_entries
        self.dp_size = dp_size
        self.info: dict[str, Any] = {"dp_size": dp_size, **(info or {})}
        self._clock = clock
        self._lock = threading.Lock()
        # Ordered by registration time: re-registering moves a room to the end, so the
        # expired entries are always a prefix.
        self._rooms: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.stats = {"registered": 0, "queried": 0, "found": 0, "expired": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self._rooms)

    def _expire(self, now: float) -> None:
        rooms = self._rooms
        cutoff = now - self.ttl_s
        while rooms:
            room, (_, at) = next(iter(rooms.items()))
            if at > cutoff:
                break
            del rooms[room]
            self.stats["expired"] += 1

    def register(self, room: Any, rank: Any) -> None:
        """Record that *room*'s KV lives on prefill *rank*; raises :class:`BadRegistryInput`."""
        self.register_many(((room, rank),))

    def register_many(self, entries: Iterable[tuple[Any, Any]]) -> int:
        """Register ``(room, rank)`` pairs, all or none (every pair is checked first)."""
        limit = self.dp_size or _ROOM_LIMIT
        checked = [(_check_uint(room, "bootstrap_room"), _check_uint(rank, "dp_rank", limit)) for room, rank in entries]
        with self._lock:
            now = self._clock()
            self._expire(now)
            rooms = self._rooms
            for room, rank in checked:
                rooms.pop(room, None)
                rooms[room] = (rank, now)
            while len(rooms) > self.max_entries:
                rooms.popitem(last=False)
                self.stats["evicted"] += 1
            self.stats["registered"] += len(checked)
        return len(checked)

    def query(self, rooms: Iterable[Any]) -> dict[int, int]:
        """The ranks of the known, unexpired *rooms*; unknown ones are left out."""
        checked = [_check_uint(r, "bootstrap_rooms[]") for r in rooms]
        out: dict[int, int] = {}
        with self._lock:
            now = self._clock()
            self._expire(now)
            table = self._rooms
            for room in checked:
                entry = table.get(room)
                if entry is not None:
                    out[room] = entry[0]
            self.stats["queried"] += len(checked)
            self.stats["found"] += len(out)
        return out


# --------------------------------------------------------------------------- client


class RegistryClient:
    """Talks to a registry over HTTP, reusing one keep-alive connection (httpx).

    Not thread-safe: give each thread its own client.
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._http: httpx.Client = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
        )

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            msg = f"bootstrap registry {self.url}{path}: {type(exc).__name__}: {exc}"
            raise RegistryError(msg) from exc
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code != 200:
            detail = data.get("detail") if isinstance(data, dict) else resp.text[:200]
            msg = f"bootstrap registry {self.url}{path}: HTTP {resp.status_code}: {detail}"
            raise RegistryError(msg)
        return data

    def register(self, room: int, rank: int) -> None:
        self._call("POST", "/register_dp_rank", {"bootstrap_room": room, "dp_rank": rank})

    def register_many(self, entries: Iterable[tuple[int, int]]) -> None:
        """Register ``(room, rank)`` pairs in as few calls as :data:`MAX_QUERY_ROOMS` allows."""
        items = [{"bootstrap_room": room, "dp_rank": rank} for room, rank in entries]
        for i in range(0, len(items), MAX_QUERY_ROOMS):
            self._call("POST", "/register_dp_ranks", {"entries": items[i : i + MAX_QUERY_ROOMS]})

    def query(self, rooms: Iterable[int]) -> dict[int, int]:
        """Ranks of the known *rooms*, in as many calls as :data:`MAX_QUERY_ROOMS` needs."""
        rooms = list(rooms)
        out: dict[int, int] = {}
        for i in range(0, len(rooms), MAX_QUERY_ROOMS):
            data = self._call("POST", "/query_dp_ranks", {"bootstrap_rooms": rooms[i : i + MAX_QUERY_ROOMS]})
            if not isinstance(data, dict):
                msg = f"bootstrap registry {self.url}/query_dp_ranks answered {data!r:.80}, not an object"
                raise RegistryError(msg)
            try:
                out.update((int(k), int(v)) for k, v in data.items())
            except (TypeError, ValueError) as exc:
                msg = f"bootstrap registry {self.url}/query_dp_ranks: bad entry in {data!r:.80}"
                raise RegistryError(msg) from exc
        return out

    def health(self) -> dict[str, Any]:
        return dict(self._call("GET", "/health"))

    def info(self) -> dict[str, Any]:
        return dict(self._call("GET", "/info"))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()



def prefill_info(load_balance_method: str | None, dp_size: int | None, follows: bool | None) -> dict[str, Any]:
    """What ``GET /info`` tells decode about the prefill side (*follows*: whether it places
    by ``bootstrap_room % dp_size``; ``None``: not known)."""
    return {"load_balance_method": load_balance_method, FOLLOWS_KEY: follows, "dp_size": dp_size}
