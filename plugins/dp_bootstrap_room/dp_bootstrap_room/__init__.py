"""``follow_bootstrap_room``: the PD prefill rank is ``bootstrap_room % dp_size``."""

from __future__ import annotations

from dpcore import (
    PLACES_BY_BOOTSTRAP_ROOM,
    InactiveRankError,
    MissingBootstrapRoomError,
    PolicyContext,
    Request,
    hookimpl,
)
from dpcore.errors import MalformedRequestError

__all__ = ["FollowBootstrapRoomPolicy"]


class FollowBootstrapRoomPolicy:
    """Rank = ``bootstrap_room % dp_size``, which the decode side computes the same way.

    Because decode relies on the modulo, an inactive target is never remapped: the request
    is rejected instead (a silent remap would make decode pull KV from the wrong rank).
    """

    name = "follow_bootstrap_room"
    capabilities = frozenset({PLACES_BY_BOOTSTRAP_ROOM})

    def __init__(self, ctx: PolicyContext) -> None:
        pass

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int:
        room = request.bootstrap_room
        if room is None:
            msg = (
                f"request {request.rid!r} has no bootstrap_room, which follow_bootstrap_room "
                "needs: send PD requests through a PD router (e.g. sglang-router "
                "--pd-disaggregation), which sets the same room on the prefill and decode legs"
            )
            raise MissingBootstrapRoomError(msg, rid=request.rid)
        if type(room) is not int or room < 0:
            msg = f"request {request.rid!r}: bootstrap_room={room!r} is not a non-negative integer"
            raise MalformedRequestError(msg, rid=request.rid)
        rank = room % ctx.dp_size
        if not ctx.is_active(rank):
            msg = (
                f"request {request.rid!r}: bootstrap_room {room} maps to rank {rank}, which is "
                "inactive; follow_bootstrap_room cannot remap (decode computes the same rank)"
            )
            raise InactiveRankError(msg, rid=request.rid)
        ctx.explain(self.name, "room_modulo")
        return rank
