"""``python -m dpcore_sglang.bench``: SGLang's own controller loop, without and with the adapter.

In one run, on the same machine, with the same traffic: SGLang 0.5.23's unmodified
``run_data_parallel_controller_process`` (its ``__init__``, event loop, pickle IPC and
load-snapshot reader) dispatching with its own ``total_requests`` method, and the same
process with the adapter switched on, once per dpcore policy in ``--policies`` (default
``total_requests`` and ``cache_aware``). Reported:

* throughput: pre-pickled ``TokenizedGenerateReqInput`` frames (token ids as ``array('q')``,
  as SGLang's TokenizerManager sends them; :data:`PROMPT_FAMILIES` prompts that share
  prefixes in families, so a cache-aware policy has prefixes to find) pushed at the controller
  as fast as it takes them, drained by one process per rank that publishes a load snapshot
  every 256 messages through SGLang's writer; the median over ``--repeat`` interleaved runs,
  and the ratio of each dpcore policy to SGLang;
* the dispatch path alone, in-process, with the sockets replaced by ones that only encode
  (so pickling is counted as it is in production, IPC is not);
* for a chain that reads block hashes: what computing them costs SGLang's tokenizer process
  per request, where the adapter has them computed (:mod:`dpcore_sglang.tokenizer_hashes`;
  the producer sends the frames that process would send, so the controller's figures do not
  include it); ``--hash-in controller`` measures the controller hashing instead;
* idle CPU: the controller process's CPU time over ``--idle-seconds`` with no traffic.

With ``--forward on`` (the default, as ``dpcore_sglang.launch_server`` runs) the adapter's
requests carry the route header SGLang's tokenizer process puts in front of each one, and the
adapter sends them on without decoding them (:mod:`dpcore_sglang.forward`); its cost in the
tokenizer process is on the tokenizer line. ``--forward off`` measures the adapter decoding
every request, as SGLang's own loop does.

Outside an environment with SGLang it builds (or reuses) the pinned venv of
:mod:`dpcore_sglang.venv` and runs itself there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

WARMUP = 2000
#: Distinct prompts the benchmark cycles through: families of PROMPT_FAMILY_SIZE prompts
#: sharing their first half, so prefix-aware policies see repeats and near misses.
PROMPT_FAMILIES = 16
PROMPT_FAMILY_SIZE = 4
DEFAULT_POLICIES = ("total_requests", "cache_aware")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=30_000, help="requests per throughput run (default 30000)")
    p.add_argument("--tokens", type=int, default=1000, help="token ids per request (default 1000)")
    p.add_argument("--dp-size", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; medians are reported (default 3)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU window (default 5)")
    p.add_argument(
        "--policies",
        default=",".join(DEFAULT_POLICIES),
        help=f"dpcore policies (or chains, separated by '+') to measure against SGLang's own loop "
        f"(default {','.join(DEFAULT_POLICIES)})",
    )
    p.add_argument(
        "--hash-in",
        choices=("tokenizer", "controller"),
        default="tokenizer",
        help="where prompts are hashed for chains that read block hashes: SGLang's tokenizer process, as "
        "dpcore_sglang.launch_server does, or the controller (default tokenizer)",
    )
    p.add_argument(
        "--forward",
        choices=("on", "off"),
        default="on",
        help="on: requests carry the route header SGLang's tokenizer process adds with "
        "dpcore_sglang.launch_server, and the adapter sends them on without decoding them; off: the adapter "
        "decodes every request (default on)",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m dpcore_sglang.bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.requests < 100 or args.repeat < 1 or args.dp_size < 2 or args.tokens < 1 or args.idle_seconds <= 0:
        p.error("--requests must be >= 100, --repeat >= 1, --dp-size >= 2, --tokens >= 1, --idle-seconds > 0")
    if importlib.util.find_spec("sglang") is None:
        return run_in_venv(argv)
    return run_inside(args)


def run_in_venv(argv: list[str]) -> int:
    """Re-run this command in the pinned SGLang venv, with this checkout's packages."""
    from dpcore_sglang.venv import ensure_venv, find_repo, install_overlay, overlay_env, repo_projects, venv_python

    repo = find_repo()
    if repo is None:
        print("dpcore_sglang.bench: SGLang is not installed here and this is not a dpcore checkout; "
              "run it where sglang==0.5.23 is installed", file=sys.stderr)
        return 2
    venv = ensure_venv(log=lambda m: print(m, file=sys.stderr))
    tmp = Path(tempfile.mkdtemp(prefix="dpsg-"))
    try:
        install_overlay(venv, tmp / "site", repo_projects(repo))
        env = overlay_env(tmp / "site")
        env["TMPDIR"] = str(tmp)
        env["PYTHONWARNINGS"] = "ignore"  # SGLang warns about missing GPU features on import
        return subprocess.run([str(venv_python(venv)), "-m", "dpcore_sglang.bench", *argv], env=env, check=False).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _adapter(variant: str) -> Any:
    """``None`` (SGLang's own dispatch) for ``"sglang"``, else the adapter running *variant*."""
    from dpcore_sglang.config import AdapterConfig

    return None if variant == "sglang" else AdapterConfig(method=variant.replace("+", ","))


