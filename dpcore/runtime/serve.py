"""``dpcore serve``: the controller as a process.

Binds the controller's sockets (ipc under a run directory by default, or TCP), optionally
writes them to ``--endpoints-file`` so ranks, senders and the HTTP front can find them,
serves ``/metrics`` on ``--metrics-host`` (127.0.0.1) when ``--metrics-port`` is given, and
runs the loop until SIGTERM or SIGINT.

A run directory is created 0700 and locked: a second ``serve`` on it is refused (binding an
existing ipc path would silently take the first one's sockets). Its socket files are removed
at exit. A listener that cannot be bound (ZMQ sockets, ``--metrics-port``, ``--http-port``,
``--bootstrap-port``) is one line on stderr and exit status 2. The status server, the
metrics server and the HTTP front's process are supervised: one that fails is logged,
counted (``dpcore_thread_restarts``) and started again. On the signal it stops taking requests (new ones are rejected with
``shutting_down``), lets in-flight ones finish for up to ``--drain-timeout`` seconds, fails
the rest, prints the final counters and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpcore import security
from dpcore.errors import ConfigError, DpcoreError
from dpcore.runtime import defaults


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The runtime flags of ``dpcore serve`` (the policy flags are added by the CLI)."""
    g = p.add_argument_group("sockets")
    g.add_argument("--transport", choices=["ipc", "tcp"], default="ipc",
                   help="ipc sockets in --run-dir (default), or tcp on --host")  # fmt: skip
    g.add_argument("--run-dir", default=None, metavar="DIR",
                   help="ipc: directory for the sockets (default: a fresh one under /tmp, removed at exit)")  # fmt: skip
    g.add_argument("--host", default="127.0.0.1",
                   help="tcp: address to bind (default 127.0.0.1; use this host's address for multi-node)")  # fmt: skip
    g.add_argument("--port-base", type=int, default=0, metavar="PORT",
                   help="tcp: ingress on PORT, reports on PORT+1, rank r on PORT+2+r (default 0: random ports)")  # fmt: skip
    g.add_argument("--endpoints-file", default=None, metavar="PATH",
                   help="write the bound endpoints as JSON here once listening")  # fmt: skip
    r = p.add_argument_group("runtime")
    r.add_argument("--heartbeat-timeout", type=float, default=defaults.HEARTBEAT_TIMEOUT_S, metavar="S",
                   help="a rank silent for S seconds becomes inactive (default %(default)g)")  # fmt: skip
    r.add_argument("--sndhwm", type=int, default=defaults.SNDHWM, metavar="N",
                   help="messages queued per rank socket before the backlog is used (default %(default)d)")  # fmt: skip
    r.add_argument("--backlog", type=int, default=defaults.BACKLOG, metavar="N",
                   help="dispatches held per full rank before requests are rejected rank_busy (default %(default)d)")  # fmt: skip
    r.add_argument("--drain-timeout", type=float, default=defaults.DRAIN_TIMEOUT_S, metavar="S",
                   help="on SIGTERM, wait up to S seconds for in-flight requests (default %(default)g)")  # fmt: skip
    r.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on PORT (0: any free port; default off)")  # fmt: skip
    r.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address /metrics binds (default 127.0.0.1; 0.0.0.0 for a scraper on another host)")  # fmt: skip
    r.add_argument("--max-context-tokens", type=int, default=wire_defaults().max_tokens, metavar="N",
                   help="largest prompt or max_new_tokens a request may carry (default 2**24); larger: rejected")  # fmt: skip
    r.add_argument("--min-block-size", type=int, default=wire_defaults().min_block_size, metavar="N",
                   help="smallest block size senders hash with: at most ceil(tokens/N) block hashes per request "
                        "(default 16)")  # fmt: skip
    r.add_argument("--max-block-hashes", type=int, default=wire_defaults().max_block_hashes, metavar="N",
                   help="at most N block hashes per request (default 16384)")  # fmt: skip
    r.add_argument("--admission-timeout", type=float, default=defaults.ADMISSION_TIMEOUT_S, metavar="S",
                   help="a request a reporting rank has not admitted after S seconds fails rank_stuck (default %(default)g)")  # fmt: skip
    r.add_argument("--startup-timeout", type=float, default=defaults.STARTUP_TIMEOUT_S, metavar="S",
                   help="how long each rank has for its first report after the controller starts; requests for "
                        "it wait meanwhile (default %(default)g; --heartbeat-timeout if that is longer)")  # fmt: skip
    r.add_argument("--policy-budget-ms", type=float, default=5.0, metavar="MS",
                   help="a policy chain call longer than this is counted and logged as an overrun (default 5)")  # fmt: skip
    r.add_argument("--max-message-bytes", type=int, default=64 << 20, metavar="N",
                   help="largest ingress frame; a peer sending more is disconnected (default 64 MiB)")  # fmt: skip
    from dpcore.runtime import recorder

    recorder.add_arguments(p)
    s = p.add_argument_group("security")
    s.add_argument("--admin-token-file", default=None, metavar="PATH",
                   help="where to write the admin token that `dpcore policy swap` and the HTTP admin route need "
                        "(created 0600 at start-up; default: RUN_DIR/admin.token with ipc; tcp: none, admin "
                        "commands disabled)")  # fmt: skip
    s.add_argument("--curve-dir", default=None, metavar="DIR",
                   help="tcp: CURVE keys from `dpcore keys` (default: $DPCORE_CURVE_DIR; none: no CURVE)")  # fmt: skip
    from dpcore.runtime import shadow

    shadow.add_arguments(p)
    try:
        from dpcore.runtime import pd_setup
    except ImportError:  # pragma: no cover - PD support is part of the package
        return
    pd_setup.add_arguments(p)
    from dpcore.http import server as http_server  # light: the HTTP stack loads in the child

    http_server.add_serve_arguments(p)


