"""PD decode: which prefill rank holds a request's KV, and the requests waiting to learn it.

The order (DESIGN: PD disaggregation): an explicit ``disagg_prefill_dp_rank``, else the PD
handler's immediate answer (:meth:`PDHandler.resolve_now`), else the request is parked
here while the handler asks the bootstrap registry, else ``--prefill-dp-size 1`` means
rank 0. The handler hands answers back through its socket, which the loop polls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from dpcore.errors import InvalidRankError, RequestRejected
from dpcore.model import Request


class PrefillRankUnknownError(RequestRejected):
    """PD decode: nothing says which prefill rank holds this request's KV."""

    code = "prefill_rank_unknown"


class PDHandler(Protocol):
    """The PD plug point (implemented in :mod:`dpcore.runtime.pd`)."""

    socket: Any

    def on_prefill_dispatch(self, request: Request, rank: int) -> None: ...

    def resolve_now(self, request: Request) -> int | None: ...

    def submit(self, request: Request) -> None: ...

    def drain(self) -> list[tuple[str, int | RequestRejected]]: ...


#: A parked request: what :meth:`Controller._place <dpcore.runtime.controller.Controller>`
#: needs to place it once its prefill rank is known.
Parked = tuple[Request, str, Any, Any]


class PrefillParking:
    """Resolves prefill ranks on the decode side and holds the requests still waiting.

    :param pd: The PD handler (``None``: no bootstrap registry configured).
    :param prefill_dp_size: The prefill side's dp size, when given.
    """

    __slots__ = ("pd", "prefill_dp_size", "_parked")

    def __init__(self, pd: PDHandler | None, prefill_dp_size: int | None) -> None:
        self.pd = pd
        self.prefill_dp_size = prefill_dp_size
        self._parked: dict[str, Parked] = {}

    def __len__(self) -> int:
        return len(self._parked)

    def prefill_rank(self, request: Request, reply: str, hdr: Any, payload: Any) -> int | None:
        """The prefill rank, or ``None`` after parking the request (raises to reject it)."""
        pdr = request.disagg_prefill_dp_rank
        if pdr is not None:
            limit = self.prefill_dp_size
            if type(pdr) is not int or pdr < 0 or (limit is not None and pdr >= limit):
                bound = f"[0, {limit})" if limit is not None else ">= 0"
                msg = f"disagg_prefill_dp_rank={pdr!r} is not a prefill rank {bound}"
                raise InvalidRankError(msg, rid=request.rid)
            return pdr
        if self.pd is not None:
            pr = self.pd.resolve_now(request)
            if pr is not None:
                return pr
            if request.rid in self._parked:
                msg = f"request id {request.rid!r} is already waiting for its prefill rank"
                raise PrefillRankUnknownError(msg, rid=request.rid)
            self._parked[request.rid] = (request, reply, hdr, payload)
            self.pd.submit(request)
            return None
        if self.prefill_dp_size == 1:
            return 0
        msg = (
            f"request {request.rid!r} has no disagg_prefill_dp_rank and no bootstrap registry is "
            "configured to look it up (--bootstrap-url), and --prefill-dp-size is not 1"
        )
        raise PrefillRankUnknownError(msg, rid=request.rid)

    def resolved(self) -> Iterator[tuple[Parked, int | RequestRejected]]:
        """Parked requests the PD handler has answered for, each with its answer."""
        if self.pd is None:
            return
        for rid, res in self.pd.drain():
            item = self._parked.pop(rid, None)
            if item is not None:
                yield item, res

    def unpark(self, rid: str, reply: str) -> Parked | None:
        """Take request *rid* of the sender at *reply* out of the parking (it was aborted);
        ``None`` if it is not parked. The PD handler's later answer for it is ignored."""
        item = self._parked.get(rid)
        if item is None or item[1] != reply:
            return None
        del self._parked[rid]
        return item

    def take_all(self) -> list[Parked]:
        """Unpark everything (shutdown)."""
        items = list(self._parked.values())
        self._parked.clear()
        return items
