"""Running the HTTP front: ``dpcore http-front`` and ``dpcore serve --http-port``.

The front is its own process, so JSON parsing and HTTP never compete with the controller's
loop for the GIL. ``dpcore http-front`` connects to a running controller (several fronts
may share one); ``dpcore serve --http-port P`` starts one as a child process
(:func:`spawn`), which exits when its parent does.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

from dpcore.errors import ConfigError

API_KEY_ENV = "DPCORE_API_KEY"
#: The most replies (one per streamed chunk) the front holds for one request whose client
#: does not read them: a few MiB at most, and far more than a reading client ever lags.
DEFAULT_MAX_UNREAD_REPLIES = 4096


def add_front_arguments(p: argparse.ArgumentParser | Any, *, prefix: str = "--http-") -> None:
    """Options of the front itself (shared by ``serve`` and ``http-front``)."""
    p.add_argument(f"{prefix}host", default="127.0.0.1",
                   help="address the HTTP front binds (default 127.0.0.1)")  # fmt: skip
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on all but /health* (default: ${API_KEY_ENV}, else none)",
    )
    p.add_argument("--max-body-bytes", type=int, default=32 << 20, help="larger request bodies get 413 (default 32 MiB)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="a client that has not sent its whole body within S seconds gets 408 (default 30)")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds to wait for a rank's next reply before 504 (default 600)")  # fmt: skip
    p.add_argument("--max-unread-replies", type=int, default=DEFAULT_MAX_UNREAD_REPLIES, metavar="N",
                   help="a streaming client that leaves N replies unread (1..1048576) ends its request with "
                        "an error event client_too_slow, and the request is aborted on its rank "
                        f"(default {DEFAULT_MAX_UNREAD_REPLIES})")  # fmt: skip
    p.add_argument("--served-model-name", default="dpcore-mock", help="model name reported to clients and routers")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the model's tokenizer.json (or its directory), read locally; default: one token per "
                        "UTF-8 byte")  # fmt: skip
    p.add_argument("--log-requests", action="store_true",
                   help="log one line per request: rid, rank served, rank asked for, bootstrap room, status")  # fmt: skip
    p.add_argument("--allow-remote-admin", action="store_true",
                   help="serve /admin/policy on a non-loopback bind too (default: loopback binds only)")  # fmt: skip


def add_serve_arguments(p: argparse.ArgumentParser | Any) -> None:
    """What ``dpcore serve`` adds: ``--http-port`` and the front's options."""
    g = p.add_argument_group("HTTP front (extra dpcore[http])")
    g.add_argument("--http-port", type=int, default=None,
                   help="serve SGLang/OpenAI HTTP on this port (0: any free port); default: no HTTP")  # fmt: skip
    add_front_arguments(g)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``dpcore http-front``."""
    p.add_argument("--ingress", required=True, metavar="EP", help="the controller's ingress endpoint")
    p.add_argument("--status", required=True, metavar="EP", help="the controller's status endpoint")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--http-port", type=int, help="port to listen on (0: any free port)")
    where.add_argument("--http-fd", type=int, help=argparse.SUPPRESS)  # a listening socket from dpcore serve
    p.add_argument("--block-size", type=int, default=64, help="tokens per hashed block (match the ranks)")
    p.add_argument("--bootstrap-port", type=int, default=None, help="PD prefill: registry port for /server_info")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process goes away")
    p.add_argument("--port-file", default=None, help="write the bound port here once listening")
    add_front_arguments(p)


def check(args: argparse.Namespace) -> None:
    """Validate the front's options before anything is bound."""
    port = getattr(args, "http_port", None)
    if port is not None and not 0 <= port < 65536:
        raise ConfigError(f"--http-port must be in 0..65535, got {port}")
    if args.max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be positive, got {args.max_body_bytes}")
    if not args.request_timeout > 0:
        raise ConfigError(f"--request-timeout must be positive, got {args.request_timeout}")
    from dpcore.sdk.asyncclient import MAX_UNREAD_LIMIT

    if not 1 <= args.max_unread_replies <= MAX_UNREAD_LIMIT:
        raise ConfigError(f"--max-unread-replies must be in 1..{MAX_UNREAD_LIMIT}, got {args.max_unread_replies}")
    if not 0 < args.body_timeout < float("inf"):
        raise ConfigError(f"--body-timeout must be a positive number of seconds, got {args.body_timeout}")
    if args.tokenizer is not None:
        from dpcore.http.tokenizer import FileTokenizer

        FileTokenizer(args.tokenizer)  # a bad path fails now, before anything is bound
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"the HTTP front needs the http extra: pip install 'dpcore[http]' ({exc})") from None


