"""``python -m dpcore_sglang.launch_server <SGLang server args> --load-balance-method <dpcore policy or chain>``.

Starts SGLang exactly as ``python -m sglang.launch_server`` does, with dpcore's policy chain
in its data-parallel controller. Before anything starts, it checks the SGLang version,
resolves ``--load-balance-method`` the dpcore way (``auto``, chains, renamed and removed
names) and loads the policies, so a bad name fails here with one clear line (exit 2).
SGLang's own parser then gets every other argument, plus the ``--load-balance-method`` it
should believe in (see :func:`sglang_method`).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from dpcore.auto import check_removed_flags
from dpcore.cli import add_policy_option_argument, parse_policy_options
from dpcore.errors import DpcoreError
from dpcore_sglang import output_lengths, server_info, tokenizer_hashes
from dpcore_sglang.config import BLOCK_HASH_MODES, ENV_VAR, AdapterConfig
from dpcore_sglang.versions import check_sglang_version

PROG = "python -m dpcore_sglang.launch_server"

#: SGLang 0.5.23's own ``--load-balance-method`` choices (besides ``auto``).
SGLANG_METHODS = ("round_robin", "follow_bootstrap_room", "total_requests", "total_tokens")
#: What SGLang is told when the chain is not one of its methods: a load-aware one, so that
#: its controller reads load snapshots on dispatch and a PD prefill side registers each
#: request's rank with the bootstrap server (decode cannot compute it from the room).
LOAD_AWARE = "total_requests"


def sglang_method(chain: Sequence[str]) -> str:
    """The ``--load-balance-method`` SGLang's own code sees for a dpcore *chain*."""
    if len(chain) == 1 and chain[0] in SGLANG_METHODS:
        return chain[0]
    return LOAD_AWARE


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        add_help=False,
        allow_abbrev=False,
        description="SGLang's launch_server with a dpcore policy chain in its data-parallel controller. "
        "Every argument not listed here goes to SGLang.",
    )
    p.add_argument(
        "--load-balance-method",
        default="auto",
        metavar="NAME[,NAME...]",
        help="dpcore policy, 'auto', or a chain tried left to right (default auto)",
    )
    add_policy_option_argument(p)
    p.add_argument(
        "--dpcore-block-size",
        type=int,
        default=None,
        metavar="N",
        help="tokens per hashed prompt block, a multiple of SGLang's page size (default: smallest multiple >= 64)",
    )
    p.add_argument(
        "--dpcore-block-hashes",
        choices=BLOCK_HASH_MODES,
        default="auto",
        help="hash prompts for the policies (auto: unless every policy in the chain ignores prompt contents)",
    )
    p.add_argument(
        "--dpcore-metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve dpcore's Prometheus metrics from SGLang's controller process on PORT (default: none)",
    )
    p.add_argument(
        "--dpcore-metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the dpcore metrics endpoint binds (default 127.0.0.1)",
    )
    p.add_argument(
        "--dpcore-record",
        default=None,
        metavar="PATH",
        help="record every request (arrival, lengths, salted block hashes; no text) as a trace for "
        "dpcore simulate, rotated at 1 GiB, 10 old files kept",
    )
    p.add_argument(
        "--dpcore-record-sample",
        type=float,
        default=1.0,
        metavar="X",
        help="fraction of requests recorded, in (0, 1], chosen by request id (default 1)",
    )
    p.add_argument(
        "--dpcore-record-hold-s",
        type=float,
        default=300.0,
        metavar="S",
        help="longest a recorded line waits for its request's output length, 0..86400 (0: write the "
        "budget at once; default 300)",
    )
    p.add_argument(
        "--dpcore-forward",
        choices=("on", "off"),
        default="on",
        help="on: the tokenizer process puts each request's routing fields in a small header and the "
        "controller sends the request on as encoded, without decoding it; off: the controller decodes "
        "every request, as SGLang's does (default on)",
    )
    p.add_argument(
        "--dpcore-dry-run",
        action="store_true",
        help="check and resolve everything, print what would run as JSON, start nothing",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "-h" in argv or "--help" in argv:
        parser.print_help()
        print("\nSGLang's own arguments follow (its --load-balance-method choices are replaced by the above).\n")
    ours, rest = parser.parse_known_args(argv)
    try:
        config, sglang_argv, plan = prepare(ours, rest)
    except DpcoreError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if ours.dpcore_dry_run:
        print(json.dumps(plan, indent=2))
        return 0
    os.environ[ENV_VAR] = config.to_json()
    server_info.install(plan)
    # This process runs SGLang's TokenizerManager: hash prompts here (for the chain, else for
    # the recording), not in the controller, and say where each request goes.
    needs = bool(plan["needs_block_hashes"])

    def block_size(page_size: int) -> int:
        return config.hashed_block_size(needs, page_size) or (config.whole_pages(page_size) if config.record else 0)

    tokenizer_hashes.register(block_size, forward=ours.dpcore_forward == "on")
    if config.record and config.record_hold_s > 0:  # the recorder waits for each request's output length
        output_lengths.register(tokenizer_hashes.dp_controller_reads)
    # SGLang's own entry point, as `python -m sglang.launch_server` runs it; every SGLang
    # process inherits the environment, and the controller's turns the adapter on.
    sys.argv = ["sglang.launch_server", *sglang_argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    return 0


def prepare(ours: argparse.Namespace, rest: list[str]) -> tuple[AdapterConfig, list[str], dict[str, object]]:
    """Validate everything before SGLang starts; return the adapter config, SGLang's argv and a plan."""
    check_removed_flags(rest)
    version = check_sglang_version()
    config = AdapterConfig(
        method=ours.load_balance_method,
        options=parse_policy_options(ours.policy_option),
        block_size=ours.dpcore_block_size,
        block_hashes=ours.dpcore_block_hashes,
        metrics_port=ours.dpcore_metrics_port,
        metrics_host=ours.dpcore_metrics_host,
        record=str(Path(ours.dpcore_record).resolve()) if ours.dpcore_record else None,
        record_sample=ours.dpcore_record_sample,
        record_hold_s=ours.dpcore_record_hold_s,
    )
    if config.record:
        from dpcore.runtime.recorder import RecordConfig

        # A bad path, rate or hold fails now.
        RecordConfig(path=config.record, sample=config.record_sample, hold_s=config.record_hold_s)
    from sglang.srt.server_args import prepare_server_args

    from dpcore.manager import PolicyManager

    args = prepare_server_args(rest)
    dp_size = int(args.dp_size or 1)
    mode = args.disaggregation_mode
    manager = PolicyManager.from_method(config.method, dp_size=dp_size, disaggregation_mode=mode, options=config.options)
    if getattr(args, "page_size", None):
        config.hashed_block_size(manager.needs_block_hashes, int(args.page_size))  # --dpcore-block-size fits the pages
    told = sglang_method(manager.chain)
    if dp_size == 1:
        print(
            f"{PROG}: warning: --dp-size is 1, so SGLang runs no data-parallel controller and "
            f"--load-balance-method {config.method!r} has no effect",
            file=sys.stderr,
        )
    plan: dict[str, object] = {
        "sglang": version,
        **manager.describe(),
        "sglang_load_balance_method": told,
        "needs_block_hashes": manager.needs_block_hashes,
        "forward": ours.dpcore_forward == "on",
        ENV_VAR: json.loads(config.to_json()),
    }
    return config, [*rest, "--load-balance-method", told], plan


if __name__ == "__main__":
    sys.exit(main())
