"""The Starlette app of the HTTP front.

Generation endpoints (SGLang ``/generate``, OpenAI ``/v1/completions`` and
``/v1/chat/completions``) parse the body (:mod:`dpcore.http.protocol`), submit one request
to the controller and wait for the rank's first reply before answering, so a rejection
becomes a proper HTTP status (400 for a bad rank, 503 when every rank is down, ...) even for
streaming requests. After that, a streaming request gets server-sent events.

The endpoints routers poll read the controller's status snapshot: ``/health``,
``/health_generate``, ``/server_info`` (and ``/get_server_info``), ``/model_info`` (and
``/get_model_info``), ``/v1/models``, ``/get_load`` and ``/v1/loads``.

Errors are JSON. On the OpenAI paths (``/v1/...``) they have OpenAI's shape, which the
OpenAI SDKs turn into a readable exception: ``{"error": {"message", "type", "param",
"code"}}``; elsewhere SGLang's: ``{"error": code, "detail": message}``. Both carry ``rid``
when known. ``code`` is the same stable string in both.

Limits: a body over ``--max-body-bytes`` (32 MiB by default) gets 413 before it is read; a
body not received within 30 s gets 408; bodies over 64 KiB are parsed and tokenized on a
worker thread, never on the event loop. A prompt plus ``max_new_tokens`` larger than every
rank's reported KV capacity gets 400 ``context_length_exceeded``. A streaming client that
leaves ``--max-unread-replies`` replies unread ends its request ``client_too_slow``
(:class:`~dpcore.sdk.asyncclient.ReplyStream`): one client that stops reading cannot make the
front hold its whole output.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
import structlog
from attrs import field, frozen
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from dpcore import wire
from dpcore.http.protocol import PARSERS, GenerateInput, HttpError
from dpcore.http.responses import DONE, Output, sse
from dpcore.http.statuses import error_response, reply_error
from dpcore.http.tokenizer import ByteTokenizer, Tokenizer
from dpcore.runtime.status import StatusUnavailableError
from dpcore.sdk.client import ControllerUnavailableError, MessageTooLargeError

if TYPE_CHECKING:
    from dpcore.http.link import ControllerLink
    from dpcore.sdk.asyncclient import ReplyStream
    from dpcore.wire import Reply

#: Response header naming the rank that served the request.
SERVED_RANK_HEADER = "X-Dpcore-Dp-Rank"
DEFAULT_MAX_BODY_BYTES = 32 << 20
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Bodies up to this size are parsed and tokenized on the event loop (well under a
#: millisecond); bigger ones on a worker thread.
INLINE_PARSE_BYTES = 64 << 10
#: How often the largest KV capacity of the ranks is read again for the prompt-size check.
_CAPACITY_REFRESH_S = 1.0
#: Paths open without the API key, as in SGLang: what load balancers probe.
OPEN_PREFIXES = ("/health", "/metrics")
_log = structlog.get_logger("dpcore.http")


@frozen
class FrontConfig:
    """Settings of one HTTP front.

    :ivar model: Name served in ``/v1/models`` and ``model_path`` of ``/model_info``.
    :ivar api_key: When set, every path but ``/health*`` needs ``Authorization: Bearer KEY``.
    :ivar max_body_bytes: Larger request bodies get 413.
    :ivar body_timeout_s: A client that has not sent its whole body by then gets 408.
    :ivar request_timeout_s: Longest wait for a rank's next reply before answering 504.
    :ivar bootstrap_port: PD prefill: the bootstrap registry port, shown in ``/server_info``.
    :ivar log_requests: Log one line per request (rid, ranks, room, status).
    """

    model: str = "dpcore-mock"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    request_timeout_s: float = 600.0
    bootstrap_port: int | None = None
    log_requests: bool = False
    tokenizer: Tokenizer = field(factory=ByteTokenizer)
    #: The address the front binds and ``--allow-remote-admin`` (see :mod:`dpcore.http.admin`).
    host: str = "127.0.0.1"
    allow_remote_admin: bool = False


# --------------------------------------------------------------------------- request plumbing


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refusing more than *limit* bytes before reading them all, and a client
    that takes more than *timeout_s* to send it (it would hold a connection and a buffer)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise HttpError(413, "body_too_large", f"request body of {size} bytes is over the limit of {limit}")
    chunks, total = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise HttpError(413, "body_too_large", f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        msg = f"the request body did not arrive within {timeout_s:g}s ({total} bytes came)"
        raise HttpError(408, "body_timeout", msg) from None
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """The JSON document in *raw*, or a 400 that says what is wrong."""
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise HttpError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads recurses per nesting level
        raise HttpError(400, "invalid_json", "request body is nested too deeply") from None


def bad_unicode() -> HttpError:
    # No rid in the answer: it may be the string that cannot be encoded.
    return HttpError(400, "invalid_field", "strings must be valid Unicode (JSON had a lone surrogate escape)")


class Front:
    """Request handling shared by the routes; one per app."""

    def __init__(self, link: ControllerLink, config: FrontConfig) -> None:
        self.link = link
        self.config = config
        self.started = int(time.time())
        self._mode: str | None = None
        self.request_log = structlog.get_logger("dpcore.http") if config.log_requests else None
        #: Client request ids in flight on this front (a second request with one is refused),
        #: each with the input that holds it.
        self.in_flight: dict[str, GenerateInput] = {}
        self._capacity: int | None = None
        self._capacity_at = 0.0
        self._capacity_task: asyncio.Future[None] | None = None

    async def _check_fits(self, inp: GenerateInput) -> None:
        """A request that needs more KV than any rank has is the client's error (400), not
        the engine's: no rank could ever serve it. Capacities are those the ranks report
        (ranks that reported none are not counted), read again at most every second; while
        the controller cannot say, the last known value holds."""
        now = time.monotonic()
        task = self._capacity_task
        if task is None or (task.done() and now - self._capacity_at >= _CAPACITY_REFRESH_S):
            self._capacity_at = now
            task = self._capacity_task = asyncio.ensure_future(self._read_capacity())
        if self._capacity is None and not task.done():
            await asyncio.shield(task)  # the first requests wait for the first answer
        cap = self._capacity
        need = len(inp.token_ids) + inp.max_new_tokens
        if cap is not None and need > cap:
            msg = (
                f"the prompt ({len(inp.token_ids)} tokens) plus max_new_tokens ({inp.max_new_tokens}) needs {need} "
                f"tokens of KV cache; the largest rank holds {cap}"
            )
            raise HttpError(400, "context_length_exceeded", msg, rid=inp.rid)

    async def _read_capacity(self) -> None:
        try:
            loads = (await self.status())["loads"]
        except HttpError:  # the controller is slow: generation says so itself
            return
        self._capacity = max((r.get("kv_capacity") or 0 for r in loads), default=0) or None

    async def _next(self, stream: ReplyStream, deadline: float, rid: str) -> Reply:
        left = deadline - time.monotonic()
        try:
            return await stream.next(max(0.0, left))
        except asyncio.TimeoutError:
            self.link.abandon(stream, wire.ABORT_TIMEOUT)
            msg = f"no reply from the rank within {self.config.request_timeout_s:g}s"
            raise HttpError(504, "timeout", msg, rid=rid) from None

    async def submit(self, inp: GenerateInput, big: bool = False) -> tuple[ReplyStream, Reply, float]:
        """Send *inp*; return its stream and its first reply (raises for rej/fail).

        The caller owns ``inp.rid`` in :attr:`in_flight` from here on (release it with
        :meth:`_end` when the request ends, whichever way)."""
        if inp.rid in self.in_flight:
            msg = f"request id {inp.rid!r} is already pending on this front"
            raise HttpError(400, "duplicate_rid", msg, rid=inp.rid)
        self.in_flight[inp.rid] = inp
        try:
            stream = await self._send(inp, big)
            deadline = time.monotonic() + self.config.request_timeout_s
            try:
                first = await self._next(stream, deadline, inp.rid)
            except BaseException:
                self.link.abandon(stream)  # e.g. cancelled: the client went away
                raise
        except BaseException:
            del self.in_flight[inp.rid]
            raise
        if first.kind != "out" or "error" in first.meta:
            del self.in_flight[inp.rid]
            raise reply_error(first, inp.rid)
        return stream, first, deadline

    async def _send(self, inp: GenerateInput, big: bool) -> ReplyStream:
        try:
            # A big prompt is hashed and packed on a worker thread, as it was parsed.
            encoded = await asyncio.to_thread(self.link.encode, inp) if big else None
            return await self.link.submit(inp, encoded)
        except UnicodeEncodeError:  # a string the wire cannot carry
            raise bad_unicode() from None
        except OverflowError:  # e.g. in sampling_params, which are passed on untouched
            msg = "an integer in the request does not fit in 64 bits"
            raise HttpError(400, "invalid_field", msg, rid=inp.rid) from None
        except MessageTooLargeError as exc:
            raise HttpError(413, "body_too_large", str(exc), rid=inp.rid) from None
        except ControllerUnavailableError as exc:
            raise HttpError(503, "controller_unavailable", str(exc), rid=inp.rid) from None

    def _parse(self, kind: str, raw: bytes, headers: Any) -> GenerateInput:
        """JSON and tokenization: CPU work that grows with the prompt."""
        try:
            return PARSERS[kind](parse_json(raw), headers, self.config.tokenizer)
        except UnicodeEncodeError:  # the tokenizer met a lone surrogate
            raise bad_unicode() from None

    async def generate(self, request: Request, kind: str) -> Response:
        started = time.monotonic()
        inp: GenerateInput | None = None
        try:
            raw = await read_body(request, self.config.max_body_bytes, self.config.body_timeout_s)
            big = len(raw) > INLINE_PARSE_BYTES
            if not big:
                inp = self._parse(kind, raw, request.headers)
            else:
                # A big prompt is parsed and tokenized on a worker thread, so the event loop
                # keeps serving every other connection meanwhile.
                inp = await asyncio.to_thread(self._parse, kind, raw, request.headers)
            await self._check_fits(inp)
            if await self.mode() == "prefill" and inp.max_new_tokens > 1:
                # A PD prefill server computes the prompt's KV and the first token; decode
                # generates the rest.
                inp = attrs.evolve(inp, max_new_tokens=1)
            stream, first, deadline = await self.submit(inp, big)
            out = Output(inp, self.config.tokenizer, started)
            out.add(first)
            headers = {SERVED_RANK_HEADER: str(first.rank)}
            if inp.rid.isascii() and inp.rid.isprintable():  # else it cannot be a header value
                headers["X-Request-Id"] = inp.rid
            if inp.stream:
                events = self._events(stream, out, deadline)
                # The generator's finally ends the request; the background task covers a
                # client that left before the first chunk (a generator never started has
                # no finally to run).
                end = BackgroundTask(self._end, stream, inp)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers, background=end)
            try:
                while not out.final:
                    reply = await self._next(stream, deadline, inp.rid)
                    if reply.kind != "out" or "error" in reply.meta:
                        raise reply_error(reply, inp.rid)
                    out.add(reply)
            finally:
                self._end(stream, inp)
        except HttpError as exc:
            self._log_request(kind, inp, None, exc)
            raise
        self._log_request(kind, inp, out, None)
        return JSONResponse(out.body(), headers=headers)

    async def _events(self, stream: ReplyStream, out: Output, deadline: float) -> AsyncIterator[bytes]:
        rid = out.inp.rid
        error: HttpError | None = None
        try:
            for event in out.chunk(first=True):
                yield sse(event)
            while not out.final:
                try:
                    reply = await self._next(stream, deadline, rid)
                    if reply.kind != "out" or "error" in reply.meta:
                        raise reply_error(reply, rid)
                except HttpError as exc:  # headers are gone: report it in the stream
                    error = exc
                    yield sse({"error": {"code": exc.code, "message": str(exc), "type": exc.openai_type,
                                         "param": exc.param, "status": exc.status}})  # fmt: skip
                    break
                out.add(reply)
                for event in out.chunk(first=False):
                    yield sse(event)
            yield DONE
        finally:
            self._end(stream, out.inp)  # the client went away or the request failed mid-stream
            self._log_request(out.inp.kind, out.inp, out, error)

    def _end(self, stream: ReplyStream, inp: GenerateInput) -> None:
        """The request of *stream* is over here: free its client id, and stop it on its rank
        unless its final reply came (idempotent)."""
        self.link.abandon(stream)
        if self.in_flight.get(inp.rid) is inp:
            del self.in_flight[inp.rid]

    def _log_request(self, kind: str, inp: GenerateInput | None, out: Output | None, error: HttpError | None) -> None:
        """One line per request with ``--log-requests``: where it went and how it ended."""
        if self.request_log is None:
            return
        fields: dict[str, Any] = {"kind": kind, "status": error.status if error else 200}
        if inp is not None:
            fields.update(rid=inp.rid, routed_dp_rank=inp.routed_dp_rank, bootstrap_room=inp.bootstrap_room,
                          disagg_prefill_dp_rank=inp.disagg_prefill_dp_rank, prompt_tokens=len(inp.token_ids))  # fmt: skip
        if out is not None:
            fields.update(dp_rank=out.rank, prefill_dp_rank=out.meta.get("prefill_dp_rank"),
                          completion_tokens=out.completion_tokens, final=out.final)  # fmt: skip
        if error is not None:
            fields.update(error=error.code, detail=str(error))
        self.request_log.info("request", **fields)

    async def mode(self) -> str:
        """The controller's disaggregation mode (fixed for its life, so asked once)."""
        if self._mode is None:
            self._mode = (await self.status())["disaggregation_mode"]
        return self._mode

    # ------------------------------------------------------------------ polled endpoints

    async def status(self) -> dict[str, Any]:
        try:
            return await self.link.status()
        except StatusUnavailableError as exc:
            raise HttpError(503, "controller_unavailable", str(exc)) from None

    async def health(self, request: Request) -> Response:
        st = await self.status()
        if not st["active_ranks"]:
            raise HttpError(503, "no_active_rank", f"all {st['dp_size']} ranks are inactive")
        return JSONResponse({"status": "ok", "active_ranks": st["active_ranks"]})

    async def health_generate(self, request: Request) -> Response:
        """A one-token request through the controller and a rank, as SGLang's."""
        st = await self.status()
        mode = st["disaggregation_mode"]
        inp = GenerateInput(
            kind="generate",
            rid=f"health-{uuid.uuid4().hex}",
            token_ids=(0,),
            max_new_tokens=1,
            # PD: a room for prefill policies that need one; decode is told the prefill rank.
            bootstrap_room=uuid.uuid4().int >> 65 if mode == "prefill" else None,
            disagg_prefill_dp_rank=0 if mode == "decode" else None,
        )
        stream, first, deadline = await self.submit(inp)
        try:
            while not first.final:
                first = await self._next(stream, deadline, inp.rid)
        finally:
            self._end(stream, inp)
        return JSONResponse({"status": "ok", "dp_rank": first.rank})

    async def server_info(self, request: Request) -> Response:
        st = await self.status()
        from dpcore import __version__

        info: dict[str, Any] = {
            "dp_size": st["dp_size"],
            "load_balance_method": st["load_balance_method"],
            "load_balance_method_requested": st["requested"],
            "load_balance_reason": st["reason"],
            "disaggregation_mode": st["disaggregation_mode"],
            "model_path": self.config.model,
            "served_model_name": self.config.model,
            "tokenizer": self.config.tokenizer.name,
            "tp_size": 1,
            "version": __version__,
            "server": "dpcore",
            "active_ranks": st["active_ranks"],
            # mini_lb and other tools count ranks as len(internal_states).
            "internal_states": st["loads"],
            "counters": st.get("counters"),
            # The running chain's swaps (dpcore.runtime.swap): count, refusals, the last one.
            "policy_swaps": st.get("policy_swaps"),
            # The --shadow-policy chain's agreement, load and cost (dpcore.runtime.shadow), or None.
            "shadow": st.get("shadow"),
            # This front's own counts (dpcore.http.link.ControllerLink.stats).
            "front": self.link.stats(),
        }
        if self.config.bootstrap_port is not None:
            info["disaggregation_bootstrap_port"] = self.config.bootstrap_port
        return JSONResponse(info)

    async def model_info(self, request: Request) -> Response:
        return JSONResponse({
            "model_path": self.config.model,
            "tokenizer_path": None if self.config.tokenizer.name == "bytes" else self.config.tokenizer.name,
            "is_generation": True,
            "served_model_name": self.config.model,
        })  # fmt: skip

    async def models(self, request: Request) -> Response:
        card = {"id": self.config.model, "object": "model", "created": self.started,
                "owned_by": "dpcore", "root": self.config.model}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    async def get_load(self, request: Request) -> Response:
        keys = ("dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens")
        return JSONResponse([{k: r[k] for k in keys} for r in (await self.status())["loads"]])

    async def v1_loads(self, request: Request) -> Response:
        loads = (await self.status())["loads"]
        ranks = []
        for r in loads:
            waiting = r["num_waiting_reqs"]
            cap = r["kv_capacity"]
            ranks.append({
                "dp_rank": r["dp_rank"],
                "active": r["active"],
                "reported": r["reported"],
                "num_running_reqs": r["num_reqs"] - waiting,
                "num_waiting_reqs": waiting,
                "num_total_reqs": r["num_reqs"],
                "num_used_tokens": r["num_tokens"],
                "max_total_num_tokens": cap,
                "token_usage": round(r["kv_used"] / cap, 6) if cap else 0.0,
                "unacked_dispatches": r["unacked"],
            })  # fmt: skip
        aggregate = {
            "total_running_reqs": sum(x["num_running_reqs"] for x in ranks),
            "total_waiting_reqs": sum(x["num_waiting_reqs"] for x in ranks),
            "total_reqs": sum(x["num_total_reqs"] for x in ranks),
            "total_tokens": sum(x["num_used_tokens"] for x in ranks),
        }
        return JSONResponse({
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "dp_rank_count": len(ranks),
            "loads": ranks,
            "aggregate": aggregate,
        })  # fmt: skip


