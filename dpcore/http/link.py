"""The HTTP front's connection to the controller: requests in, replies and status out.

Requests go through the client SDK's :class:`~dpcore.sdk.asyncclient.AsyncClient` (PUSH to the
controller's ingress, replies on the front's own PULL socket); loads and liveness come from
the controller's status channel (:mod:`dpcore.runtime.status`). Both live on the event loop
uvicorn runs, so they are created in :meth:`ControllerLink.start` (the app's startup).
"""

from __future__ import annotations

import itertools
import secrets
from typing import Any

import msgpack

from dpcore import wire
from dpcore.http.protocol import GenerateInput
from dpcore.http.server import DEFAULT_MAX_UNREAD_REPLIES
from dpcore.runtime.status import AsyncStatusClient
from dpcore.sdk.asyncclient import AsyncClient, ReplyStream


class ControllerLink:
    """Submits :class:`GenerateInput` requests and reads the controller's status.

    Each request goes out under an id of its own, ``<client rid>~<unique suffix>``, never
    the client's id alone: a client may reuse an id as soon as its earlier request ended
    on this side (it disconnected, it timed out), while that request may still be running
    on its rank. Replies are matched by the unique id, so they can never reach the new
    request; :meth:`abandon` also asks the rank to stop the old one.

    :param ingress: The controller's ingress endpoint.
    :param status: The controller's status endpoint.
    :param block_size: Tokens per hashed block (match the ranks' ``--block-size``).
    :param max_unread_replies: The most replies of one request held for a client that does
        not read them (``--max-unread-replies``); beyond it the request ends ``client_too_slow``.
    """

    def __init__(
        self, ingress: str, status: str, *, block_size: int = 64, max_unread_replies: int = DEFAULT_MAX_UNREAD_REPLIES
    ) -> None:
        self.ingress = ingress
        self.status_endpoint = status
        self.block_size = block_size
        self.max_unread_replies = max_unread_replies
        self.client: AsyncClient | None = None
        self._status: AsyncStatusClient | None = None
        self._admin: Any = None
        self._ctx: Any = None
        # Unique across fronts sharing a controller, and across restarts of this one.
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count()

    async def start(self) -> None:
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        self._ctx = ctx
        self.client = AsyncClient(
            self.ingress, zmq_ctx=ctx, block_size=self.block_size, max_unread_replies=self.max_unread_replies
        )
        self._status = AsyncStatusClient(self.status_endpoint, ctx=ctx)

    def wire_id(self, rid: str) -> str:
        """A fresh id for one request of client id *rid*."""
        return f"{rid}~{self._prefix}{next(self._ids):x}"

    def encode(self, inp: GenerateInput) -> tuple[str, bytes, bytes]:
        """``(wire id, header, payload)`` of *inp*: hashing and packing the prompt, CPU work
        that grows with it (thread-safe; the front runs it off its event loop for big ones)."""
        if self.client is None:
            msg = "ControllerLink.start() was not awaited"
            raise RuntimeError(msg)
        wid = self.wire_id(inp.rid)
        payload = inp.engine_payload()
        payload["rid"] = wid
        hdr = self.client.encode(
            wid,
            token_ids=inp.token_ids,
            routed_dp_rank=inp.routed_dp_rank,
            data_parallel_rank=inp.data_parallel_rank,
            bootstrap_room=inp.bootstrap_room,
            disagg_prefill_dp_rank=inp.disagg_prefill_dp_rank,
            max_new_tokens=inp.max_new_tokens,
        )
        return wid, hdr, msgpack.packb(payload)

    async def submit(self, inp: GenerateInput, encoded: tuple[str, bytes, bytes] | None = None) -> ReplyStream:
        """Send *inp* (as *encoded* by :meth:`encode`, or encoded here) under a fresh id (the
        stream's ``rid``)."""
        wid, hdr, payload = encoded or self.encode(inp)
        return await self.client.submit_encoded(wid, hdr, payload)  # type: ignore[union-attr]

    def abandon(self, stream: ReplyStream, reason: str = wire.ABORT_CLIENT_GONE) -> None:
        """The request of *stream* lost its client (or, with *reason* ``timeout``, its rank
        took too long): drop its replies and stop it on its rank. Once per request: the
        stream is done after it."""
        if self.client is not None and not stream.done:
            self.client.abort(stream.rid, reason)

    def stats(self) -> dict[str, int]:
        """This front's own counts of the replies it handled (the controller's are in :meth:`status`)."""
        c = self.client
        return {
            "max_unread_replies": self.max_unread_replies,
            "unread_replies_peak": c.unread_peak if c else 0,
            "client_too_slow": c.too_slow if c else 0,
            "stale_replies": c.stale if c else 0,
            "bad_replies": c.bad_replies if c else 0,
            "aborts_unsent": c.aborts_unsent if c else 0,
        }

    async def status(self, timeout_s: float = 2.0) -> dict[str, Any]:
        if self._status is None:
            msg = "ControllerLink.start() was not awaited"
            raise RuntimeError(msg)
        return await self._status.get(timeout_s)

    async def admin(self, token: str, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """An admin command to the controller (:mod:`dpcore.runtime.admin`), with the caller's token."""
        if self._ctx is None:
            msg = "ControllerLink.start() was not awaited"
            raise RuntimeError(msg)
        if self._admin is None:
            from dpcore.runtime.admin import AsyncAdminClient

            self._admin = AsyncAdminClient(self.status_endpoint, ctx=self._ctx)
        return await self._admin.call(token, op, args)  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self._admin is not None:
            self._admin.close()
        if self._status is not None:
            self._status.close()
        if self.client is not None:
            await self.client.close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
