"""Per-rank dispatch backlogs in front of the rank sockets.

Dispatches wait in a bounded per-rank backlog and are sent ``NOBLOCK`` before the loop polls
again, so a burst costs each rank socket one wake-up. What a full socket (slow, dead, or
not connected yet) does not take stays in the backlog until the socket is writable; the
loop then polls that socket for ``POLLOUT``. When the backlog is full too, the caller
refuses the request (``rank_busy``). The loop never blocks on a rank.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from dpcore.runtime.transport import send_frames


class Outbox:
    """The rank sockets' backlogs: ``(seq or None, frames)`` per queued message.

    :param socks: One PUSH socket per rank.
    :param poller: The loop's poller (a socket with a backlog is watched for ``POLLOUT``).
    :param limit: Messages per rank backlog.
    """

    __slots__ = ("_socks", "_poller", "limit", "_backlog", "_dirty", "_watching", "writable")

    def __init__(self, socks: Sequence[zmq.Socket], poller: zmq.Poller, limit: int) -> None:  # type: ignore[type-arg]
        self._socks = list(socks)
        self._poller = poller
        self.limit = limit
        self._backlog: list[deque[tuple[int | None, Sequence[Any]]]] = [deque() for _ in socks]
        # Ranks with messages staged this turn; sent together before the next poll, so a
        # burst wakes each rank socket's I/O once instead of once per message.
        self._dirty: set[int] = set()
        self._watching: set[int] = set()
        #: Rank socket → rank, to route ``POLLOUT`` events.
        self.writable = {s: r for r, s in enumerate(self._socks)}

    def has_room(self, rank: int) -> bool:
        """Whether *rank*'s backlog can take one more (after trying to send what it holds)."""
        bl = self._backlog[rank]
        if len(bl) < self.limit:
            return True
        self.flush(rank)
        return len(bl) < self.limit

    def stage(self, rank: int, seq: int | None, frames: Sequence[Any]) -> None:
        """Queue *frames* for *rank*; sent by :meth:`flush_dirty` before the next poll."""
        self._backlog[rank].append((seq, frames))
        self._dirty.add(rank)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def flush(self, rank: int) -> None:
        bl = self._backlog[rank]
        sock = self._socks[rank]
        while bl:
            if not send_frames(sock, bl[0][1]):
                self._watch(rank)  # the rest goes when the socket has room
                return
            bl.popleft()
        self._unwatch(rank)

    def flush_dirty(self) -> None:
        for r in self._dirty:
            self.flush(r)
        self._dirty.clear()

    def unsent(self, rank: int) -> set[int | None]:
        """Dispatch seqs still in *rank*'s backlog (never reached its socket)."""
        return {x[0] for x in self._backlog[rank]}

    def drop(self, rank: int) -> None:
        """Forget *rank*'s backlog (the caller re-dispatches or fails what it held)."""
        self._backlog[rank].clear()
        self._unwatch(rank)

    def sizes(self) -> list[int]:
        return [len(b) for b in self._backlog]

    def _watch(self, rank: int) -> None:
        if rank not in self._watching:
            self._watching.add(rank)
            self._poller.register(self._socks[rank], zmq.POLLOUT)

    def _unwatch(self, rank: int) -> None:
        if rank in self._watching:
            self._watching.discard(rank)
            self._poller.unregister(self._socks[rank])
