"""The soak's report: the figures of a finished run, the verdicts on them (the books, never
the speed), and the table ``dpcore soak`` prints.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import TYPE_CHECKING, Any

import attrs

from dpcore.quantile import percentile
from dpcore.soak.config import ADMISSION_TIMEOUT_S, NO_RANK, RESTART_AFTER_S

if TYPE_CHECKING:
    from dpcore.soak.runner import Soak

#: A /health poll this soon after the controller resumed may still see the stall.
HEALTH_STALL_MARGIN_S = 1.0


def figures(run: Soak, counters: dict[str, Any], final: dict[str, Any] | None, exit_code: int, shutdown_s: float,
            pending: list[str], stale: int, bad_replies: int) -> dict[str, Any]:  # fmt: skip
    """The figures of a finished run (what :func:`print_figures` shows and ``--json`` writes),
    with their verdicts (:func:`checks`)."""
    b = run.books
    kinds = Counter(r.kind for r in b.finals.values())
    good_rej = Counter(r.code for rid, r in b.finals.items() if rid in b.good and r.kind == "rej")
    bad_ok = sum(1 for rid, code in b.bad_answered.items() if rid in b.finals and b.finals[rid].code == code)
    fails = [(rid, r) for rid, r in b.finals.items() if r.kind == "fail"]
    latencies = sorted(
        1000 * (b.ended_at[rid] - b.sent_at[rid]) for rid in b.good if rid in b.finals and b.finals[rid].kind == "out"
    )
    _rejoins(run)
    unexplained = [rid for rid, r in fails if not _explained(run, r, b.ended_at[rid])]
    warm = [v for t, v in run.rss if t >= 0.25 * run.cfg.duration_s]
    rss = {
        "start_mb": round(warm[0] / 2**20, 1) if warm else None,
        "end_mb": round(warm[-1] / 2**20, 1) if warm else None,
        "max_mb": round(max(warm) / 2**20, 1) if warm else None,
        "samples": len(run.rss),
    }
    disrupted = [d for d in run.disruptions if d.kind not in NO_RANK]
    c = counters
    figures: dict[str, Any] = {
        "config": attrs.asdict(run.cfg),
        "sent": {"good": len(b.good), "bad_answered": len(b.bad_answered), "bad_unanswered": b.bad_unanswered},
        "replies": {"out": kinds["out"], "fail": kinds["fail"], "rej": kinds["rej"], "pending": len(pending),
                    "duplicates_dropped": stale, "undecodable": bad_replies,
                    "good_rejected": dict(good_rej), "bad_rejected_as_expected": bad_ok,
                    "fail_codes": dict(Counter(r.code for _, r in fails)), "fails_unexplained": len(unexplained),
                    "unexplained": [(r.code, r.rank, round(b.ended_at[rid] - run.t0, 2))
                                    for rid, r in fails if rid in unexplained][:10]},  # fmt: skip
        "controller": {k: c.get(k) for k in ("received", "dispatched", "redispatched", "completed", "failed",
                                             "rejected", "in_flight", "parked", "bad_frames", "reports", "bad_reports",
                                             "stale_reports", "unknown_done", "internal_errors", "balanced",
                                             "loop_stalls",
                                             "rejected_by_code", "failed_by_code")},  # fmt: skip
        "final": final,
        "disruptions": [
            {"kind": d.kind, "rank": d.rank, "at_s": round(d.start - run.t0, 2),
             "rejoined_after_s": None if d.rejoined_after_s is None else round(d.rejoined_after_s, 2)}
            for d in run.disruptions
        ],  # fmt: skip
        "kills": sum(d.kind == "kill" for d in disrupted),
        "restarts": sum(d.kind in ("kill", "term") for d in disrupted),
        "pauses": sum(d.kind == "pause" for d in disrupted),
        "controller_stalls": sum(d.kind == "stall" for d in run.disruptions),
        "loop_stalls_counted": c.get("loop_stalls"),
        "rejoined": sum(d.rejoined_after_s is not None for d in disrupted),
        "disrupted": len(disrupted),
        "flood_frames": {"bad": run.flooded["bad"], "stale": run.flooded["stale"]},
        "stuck": sum(d.kind == "stuck" for d in disrupted),
        "http": attrs.asdict(run.http),
        "health": _health_figures(run),
        "latency_ms": _percentiles(latencies),
        "rss": rss,
        "shutdown": {"exit_code": exit_code, "seconds": round(shutdown_s, 2)},
        "thread_errors": list(run.thread_errors),
    }
    figures["checks"] = checks(figures)
    return figures


def _health_figures(run: Soak) -> dict[str, Any]:
    """/health polls: answered at all, and 200 whenever the controller was not stopped."""
    polls = run.health
    margin = HEALTH_STALL_MARGIN_S

    def in_stall(sent: float, answered: float) -> bool:
        return any(sent <= end + margin and answered >= start for start, end in run.stalls)

    free = [code for sent, answered, code in polls if not in_stall(sent, answered)]
    slowest = max((answered - sent for sent, answered, _ in polls), default=None)
    return {"polls": len(polls), "unanswered": sum(code == 0 for _, _, code in polls),
            "outside_stalls": len(free), "outside_stalls_not_200": sum(code != 200 for code in free),
            "codes": dict(Counter(str(code) for _, _, code in polls)),
            "slowest_s": None if slowest is None else round(slowest, 2)}  # fmt: skip


def _rejoins(run: Soak) -> None:
    """For each disruption: how soon the rank served a request sent after it was back."""
    b = run.books
    served: dict[int, list[tuple[float, float]]] = {}
    for rid, r in b.finals.items():
        if r.kind == "out" and r.rank is not None:
            served.setdefault(r.rank, []).append((b.sent_at[rid], b.ended_at[rid]))
    for d in run.disruptions:
        if d.back is None:
            continue
        after = [end for sent, end in served.get(d.rank, ()) if sent >= d.back]
        if after:
            d.rejoined_after_s = min(after) - d.back


def _explained(run: Soak, reply: Any, at: float) -> bool:
    """A failure is explained by a disruption of its rank that began before it (and
    that the controller noticed within a heartbeat timeout or so)."""
    if reply.code == "rank_stuck":
        # Only the stuck rank: what it was sent until it was replaced fails an admission
        # timeout later (a controller stall may come in between).
        slack = ADMISSION_TIMEOUT_S + 2.5 * run.cfg.heartbeat_timeout_s + 3.0
        return any(d.rank == reply.rank and d.kind == "stuck" and d.start <= at <= (d.back or at) + slack
                   for d in run.disruptions)  # fmt: skip
    if reply.code != "rank_died":
        return False
    limit = 2 * run.cfg.heartbeat_timeout_s + RESTART_AFTER_S + 3.0
    return any(d.rank == reply.rank and d.kind not in NO_RANK and d.start <= at <= d.start + limit
               for d in run.disruptions)  # fmt: skip


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": len(values), "p50": round(percentile(values, 0.5), 2), "p99": round(percentile(values, 0.99), 2),
            "max": round(max(values), 2)}  # fmt: skip


def checks(f: dict[str, Any]) -> dict[str, bool]:
    """The soak's verdicts: the books, not the speed."""
    s, r, c, fin, h, hl = f["sent"], f["replies"], f["controller"], f["final"] or {}, f["http"], f["health"]
    answered = s["good"] + s["bad_answered"]
    # Every HTTP attempt reached the controller and ended there: left (aborted on its rank,
    # counted completed), answered, rejected or failed.
    http_ended = h["left"] + h["ok"] + h["failed"]
    http_sent = http_ended + h["rejected"]
    return {
        "every request got exactly one final reply": r["pending"] == 0 and r["out"] + r["fail"] + r["rej"] == answered,
        "controller: received = completed + failed + rejected": c["in_flight"] == 0 and c["parked"] == 0
        and c["received"] == c["completed"] + c["failed"] + c["rejected"] == answered + http_sent,
        "controller: dispatched = completed + failed + redispatched": c["dispatched"]
        == c["completed"] + c["failed"] + c["redispatched"] and c["balanced"] == {"received": True, "dispatched": True},
        "controller and clients agree": c["rejected"] == r["rej"] + h["rejected"]
        and c["completed"] + c["failed"] == r["out"] + r["fail"] + http_ended,
        "HTTP: each request left after its first chunk got its own answer when asked again": h["requests"] > 0
        and h["ok"] == h["requests"] and h["left"] > 0 and not h["wrong_output"] and not h["gave_up"] and not h["other"],
        "/health answered every poll, 200 while the controller ran": hl["polls"] > 0 and hl["unanswered"] == 0
        and hl["outside_stalls"] > 0 and hl["outside_stalls_not_200"] == 0,
        "rejections are exactly the bad requests": r["bad_rejected_as_expected"] == s["bad_answered"] and not r["good_rejected"],
        "failures only rank_died on a disrupted rank, rank_stuck on the stuck one": r["fails_unexplained"] == 0,
        "bad frames all counted": c["bad_frames"] == s["bad_unanswered"],
        "every flooded report counted, none applied": c["bad_reports"] == f["flood_frames"]["bad"]
        and c["stale_reports"] >= f["flood_frames"]["stale"],
        "every disrupted rank rejoined by itself": f["rejoined"] == f["disrupted"] > 0,
        "a controller stall was counted as the loop's own, not the ranks'": f["controller_stalls"] == 0 or (f["loop_stalls_counted"] or 0) >= 1,
        "no internal errors": c["internal_errors"] == 0,
        "the soak's own threads ran to the end": not f["thread_errors"],
        # A leak grows with traffic; 16 MiB is far above the noise of a flat process.
        "controller memory flat": f["rss"]["end_mb"] is not None and f["rss"]["end_mb"] - f["rss"]["start_mb"] < 16,
        "clean shutdown (exit 0, books balanced)": f["shutdown"]["exit_code"] == 0 and fin.get("balanced") is True,
    }


