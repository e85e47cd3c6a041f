"""``dpcore bench``: how fast the controller forwards requests, against two references.

All three run on this machine with the same requests (``--tokens`` token ids each, 4 ranks,
ipc sockets), one sender process and one receiver process per rank:

1. **dpcore**: the real :class:`~dpcore.runtime.controller.Controller` with the load-aware
   baseline the installed distributions declare (``total_requests``, from the first-party
   policies; see :data:`dpcore.auto.BASELINE`); receivers acknowledge and report load (with ``done`` seqs) every 256
   messages, and after draining their socket at most every 25 ms (about one engine step), plus
   a heartbeat every 0.5 s while idle: a cadence of the rank's own, as a real rank's, so the
   number of reports the controller handles does not grow with how often a receiver finds its
   socket empty (which depends on how the processes share the cores).
2. **pickle loop**: SGLang's style, ``recv_pyobj`` → round robin → ``send_pyobj``
   (:mod:`dpcore.bench_baseline`, the only pickle in dpcore).
3. **zmq.proxy**: libzmq's C proxy from a PULL to a PUSH, the transport's ceiling.

Throughput is ``count / (last receive - first receive)`` over all receivers, median of
``--repeat`` runs (the loops are interleaved, so drift on a shared machine hits all three).
The router's CPU time per message (all its threads, from ``/proc``) is shown too: it is
steadier than msgs/s when other work shares the cores. The benchmark also times each installed policy's decision through the
hooks without sockets (``select`` + ``dispatched``, a load report every 256 decisions) and
the controller's CPU use while idle with four heartbeating ranks.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from dpcore.auto import baseline_policy

MODES = ("dpcore", "pickle", "proxy")
#: ``--record``: the dpcore loop again, recording every request (``dpcore serve --record``).
RECORD = "record"
#: Who runs the baseline policy, for the error when no distribution declares one.
BASELINE_USER = "dpcore bench's dpcore loop"
BASELINE_REMEDY = "it needs exactly one"
#: Of a recorded request's 15 block hashes, how many every request shares (a system prompt);
#: the rest are new, so the recorder salts them instead of finding them in its cache.
SHARED_BLOCKS = 4
REPORT_EVERY = 256
#: A drained receiver reports what it finished at most this often. Ranks report on a step-like
#: cadence of their own, not each time their socket runs dry: SGLang's scheduler publishes its
#: load snapshot at most once per scheduler step (``Scheduler.publish_load_snapshot``, forced
#: on prefill steps, else every ``load_snapshot_publish_interval`` = 15 decode steps), and
#: dpcore's simulator and mock ranks take a 25 ms decode step (``decode_step_s``) and report
#: every 15 steps or 100 ms. 25 ms is one such step: a report per step of the rank's own.
REPORT_GAP_S = 0.025
HEARTBEAT_S = 0.5

# ----------------------------------------------------------------------------- processes
# Everything below runs in spawned children; imports stay inside so spawning is cheap.


def _quiet() -> None:
    from dpcore import log

    log.configure("warning")


def _token_ids(n: int) -> list[int]:
    # Deterministic, vocab-sized ids (the values do not matter, their count does).
    return [(i * 7919 + 13) % 151_000 for i in range(n)]


def _router(mode: str, eps: dict[str, Any], ready: Any, writer_path: Any = None) -> None:
    import zmq

    _quiet()
    if mode in ("dpcore", RECORD):
        from dpcore.manager import PolicyManager
        from dpcore.runtime.controller import Controller, ControllerEndpoints

        live = baseline_policy(BASELINE_USER, remedy=BASELINE_REMEDY)
        manager = PolicyManager.from_method(live, dp_size=len(eps["dispatch"]))
        ce = ControllerEndpoints(eps["ingress"], eps["report"], tuple(eps["dispatch"]))
        shadow = None
        if eps.get("shadow"):
            from dpcore.runtime.shadow import Shadow

            shadow = Shadow(manager, eps["shadow"])
        c = Controller(manager, endpoints=ce, heartbeat_timeout_s=30.0, shadow=shadow)
        signal.signal(signal.SIGTERM, lambda *_: c.request_stop(0.0))
        rec = None
        if mode == RECORD:
            from dpcore.runtime.recorder import Recorder, RecordConfig

            rec = Recorder(RecordConfig(path=eps["record"]))
            rec.start()
            rec.install(c)
            if writer_path is not None:  # how the writer process formats lines, as it said
                writer_path.value = (rec.writer_path or "unknown").encode()
        ready.set()
        c.run()
        if rec is not None:
            rec.close()
        return
    ctx = zmq.Context()
    ingress = ctx.socket(zmq.PULL)
    ingress.bind(eps["ingress"])
    if mode == "proxy":
        backend = ctx.socket(zmq.PUSH)
        backend.bind(eps["dispatch"][0])
        ready.set()
        zmq.proxy(ingress, backend)  # runs until the process is terminated
        return
    from dpcore.bench_baseline import pickle_loop

    workers = []
    for ep in eps["dispatch"]:
        s = ctx.socket(zmq.PUSH)
        s.bind(ep)
        workers.append(s)
    ready.set()
    pickle_loop(ingress, workers)


def _receiver(mode: str, rank: int, eps: dict[str, Any], counts: Any, first: Any, last: Any, ready: Any, stop: Any) -> None:
    import msgpack
    import zmq

    from dpcore import wire

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.linger = 0
    pull.connect(eps["dispatch"][0 if mode == "proxy" else rank])
    report = None
    epoch = time.time_ns()
    rseq = 0
    done: list[int] = []
    last_report = 0.0

    def send_report() -> None:
        nonlocal rseq, last_report
        rseq += 1
        ack = done[-1] if done else -1
        report.send(wire.encode_load(rank, epoch=epoch, seq=rseq, ack=ack, done=done), zmq.NOBLOCK)  # type: ignore[union-attr]
        done.clear()
        last_report = time.monotonic()

    if mode in ("dpcore", RECORD):
        report = ctx.socket(zmq.PUSH)
        report.linger = 0
        report.connect(eps["report"])
        send_report()
    ready.set()
    unpack = msgpack.unpackb
    n = 0
    recv = pull.recv_multipart
    gap_ms = int(REPORT_GAP_S * 1000)
    while not stop.is_set():
        # With finished work unreported, wake within one gap to report it.
        if not pull.poll(gap_ms if done else 100):
            if report is not None and time.monotonic() - last_report > (REPORT_GAP_S if done else HEARTBEAT_S):
                send_report()
            continue
        while True:
            try:
                frames = recv(zmq.NOBLOCK, copy=False)  # the same cheap receive in every mode
            except zmq.Again:
                break
            if n == 0:
                first[rank] = time.monotonic()
            n += 1
            if report is not None:
                done.append(unpack(frames[0])["seq"])
                if len(done) >= REPORT_EVERY:
                    send_report()
        last[rank] = time.monotonic()
        counts[rank] = n
        if report is not None and done and time.monotonic() - last_report >= REPORT_GAP_S:
            send_report()
    pull.close()
    if report is not None:
        report.close()
    ctx.term()


def _sender(mode: str, ingress: str, count: int, tokens: int, cpu: Any = None) -> None:
    """Send *count* requests; *cpu*: a shared double that gets the CPU seconds spent sending."""
    import zmq

    from dpcore import wire
    from dpcore.hashing import block_hashes

    ids = _token_ids(tokens)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.connect(ingress)
    if mode == "pickle":
        from dpcore.bench_baseline import send_requests

        t0 = time.process_time()
        send_requests(s, count, ids)
    else:
        payload = wire.pack_token_ids(ids)
        bh = block_hashes(ids)
        reply = "ipc:///nonexistent/dpcore-bench-reply"  # nothing is rejected in the benchmark
        enc = wire.encode_request
        send = s.send_multipart
        hashes = [bh] * count
        if mode == RECORD:
            # Made before the first send (outside the measured span): headers of the same
            # size, with mostly new prefixes for the recorder to salt.
            import random

            rng = random.Random(0)
            shared = bh[:SHARED_BLOCKS]
            hashes = [(*shared, *(rng.getrandbits(63) for _ in range(len(bh) - len(shared)))) for _ in range(count)]
        t0 = time.process_time()
        for i in range(count):
            send((enc(f"r{i}", num_tokens=tokens, reply=reply, block_hashes=hashes[i]), payload))
    s.close(linger=-1)  # deliver everything before exiting
    ctx.term()
    if cpu is not None:
        cpu.value = time.process_time() - t0


def _cpu_seconds(pid: int) -> float | None:
    """User+system CPU time of process *pid* (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    """The child processes of *pid* (Linux /proc; the recording's writer process)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _settled_cpu(pids: list[int], quiet_s: float = 0.3, limit_s: float = 20.0) -> float:
    """CPU seconds of *pids* once they stop using CPU (a writer still catching up finishes first)."""
    total = sum(_cpu_seconds(p) or 0.0 for p in pids)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(quiet_s)
        now = sum(_cpu_seconds(p) or 0.0 for p in pids)
        if now == total:
            break
        total = now
    return total


# ----------------------------------------------------------------------------- one run


def forward_once(
    mode: str, count: int, tokens: int, dp_size: int, idle_s: float = 0.0, shadow: str | None = None
) -> dict[str, Any]:
    """One forwarding run; returns msgs/s (and idle CPU % of the router when *idle_s*).

    *shadow*: a shadow chain beside dpcore's live one (:mod:`dpcore.runtime.shadow`)."""
    from dpcore.sdk import endpoints as ep

    ctx = mp.get_context("spawn")
    run_dir = ep.make_run_dir("dpcore-bench-")
    eps = {
        "ingress": ep.ipc(run_dir, "in"),
        "report": ep.ipc(run_dir, "rep"),
        "dispatch": [ep.ipc(run_dir, f"r{r}") for r in range(dp_size)],
        "record": os.path.join(run_dir, "record.jsonl"),
        "shadow": shadow,
    }
    counts = ctx.Array("q", dp_size, lock=False)
    sender_cpu = ctx.Value("d", -1.0, lock=False)
    first = ctx.Array("d", dp_size, lock=False)
    last = ctx.Array("d", dp_size, lock=False)
    stop = ctx.Event()
    router_ready = ctx.Event()
    writer_path = ctx.Array("c", 32, lock=False)
    router = ctx.Process(target=_router, args=(mode, eps, router_ready, writer_path), daemon=True)
    procs = []
    out: dict[str, Any] = {}
    try:
        router.start()
        if not router_ready.wait(30):
            raise RuntimeError(f"bench: the {mode} router did not start")
        readies = []
        for r in range(dp_size):
            ready = ctx.Event()
            p = ctx.Process(target=_receiver, args=(mode, r, eps, counts, first, last, ready, stop), daemon=True)
            p.start()
            procs.append(p)
            readies.append(ready)
        for ready in readies:
            if not ready.wait(30):
                raise RuntimeError("bench: a receiver did not start")
        time.sleep(0.3)  # let every connection finish its handshake
        cpu0 = _cpu_seconds(router.pid)  # type: ignore[arg-type]
        writers = _children(router.pid) if mode == RECORD else []  # type: ignore[arg-type]
        wcpu0 = sum(_cpu_seconds(p) or 0.0 for p in writers)
        receivers = [p.pid for p in procs]
        rcpu0 = [_cpu_seconds(p) for p in receivers]  # type: ignore[arg-type]
        sender = ctx.Process(target=_sender, args=(mode, eps["ingress"], count, tokens, sender_cpu), daemon=True)
        sender.start()
        procs.append(sender)
        deadline = time.monotonic() + 30 + count / 2000
        while sum(counts) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench: {mode} delivered {sum(counts)} of {count} messages in time")
            time.sleep(0.01)
        cpu1 = _cpu_seconds(router.pid)  # type: ignore[arg-type]
        rcpu1 = [_cpu_seconds(p) for p in receivers]  # type: ignore[arg-type]
        if cpu0 is not None and cpu1 is not None:
            out["router_cpu_us_per_msg"] = (cpu1 - cpu0) / count * 1e6
        if writers:
            # All the run's work of the writer process, also what it did after the last reply.
            out["writer_cpu_us_per_msg"] = (_settled_cpu(writers) - wcpu0) / count * 1e6
        sender.join(10)
        parts = [sender_cpu.value if sender_cpu.value >= 0 else None, *rcpu0, *rcpu1]
        if "router_cpu_us_per_msg" in out and None not in parts:
            # Every process of the loop: sender, controller, receivers and (recording) writer.
            spent = sender_cpu.value + sum(rcpu1) - sum(rcpu0)  # type: ignore[arg-type]
            out["loop_cpu_us_per_msg"] = (
                out["router_cpu_us_per_msg"] + out.get("writer_cpu_us_per_msg", 0.0) + spent / count * 1e6
            )
        time.sleep(0.05)
        span = max(last) - min(first[r] for r in range(dp_size) if counts[r])
        out["msgs_per_s"] = count / span if span > 0 else float("inf")
        out["per_rank"] = list(counts)
        if idle_s > 0:
            time.sleep(0.5)  # the last reports settle
            c0 = _cpu_seconds(router.pid)  # type: ignore[arg-type]
            t0 = time.monotonic()
            time.sleep(idle_s)
            c1 = _cpu_seconds(router.pid)  # type: ignore[arg-type]
            if c0 is not None and c1 is not None:
                out["idle_cpu_percent"] = 100.0 * (c1 - c0) / (time.monotonic() - t0)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
        router.terminate()
        router.join(10)
        for p in [*procs, router]:
            if p.is_alive():
                p.kill()
                p.join(5)
        if mode == RECORD:
            out["recorded"] = _recorded_requests(eps["record"])
            out["writer_path"] = writer_path.value.decode()
        ep.remove_run_dir(run_dir)
    return out


def _recorded_requests(path: str) -> int:
    """Lines (one a request) in the recording at *path* and its rotated files, once the writer ended."""
    p = Path(path)
    return sum(f.read_bytes().count(b"\n") for f in p.parent.glob(p.stem + "*"))


# ----------------------------------------------------------------------------- policies


def policy_costs(decisions: int, tokens: int, dp_size: int = 4) -> dict[str, float]:
    """µs per decision (select + dispatched through the hooks) for each installed policy."""
    import msgpack

    from dpcore.cacheindex import STORED, KvEventBatch
    from dpcore.discovery import available, load_policy_class
    from dpcore.hashing import block_hashes
    from dpcore.manager import PolicyManager
    from dpcore.model import LoadReport, Request
    from dpcore.policy import NEEDS_BLOCK_HASHES, capabilities

    installed = available()
    base = _token_ids(tokens)
    prefixes = [block_hashes([p * 1_000_003 + t for t in base]) for p in range(64)]
    # Each request has its own hashes, as one decoded from the wire does: a policy comparing a
    # prompt with one it stored pays for the comparison, not a pointer test.
    reqs = [
        Request(f"r{i}", tokens, tuple(msgpack.unpackb(msgpack.packb(prefixes[i % 64]))),
                bootstrap_room=i * 2654435761 % (1 << 40))
        for i in range(min(decisions, 4096))
    ]
    out: dict[str, float] = {}
    # "<name>+kv", for each policy that reads block hashes: every rank publishes KV events
    # (one stored batch per dispatch, applied to the controller's cache index inside the
    # timed loop: the index update counts).
    hashing = [n for n in sorted(installed) if NEEDS_BLOCK_HASHES in capabilities(load_policy_class(n))]
    runs = [(n, False) for n in sorted(installed)] + [(n, True) for n in hashing]
    for name, kv in runs:
        m = PolicyManager.from_method(name, dp_size=dp_size)
        select, dispatched, report = m.select, m.dispatched, m.report
        apply = m.cache.apply
        kv_seq = [0] * dp_size
        if kv:
            for r in range(dp_size):
                apply(KvEventBatch(r, 0, 0, ()))
                kv_seq[r] = 1
        seqs = [0] * dp_size
        acked = [-1] * dp_size
        t0 = time.perf_counter()
        for i in range(decisions):
            req = reqs[i % len(reqs)]
            rank = select(req)
            acked[rank] = dispatched(req, rank)
            if kv:
                apply(KvEventBatch(rank, 0, kv_seq[rank], ((STORED, None, req.block_hashes),)))
                kv_seq[rank] += 1
            if i % REPORT_EVERY == REPORT_EVERY - 1:
                for r in range(dp_size):
                    seqs[r] += 1
                    report(LoadReport(r, 0, seqs[r], acked[r], 1, 0, tokens))
        out[name + ("+kv" if kv else "")] = (time.perf_counter() - t0) / decisions * 1e6
    return out


# ----------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=100_000, help="requests per run (default 100000)")
    p.add_argument("--tokens", type=int, default=1000, help="token ids per request (default 1000)")
    p.add_argument("--dp-size", type=int, default=4, help="ranks (default 4)")
    p.add_argument("--repeat", type=int, default=3, help="runs per loop; the median is reported (default 3)")
    p.add_argument("--decisions", type=int, default=50_000, help="decisions timed per policy (default 50000)")
    p.add_argument("--idle-seconds", type=float, default=3.0, help="idle CPU measurement window (default 3)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--shadow-policy", default=None, metavar="NAME",
                   help="run dpcore's loop with this shadow chain beside its live policy (its cost)")  # fmt: skip
    p.add_argument(
        "--record",
        action="store_true",
        help="also run the dpcore loop recording every request (dpcore serve --record; mostly new "
        "prefixes per request) and show what recording costs",
    )
    p.add_argument(
        "--sglang",
        action="store_true",
        help="instead: SGLang's own controller loop without and with the dpcore-sglang adapter "
        "(30000 requests, idle CPU over 5 s; --tokens, --dp-size, --repeat and --json apply)",
    )


def run_sglang(args: argparse.Namespace) -> int:
    """``--sglang``: hand over to the adapter's benchmark (adapters/sglang)."""
    from dpcore.errors import ConfigError

    try:
        from dpcore_sglang.bench import main
    except ImportError as exc:
        msg = "dpcore bench --sglang needs dpcore-sglang: pip install --no-deps -e adapters/sglang (make setup does)"
        raise ConfigError(msg) from exc
    argv = ["--tokens", str(args.tokens), "--dp-size", str(args.dp_size), "--repeat", str(args.repeat)]
    return main(argv + (["--json", args.json] if args.json else []))


def run(args: argparse.Namespace) -> int:
    if args.sglang:
        return run_sglang(args)
    # The baseline ships in dpcore-bench: without it, one line naming the extra, before any
    # process starts.
    import dpcore.bench_baseline  # noqa: F401
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from dpcore.errors import ConfigError

    if args.count < 100 or args.repeat < 1 or args.dp_size < 1 or args.tokens < 1 or args.decisions < 1:
        msg = "--count must be >= 100 and --repeat, --dp-size, --tokens, --decisions >= 1"
        raise ConfigError(msg)
    # Before any process starts: a role nobody declares is one line.
    live = baseline_policy(BASELINE_USER, remedy=BASELINE_REMEDY)
    console = Console()
    modes = (*MODES, RECORD) if args.record else MODES
    runs: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    writer_cpu: list[float] = []
    recorded: list[int] = []
    writer_paths: set[str] = set()
    loop_cpu: dict[str, list[float]] = {m: [] for m in modes}
    idle = None
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("forwarding", total=args.repeat * len(modes))
        for i in range(args.repeat):
            # Interleave the loops so drift on a shared machine hits all of them alike.
            for mode in modes:
                progress.update(task, description=f"{mode} run {i + 1}/{args.repeat}")
                measure_idle = mode == "dpcore" and i == args.repeat - 1
                res = forward_once(mode, args.count, args.tokens, args.dp_size, args.idle_seconds if measure_idle else 0.0,
                                   shadow=args.shadow_policy)  # fmt: skip
                runs[mode].append(res["msgs_per_s"])
                if "router_cpu_us_per_msg" in res:
                    cpu[mode].append(res["router_cpu_us_per_msg"])
                if "writer_cpu_us_per_msg" in res:
                    writer_cpu.append(res["writer_cpu_us_per_msg"])
                if "recorded" in res:
                    recorded.append(res["recorded"])
                    writer_paths.add(res["writer_path"])
                if "loop_cpu_us_per_msg" in res:
                    loop_cpu[mode].append(res["loop_cpu_us_per_msg"])
                if measure_idle:
                    idle = res.get("idle_cpu_percent")
                progress.advance(task)
        progress.update(task, description="policy decisions")
        costs = policy_costs(args.decisions, args.tokens, args.dp_size)
    med = {m: statistics.median(v) for m, v in runs.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items() if v}
    vs_pickle = med["dpcore"] / med["pickle"]
    vs_proxy = med["dpcore"] / med["proxy"]

    shadowed = f", dpcore with shadow {args.shadow_policy}" if args.shadow_policy else ""
    t = Table(title=f"forwarding: {args.count:,} requests x {args.tokens} token ids, {args.dp_size} ranks, ipc{shadowed}")
    for col in ("loop", "msgs/s", "runs", "dpcore is", "CPU µs/msg"):
        t.add_column(col, justify="right" if col != "loop" else "left")
    labels = {"dpcore": f"dpcore ({live})", "pickle": "pickle loop", "proxy": "zmq.proxy (C)",
              RECORD: "dpcore, recording"}  # fmt: skip
    for mode in modes:
        ratio = "" if mode == "dpcore" else f"{med['dpcore'] / med[mode]:.2f}x"
        router_cpu = f"{med_cpu[mode]:.1f}" if mode in med_cpu else "?"
        t.add_row(labels[mode], f"{med[mode]:,.0f}", " / ".join(f"{x:,.0f}" for x in runs[mode]), ratio, router_cpu)
    console.print(t)
    console.print(
        "dpcore: the controller with load reports flowing; pickle loop: recv_pyobj -> round robin"
        " -> send_pyobj; zmq.proxy: libzmq's C proxy, the transport ceiling. CPU µs/msg: the"
        " router process's CPU time (all threads) per message."
    )
    console.print(f"dpcore / pickle loop = {vs_pickle:.2f}x msgs/s")
    console.print(f"dpcore / zmq.proxy   = {vs_proxy:.2f}x msgs/s")
    if args.record:
        console.print(
            f"dpcore recording / not recording = {med[RECORD] / med['dpcore']:.3f}x msgs/s "
            f"(recording costs {100 * (1 - med[RECORD] / med['dpcore']):.1f}% of forwarding throughput)"
        )
        console.print(f"the recording's writer formats lines in its {' / '.join(sorted(writer_paths))} path")
        if writer_cpu and RECORD in med_cpu and "dpcore" in med_cpu:
            console.print(
                f"recording's CPU per request: controller {med_cpu[RECORD] - med_cpu['dpcore']:+.1f} µs, "
                f"writer process {statistics.median(writer_cpu):.1f} µs (medians)"
            )
        short = [n for n in recorded if n < args.count]
        if short:
            console.print(f"[red]the recording missed requests: {' / '.join(map(str, recorded))} lines of "
                          f"{args.count:,} a run (dropped when the writer's queue was full); the figures "
                          "above understate recording's cost[/red]")  # fmt: skip
        else:
            console.print(f"every request was recorded: {args.count:,} lines in each of {len(recorded)} runs")
        if loop_cpu[RECORD] and loop_cpu["dpcore"]:
            plain, rec = statistics.median(loop_cpu["dpcore"]), statistics.median(loop_cpu[RECORD])
            console.print(
                f"the whole loop's CPU per request (sender, controller, receivers, writer): {plain:.1f} µs, "
                f"recording {rec:.1f} µs (medians); on cores with no idle time that is "
                f"{100 * (1 - plain / rec):.1f}% of forwarding throughput"
            )
            lo_hi = {m: f"{min(v):.1f} to {max(v):.1f}" for m, v in loop_cpu.items() if v}
            console.print(f"over the {args.repeat} runs, the whole loop's CPU per request ranged {lo_hi['dpcore']} µs "
                          f"(not recording) and {lo_hi[RECORD]} µs (recording); msgs/s "
                          f"{min(runs['dpcore']):,.0f} to {max(runs['dpcore']):,.0f} and "
                          f"{min(runs[RECORD]):,.0f} to {max(runs[RECORD]):,.0f}")  # fmt: skip
    pt = Table(
        title=f"policy decision cost through the hooks (select + dispatched, no sockets), "
        f"{args.dp_size} ranks, {args.tokens}-token prompts"
    )
    pt.add_column("policy")
    pt.add_column("µs / decision", justify="right")
    for name, us in costs.items():
        pt.add_row(name, f"{us:.2f}")
    console.print(pt)
    if idle is not None:
        console.print(f"idle controller CPU: {idle:.2f}% of a core over {args.idle_seconds:g}s")
    if args.json:
        result = {
            "dpcore_msgs_per_s": med["dpcore"],
            "pickle_loop_msgs_per_s": med["pickle"],
            "zmq_proxy_msgs_per_s": med["proxy"],
            "dpcore_vs_pickle_loop": vs_pickle,
            "dpcore_vs_zmq_proxy": vs_proxy,
            "runs": runs,
            "router_cpu_us_per_msg": med_cpu,
            "policy_decision_us": costs,
            "idle_cpu_percent": idle,
            "count": args.count,
            "tokens": args.tokens,
            "dp_size": args.dp_size,
            "repeat": args.repeat,
            "cpus": os.cpu_count(),
        }
        if args.record:
            result["dpcore_recording_msgs_per_s"] = med[RECORD]
            result["recording_vs_dpcore"] = med[RECORD] / med["dpcore"]
            result["record_writer_cpu_us_per_msg"] = statistics.median(writer_cpu) if writer_cpu else None
            result["recorded_per_run"] = recorded
            result["record_writer_path"] = sorted(writer_paths)
            result["loop_cpu_us_per_msg"] = {m: statistics.median(v) for m, v in loop_cpu.items() if v}
            # Each run's figures too, for their spread (msgs/s per run are in "runs").
            result["loop_cpu_us_per_msg_runs"] = {m: v for m, v in loop_cpu.items() if v}
            result["record_writer_cpu_us_per_msg_runs"] = writer_cpu
        Path(args.json).write_text(json.dumps(result, indent=2))
        console.print(f"wrote {args.json}")
    return 0
