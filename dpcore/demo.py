"""``dpcore demo``: a controller, mock engine ranks and a real trace, on this machine.

It starts ``dpcore serve``, a ``dpcore mock-barrier`` and ``--dp-size`` ``dpcore mock-worker``
processes on loopback ipc sockets, replays the bundled Mooncake sample (or ``--trace``)
through the client SDK at ``--speedup`` × real time, shows live progress, and ends with a
per-rank table. The ranks run in lockstep through the barrier, as DP-attention ranks do
(every step lasts as long as the slowest rank's, with the simulator's step-time model), and
their engine time runs ``--speedup`` times faster too, so every number in the table is in
*model* seconds: what the same run would show in real time.

Every process it starts is stopped by its pid when the demo ends, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from attrs import define, field

from dpcore.auto import AUTO
from dpcore.cli import add_policy_option_argument
from dpcore.errors import ConfigError, DpcoreError
from dpcore.mock.barrier import DEFAULT_STEP_TIMEOUT_S
from dpcore.mock.worker import add_report_profile_argument
from dpcore.quantile import percentile
from dpcore.sim.config import add_engine_config_argument

DEFAULT_REQUESTS = 500
DEFAULT_SPEEDUP = 20.0
#: The bundled sample asks for ~41,000 prompt tokens/s as recorded; four DP-attention ranks of
#: the step model extend at most ~23,500 tokens/s together, so the recorded rate only grows a
#: queue. A quarter of it loads them to ~45% of their prefill capacity: busy, with queueing
#: and stragglers, where policies differ.
DEFAULT_RATE = 0.25
#: Wall seconds to wait for the controller and ranks to come up.
START_TIMEOUT_S = 30.0
WARMUP_PREFIX = "warmup-"
#: Model seconds the lockstep may lag behind the clock before the summary says so.
LAG_WARN_S = 1.0


class DemoError(DpcoreError):
    """The demo could not run (a process did not start, requests went unanswered...)."""


def sample_path() -> Path:
    """The bundled trace sample (see ``dpcore/data/README.md`` for its source and licence)."""
    from dpcore.extras import sample_trace

    return sample_trace()


# --------------------------------------------------------------------------- results


@define
class RankStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft: list[float] = field(factory=list)
    e2e: list[float] = field(factory=list)
    #: Time per output token after the first, per request with two or more output tokens.
    tpot: list[float] = field(factory=list)

    def add(self, meta: dict[str, Any]) -> None:
        self.requests += 1
        self.prompt_tokens += int(meta.get("prompt_tokens", 0))
        self.cached_tokens += int(meta.get("cached_tokens", 0))
        self.completion_tokens += int(meta.get("completion_tokens", 0))
        if "ttft_s" in meta:
            self.ttft.append(float(meta["ttft_s"]))
        if "e2e_s" in meta:
            self.e2e.append(float(meta["e2e_s"]))
            out = int(meta.get("completion_tokens", 0))
            if "ttft_s" in meta and out > 1:
                self.tpot.append((float(meta["e2e_s"]) - float(meta["ttft_s"])) / (out - 1))

    @property
    def hit_ratio(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the kernel sends SIGTERM to the child if the demo dies without cleaning up.
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """The processes the demo started, each with a log file; stopped by pid, never by name."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(Path(self.run_dir) / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        try:
            # A session of its own: a terminal Ctrl-C reaches only the demo, which then stops
            # every child itself, in order, instead of racing them.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )  # fmt: skip
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def check(self) -> None:
        """Raise :class:`DemoError` if a process exited, with the tail of its log."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                msg = f"{name} exited with status {proc.returncode}:\n{self.tail(name)}"
                raise DemoError(msg)

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (Path(self.run_dir) / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if needed. The controller goes first, while its ranks can
        still deliver their last reports, so it ends with every request accounted for."""
        first = [p for n, p in self.procs.items() if n == "controller"]
        rest = [p for n, p in self.procs.items() if n != "controller"]
        for batch in (first, rest):
            live = [p for p in batch if p.poll() is None]
            for p in live:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            for p in live:
                try:
                    p.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _dpcore(*args: str) -> list[str]:
    return [sys.executable, "-m", "dpcore", "--log-level", "warning", *args]


