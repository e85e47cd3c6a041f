"""The ``dpcore`` command line.

Each subcommand lives in the module named in :data:`COMMANDS`, which provides
``add_arguments(parser)`` and ``run(args) -> int``; heavy imports stay inside ``run`` so that
``dpcore --help`` is fast. Every :class:`~dpcore.errors.DpcoreError` becomes one line on
stderr and exit status 2, never a traceback; so does a command whose optional dependencies are
not installed (the line names the ``pip install 'dpcore[extra]'`` that adds them).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

from dpcore.auto import AUTO, check_removed_flags
from dpcore.errors import DpcoreError, PolicyOptionError
from dpcore.extras import missing_extra
from dpcore.localpolicy import is_spec

#: (name, module, one-line help). The module provides add_arguments(parser) and run(args).
COMMANDS: list[tuple[str, str, str]] = [
    ("policies", "dpcore.cli", "list installed policies"),
    ("serve", "dpcore.cli", "run the controller (or validate with --dry-run)"),
    ("policy", "dpcore.policycli", "show or swap the running controller's policy chain (no restart)"),
    ("shadow-report", "dpcore.shadowreport", "what the --shadow-policy chain of a running controller would have done"),
    ("demo", "dpcore.demo", "run a controller and mock ranks, replay a real trace, show per-rank results"),
    ("mock-worker", "dpcore.mock.worker", "run one mock engine rank (used by the demo and tests)"),
    ("mock-barrier", "dpcore.mock.barrier", "run the step barrier that keeps mock ranks in lockstep"),
    ("bootstrap-registry", "dpcore.runtime.bootstrap_server", "run a standalone PD bootstrap registry (HTTP)"),
    ("simulate", "dpcore.sim.cli", "replay a trace through policies and peer baselines"),
    ("trace", "dpcore.sim.convert", "convert an SGLang request log or OpenAI-style requests into a trace"),
    ("bench", "dpcore.bench", "measure forwarding throughput against a pickle loop and zmq.proxy"),
    ("http-front", "dpcore.http.server", "run an SGLang/OpenAI HTTP front for a running controller"),
    ("new-policy", "dpcore.scaffold", "create a policy plugin distribution (entry point, README, tests)"),
    ("keys", "dpcore.security", "generate a CURVE key set for TCP between controller, ranks and senders"),
    ("soak", "dpcore.soak", "fault soak: controller + mock ranks under kills, stalls, floods and bad requests"),
]

EXIT_CONFIG = 2


# --------------------------------------------------------------------------- helpers


def add_policy_option_argument(
    p: argparse.ArgumentParser, help: str = "constructor option for a policy in the chain; repeatable"
) -> None:
    """``--policy-option POLICY.OPTION=VALUE`` (repeatable), read by :func:`parse_policy_options`."""
    p.add_argument("--policy-option", action="append", default=[], metavar="POLICY.OPTION=VALUE", help=help)


def parse_policy_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["cache_aware.balance_abs=32"]`` → ``{"cache_aware": {"balance_abs": 32}}``.

    Values are read as JSON when they parse (numbers, booleans), else kept as strings.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        # Option names have no dots; a policy named by its file (x.py:Cls) does.
        policy, dot, option = key.rpartition(".") if is_spec(key.rpartition(".")[0]) else key.partition(".")
        if not sep or not dot or not policy or not option:
            msg = f"--policy-option {item!r}: expected POLICY.OPTION=VALUE, e.g. cache_aware.balance_abs=32"
            raise PolicyOptionError(msg)
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        policy = policy.strip()
        out.setdefault(policy if is_spec(policy) else policy.lower(), {})[option.strip()] = value
    return out


def add_policy_arguments(p: argparse.ArgumentParser) -> None:
    """The options every command that builds a policy chain shares."""
    p.add_argument("--dp-size", type=int, default=4, help="number of data-parallel ranks (default 4)")
    p.add_argument(
        "--load-balance-method",
        default=AUTO,
        metavar="NAME[,NAME...]",
        help="policy name, 'auto', or a chain tried left to right (default auto)",
    )
    p.add_argument(
        "--disaggregation-mode",
        default="null",
        metavar="{null,prefill,decode}",
        help="PD disaggregation side (default null: no PD)",
    )
    add_policy_option_argument(p)


def build_manager(args: argparse.Namespace, **kwargs: Any) -> Any:
    """Validate the policy arguments and load the chain (nothing is bound yet)."""
    from dpcore.manager import PolicyManager

    if args.dp_size < 1:
        msg = f"--dp-size must be at least 1, got {args.dp_size}"
        raise PolicyOptionError(msg)
    return PolicyManager.from_method(
        args.load_balance_method,
        dp_size=args.dp_size,
        disaggregation_mode=args.disaggregation_mode,
        options=parse_policy_options(args.policy_option),
        **kwargs,
    )


# --------------------------------------------------------------------------- policies


def _policies_add(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show this policy's options, types and defaults")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def policy_options(cls: type) -> list[dict[str, str]]:
    """A policy's constructor options for display (:func:`dpcore.policy.options`)."""
    from dpcore.policy import options

    return [
        {
            "name": o.name,
            "type": o.type or "any",
            "default": "(required)" if o.required else repr(o.default),
            "help": o.help,
        }
        for o in options(cls)
    ]


