"""The bootstrap registry's HTTP server (the API in :mod:`dpcore.runtime.bootstrap`), in a
thread of the prefill controller or standalone as ``dpcore bootstrap-registry``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from dpcore.runtime.bootstrap import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_TTL_S,
    MAX_BODY_BYTES,
    MAX_QUERY_ROOMS,
    BadRegistryInput,
    BootstrapRegistry,
    RegistryError,
    prefill_info,
)

if TYPE_CHECKING:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse


# --------------------------------------------------------------------------- HTTP server


def make_app(registry: BootstrapRegistry) -> Starlette:
    """The Starlette app serving *registry*."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def error(status: int, code: str, detail: str) -> JSONResponse:
        return JSONResponse({"error": code, "detail": detail}, status_code=status)

    async def body_object(request: HttpRequest) -> dict[str, Any] | JSONResponse:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return error(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error(413, "body_too_large", f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return error(400, "invalid_json", f"request body is not JSON: {exc}")
        if not isinstance(body, dict):
            return error(400, "invalid_body", f"expected a JSON object, got {type(body).__name__}")
        return body

    async def register_dp_rank(request: HttpRequest) -> JSONResponse:
        body = await body_object(request)
        if isinstance(body, JSONResponse):
            return body
        missing = [k for k in ("bootstrap_room", "dp_rank") if k not in body]
        if missing:
            return error(400, "missing_field", f"missing {', '.join(missing)}")
        try:
            registry.register(body["bootstrap_room"], body["dp_rank"])
        except BadRegistryInput as exc:
            return error(400, "invalid_field", str(exc))
        return JSONResponse({"ok": True})

    async def register_dp_ranks(request: HttpRequest) -> JSONResponse:
        body = await body_object(request)
        if isinstance(body, JSONResponse):
            return body
        entries = body.get("entries")
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            detail = 'entries must be a list of {"bootstrap_room": int, "dp_rank": int} objects'
            return error(400, "invalid_field", detail)
        if len(entries) > MAX_QUERY_ROOMS:
            return error(413, "too_many_rooms", f"{len(entries)} entries in one call; at most {MAX_QUERY_ROOMS}")
        try:
            n = registry.register_many((e.get("bootstrap_room"), e.get("dp_rank")) for e in entries)
        except BadRegistryInput as exc:
            return error(400, "invalid_field", str(exc))
        return JSONResponse({"ok": True, "registered": n})

    async def query_dp_ranks(request: HttpRequest) -> JSONResponse:
        body = await body_object(request)
        if isinstance(body, JSONResponse):
            return body
        rooms = body.get("bootstrap_rooms")
        if not isinstance(rooms, list):
            return error(400, "invalid_field", f"bootstrap_rooms must be a list, got {rooms!r:.80}")
        if len(rooms) > MAX_QUERY_ROOMS:
            detail = f"{len(rooms)} rooms in one query; at most {MAX_QUERY_ROOMS}"
            return error(413, "too_many_rooms", detail)
        try:
            found = registry.query(rooms)
        except BadRegistryInput as exc:
            return error(400, "invalid_field", str(exc))
        return JSONResponse({str(room): rank for room, rank in found.items()})

    async def health(request: HttpRequest) -> JSONResponse:
        return JSONResponse({"status": "ok", "entries": len(registry)})

    async def info(request: HttpRequest) -> JSONResponse:
        return JSONResponse({**registry.info, "ttl_s": registry.ttl_s, "stats": dict(registry.stats)})

    async def http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")

    routes = [
        Route("/register_dp_rank", register_dp_rank, methods=["POST"]),
        Route("/register_dp_ranks", register_dp_ranks, methods=["POST"]),
        Route("/query_dp_ranks", query_dp_ranks, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})  # type: ignore[dict-item]


class RegistryServer:
    """Serves a registry over HTTP with uvicorn, in a daemon thread of this process.

    ``port=0`` binds a free port; :attr:`url` says which. Binds 127.0.0.1 unless told
    otherwise. Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, registry: BootstrapRegistry, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> RegistryServer:
        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto must be IPPROTO_TCP, or asyncio does not set TCP_NODELAY on accepted sockets
        # and every response waits ~40 ms for a delayed ACK (headers and body are two writes).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            msg = f"bootstrap registry cannot bind {self.host}:{self.port}: {exc}"
            raise RegistryError(msg) from exc
        self.port = sock.getsockname()[1]
        self._sock = sock
        config = uvicorn.Config(make_app(self.registry), log_level="warning", access_log=False, lifespan="off")
        server = uvicorn.Server(config)
        self._server = server
        # uvicorn installs signal handlers only on the main thread, so it leaves ours alone.
        self._thread = threading.Thread(
            target=lambda: asyncio.run(server.serve(sockets=[sock])), name="dpcore-bootstrap", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                msg = f"bootstrap registry on {self.url} did not start"
                raise RegistryError(msg)
            time.sleep(0.005)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI: dpcore bootstrap-registry


def add_arguments(p: Any) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8998, help="port to bind (default 8998, SGLang's)")
    p.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="entry lifetime in seconds")
    p.add_argument("--max-entries", type=int, default=DEFAULT_MAX_ENTRIES, help="size bound")
    p.add_argument("--dp-size", type=int, default=None, help="prefill dp size (refuse ranks outside it)")
    p.add_argument(
        "--load-balance-method", default=None, help="the prefill policy, served on GET /info for decode"
    )


def run(args: Any) -> int:
    """Run a standalone registry in the foreground until Ctrl-C."""
    import structlog

    from dpcore.errors import ConfigError
    from dpcore.runtime.pd import follows_bootstrap_room

    method = args.load_balance_method
    follows = None if method is None else follows_bootstrap_room(method)
    try:
        registry = BootstrapRegistry(
            ttl_s=args.ttl, max_entries=args.max_entries, dp_size=args.dp_size,
            info=prefill_info(method, args.dp_size, follows),
        )
    except ValueError as exc:
        raise ConfigError(f"bootstrap-registry: {exc}") from exc
    from dpcore import security

    log = structlog.get_logger("dpcore")
    security.warn_exposed("the PD bootstrap registry (HTTP, no authentication available)", args.host,
                          "Anyone who can reach it can register or read room -> rank entries.",
                          "bind it to 127.0.0.1 or a private network (--host)", log)  # fmt: skip
    server = RegistryServer(registry, host=args.host, port=args.port).start()
    log.info("bootstrap_registry_started", url=server.url)
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()
