"""The HTTP front's connection to the controller: requests in, replies and status out.

Requests go through the client SDK's :class:`~dpcore.sdk.client.AsyncClient` (PUSH to the
controller's ingress, replies on the front's own PULL socket); loads and liveness come from
the controller's status channel (:mod:`dpcore.runtime.status`). Both live on the event loop
uvicorn runs, so they are created in :meth:`ControllerLink.start` (the app's startup).
"""

from __future__ import annotations

from typing import Any

import msgpack

from dpcore.http.protocol import GenerateInput
from dpcore.runtime.status import AsyncStatusClient
from dpcore.sdk.client import AsyncClient, ReplyStream


class ControllerLink:
    """Submits :class:`GenerateInput` requests and reads the controller's status.

    :param ingress: The controller's ingress endpoint.
    :param status: The controller's status endpoint.
    :param block_size: Tokens per hashed block (match the ranks' ``--block-size``).
    """

    def __init__(self, ingress: str, status: str, *, block_size: int = 64) -> None:
        self.ingress = ingress
        self.status_endpoint = status
        self.block_size = block_size
        self.client: AsyncClient | None = None
        self._status: AsyncStatusClient | None = None
        self._ctx: Any = None

    async def start(self) -> None:
        import zmq.asyncio

        ctx = zmq.asyncio.Context()
        self._ctx = ctx
        self.client = AsyncClient(self.ingress, zmq_ctx=ctx, block_size=self.block_size)
        self._status = AsyncStatusClient(self.status_endpoint, ctx=ctx)

    async def submit(self, inp: GenerateInput) -> ReplyStream:
        assert self.client is not None, "ControllerLink.start() was not awaited"
        return await self.client.submit(
            inp.rid,
            token_ids=inp.token_ids,
            payload=msgpack.packb(inp.engine_payload()),
            routed_dp_rank=inp.routed_dp_rank,
            data_parallel_rank=inp.data_parallel_rank,
            bootstrap_room=inp.bootstrap_room,
            disagg_prefill_dp_rank=inp.disagg_prefill_dp_rank,
            max_new_tokens=inp.max_new_tokens,
        )

    def forget(self, rid: str) -> None:
        if self.client is not None:
            self.client.forget(rid)

    async def status(self, timeout_s: float = 2.0) -> dict[str, Any]:
        assert self._status is not None, "ControllerLink.start() was not awaited"
        return await self._status.get(timeout_s)

    async def close(self) -> None:
        if self._status is not None:
            self._status.close()
        if self.client is not None:
            await self.client.close()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