def wire_defaults() -> Any:
    from dpcore import wire

    return wire.DEFAULT_LIMITS


def limits_from_args(args: argparse.Namespace) -> Any:
    """The wire limits of ``--max-context-tokens``, ``--min-block-size``, ``--max-block-hashes``."""
    from dpcore import wire

    try:
        return wire.Limits(max_tokens=args.max_context_tokens, min_block_size=args.min_block_size,
                           max_block_hashes=args.max_block_hashes)  # fmt: skip
    except ValueError as exc:
        msg = str(exc).replace("wire limit max_tokens", "--max-context-tokens").replace(
            "wire limit min_block_size", "--min-block-size").replace("wire limit max_block_hashes", "--max-block-hashes")
        raise ConfigError(msg) from None


def _endpoints(args: argparse.Namespace, dp_size: int) -> tuple[Any, Any, str]:
    """(ControllerEndpoints, the claimed RunDir or None for tcp, status endpoint); *args*
    passed :func:`check`."""
    from dpcore.runtime.controller import ControllerEndpoints
    from dpcore.sdk import endpoints as ep

    if args.transport == "tcp":
        eps = ControllerEndpoints.tcp(dp_size, args.host, args.port_base)
        status = f"tcp://{args.host}:{args.port_base + 2 + dp_size}" if args.port_base else f"tcp://{args.host}:*"
        return eps, None, status
    run_dir = ep.RunDir(args.run_dir)
    return ControllerEndpoints.ipc(run_dir.path, dp_size), run_dir, ep.ipc(run_dir.path, "status")


def _front_watch(proc: list[Any], respawn: Callable[[], Any], stop: threading.Event) -> Callable[[], None]:
    """The body of the HTTP front's supervisor: it raises when the front's process exits by
    itself (the supervisor logs and counts that), and starts a new one when run again."""

    def body() -> None:
        if proc[0].poll() is not None:
            proc[0] = respawn()
        while not stop.wait(0.5):
            code = proc[0].poll()
            if code is not None and not stop.is_set():
                msg = f"HTTP front process {proc[0].pid} exited with status {code}"
                raise RuntimeError(msg)

    return body


