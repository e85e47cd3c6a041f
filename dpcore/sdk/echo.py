"""A minimal rank on the worker SDK: answers each request with its own payload.

The end-to-end tests and ``dpcore bench`` use it as a rank that costs almost nothing::

    python -m dpcore.sdk.echo --rank 0 --dispatch ipc:///tmp/x/rank0 --report ipc:///tmp/x/report

``--delay-s`` keeps every request running for a while (so a rank can die with requests in
flight); ``--no-admit`` makes a stuck rank that receives but never admits anything.
"""

from __future__ import annotations

import argparse
import heapq
import signal
import sys
import time
from collections.abc import Sequence

from dpcore.sdk.worker import Work, Worker


def main(argv: Sequence[str] | None = None) -> int:
    """A minimal rank: answers each request with its payload after ``--delay-s``."""
    p = argparse.ArgumentParser(prog="python -m dpcore.sdk.echo", description=main.__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--dispatch", required=True, help="the controller's dispatch endpoint for this rank")
    p.add_argument("--report", required=True, help="the controller's report endpoint")
    p.add_argument("--delay-s", type=float, default=0.0, help="time each request stays running")
    p.add_argument("--no-admit", action="store_true", help="receive but never admit (a stuck rank)")
    p.add_argument("--extra-load", type=int, default=0, metavar="N",
                   help="report N more waiting requests (and N*100 tokens) than it has: a busy rank")  # fmt: skip
    p.add_argument("--heartbeat-s", type=float, default=0.2)
    args = p.parse_args(argv)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    w = Worker(
        args.rank, dispatch_endpoint=args.dispatch, report_endpoint=args.report,
        heartbeat_interval_s=args.heartbeat_s,
    )  # fmt: skip
    running: list[tuple[float, int, Work]] = []  # heap of (due, seq, work)
    tokens = 0
    if args.extra_load:
        w.report(0, args.extra_load, 100 * args.extra_load)
    while not stop:
        timeout = args.heartbeat_s
        if running:
            timeout = max(0.0, min(timeout, running[0][0] - time.monotonic()))
        items = w.recv(timeout)
        changed = bool(items)
        if not args.no_admit:
            now = time.monotonic()
            for work in items:
                w.admit(work)
                tokens += work.request.num_tokens
                heapq.heappush(running, (now + args.delay_s, work.seq, work))
            now = time.monotonic()
            while running and running[0][0] <= now:
                _, _, work = heapq.heappop(running)
                tokens -= work.request.num_tokens
                meta = {"prompt_tokens": work.request.num_tokens, "completion_tokens": 0}
                if work.prefill_rank is not None:
                    meta["prefill_rank"] = work.prefill_rank
                w.send(work, meta, work.payload)
                changed = True
        if changed:
            w.report(len(running), args.extra_load, tokens + 100 * args.extra_load)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