def print_figures(f: dict[str, Any], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file or sys.stdout)
    cfg = f["config"]
    t = Table(title=f"dpcore soak: {cfg['duration_s']:g}s at {cfg['rate']:g} req/s, {cfg['dp_size']} mock ranks, {cfg['method']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    s, r, c, lat, rss = f["sent"], f["replies"], f["controller"], f["latency_ms"], f["rss"]
    rows = [
        ("requests sent (good / bad answered / bad frames)", f"{s['good']} / {s['bad_answered']} / {s['bad_unanswered']}"),
        ("controller received", c["received"]),
        ("dispatched (incl. re-dispatches)", c["dispatched"]),
        ("completed", c["completed"]),
        ("failed (rank died)", c["failed"]),
        ("re-dispatched (unadmitted on a dead rank)", c["redispatched"]),
        ("rejected", f"{c['rejected']} {c['rejected_by_code']}"),
        ("client finals out / fail / rej", f"{r['out']} / {r['fail']} / {r['rej']}"),
        ("late duplicate outputs dropped by the client", r["duplicates_dropped"]),
        ("ranks killed / SIGTERM-restarted / paused", f"{f['kills']} / {f['restarts'] - f['kills']} / {f['pauses']}"),
        ("controller stalled (SIGSTOP) / loop stalls it counted", f"{f['controller_stalls']} / {f['loop_stalls_counted']}"),
        ("disrupted ranks that rejoined by themselves", f"{f['rejoined']} / {f['disrupted']}"),
        ("report flood: bad / stale frames sent", f"{f['flood_frames']['bad']} / {f['flood_frames']['stale']}"),
        ("stuck rank stood in (times)", f["stuck"]),
        ("HTTP requests left after one chunk / answered when asked again", f"{f['http']['left']} / {f['http']['ok']}"),
        ("HTTP attempts rejected / failed on the way (asked again)", f"{f['http']['rejected']} / {f['http']['failed']}"),
        ("HTTP attempts while the id was still in use (400, asked again)", f["http"]["rid_in_use"]),
        ("/health polls / unanswered / not 200 while the controller ran",
         f"{f['health']['polls']} / {f['health']['unanswered']} / {f['health']['outside_stalls_not_200']}"),
        ("controller counted bad / stale reports", f"{c['bad_reports']} / {c['stale_reports']}"),
        ("latency of good requests p50 / p99 / max (ms)", f"{lat['p50']} / {lat['p99']} / {lat['max']}"),
        ("controller RSS from 25% of the run: start / end / max (MB)", f"{rss['start_mb']} / {rss['end_mb']} / {rss['max_mb']}"),
        ("SIGTERM to exit (s), exit code", f"{f['shutdown']['seconds']}, {f['shutdown']['exit_code']}"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console.print(t)
    for name, ok in f["checks"].items():
        console.print(f"[{'green' if ok else 'bold red'}]{'PASS' if ok else 'FAIL'}[/] {name}")
    for error in f["thread_errors"]:
        console.print(f"[bold red]soak thread[/] {error}")