def _policy_detail(name: str, as_json: bool) -> int:
    import inspect

    from dpcore.discovery import available, load_policy_class
    from dpcore.policy import capabilities

    key = name if is_spec(name) else name.lower().replace("-", "_")
    cls = load_policy_class(key)
    info = available().get(key)
    doc = inspect.getdoc(cls) or ""
    detail = {
        "name": key,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "dist": info.dist if info else None,
        "version": info.version if info else None,
        "summary": doc.split("\n\n")[0].replace("\n", " "),
        "options": policy_options(cls),
        "capabilities": sorted(capabilities(cls)),
    }
    if as_json:
        print(json.dumps(detail, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    origin = f"{detail['dist']} {detail['version']}" if detail["dist"] else "a local file or module"
    console.print(f"[bold]{key}[/bold]: {detail['class']} from {origin}")
    if detail["summary"]:
        console.print(detail["summary"])
    table = Table(title=f"options (--policy-option {key}.NAME=VALUE)")
    for col in ("option", "type", "default", "meaning"):
        table.add_column(col)
    for o in detail["options"]:
        table.add_row(o["name"], o["type"], o["default"], o["help"])
    console.print(table if detail["options"] else "no options")
    if detail["capabilities"]:
        console.print(f"needs: {', '.join(detail['capabilities'])}")
    return 0


def _policies_run(args: argparse.Namespace) -> int:
    from dpcore.discovery import available

    if args.name:
        return _policy_detail(args.name, args.json)
    infos = available()
    if args.json:
        rows = [
            {"name": i.name, "dist": i.dist, "version": i.version, "entry_point": i.value, "summary": i.summary}
            for i in infos.values()
        ]
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="installed dpcore policies (entry-point group dpcore.policies)")
    for col in ("name", "distribution", "version", "summary"):
        table.add_column(col)
    for i in infos.values():
        table.add_row(i.name, i.dist or "?", i.version or "?", i.summary)
    Console().print(table)
    if not infos:
        print("no policies installed: pip install 'dpcore[policies]' (or any dpcore policy)", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- serve


def _serve_add(p: argparse.ArgumentParser) -> None:
    add_policy_arguments(p)
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved chain, exit")
    p.add_argument("--json", action="store_true", help="with --dry-run: print JSON")
    try:
        runtime = importlib.import_module("dpcore.runtime.serve")
    except ModuleNotFoundError as exc:
        if exc.name != "dpcore.runtime.serve" and exc.name != "dpcore.runtime":
            raise
    else:
        runtime.add_arguments(p)


#: serve's settings echoed by --dry-run (argparse dest names), when the command has them.
_ECHOED = (
    "transport", "run_dir", "host", "port_base", "endpoints_file", "heartbeat_timeout", "sndhwm", "backlog",
    "drain_timeout", "max_message_bytes", "max_context_tokens", "min_block_size", "max_block_hashes",
    "policy_budget_ms", "admission_timeout", "metrics_host", "metrics_port", "curve_dir", "http_host", "http_port",
    "bootstrap_port", "bootstrap_host", "bootstrap_url", "prefill_dp_size", "prefill_load_balance_method",
    "pd_resolve_timeout", "admin_token_file", "record", "record_block_size", "record_sample", "record_max_bytes",
    "record_rotate_s", "record_keep", "record_hold_s", "record_nice", "shadow_policy", "shadow_budget_ms",
)


def _serve_run(args: argparse.Namespace) -> int:
    manager = build_manager(args)
    try:
        runtime = importlib.import_module("dpcore.runtime.serve")
    except ModuleNotFoundError as exc:
        if exc.name not in ("dpcore.runtime.serve", "dpcore.runtime"):
            raise
        runtime = None
    if not args.dry_run:
        return int(runtime.run(args, manager))  # type: ignore[union-attr]
    if runtime is not None:
        runtime.check(args, manager)  # exactly what serve checks before binding anything
    desc = dict(manager.describe())
    desc["options"] = parse_policy_options(args.policy_option)
    desc["serve"] = {k: getattr(args, k) for k in _ECHOED if hasattr(args, k)}
    if args.json:
        print(json.dumps(desc, indent=2, default=str))
        return 0
    print(f"load balance method: {desc['requested']}")
    print(f"resolved chain:      {' -> '.join(desc['chain'])}")
    print(f"reason:              {desc['reason']}")
    print(f"dp size:             {desc['dp_size']}")
    print(f"disaggregation mode: {desc['disaggregation_mode']}")
    for p in desc["policies"]:
        origin = f"{p['dist']} {p['version']}" if p.get("dist") else "a local file or module"
        opts = desc["options"].get(p["name"], {})
        shown = ", ".join(f"{k}={v!r}" for k, v in opts.items()) or "defaults"
        print(f"  {p['name']}: {p['class']} from {origin}; options: {shown}")
    for key, value in desc["serve"].items():
        if value is not None:
            print(f"{'--' + key.replace('_', '-') + ':':<30} {value}")
    print("configuration is valid; nothing was started")
    return 0


_LOCAL = {"policies": (_policies_add, _policies_run), "serve": (_serve_add, _serve_run)}


# --------------------------------------------------------------------------- main


def _version() -> str:
    from dpcore import __version__

    return f"dpcore {__version__} (Python {sys.version.split()[0]})"


def _not_installed(name: str, exc: ModuleNotFoundError) -> tuple[Any, Any]:
    """A subcommand whose module comes from an extra that is not installed: it says so when run."""
    error = missing_extra(exc, f"dpcore {name}")

    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        raise error  # type: ignore[misc]

    return add, run


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpcore", description="Data-parallel request controller for LLM serving."
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-json", action="store_true", help="JSON log lines (default on a non-tty)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module, help_ in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_)
        if name in _LOCAL:
            add, run = _LOCAL[name]
        else:
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError as exc:
                if missing_extra(exc, name) is None:
                    raise
                add, run = _not_installed(name, exc)
            else:
                add, run = mod.add_arguments, mod.run
        add(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from dpcore import log

    if not argv:  # a bare `dpcore` shows what it can do
        make_parser().print_help()
        return 0
    try:
        check_removed_flags(argv)
        args = make_parser().parse_args(argv)
        log.configure(args.log_level, json=True if args.log_json else None)
        return int(args._run(args) or 0)
    except DpcoreError as exc:
        print(f"dpcore: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModuleNotFoundError as exc:
        command = next((a for a in argv if a in {c[0] for c in COMMANDS}), "")
        error = missing_extra(exc, f"dpcore {command}".strip())
        if error is None:
            raise
        print(f"dpcore: error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
