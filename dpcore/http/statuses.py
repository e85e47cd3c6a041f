"""What a front error or a controller's rejection is as an HTTP answer: the status for each
rejection code (from the :class:`~dpcore.errors.RequestRejected` classes and the controller's
own codes) and the JSON error body in the shape of the path's dialect.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from starlette.responses import JSONResponse

from dpcore.errors import RequestRejected
from dpcore.http.protocol import HttpError

if TYPE_CHECKING:
    from dpcore.wire import Reply


@functools.cache
def _rejection_statuses() -> dict[str, int]:
    # The controller's modules define RequestRejected subclasses: import them before the walk.
    from dpcore.runtime.controller import CODE_CONTROLLER_SHUTDOWN
    from dpcore.runtime.lifecycle import CODE_RANK_DIED, CODE_RANK_STUCK
    from dpcore.runtime.placement import CODE_SHUTDOWN

    # Codes the controller sends without a RequestRejected class; all mean "try again".
    plain = (CODE_SHUTDOWN, CODE_RANK_DIED, CODE_CONTROLLER_SHUTDOWN, CODE_RANK_STUCK)
    out: dict[str, int] = dict.fromkeys(plain, 503)
    todo: list[type[RequestRejected]] = [RequestRejected]
    while todo:
        cls = todo.pop()
        out.setdefault(cls.code, cls.http_status)
        todo.extend(cls.__subclasses__())
    return out


def status_for(code: str, default: int = 500) -> int:
    """The HTTP status for a controller rejection *code* (*default* for unknown codes)."""
    return _rejection_statuses().get(code, default)


#: Paths whose errors have OpenAI's shape.
OPENAI_PREFIX = "/v1/"


def error_response(exc: HttpError, path: str = "") -> JSONResponse:
    """*exc* as a JSON response, shaped for *path*'s dialect."""
    body = exc.openai_body() if path.startswith(OPENAI_PREFIX) else exc.body()
    return JSONResponse(body, status_code=exc.status)


def reply_error(reply: Reply, rid: str) -> HttpError:
    """The HTTP error for a ``rej``/``fail`` reply, or an ``out`` the engine marked failed."""
    if reply.kind == "out":
        return HttpError(500, "engine_error", str(reply.meta.get("error")), rid=rid)
    # A failure means the request was lost with its rank: retryable, so 503 by default.
    default = 503 if reply.kind == "fail" else 500
    return HttpError(status_for(reply.code, default), reply.code, reply.msg, rid=rid)
