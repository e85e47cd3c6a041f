"""``dpcore soak``: a bounded fault soak of a real controller with real mock ranks.

``dpcore serve`` and ``--dp-size`` ``dpcore mock-worker`` processes run on loopback (ipc
sockets in a private directory). A driver sends requests at a steady ``--rate`` through the
client SDK, with ``--bad-fraction`` of them bad (an out-of-range rank, a broken header that
still names its sender, a frame that is not msgpack at all), while a chaos schedule

* SIGKILLs a rank and restarts it a moment later (a crash),
* SIGTERMs a rank and restarts it at once (a controlled restart),
* SIGSTOPs a rank for longer than ``--heartbeat-timeout`` and then SIGCONTs it (a stall),
* SIGSTOPs the controller itself for 2.5 heartbeat timeouts (a loop stall: no healthy rank
  may be declared dead for it),
* floods the load-report channel with broken, out-of-range and stale reports, from this
  process, and then from two other processes at once,
* replaces a rank for a while by a stuck one (it heartbeats but never admits a request:
  what it is sent fails ``rank_stuck`` after ``--admission-timeout``).

``dpcore serve`` also runs its HTTP front. Meanwhile an HTTP client opens streams and
leaves each after its first chunk (the front aborts the request on its rank), then asks
again under the same request id until it is answered, and checks that the answer is the new
request's own; and ``/health`` is polled throughout.

At the end the driver stops sending, waits for every reply, SIGTERMs the controller and
checks the books: every request got exactly one final reply; the controller's counters add
up (received = completed + failed + rejected, dispatched = completed + failed +
redispatched); rejections are exactly the bad requests; failures are ``rank_died`` on a
rank that was being disrupted at the time; every disrupted rank served again without anyone
doing anything; every HTTP request that was left got its own answer when asked again;
``/health`` answered every poll, 200 whenever the controller was not stopped; the
controller exits 0. It prints latency percentiles of the good requests
and the controller's memory over time (the checks are about the books, not speed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dpcore.soak.config import SoakConfig
from dpcore.soak.report import checks, print_figures
from dpcore.soak.runner import Soak

__all__ = ["Soak", "SoakConfig", "add_arguments", "checks", "print_figures", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = SoakConfig()
    p.add_argument("--duration", type=float, default=d.duration_s, help=f"seconds of traffic (default {d.duration_s:g})")
    p.add_argument("--rate", type=float, default=d.rate, help=f"requests per second (default {d.rate:g})")
    p.add_argument("--dp-size", type=int, default=d.dp_size, help=f"mock ranks (default {d.dp_size})")
    p.add_argument("--load-balance-method", default=d.method,
                   help="policy (default: the load-aware baseline the installed distributions declare)")  # fmt: skip
    p.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout_s,
                   help=f"controller's rank heartbeat deadline, seconds (default {d.heartbeat_timeout_s:g})")  # fmt: skip
    p.add_argument("--bad-fraction", type=float, default=d.bad_fraction, help=f"share of bad requests (default {d.bad_fraction})")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the figures as JSON")
    p.add_argument("--workdir", default=None, metavar="DIR", help="keep the processes' logs here (default: a temporary dir)")


def run(args: argparse.Namespace) -> int:
    cfg = SoakConfig(
        duration_s=args.duration, rate=args.rate, dp_size=args.dp_size, method=args.load_balance_method,
        heartbeat_timeout_s=args.heartbeat_timeout, bad_fraction=args.bad_fraction, seed=args.seed,
    )  # fmt: skip
    cfg.check()
    with tempfile.TemporaryDirectory(prefix="dpcore-soak-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        figures = Soak(cfg, workdir).run()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
    print_figures(figures)
    return 0 if all(figures["checks"].values()) else 1