def _write_json(path: str, data: dict[str, Any]) -> None:
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)  # atomic: readers never see half a file


def print_stats(stats: dict[str, Any], file: Any = None) -> None:
    """The final counters as a rich table (and the accounting identities)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title="dpcore controller: final counters")
    for col in ("rank", "dispatched", "completed", "failed", "redispatched", "rejected", "in flight"):
        t.add_column(col, justify="right")
    for row in stats["per_rank"]:
        t.add_row(*(str(row[k]) for k in ("rank", "dispatched", "completed", "failed", "redispatched", "rejected", "in_flight")))
    t.add_row(
        "all", *(str(stats[k]) for k in ("dispatched", "completed", "failed", "redispatched", "rejected", "in_flight")),
        style="bold",
    )  # fmt: skip
    console = Console(file=file or sys.stdout)
    console.print(t)
    console.print(
        f"received {stats['received']} = dispatched {stats['dispatched']} - redispatched {stats['redispatched']}"
        f" + rejected {stats['rejected']} + parked {stats['parked']}: {stats['balanced']['received']}; "
        f"dispatched = completed + failed + redispatched + in flight: {stats['balanced']['dispatched']}"
    )
    if stats["rejected_by_code"] or stats["failed_by_code"]:
        console.print(f"rejected by code {stats['rejected_by_code']}, failed by code {stats['failed_by_code']}")
    aborts = stats["aborts"]
    if aborts["total"]:
        console.print(f"aborts {aborts['total']}: by reason {aborts['by_reason']}, by outcome {aborts['by_outcome']}")


def _curve_keys(args: argparse.Namespace) -> Any:
    """The CURVE keys of ``--curve-dir`` (exported to child processes), else the environment's."""
    if args.curve_dir:
        keys = security.load_dir(args.curve_dir, security.CONTROLLER)
        os.environ[security.ENV_DIR] = str(Path(args.curve_dir).resolve())  # the HTTP front child inherits it
        return keys
    return security.from_env(role=security.CONTROLLER)


def _shadow(args: argparse.Namespace, manager: Any) -> Any:
    """The shadow chain of ``--shadow-policy`` (attached by the controller), or ``None``."""
    from dpcore.cli import parse_policy_options
    from dpcore.runtime.shadow import Shadow

    if not args.shadow_policy:
        if args.shadow_policy_option:
            raise ConfigError("--shadow-policy-option needs --shadow-policy")
        return None
    try:
        return Shadow(manager, args.shadow_policy, parse_policy_options(args.shadow_policy_option),
                      budget_s=args.shadow_budget_ms / 1000)  # fmt: skip
    except DpcoreError as exc:
        raise ConfigError(f"--shadow-policy {args.shadow_policy!r}: {exc}") from None
    except Exception as exc:  # a constructor that raises: one line, like every configuration error
        raise ConfigError(f"--shadow-policy {args.shadow_policy!r}: building it raised {exc!r}") from None


def _admin(args: argparse.Namespace, controller: Any, run_dir: Any) -> tuple[Any, Any, str | None]:
    """The policy swapper, the admin command handler and the admin token file (or ``None``:
    admin commands disabled)."""
    from dpcore.runtime import admin
    from dpcore.runtime.swap import Swapper

    path = args.admin_token_file
    if path is None and run_dir is not None:
        path = os.path.join(run_dir.path, admin.TOKEN_NAME)
    token = admin.create_token(path) if path is not None else None
    swapper = Swapper(controller)
    return swapper, admin.Admin(swapper, token), path