# --------------------------------------------------------------------------- app


def _guard(front: Front, handler: Callable[[Request], Awaitable[Response]], *, open_: bool) -> Callable[[Request], Awaitable[Response]]:
    key = front.config.api_key

    async def endpoint(request: Request) -> Response:
        if key is not None and not open_:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return error_response(HttpError(401, "unauthorized", "missing or wrong API key (Authorization: Bearer KEY)"),
                                      request.url.path)  # fmt: skip
        try:
            return await handler(request)
        except HttpError as exc:
            return error_response(exc, request.url.path)
        except Exception:  # a bug: answer in JSON and keep the connection, never a bare 500
            _log.exception("http_internal_error", path=request.url.path)
            return error_response(HttpError(500, "internal_error", "internal error in the HTTP front (logged)"),
                                  request.url.path)  # fmt: skip

    return endpoint


def create_app(link: ControllerLink, config: FrontConfig | None = None) -> Starlette:
    """The app; *link* is started on startup and closed on shutdown."""
    from dpcore.http import metrics

    config = config or FrontConfig()
    front = Front(link, config)

    def gen(kind: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return await front.generate(request, kind)

        return handler

    table: list[tuple[str, Callable[[Request], Awaitable[Response]], str]] = [
        ("/generate", gen("generate"), "POST"),
        ("/v1/completions", gen("completion"), "POST"),
        ("/v1/chat/completions", gen("chat"), "POST"),
        ("/health", front.health, "GET"),
        ("/health_generate", front.health_generate, "GET"),
        ("/server_info", front.server_info, "GET"),
        ("/get_server_info", front.server_info, "GET"),
        ("/model_info", front.model_info, "GET"),
        ("/get_model_info", front.model_info, "GET"),
        ("/v1/models", front.models, "GET"),
        ("/get_load", front.get_load, "GET"),
        ("/v1/loads", front.v1_loads, "GET"),
        ("/metrics", metrics.handler(link), "GET"),
    ]
    routes = [
        Route(path, _guard(front, h, open_=path.startswith(OPEN_PREFIXES)), methods=[method])
        for path, h, method in table
    ]
    from dpcore.http import admin

    # The admin token, checked by the controller, guards these; the API key does not.
    for method, h in admin.handlers(link, config.host, config.allow_remote_admin).items():
        routes.append(Route(admin.PATH, _guard(front, h, open_=True), methods=[method]))

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = HttpError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")
        return error_response(err, request.url.path)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await link.start()
        try:
            yield
        finally:
            await link.close()

    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error},  # type: ignore[dict-item]
        lifespan=lifespan,
    )
