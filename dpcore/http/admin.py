"""The HTTP front's admin routes: the running policy chain, and swapping it.

``GET /admin/policy`` shows the chain and its swaps; ``POST /admin/policy`` with
``{"method": "cache_aware", "options": {"cache_aware": {"balance_abs": 32}}}`` swaps it
(:mod:`dpcore.runtime.swap`). Both need ``Authorization: Bearer ADMIN_TOKEN`` (the token
``dpcore serve`` writes to ``RUN_DIR/admin.token``); the front passes it on and the controller
checks it, so the front never holds the token. The API key (``--api-key``) does not open them.

Loopback only by default: when the front binds an address other hosts can reach, the routes
answer 403 unless it was started with ``--allow-remote-admin``; without that flag a request
from a non-loopback peer is refused too.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dpcore import security
from dpcore.http.protocol import HttpError
from dpcore.runtime.admin import BAD_COMMAND, DISABLED, UNAUTHORIZED, AdminError

if TYPE_CHECKING:
    from dpcore.http.link import ControllerLink

PATH = "/admin/policy"
#: Largest admin request body.
MAX_BODY_BYTES = 64 << 10
#: HTTP status of a refused admin command, by code; a refused swap is 409 (the request was
#: understood, the chain was not changed), no answer is 503.
_STATUS = {UNAUTHORIZED: 401, DISABLED: 403, BAD_COMMAND: 400, "unavailable": 503}


def enabled(host: str, allow_remote: bool) -> bool:
    """Whether a front bound to *host* serves the admin routes."""
    return allow_remote or security.is_loopback(host)


def handlers(link: ControllerLink, host: str, allow_remote: bool) -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """The route handlers by method (``GET``, ``POST``); they raise :class:`HttpError`."""

    def check(request: Request) -> str:
        if not enabled(host, allow_remote):
            msg = (f"the admin routes are served only on a loopback bind; this front binds {host} "
                   "(start it with --allow-remote-admin to serve them there)")  # fmt: skip
            raise HttpError(403, "admin_loopback_only", msg)
        peer = request.client.host if request.client else ""
        if not allow_remote and not security.is_loopback(peer):
            raise HttpError(403, "admin_loopback_only", f"admin requests are taken from loopback only, not {peer}")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            raise HttpError(401, UNAUTHORIZED, "admin routes need 'Authorization: Bearer ADMIN_TOKEN' (RUN_DIR/admin.token)")
        return auth[7:].strip()

    async def call(token: str, op: str, args: dict[str, Any] | None = None) -> Response:
        try:
            data = await link.admin(token, op, args)
        except AdminError as exc:
            raise HttpError(_STATUS.get(exc.code, 409), exc.code, str(exc)) from None
        return JSONResponse(data)

    async def show(request: Request) -> Response:
        return await call(check(request), "show")

    async def swap(request: Request) -> Response:
        token = check(request)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HttpError(413, "body_too_large", f"admin request body over {MAX_BODY_BYTES} bytes")
        try:
            obj = json.loads(body or b"{}")
        except ValueError as exc:
            raise HttpError(400, BAD_COMMAND, f"body is not JSON: {exc}") from None
        if type(obj) is not dict or set(obj) - {"method", "options"}:
            raise HttpError(400, BAD_COMMAND, 'body must be {"method": "NAME[,NAME...]", "options": {POLICY: {OPTION: VALUE}}}')
        return await call(token, "swap", {"method": obj.get("method"), "options": obj.get("options") or {}})

    return {"GET": show, "POST": swap}