def check(args: argparse.Namespace, manager: Any) -> None:
    """Every check of ``serve``'s options that binds nothing; ``serve --dry-run`` runs exactly these."""
    from dpcore.runtime import pd_setup

    if args.max_message_bytes < 1024:
        raise ConfigError(f"--max-message-bytes must be at least 1024, got {args.max_message_bytes}")
    limits_from_args(args)
    if not 0 < args.policy_budget_ms < float("inf"):
        raise ConfigError(f"--policy-budget-ms must be a positive number, got {args.policy_budget_ms}")
    if not 0 < args.startup_timeout < float("inf"):
        raise ConfigError(f"--startup-timeout must be a positive number of seconds, got {args.startup_timeout}")
    if not 0 < args.admission_timeout < float("inf"):
        raise ConfigError(f"--admission-timeout must be a positive number of seconds, got {args.admission_timeout}")
    dp_size = manager.ctx.dp_size
    if args.transport == "tcp" and not 0 <= args.port_base < 65536 - dp_size - 3:
        raise ConfigError(f"--port-base {args.port_base} leaves no room for {dp_size + 3} ports")
    if args.curve_dir:
        security.load_dir(args.curve_dir, security.CONTROLLER)
    if getattr(args, "record", None):
        from dpcore.runtime import recorder

        recorder.config_from_args(args)
    _shadow(args, manager)  # builds it (a bad shadow fails here); the controller attaches the one run() builds
    if getattr(args, "http_port", None) is not None:
        from dpcore.http import server as http_server

        http_server.check(args)
    pd_setup.check(args, manager.ctx.disaggregation_mode)