def _wait_for_file(path: Path, procs: Processes, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        procs.check()
        if time.monotonic() > deadline:
            msg = f"the controller did not start within {timeout_s:g} s:\n{procs.tail('controller')}"
            raise DemoError(msg)
        time.sleep(0.02)
    return dict(json.loads(path.read_text()))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the run


@define
class Tally:
    sent: int = 0
    completed: int = 0
    rejected: int = 0
    failed: int = 0
    codes: dict[str, int] = field(factory=dict)
    per_rank: list[RankStats] = field(factory=list)

    @property
    def ended(self) -> int:
        return self.completed + self.rejected + self.failed


def _warm_up(client: Any, dp_size: int, procs: Processes, timeout_s: float) -> None:
    """One tiny request pinned to each rank: returns once every rank answered."""
    for r in range(dp_size):
        client.submit(f"{WARMUP_PREFIX}{r}", num_tokens=1, routed_dp_rank=r, max_new_tokens=1)
    deadline = time.monotonic() + timeout_s
    waiting = {f"{WARMUP_PREFIX}{r}" for r in range(dp_size)}
    while waiting:
        procs.check()
        if time.monotonic() > deadline:
            msg = f"ranks {sorted(waiting)} did not answer within {timeout_s:g} s"
            raise DemoError(msg)
        for reply in client.poll(0.1):
            if reply.kind == "out" and reply.final:
                waiting.discard(reply.rid)
            elif reply.kind != "out":  # the controller has not heard from that rank yet: retry
                time.sleep(0.1)
                r = int(reply.rid[len(WARMUP_PREFIX) :])
                client.submit(reply.rid, num_tokens=1, routed_dp_rank=r, max_new_tokens=1)


def _replay(
    client: Any, trace: Any, tally: Tally, procs: Processes, on_tick: Any, drain_timeout_s: float,
    max_new_tokens: int | None = None,
) -> bool:
    """Send every request at its arrival time (wall = trace time / speed-up); collect replies.

    *max_new_tokens*: every request's budget; its output still ends at the trace's length
    (the mock ranks' ``eos_after``). ``None``: the budget is the trace's length.
    Returns whether every request ended (out, rej or fail) before the drain timeout.
    """
    import msgpack

    requests = trace.requests
    n = len(requests)
    t0 = time.monotonic()
    i = 0
    last_tick = 0.0
    last_end = t0
    drain_deadline: float | None = None
    while tally.ended < n:
        now = time.monotonic()
        while i < n and requests[i].arrival <= now - t0:
            r = requests[i]
            if max_new_tokens is None:
                client.submit(f"t{r.index}", num_tokens=r.input_length, block_hashes=r.hash_ids,
                              max_new_tokens=r.output_length)  # fmt: skip
            else:
                client.submit(f"t{r.index}", num_tokens=r.input_length, block_hashes=r.hash_ids,
                              max_new_tokens=max_new_tokens, payload=msgpack.packb({"eos_after": r.output_length}))  # fmt: skip
            i += 1
            tally.sent = i
        if i == n and drain_deadline is None:
            drain_deadline = now + drain_timeout_s
        wait = 0.1 if i == n else max(0.0, min(0.1, requests[i].arrival - (time.monotonic() - t0)))
        for reply in client.poll(wait):
            if not reply.final:
                continue
            last_end = time.monotonic()
            if reply.kind == "out":
                tally.completed += 1
                rank = reply.meta.get("dp_rank", reply.rank)
                if isinstance(rank, int) and 0 <= rank < len(tally.per_rank):
                    tally.per_rank[rank].add(dict(reply.meta))
            else:
                if reply.kind == "rej":
                    tally.rejected += 1
                else:
                    tally.failed += 1
                tally.codes[reply.code] = tally.codes.get(reply.code, 0) + 1
        now = time.monotonic()
        if now - last_tick >= 0.1:
            last_tick = now
            procs.check()
            on_tick()
        if drain_deadline is not None and now > drain_deadline and now - last_end > 5.0:
            return False
    on_tick()
    return True


# --------------------------------------------------------------------------- output


def _live_view(tally: Tally, total: int, dp_size: int, speedup: float) -> tuple[Any, Any]:
    """A rich Live showing sent/completed and per-rank bars, and its refresh function."""
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    overall = Progress(
        TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
    )  # fmt: skip
    sent = overall.add_task("sent", total=total, note=f"speed-up {speedup:g}x")
    done = overall.add_task("completed", total=total, note="")
    ranks = Progress(TextColumn("{task.description:>10}"), BarColumn(), TextColumn("{task.fields[note]}"))
    rank_tasks = [ranks.add_task(f"rank {r}", total=1, note="") for r in range(dp_size)]

    def refresh() -> None:
        overall.update(sent, completed=tally.sent)
        note = f"rejected {tally.rejected}  failed {tally.failed}  in flight {tally.sent - tally.ended}"
        overall.update(done, completed=tally.completed, note=note)
        top = max((s.requests for s in tally.per_rank), default=0) or 1
        for r, s in enumerate(tally.per_rank):
            ranks.update(
                rank_tasks[r], completed=s.requests, total=top,
                note=f"{s.requests:5d} req  {s.prompt_tokens / 1e6:6.2f}M tok  hit {s.hit_ratio:6.1%}",
            )  # fmt: skip

    return Live(Group(overall, ranks), refresh_per_second=8, transient=False), refresh


def summary(
    tally: Tally, trace: Any, args: argparse.Namespace, chain: str, ceiling: float, wall_s: float,
    lockstep: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    ranks = []
    for r, s in enumerate(tally.per_rank):
        ranks.append(
            {
                "rank": r,
                "requests": s.requests,
                "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens,
                "completion_tokens": s.completion_tokens,
                "prefix_hit_ratio": s.hit_ratio,
                "ttft_p50_s": percentile(s.ttft, 0.5),
                "ttft_p99_s": percentile(s.ttft, 0.99),
            }
        )
    all_ttft = [x for s in tally.per_rank for x in s.ttft]
    all_tpot = [x for s in tally.per_rank for x in s.tpot]
    prompt = sum(s.prompt_tokens for s in tally.per_rank)
    cached = sum(s.cached_tokens for s in tally.per_rank)
    counts = [s.requests for s in tally.per_rank]
    mean = sum(counts) / len(counts) if counts else 0.0
    return {
        "load_balance_method": chain,
        "dp_size": args.dp_size,
        "speedup": args.speedup,
        "engine_config": getattr(args, "engine_config", None),
        "trace": describe(trace, args),
        "requests": len(trace.requests),
        "completed": tally.completed,
        "rejected": tally.rejected,
        "failed": tally.failed,
        "codes": dict(tally.codes),
        "wall_s": wall_s,
        "prefix_hit_ratio": cached / prompt if prompt else 0.0,
        "prefix_hit_ceiling": ceiling,
        "ttft_p50_s": percentile(all_ttft, 0.5),
        "ttft_p99_s": percentile(all_ttft, 0.99),
        "tpot_p50_s": percentile(all_tpot, 0.5),
        "tpot_p99_s": percentile(all_tpot, 0.99),
        "request_imbalance": max(counts) / mean if mean else 0.0,
        "ranks": ranks,
        "lockstep": lockstep or {},
    }


def describe(trace: Any, args: argparse.Namespace) -> str:
    n = len(trace.requests)
    recorded = trace.duration_s * trace.time_scale  # trace seconds, before rate and speed-up
    per_s = n / recorded if recorded else 0.0
    rate = f"; × {args.rate:g}: {per_s * args.rate:.1f} req/s" if args.rate != 1 else ""
    return (
        f"{n:,} requests of {Path(trace.path).name} ({recorded:,.0f} s of trace, {per_s:.1f} req/s{rate}) "
        f"at {args.speedup:g}x speed: {trace.duration_s:,.1f} s"
    )


def print_table(s: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(
        title=f"dpcore demo: {s['load_balance_method']} on {s['dp_size']} mock ranks",
        caption=(
            f"{s['trace']}\nTTFT in model seconds (wall × {s['speedup']:g}), measured on the rank. "
            f"Prefix-hit ceiling (one infinite cache for all ranks): {s['prefix_hit_ceiling']:.1%}"
        ),
    )
    for col in ("rank", "requests", "prompt tokens", "cached tokens", "prefix hit", "TTFT p50", "TTFT p99"):
        t.add_column(col, justify="right")

    def row(name: str, d: dict[str, Any], **kw: Any) -> None:
        t.add_row(
            name, f"{d['requests']:,}", f"{d['prompt_tokens']:,}", f"{d['cached_tokens']:,}",
            f"{d['prefix_hit_ratio']:.1%}", f"{d['ttft_p50_s']:.2f} s", f"{d['ttft_p99_s']:.2f} s", **kw,
        )  # fmt: skip

    for d in s["ranks"]:
        row(str(d["rank"]), d)
    total = {
        "requests": s["completed"],
        "prompt_tokens": sum(d["prompt_tokens"] for d in s["ranks"]),
        "cached_tokens": sum(d["cached_tokens"] for d in s["ranks"]),
        "prefix_hit_ratio": s["prefix_hit_ratio"],
        "ttft_p50_s": s["ttft_p50_s"],
        "ttft_p99_s": s["ttft_p99_s"],
    }
    t.add_section()
    row("all", total, style="bold")
    console.print(t)
    line = (
        f"{s['completed']:,} of {s['requests']:,} requests completed, {s['rejected']} rejected, "
        f"{s['failed']} failed in {s['wall_s']:.1f} s wall; requests max/mean over ranks "
        f"{s['request_imbalance']:.2f}"
    )
    if s["codes"]:
        line += f"; codes {s['codes']}"
    console.print(line)
    console.print(f"TPOT p50 {s['tpot_p50_s'] * 1e3:.1f} ms, p99 {s['tpot_p99_s'] * 1e3:.1f} ms (model time)")
    if ls := s["lockstep"]:
        console.print(lockstep_line(ls))


def lockstep_line(ls: dict[str, Any]) -> str:
    """One line on what the barrier saw: steps, straggler waste, and time lost to the machine."""
    waste = ls["waste_s"] / ls["rank_s"] if ls.get("rank_s") else 0.0
    line = (
        f"lockstep: {ls['steps']:,} steps ({ls['extend_steps']:,} with a prefill), straggler waste "
        f"{waste:.1%} of rank time, {ls['idle_rank_steps']:,} idle-batch rank-steps"
    )
    if ls.get("dropped"):
        line += (
            f"; {ls['dropped']} time(s) a rank missed a step and the others went on without it "
            f"after the step timeout ({ls['stall_s']:.1f} model s of waiting)"
        )
    if ls.get("lag_max_s", 0.0) > LAG_WARN_S:
        line += (
            f"; the processes fell up to {ls['lag_max_s']:.1f} model s behind the clock (results stay in "
            "model time, but the controller saw load reports that late): a lower --speedup keeps up"
        )
    return line


# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dp-size", type=int, default=4, help="mock ranks to start (default 4)")
    p.add_argument("--load-balance-method", default=AUTO, metavar="NAME[,NAME...]",
                   help="any installed policy or chain (default auto; `dpcore serve --dry-run` shows what it picks)")  # fmt: skip
    add_policy_option_argument(p)
    p.add_argument("--speedup", type=float, default=DEFAULT_SPEEDUP,
                   help=f"run the trace and the engines this many times faster than real time (default {DEFAULT_SPEEDUP:g})")  # fmt: skip
    p.add_argument("--requests", type=int, default=DEFAULT_REQUESTS,
                   help=f"replay the first N requests of the trace (default {DEFAULT_REQUESTS})")  # fmt: skip
    p.add_argument("--rate", type=float, default=DEFAULT_RATE,
                   help=f"request-rate multiplier on top of the trace's (default {DEFAULT_RATE:g}: the recorded rate "
                        "would overload four ranks; 1 replays it as recorded)")  # fmt: skip
    p.add_argument("--trace", default=None, metavar="PATH",
                   help="a Mooncake jsonl or Azure csv trace (default: the bundled Mooncake sample)")  # fmt: skip
    p.add_argument("--kv-capacity", type=int, default=None, metavar="TOKENS",
                   help="per mock rank (default: the --engine-config file's kv_capacity_tokens, else 500,000)")  # fmt: skip
    p.add_argument("--drain-timeout", type=float, default=60.0, metavar="S",
                   help="wall seconds to wait for the last replies after the replay (default 60)")  # fmt: skip
    add_report_profile_argument(p)
    add_engine_config_argument(p)
    p.add_argument("--step-timeout", type=float, default=DEFAULT_STEP_TIMEOUT_S, metavar="S",
                   help="wall seconds a lockstep step waits for a silent rank before going on without it "
                        f"(default {DEFAULT_STEP_TIMEOUT_S:g})")  # fmt: skip
    p.add_argument("--no-live", action="store_true", help="no live view (also the default when not on a terminal)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--record", default=None, metavar="PATH",
                   help="record the run as a trace (dpcore serve --record; timestamps in wall time, so replay "
                        "it with dpcore simulate --time-scale 1/SPEEDUP)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="ask for N new tokens at most, as a client's max_tokens; each output still ends at "
                        "its trace length, as at an end-of-sequence token, 1..2**24 (default: the trace length)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from dpcore.cli import build_manager
    from dpcore.sdk import endpoints
    from dpcore.sdk.client import Client
    from dpcore.sim.config import load_engine_config
    from dpcore.sim.oracle import ceiling_hit_ratio
    from dpcore.sim.traces import read_trace

    # Everything is validated before a process starts.
    args.disaggregation_mode = "null"
    manager = build_manager(args)
    chain = ",".join(manager.chain)
    if not args.speedup > 0 or not math.isfinite(args.speedup):
        raise ConfigError(f"--speedup must be a positive number, got {args.speedup!r}")
    if not args.rate > 0 or not math.isfinite(args.rate):
        raise ConfigError(f"--rate must be a positive number, got {args.rate!r}")
    if args.requests < 1:
        raise ConfigError(f"--requests must be at least 1, got {args.requests}")
    if args.max_new_tokens is not None and not 1 <= args.max_new_tokens <= 1 << 24:
        raise ConfigError(f"--max-new-tokens must be an integer in 1..2**24, got {args.max_new_tokens}")
    if not args.step_timeout > 0 or not math.isfinite(args.step_timeout):
        raise ConfigError(f"--step-timeout must be a positive number of seconds, got {args.step_timeout!r}")
    # The mock ranks read the same file (step-time model, KV capacity, report cadence), so a
    # demo and `dpcore simulate --engine-config FILE` model the same engine; checked here once.
    engine = load_engine_config(args.engine_config)
    engine_config = [] if args.engine_config is None else ["--engine-config", str(Path(args.engine_config).resolve())]
    report_profile = args.report_profile or engine.report_profile
    trace = read_trace(args.trace or sample_path(), time_scale=args.speedup * args.rate, limit=args.requests)
    block_size = trace.block_size or 512
    ceiling = ceiling_hit_ratio(trace)
    console = Console(stderr=False)
    live_ok = not args.no_live and console.is_terminal

    run_dir = endpoints.make_run_dir("dpcore-demo-")
    procs = Processes(run_dir)
    ok = False

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Explicit handlers: also when started with SIGINT ignored (a background job), and on SIGTERM.
    old_handlers = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        eps_file = Path(run_dir) / "endpoints.json"
        stats_file = Path(run_dir) / "lockstep.json"
        serve = ["serve", "--dp-size", str(args.dp_size), "--load-balance-method", args.load_balance_method,
                 "--run-dir", run_dir, "--endpoints-file", str(eps_file), "--drain-timeout", "2"]  # fmt: skip
        for opt in args.policy_option:
            serve += ["--policy-option", opt]
        if args.record:
            serve += ["--record", str(Path(args.record).resolve()), "--record-block-size", str(block_size)]
        procs.start("controller", _dpcore(*serve))
        barrier = endpoints.ipc(run_dir, "barrier")
        procs.start("barrier", _dpcore("mock-barrier", "--endpoint", barrier, "--dp-size", str(args.dp_size),
                                       "--speedup", str(args.speedup), "--step-timeout", str(args.step_timeout),
                                       "--stats-file", str(stats_file), *engine_config))  # fmt: skip
        eps = _wait_for_file(eps_file, procs, START_TIMEOUT_S)
        for r in range(args.dp_size):
            worker = ["mock-worker", "--rank", str(r), "--dispatch", eps["dispatch"][r], "--report", eps["report"],
                      "--barrier", barrier, "--block-size", str(block_size), "--report-profile", report_profile,
                      "--exit-with-parent", *engine_config]  # fmt: skip
            if args.kv_capacity is not None:
                worker += ["--kv-capacity", str(args.kv_capacity)]
            procs.start(f"rank{r}", _dpcore(*worker))
        console.print(
            f"[bold]dpcore demo[/]: controller ({chain}) + {args.dp_size} mock ranks, pids "
            f"{', '.join(str(p.pid) for p in procs.procs.values())}; logs in {run_dir}"
        )
        tally = Tally(per_rank=[RankStats() for _ in range(args.dp_size)])
        with Client(eps["ingress"]) as client:
            _warm_up(client, args.dp_size, procs, START_TIMEOUT_S)
            console.print(f"replaying {describe(trace, args)}")
            t0 = time.monotonic()
            if live_ok:
                live, refresh = _live_view(tally, len(trace.requests), args.dp_size, args.speedup)
                with live:
                    ok = _replay(client, trace, tally, procs, refresh, args.drain_timeout, args.max_new_tokens)
            else:
                ok = _replay(client, trace, tally, procs, lambda: None, args.drain_timeout, args.max_new_tokens)
            wall = time.monotonic() - t0
        procs.stop()  # the barrier writes its counters as it stops
        s = summary(tally, trace, args, chain, ceiling, wall, _read_json(stats_file))
        print_table(s, console)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(s, indent=2))
        if not ok:
            console.print(f"[red]{len(trace.requests) - tally.ended} requests got no answer; logs in {run_dir}[/]")
    except DemoError:
        ok = False
        console.print(f"[red]the demo failed; process logs are in {run_dir}[/]")
        raise
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        procs.stop()
        if ok or sys.exc_info()[0] is KeyboardInterrupt:
            endpoints.remove_run_dir(run_dir)
    return 0 if ok else 1