def make_requests(tokens: int) -> list[Any]:
    """The benchmark's requests, as SGLang's TokenizerManager builds them."""
    from array import array

    from dpcore_sglang.testing import make_request

    reqs = []
    half = tokens // 2
    for f in range(PROMPT_FAMILIES):
        for m in range(PROMPT_FAMILY_SIZE):
            base = (f * PROMPT_FAMILY_SIZE + m) * tokens
            req = make_request(f"bench-{f}-{m}", tokens)
            # Shared first half per family, a distinct second half per member.
            req.input_ids = array("q", [f * tokens + t for t in range(half)] + [base + t for t in range(half, tokens)])
            reqs.append(req)
    return reqs


def tokenizer_frame(req: Any, block_size: int, forward: bool) -> bytes:
    """*req* as SGLang's tokenizer process sends it to the adapter: with its route header
    (*forward*), else with its block hashes when *block_size* > 0, else as SGLang encodes it."""
    from dpcore_sglang.tokenizer_hashes import carry, entries_for, frame_with_route

    frame = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
    if forward:
        return frame_with_route(frame, req, block_size)
    return carry(frame, block_size, entries_for(req, block_size)) if block_size else frame


def make_frames(reqs: list[Any], block_size: int = 0, forward: bool = False) -> list[bytes]:
    """*reqs* encoded once as the tokenizer process sends them (the producer is not measured)."""
    return [tokenizer_frame(req, block_size, forward) for req in reqs]


def tokenizer_block_size(variant: str, hash_in: str) -> int:
    """Tokens per block SGLang's tokenizer process hashes for *variant* (0: none), on the
    harness's one-token pages."""
    if variant == "sglang" or hash_in != "tokenizer":
        return 0
    from dpcore.manager import PolicyManager

    config = _adapter(variant)
    manager = PolicyManager.from_method(config.method, dp_size=2)
    return config.hashed_block_size(manager.needs_block_hashes, 1)


def tokenizer_cost(reqs: list[Any], block_size: int, forward: bool, count: int, repeat: int) -> dict[str, float]:
    """CPU µs per request in SGLang's tokenizer process: its own encoding of a request, and
    what dpcore's hook adds to it (hashing, the header, the longer frame)."""

    def own(req: Any) -> bytes:
        return pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)

    def hooked(req: Any) -> bytes:
        return tokenizer_frame(req, block_size, forward)

    best = {}
    for name, fn in (("encode", own), ("hooked", hooked)):
        runs = []
        for _ in range(repeat):
            t0 = time.process_time()
            for i in range(count):
                fn(reqs[i % len(reqs)])
            runs.append(1e6 * (time.process_time() - t0) / count)
        best[name] = min(runs)
    return {"sglang_encode_us": best["encode"], "added_us": best["hooked"] - best["encode"]}


def throughput(variant: str, frames: list[bytes], requests: int, dp_size: int) -> dict[str, Any]:
    """One run: requests per second through SGLang's controller, and where they went."""
    from dpcore_sglang.testing import ControllerHarness

    with ControllerHarness(dp_size=dp_size, sglang_method="total_requests", adapter=_adapter(variant), mode="count") as h:
        m = len(frames)
        for i in range(WARMUP):
            h.send_raw(frames[i % m])
        h.counts(WARMUP, timeout=60)
        c0, t0 = h.cpu_seconds(), time.perf_counter()
        for i in range(requests):
            h.send_raw(frames[i % m])
        per_rank = h.counts(WARMUP + requests, timeout=600)
        took = time.perf_counter() - t0
        cpu = h.cpu_seconds() - c0
        if sum(per_rank) < WARMUP + requests or h.quit_signals:
            msg = f"{variant}: only {sum(per_rank)} of {WARMUP + requests} requests arrived"
            raise RuntimeError(msg)
    # CPU per request separates the controller's own cost from waiting on a busy machine.
    return {"req_per_s": requests / took, "cpu_us_per_req": 1e6 * cpu / requests, "per_rank": per_rank}


