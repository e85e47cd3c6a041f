"""``python -m dpcore_sglang.bench``: SGLang's own controller loop, without and with the adapter.

In one run, on the same machine, with the same traffic: SGLang 0.5.23's unmodified
``run_data_parallel_controller_process`` (its ``__init__``, event loop, pickle IPC and
load-snapshot reader) dispatching with its own ``total_requests`` method, and the same
process with the adapter switched on and dpcore's ``total_requests`` policy. Reported:

* throughput: pre-pickled ``TokenizedGenerateReqInput`` frames pushed at the controller as
  fast as it takes them, drained by one process per rank that publishes a load snapshot
  every 256 messages through SGLang's writer; the median over ``--repeat`` interleaved runs,
  and the ratio dpcore / SGLang;
* idle CPU: the controller process's CPU time over ``--idle-seconds`` with no traffic.

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

VARIANTS = ("sglang", "dpcore")
WARMUP = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=30_000, help="requests per throughput run (default 30000)")
    p.add_argument("--tokens", type=int, default=1000, help="token ids per request (default 1000)")
    p.add_argument("--dp-size", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; medians are reported (default 3)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU window (default 5)")
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
    from dpcore_sglang.config import AdapterConfig

    return None if variant == "sglang" else AdapterConfig(method="total_requests")


def throughput(variant: str, frame: bytes, requests: int, dp_size: int) -> dict[str, Any]:
    """One run: requests per second through SGLang's controller, and where they went."""
    from dpcore_sglang.testing import ControllerHarness

    with ControllerHarness(dp_size=dp_size, sglang_method="total_requests", adapter=_adapter(variant), mode="count") as h:
        for _ in range(WARMUP):
            h.send_raw(frame)
        h.counts(WARMUP, timeout=60)
        c0, t0 = h.cpu_seconds(), time.perf_counter()
        for _ in range(requests):
            h.send_raw(frame)
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


class _NullSocket:
    """A worker socket that drops what it is sent (the dispatch-cost measurement has no IPC)."""

    def send_pyobj(self, obj: Any, flags: int = 0, protocol: int = -1) -> None:
        pass


def dispatch_cost(frame: bytes, dp_size: int, count: int, repeat: int) -> dict[str, list[float]]:
    """Microseconds per request through SGLang's ``_request_dispatcher`` with sockets nulled.

    One real controller, built by SGLang's own ``__init__`` (in a child process: it leaves
    scheduler-launch threads that never end): first as is, then with
    :func:`dpcore_sglang.adapter.install`. Only the send is removed, so this is what the
    adapter adds per request without pickling and IPC in the way.
    """
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_dispatch_cost_child, args=(writer, frame, dp_size, count, repeat))
    child.start()
    writer.close()
    try:
        return reader.recv()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()


def _dispatch_cost_child(writer: Any, frame: bytes, dp_size: int, count: int, repeat: int) -> None:
    import os

    import psutil
    import zmq
    from sglang.srt.managers.data_parallel_controller import DataParallelController
    from sglang.srt.managers.load_snapshot import shm_path_for
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import PortArgs, ServerArgs

    from dpcore_sglang.adapter import install
    from dpcore_sglang.config import AdapterConfig
    from dpcore_sglang.testing import MODE_ENV, RESULTS_ENV, draining_scheduler

    tmp = tempfile.mkdtemp(prefix="dpsg")
    shm = None
    try:
        os.environ[RESULTS_ENV] = f"ipc://{tmp}/results"
        os.environ[MODE_ENV] = "count"
        sink = zmq.Context().socket(zmq.PULL)
        sink.bind(os.environ[RESULTS_ENV])
        server_args = ServerArgs(model_path="dummy", dp_size=dp_size, load_balance_method="total_requests")
        port_args = PortArgs.init_new(server_args)
        shm = shm_path_for(port_args.instance_id)
        publish(server_args, role="dp_controller")
        ctl = DataParallelController(server_args, port_args, draining_scheduler)
        ctl.workers = [_NullSocket() for _ in ctl.workers]
        req = pickle.loads(frame)

        def once() -> float:
            dispatch = ctl._request_dispatcher
            t0 = time.perf_counter()
            for _ in range(count):
                dispatch(req)
            return 1e6 * (time.perf_counter() - t0) / count

        out = {"sglang": [once() for _ in range(repeat)]}
        install(ctl, AdapterConfig(method="total_requests"))
        out["dpcore"] = [once() for _ in range(repeat)]
        writer.send(out)
    finally:
        for p in psutil.Process().children(recursive=True):
            p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        if shm is not None and os.path.exists(shm):
            os.unlink(shm)
        os._exit(0)


def run_inside(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from dpcore_sglang.testing import make_request
    from dpcore_sglang.versions import installed_sglang_version

    console = Console(stderr=True)
    # SGLang's own IPC format (pickle IPC is its default), made once: the producer is not measured.
    frame = pickle.dumps(make_request("bench", args.tokens), protocol=pickle.HIGHEST_PROTOCOL)
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for i in range(args.repeat):
        for variant in VARIANTS:  # interleaved, so drift on a shared machine hits both alike
            console.log(f"{variant}: throughput run {i + 1}/{args.repeat}")
            runs[variant].append(throughput(variant, frame, args.requests, args.dp_size))
    idle = {}
    for variant in VARIANTS:
        console.log(f"{variant}: idle CPU over {args.idle_seconds:g} s")
        idle[variant] = idle_cpu(variant, frame, args.dp_size, args.idle_seconds)
    console.log("dispatch path without IPC, in-process")
    cost = dispatch_cost(frame, args.dp_size, 20_000, max(3, args.repeat))
    med = {v: statistics.median(r["req_per_s"] for r in runs[v]) for v in VARIANTS}
    cpu = {v: statistics.median(r["cpu_us_per_req"] for r in runs[v]) for v in VARIANTS}
    path = {v: statistics.median(cost[v]) for v in VARIANTS}
    ratio = med["dpcore"] / med["sglang"]

    table = Table(
        title=f"SGLang {installed_sglang_version()} controller: {args.requests:,} requests x {args.tokens} token ids, "
        f"{args.dp_size} ranks, total_requests"
    )
    for col in (
        "dispatch",
        "req/s (median)",
        "runs",
        "controller CPU µs/req",
        "dispatch path µs/req (no IPC)",
        f"idle CPU, {args.idle_seconds:g} s",
    ):
        table.add_column(col, justify="right")
    for v, label in (("sglang", "SGLang's own"), ("dpcore", "dpcore adapter")):
        table.add_row(
            label,
            f"{med[v]:,.0f}",
            " / ".join(f"{r['req_per_s']:,.0f}" for r in runs[v]),
            f"{cpu[v]:.0f}",
            f"{path[v]:.1f}",
            f"{idle[v]:.1f} %",
        )
    Console(width=140).print(table)
    Console().print(f"throughput ratio dpcore / SGLang: [bold]{ratio:.3f}[/] (goal >= 0.95); "
                    f"idle CPU {idle['sglang']:.1f} % -> {idle['dpcore']:.1f} % of a core (goal <= 2 %)")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "sglang": installed_sglang_version(),
                    "requests": args.requests,
                    "tokens": args.tokens,
                    "dp_size": args.dp_size,
                    "runs": runs,
                    "median_req_per_s": med,
                    "throughput_ratio": ratio,
                    "median_controller_cpu_us_per_req": cpu,
                    "dispatch_path_us_per_req": cost,
                    "idle_cpu_percent": idle,
                    "idle_seconds": args.idle_seconds,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
