"""The PD flags of ``dpcore serve``, their checks, and the :class:`~dpcore.runtime.pd.PDHandler`
they ask for (hosting the bootstrap registry's HTTP server when prefill is told to).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from dpcore.errors import ConfigError
from dpcore.runtime.bootstrap import FOLLOWS_KEY, BootstrapRegistry, RegistryClient, RegistryError, prefill_info
from dpcore.runtime.bootstrap_server import RegistryServer
from dpcore.runtime.pd import DEFAULT_RESOLVE_TIMEOUT_S, PDHandler, follows_bootstrap_room

if TYPE_CHECKING:
    from dpcore.manager import PolicyManager

#: How long decode waits at start-up for the registry's /info (prefill may start later).
INFO_WAIT_S = 30.0
NEED_PREFILL_DP_SIZE = "PD decode needs the prefill dp size: give --prefill-dp-size or --bootstrap-url"
NEED_PREFILL_METHOD = (
    "PD decode needs to know how prefill places requests: give --prefill-load-balance-method "
    "or a --bootstrap-url whose registry was started by the prefill controller"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The PD flags of ``dpcore serve``."""
    g = p.add_argument_group("PD disaggregation (mode b: bootstrap registry)")
    g.add_argument("--bootstrap-port", type=int, default=None, metavar="PORT",
                   help="prefill: host the bootstrap registry here, on 127.0.0.1:PORT (0: any free port)")  # fmt: skip
    g.add_argument("--bootstrap-host", default="127.0.0.1", help="prefill: address the registry binds")
    g.add_argument("--bootstrap-url", default=None, metavar="URL",
                   help="the bootstrap registry (prefill: register there; decode: ask there)")  # fmt: skip
    g.add_argument("--prefill-dp-size", type=int, default=None, metavar="N",
                   help="decode: the prefill side's dp size (default: ask the registry's /info)")  # fmt: skip
    g.add_argument("--prefill-load-balance-method", default=None, metavar="NAME",
                   help="decode: the prefill side's policy (default: ask the registry's /info)")  # fmt: skip
    g.add_argument("--pd-resolve-timeout", type=float, default=DEFAULT_RESOLVE_TIMEOUT_S, metavar="S",
                   help="decode: give up on a request whose prefill rank is still unknown after S seconds")  # fmt: skip


def _fetch_info(url: str, wait_s: float, log: Any) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s
    with RegistryClient(url, timeout_s=2.0) as client:
        while True:
            try:
                return client.info()
            except RegistryError as exc:
                if time.monotonic() > deadline:
                    msg = (
                        f"PD decode: cannot learn the prefill dp size and policy from {url}/info ({exc}); "
                        "start prefill first or give --prefill-dp-size and --prefill-load-balance-method"
                    )
                    raise ConfigError(msg) from exc
                log.info("pd_waiting_for_registry", url=url, error=str(exc))
                time.sleep(0.5)


def check(args: argparse.Namespace, mode: str) -> None:
    """The PD options' checks that need no network (``serve`` and ``serve --dry-run`` both run them)."""
    if mode == "prefill" and args.bootstrap_port is not None and args.bootstrap_url is not None:
        raise ConfigError("give either --bootstrap-port (host the registry) or --bootstrap-url, not both")
    if mode == "decode" and not args.bootstrap_url:
        if args.prefill_dp_size is None:
            raise ConfigError(NEED_PREFILL_DP_SIZE)
        if args.prefill_load_balance_method is None:
            raise ConfigError(NEED_PREFILL_METHOD)


def from_args(
    args: argparse.Namespace, manager: PolicyManager, zmq_ctx: zmq.Context | None = None, log: Any = None  # type: ignore[type-arg]
) -> PDHandler | None:
    """Build the PD handler ``dpcore serve`` asked for, or ``None`` when not in PD mode.

    Prefill with ``--bootstrap-port`` also starts the registry's HTTP server here; the
    handler stops it in :meth:`PDHandler.close`.
    """
    mode = manager.ctx.disaggregation_mode
    if mode == "null":
        return None
    check(args, mode)
    log = log if log is not None else structlog.get_logger("dpcore")
    timeout = args.pd_resolve_timeout
    if mode == "prefill":
        dp = manager.ctx.dp_size
        follows = manager.places_by_bootstrap_room
        registry = None
        server = None
        if args.bootstrap_port is not None:
            registry = BootstrapRegistry(dp_size=dp, info=prefill_info(manager.chain[0], dp, follows))
            server = RegistryServer(registry, host=args.bootstrap_host, port=args.bootstrap_port)
        handler = PDHandler(
            "prefill", dp_size=dp, prefill_dp_size=dp, prefill_follows_room=follows, registry=registry,
            registry_url=args.bootstrap_url, resolve_timeout_s=timeout, zmq_ctx=zmq_ctx, log=log,
        )  # fmt: skip
        if server is not None:
            try:
                server.start()
            except RegistryError as exc:
                handler.close()
                raise ConfigError(str(exc)) from exc
            handler.server = server
            log.info("bootstrap_registry_started", url=server.url, prefill_follows_bootstrap_room=follows)
        return handler
    prefill_dp = args.prefill_dp_size
    method = args.prefill_load_balance_method
    follows = None  # the registry's word, when prefill's policy is learned from it
    if (prefill_dp is None or method is None) and args.bootstrap_url:
        info = _fetch_info(args.bootstrap_url, INFO_WAIT_S, log)
        prefill_dp = prefill_dp if prefill_dp is not None else info.get("dp_size")
        if method is None:
            method, follows = info.get("load_balance_method"), info.get(FOLLOWS_KEY)
    if prefill_dp is None:
        raise ConfigError(NEED_PREFILL_DP_SIZE)
    if method is None:
        raise ConfigError(NEED_PREFILL_METHOD)
    if not isinstance(follows, bool):
        follows = follows_bootstrap_room(method)
    handler = PDHandler(
        "decode", dp_size=manager.ctx.dp_size, prefill_dp_size=prefill_dp,
        prefill_follows_room=follows, registry_url=args.bootstrap_url,
        resolve_timeout_s=timeout, zmq_ctx=zmq_ctx, log=log,
    )  # fmt: skip
    log.info("pd_decode", **{k: v for k, v in handler.describe().items() if k != "stats"})
    return handler