def run(args: argparse.Namespace, manager: Any) -> int:
    import structlog
    import zmq

    from dpcore.runtime import metrics, pd_setup, recorder, status, supervise
    from dpcore.runtime.controller import Controller

    log = structlog.get_logger("dpcore.serve")
    check(args, manager)
    keys = _curve_keys(args)
    if args.transport == "tcp" and keys is None:
        security.warn_exposed("dpcore serve (the controller's ZMQ sockets)", args.host, security.ZMQ_RISK,
                              security.ZMQ_FIX, log)  # fmt: skip
    if getattr(args, "http_port", None) is not None:
        from dpcore.http import server as http_server

        http_server.warn_exposed(args.http_host, args.api_key or os.environ.get(http_server.API_KEY_ENV) or None)
    if getattr(args, "bootstrap_port", None) is not None:
        security.warn_exposed("the PD bootstrap registry (HTTP, no authentication available)", args.bootstrap_host,
                              "Anyone who can reach it can register or read room -> rank entries.",
                              "bind it to 127.0.0.1 or a private network (--bootstrap-host)", log)  # fmt: skip
    eps, run_dir, status_ep = _endpoints(args, manager.ctx.dp_size)
    ctx = zmq.Context()
    handler = None
    controller = None
    status_server = None
    metrics_server = None
    front: list[Any] = []
    token_file = None
    http_sock = None
    stopping = threading.Event()
    threads: list[supervise.Supervised] = []
    rec = recorder.from_args(args)
    try:
        if args.http_port is not None:
            from dpcore.http import server as http_server

            http_server.check(args)
            http_sock = http_server.bind(args.http_host, args.http_port)
        if args.metrics_port is not None:
            metrics_server, metrics_port = metrics.bind(args.metrics_port, args.metrics_host)
        handler = pd_setup.from_args(args, manager, zmq_ctx=ctx, log=log)
        shadow = _shadow(args, manager)
        prefill_dp = None
        if manager.ctx.disaggregation_mode == "decode":
            prefill_dp = handler.prefill_dp_size if handler is not None else args.prefill_dp_size
        controller = Controller(
            manager, endpoints=eps, zmq_ctx=ctx, heartbeat_timeout_s=args.heartbeat_timeout,
            sndhwm=args.sndhwm, backlog=args.backlog, pd=handler, prefill_dp_size=prefill_dp,
            drain_timeout_s=args.drain_timeout, curve=keys or False, max_message_bytes=args.max_message_bytes,
            limits=limits_from_args(args), policy_budget_s=args.policy_budget_ms / 1000,
            admission_timeout_s=args.admission_timeout, startup_timeout_s=args.startup_timeout, shadow=shadow,
        )  # fmt: skip
        c = controller
        if rec is not None:
            threads.append(rec.start())
            rec.install(controller)
            log.info("recording", **rec.describe())
        if run_dir is not None:
            run_dir.own(controller.endpoints.to_dict()["dispatch"] + [controller.endpoints.ingress,
                        controller.endpoints.report, status_ep])  # fmt: skip

        def thread_report() -> dict[str, Any]:
            return supervise.report(threads)

        swapper, admin_cmds, token_file = _admin(args, controller, run_dir)

        def policy_swaps() -> dict[str, Any]:
            return {k: v for k, v in swapper.info().items() if k != "history"}

        status_server = status.StatusServer(
            status_ep,
            lambda: status.snapshot(manager, counters=c.stats(), threads=thread_report(), policy_swaps=policy_swaps(),
                                    shadow=shadow.summary() if shadow is not None else None),
            call_soon=c.call_soon, ctx=ctx, curve=keys or False, admin=admin_cmds.answer,
        )  # fmt: skip
        threads.append(status_server.thread)
        status_server.start()
        info: dict[str, Any] = {**controller.endpoints.to_dict(), "status": status_server.endpoint, "pid": os.getpid()}
        if token_file is not None:
            info["admin_token_file"] = token_file
        if metrics_server is not None:
            from dpcore.runtime.swap import SwapCollector

            collectors: list[Any] = [SwapCollector(swapper)] + ([rec.collector()] if rec is not None else [])
            if shadow is not None:
                from dpcore.runtime.shadow import ShadowCollector

                collectors.append(ShadowCollector(shadow, controller.on_loop))
            metrics.attach(metrics_server, controller, thread_report, collectors)
            threads.append(supervise.Supervised("dpcore-metrics", metrics_server.serve_forever, stopping).start())
            host = f"[{args.metrics_host}]" if ":" in args.metrics_host else args.metrics_host
            info["metrics"] = f"http://{host}:{metrics_port}/metrics"
        if handler is not None and getattr(handler, "server", None) is not None:
            info["bootstrap"] = handler.server.url
        if http_sock is not None:
            server = getattr(handler, "server", None)

            def spawn_front() -> Any:
                return http_server.spawn(
                    args, http_sock, ingress=c.endpoints.ingress, status=status_server.endpoint,
                    bootstrap_port=server.port if server is not None else None,
                )  # fmt: skip

            front.append(spawn_front())
            threads.append(supervise.Supervised("dpcore-http-front", _front_watch(front, spawn_front, stopping),
                                                stopping).start())  # fmt: skip
            info["http"] = f"http://{args.http_host}:{http_sock.getsockname()[1]}"
        if args.endpoints_file:
            _write_json(args.endpoints_file, info)
        log.info("serving", **info)

        def _on_signal(signum: int, _frame: object) -> None:
            log.info("stopping", signal=signal.Signals(signum).name, drain_timeout_s=args.drain_timeout)
            c.request_stop()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        stats = controller.run()
    finally:
        stopping.set()
        if front:
            http_server.stop(front[0])
        if http_sock is not None:
            http_sock.close()
        if controller is not None:
            controller.close()
        if rec is not None:
            rec.close()
        if status_server is not None:
            status_server.close()
        if handler is not None:
            handler.close()
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        ctx.term()
        if run_dir is not None:
            run_dir.release()
        if args.endpoints_file:
            Path(args.endpoints_file).unlink(missing_ok=True)
        if token_file is not None:
            Path(token_file).unlink(missing_ok=True)
    print_stats(stats)
    if rec is not None:
        print(rec.summary())
    return 0