def idle_cpu(variant: str, frame: bytes, dp_size: int, seconds: float) -> float:
    """Percent of one core the controller process uses with no traffic."""
    from dpcore_sglang.testing import ControllerHarness

    with ControllerHarness(dp_size=dp_size, sglang_method="total_requests", adapter=_adapter(variant), mode="count") as h:
        h.send_raw(frame)
        h.counts(1, timeout=30)
        time.sleep(0.5)
        c0, t0 = h.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        return 100.0 * (h.cpu_seconds() - c0) / (time.monotonic() - t0)


class _EncodeOnlySocket:
    """A worker socket that encodes what it is sent, as a real send does, and drops it."""

    def send_pyobj(self, obj: Any, flags: int = 0, protocol: int = -1) -> None:
        pickle.dumps(obj, protocol)

    def send(self, data: Any, flags: int = 0, copy: bool = True, track: bool = False) -> None:
        pass


def dispatch_cost(
    frames: dict[str, list[bytes]], dp_size: int, count: int, repeat: int, variants: list[str]
) -> dict[str, list[float]]:
    """CPU microseconds per request through SGLang's ``_request_dispatcher``, without IPC.

    One real controller per variant, built by SGLang's own ``__init__`` (in a child process:
    it leaves scheduler-launch threads that never end), as is or with
    :func:`dpcore_sglang.adapter.install`. The worker sockets only encode, so this is the
    controller's cost per request (unpickling, dispatch, pickling) without the socket calls.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_dispatch_cost_child, args=(writer, frames, dp_size, count, repeat, variants))
    child.start()
    writer.close()
    try:
        return reader.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()


def _dispatch_cost_child(
    writer: Any, frames: dict[str, list[bytes]], dp_size: int, count: int, repeat: int, variants: list[str]
) -> None:
    import os

    import psutil
    import zmq
    from sglang.srt.managers.data_parallel_controller import DataParallelController
    from sglang.srt.managers.load_snapshot import shm_path_for
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import PortArgs, ServerArgs

    from dpcore_sglang.adapter import install
    from dpcore_sglang.plugin import freeze_startup_heap
    from dpcore_sglang.testing import MODE_ENV, RESULTS_ENV, draining_scheduler

    tmp = tempfile.mkdtemp(prefix="dpsg")
    shms: list[str] = []
    try:
        os.environ[RESULTS_ENV] = f"ipc://{tmp}/results"
        os.environ[MODE_ENV] = "count"
        sink = zmq.Context().socket(zmq.PULL)
        sink.bind(os.environ[RESULTS_ENV])
        out: dict[str, list[float]] = {v: [] for v in variants}
        ctls = {}
        shms = []
        for v in variants:
            server_args = ServerArgs(model_path="dummy", dp_size=dp_size, load_balance_method="total_requests")
            port_args = PortArgs.init_new(server_args)
            shms.append(shm_path_for(port_args.instance_id))
            publish(server_args, role="dp_controller")
            ctl = DataParallelController(server_args, port_args, draining_scheduler)
            ctl.workers = [_EncodeOnlySocket() for _ in ctl.workers]
            if v != "sglang":
                install(ctl, _adapter(v))
            ctls[v] = ctl
        # As the plugin does in a controller process once the adapter is in: otherwise a full
        # collection over SGLang's start-up heap (0.3 s) lands in whichever variant's run
        # happens to trigger it.
        freeze_startup_heap()

        def once(v: str) -> float:
            ctl = ctls[v]
            dispatch = ctl._request_dispatcher
            # What the controller's receive does: SGLang's unpickling, or the adapter's receiver.
            loads = pickle.loads if v == "sglang" else ctl.recv_from_tokenizer.decode
            todo = frames[v]
            m = len(todo)
            t0 = time.thread_time()
            for i in range(count):
                dispatch(loads(todo[i % m]))
            return 1e6 * (time.thread_time() - t0) / count

        for v in variants:
            once(v)  # warm-up
        for _ in range(repeat):  # interleaved, as the throughput runs
            for v in variants:
                out[v].append(once(v))
        writer.send(out)
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        for path in shms:
            if os.path.exists(path):
                os.unlink(path)
        os._exit(0)


def run_inside(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dpcore_sglang.versions import installed_sglang_version

    console = Console(stderr=True)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    variants = ["sglang", *policies]
    reqs = make_requests(args.tokens)
    hashed = {v: tokenizer_block_size(v, args.hash_in) for v in variants}
    # Requests of an adapter variant carry what the hooked tokenizer adds (SGLang's own: nothing).
    hooked = {v: v != "sglang" and (args.forward == "on" or hashed[v] > 0) for v in variants}
    forward = {v: v != "sglang" and args.forward == "on" for v in variants}
    frames = {v: make_frames(reqs, hashed[v], forward[v]) for v in variants}
    prompts = len(reqs)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for i in range(args.repeat):
        for variant in variants:  # interleaved, so drift on a shared machine hits all alike
            console.log(f"{variant}: throughput run {i + 1}/{args.repeat}")
            runs[variant].append(throughput(variant, frames[variant], args.requests, args.dp_size))
    idle = {}
    for variant in ("sglang", policies[0]):  # the idle loop does not depend on the policy
        console.log(f"{variant}: idle CPU over {args.idle_seconds:g} s")
        idle[variant] = idle_cpu(variant, frames[variant][0], args.dp_size, args.idle_seconds)
    console.log("dispatch path without IPC, in-process")
    cost = dispatch_cost(frames, args.dp_size, 10_000, max(3, args.repeat), variants)
    tokenizer = {
        v: tokenizer_cost(reqs, hashed[v], forward[v], 5_000, max(3, args.repeat)) for v in variants if hooked[v]
    }
    med = {v: statistics.median(r["req_per_s"] for r in runs[v]) for v in variants}
    cpu = {v: statistics.median(r["cpu_us_per_req"] for r in runs[v]) for v in variants}
    path = {v: statistics.median(cost[v]) for v in variants}
    ratio = {v: med[v] / med["sglang"] for v in policies}

    table = Table(
        title=f"SGLang {installed_sglang_version()} controller: {args.requests:,} requests x {args.tokens} token ids "
        f"({prompts} prompts in {PROMPT_FAMILIES} prefix families), {args.dp_size} ranks"
    )
    for col in (
        "dispatch",
        "req/s (median)",
        "ratio",
        "runs",
        "controller CPU µs/req",
        "dispatch path CPU µs/req (no IPC)",
        "tokenizer process CPU µs/req added",
        f"idle CPU, {args.idle_seconds:g} s",
    ):
        table.add_column(col, justify="right")
    for v in variants:
        label = "SGLang's own (total_requests)" if v == "sglang" else f"dpcore adapter, {v}"
        table.add_row(
            label,
            f"{med[v]:,.0f}",
            "1" if v == "sglang" else f"{ratio[v]:.3f}",
            " / ".join(f"{r['req_per_s']:,.0f}" for r in runs[v]),
            f"{cpu[v]:.0f}",
            f"{path[v]:.1f}",
            f"{tokenizer[v]['added_us']:.1f}" if v in tokenizer else "0",
            f"{idle[v]:.1f} %" if v in idle else "",
        )
    Console(width=160).print(table)
    Console().print(
        "throughput ratio dpcore / SGLang: "
        + ", ".join(f"{v} [bold]{ratio[v]:.3f}[/]" for v in policies)
        + f"; idle CPU {idle['sglang']:.1f} % -> {idle[policies[0]]:.1f} % of a core"
    )
    for v, t in tokenizer.items():
        what = " and ".join(
            x for x, on in (("a route header", forward[v]), ("block hashes", hashed[v] > 0)) if on
        )
        Console().print(
            f"{v}: {what} computed in SGLang's tokenizer process (not the controller's): "
            f"+{t['added_us']:.1f} CPU µs per request there, beside its own encoding of the request "
            f"({t['sglang_encode_us']:.1f} µs) and its tokenizing"
        )
    if args.hash_in == "controller":
        Console().print("block hashes computed in the controller (--hash-in controller)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "sglang": installed_sglang_version(),
                    "requests": args.requests,
                    "tokens": args.tokens,
                    "prompts": prompts,
                    "hash_in": args.hash_in,
                    "forward": args.forward == "on",
                    "tokenizer_cpu_us_per_req": tokenizer,
                    "dp_size": args.dp_size,
                    "policies": policies,
                    "runs": runs,
                    "median_req_per_s": med,
                    "throughput_ratio": ratio,
                    "median_controller_cpu_us_per_req": cpu,
                    "dispatch_path_cpu_us_per_req": cost,
                    "idle_cpu_percent": idle,
                    "idle_seconds": args.idle_seconds,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