def bind(host: str, port: int) -> socket.socket:
    """The front's listening socket (``dpcore serve`` binds it, so a taken port fails before
    anything starts, and hands it to the child)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says TCP; without it every keep-alive response waits ~40 ms for a
    # delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"HTTP front cannot bind {host}:{port}: {exc}") from exc
    return sock


def warn_exposed(host: str, api_key: str | None) -> None:
    """Warn loudly when the front listens beyond loopback without an API key."""
    if api_key is None:
        import structlog

        from dpcore import security

        security.warn_exposed("the HTTP front", host,
                              "Anyone who can reach it can send generation requests and read loads.",
                              f"set --api-key (or ${API_KEY_ENV}), or bind 127.0.0.1 (--http-host)",
                              structlog.get_logger("dpcore.http"))  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """``dpcore http-front``: serve until SIGINT/SIGTERM (or the parent exits)."""
    import asyncio

    import structlog
    import uvicorn

    from dpcore.http.app import FrontConfig, create_app
    from dpcore.http.link import ControllerLink

    check(args)
    from dpcore.http.tokenizer import load as load_tokenizer

    config = FrontConfig(
        tokenizer=load_tokenizer(args.tokenizer),
        model=args.served_model_name,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_body_bytes=args.max_body_bytes,
        body_timeout_s=args.body_timeout,
        request_timeout_s=args.request_timeout,
        bootstrap_port=args.bootstrap_port,
        log_requests=args.log_requests,
        host=args.http_host,
        allow_remote_admin=args.allow_remote_admin,
    )
    link = ControllerLink(args.ingress, args.status, block_size=args.block_size,
                          max_unread_replies=args.max_unread_replies)  # fmt: skip
    if args.http_fd is not None:
        sock = socket.socket(fileno=args.http_fd)  # bound (and warned about) by dpcore serve
    else:
        warn_exposed(args.http_host, config.api_key)
        sock = bind(args.http_host, args.http_port)
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(link, config), log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    )
    log = structlog.get_logger("dpcore").bind(component="http")

    async def serve() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            log.info("http_front_started", url=f"http://{args.http_host}:{port}", pid=os.getpid())
            if args.port_file:
                with open(args.port_file + ".tmp", "w") as f:
                    f.write(f"{port}\n")
                os.replace(args.port_file + ".tmp", args.port_file)
        if args.exit_with_parent:
            parent = os.getppid()
            while not task.done():
                if os.getppid() != parent:
                    server.should_exit = True
                await asyncio.sleep(0.5)
        await task

    try:
        asyncio.run(serve())
    finally:
        sock.close()
    return 0


def spawn(
    args: argparse.Namespace,
    sock: socket.socket,
    *,
    ingress: str,
    status: str,
    bootstrap_port: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``dpcore http-front`` on the listening socket *sock* for ``dpcore serve``.

    The child exits with its parent, inherits stderr (its log lines join the controller's)
    and gets the API key through the environment, never the command line (``ps`` shows
    command lines to every user).
    """
    cmd = [
        sys.executable, "-m", "dpcore", "--log-level", getattr(args, "log_level", "info"),
        *(["--log-json"] if getattr(args, "log_json", False) else []),
        "http-front", "--ingress", ingress, "--status", status, "--http-fd", str(sock.fileno()),
        "--http-host", args.http_host, "--exit-with-parent",
        "--max-body-bytes", str(args.max_body_bytes), "--request-timeout", str(args.request_timeout),
        "--body-timeout", str(args.body_timeout), "--max-unread-replies", str(args.max_unread_replies),
        "--served-model-name", args.served_model_name,
    ]  # fmt: skip
    if bootstrap_port is not None:
        cmd += ["--bootstrap-port", str(bootstrap_port)]
    if args.tokenizer is not None:
        cmd += ["--tokenizer", args.tokenizer]
    if args.log_requests:
        cmd.append("--log-requests")
    if args.allow_remote_admin:
        cmd.append("--allow-remote-admin")
    env = dict(os.environ)
    if args.api_key:
        env[API_KEY_ENV] = args.api_key
    return subprocess.Popen(cmd, env=env, pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes] | None, timeout_s: float = 5.0) -> None:
    """Stop the front :func:`spawn` started: SIGTERM, then SIGKILL, by its pid."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout_s)
