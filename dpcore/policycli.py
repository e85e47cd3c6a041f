"""``dpcore policy show`` and ``dpcore policy swap``: the running controller's policy chain.

Both find the controller the way ``dpcore serve`` was started: ``--run-dir DIR`` (ipc; the
admin token is ``DIR/admin.token``), ``--endpoints-file PATH`` (what ``serve
--endpoints-file`` wrote), or ``--status EP`` with ``--admin-token-file PATH``. ``show`` needs
no token; ``swap`` does (see :mod:`dpcore.runtime.admin`).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from dpcore.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="policy_command", metavar="{show,swap}", required=True)
    show = sub.add_parser("show", help="the running chain and its swaps", description="the running chain and its swaps")
    swap = sub.add_parser("swap", help="replace the running chain without a restart",
                          description="replace the running chain without a restart; the old chain keeps serving "
                                      "if the new one is refused")  # fmt: skip
    swap.add_argument("method", metavar="NAME[,NAME...]", help="policy, preset or chain, as --load-balance-method")
    from dpcore.cli import add_policy_option_argument

    add_policy_option_argument(swap, help="constructor option for a policy in the new chain; repeatable")
    for sp in (show, swap):
        where = sp.add_argument_group("which controller")
        where.add_argument("--run-dir", default=None, metavar="DIR", help="the --run-dir of dpcore serve (ipc)")
        where.add_argument("--endpoints-file", default=None, metavar="PATH", help="the --endpoints-file of dpcore serve")
        where.add_argument("--status", default=None, metavar="EP", help="the controller's status endpoint")
        where.add_argument("--admin-token-file", default=None, metavar="PATH",
                           help="the admin token (default: RUN_DIR/admin.token, or the endpoints file's)")  # fmt: skip
        sp.add_argument("--timeout", type=float, default=30.0, metavar="S", help="wait up to S seconds (default 30)")
        sp.add_argument("--json", action="store_true", help="print JSON")


def where(args: argparse.Namespace) -> tuple[str, str | None]:
    """(status endpoint, admin token file or None)."""
    from dpcore.runtime import admin
    from dpcore.sdk import endpoints

    given = [x for x in (args.run_dir, args.endpoints_file, args.status) if x]
    if len(given) != 1:
        raise ConfigError("name the controller with one of --run-dir DIR, --endpoints-file PATH or --status EP")
    token_file = getattr(args, "admin_token_file", None)
    if args.run_dir:
        return endpoints.ipc(args.run_dir, "status"), token_file or os.path.join(args.run_dir, admin.TOKEN_NAME)
    if args.endpoints_file:
        try:
            with open(args.endpoints_file) as f:
                info = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the endpoints file {args.endpoints_file}: {exc}") from None
        if type(info) is not dict or type(info.get("status")) is not str:
            raise ConfigError(f"{args.endpoints_file} names no status endpoint; is it dpcore serve's --endpoints-file?")
        return info["status"], token_file or info.get("admin_token_file")
    return endpoints.check(args.status, "--status"), token_file


def status_of(endpoint: str, timeout_s: float) -> dict[str, Any]:
    import asyncio

    import zmq.asyncio

    from dpcore.runtime.status import AsyncStatusClient

    async def get() -> dict[str, Any]:
        ctx = zmq.asyncio.Context()
        client = AsyncStatusClient(endpoint, ctx=ctx)
        try:
            return await client.get(timeout_s)
        finally:
            client.close()
            ctx.term()

    return asyncio.run(get())


def _print_show(st: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    swaps = st.get("policy_swaps") or {}
    console.print(f"[bold]running chain:[/bold] {st['load_balance_method']} (requested {st['requested']!r}: {st['reason']})")
    refused = swaps.get("refused_by_reason") or {}
    console.print(f"swaps: {swaps.get('swaps', 0)} done, {swaps.get('refused', 0)} refused"
                  + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) + ")" if refused else ""))  # fmt: skip
    last = swaps.get("last")
    if last:
        before = ",".join(last["previous"])
        if last["result"] == "ok":
            console.print(f"last swap at {last['at']}: {before} -> {','.join(last['chain'])}")
        else:
            console.print(f"last swap at {last['at']}: {last['requested']!r} refused ({last['reason']}): {last['error']}")


def run(args: argparse.Namespace) -> int:
    from dpcore.runtime import admin

    endpoint, token_file = where(args)
    if args.policy_command == "show":
        st = status_of(endpoint, args.timeout)
        if args.json:
            print(json.dumps({k: st.get(k) for k in ("load_balance_method", "requested", "reason", "policy_swaps")}, indent=2))
        else:
            _print_show(st)
        return 0
    if token_file is None:
        raise ConfigError("swap needs the admin token: give --admin-token-file PATH (dpcore serve --admin-token-file)")
    from dpcore.cli import parse_policy_options

    options = parse_policy_options(args.policy_option)
    token = admin.read_token(token_file)
    try:
        result = admin.call(endpoint, token, "swap", {"method": args.method, "options": options}, timeout_s=args.timeout)
    except admin.AdminError as exc:
        raise admin.AdminError(exc.code, f"policy swap refused ({exc.code}): {exc}; the running chain is unchanged") from None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console

    Console().print(
        f"[bold]swapped:[/bold] {','.join(result['previous'])} -> {','.join(result['chain'])} "
        f"(built in {result['build_ms']} ms, installed between two decisions in {result['install_us']} µs; "
        f"swap {result['status']['swaps']} of this controller)"
    )
    return 0
