"""Prometheus metrics of a running controller.

The controller counts in plain integers on its hot path; this collector turns them into
metric families when ``/metrics`` is scraped, so a request costs no metric call at all.
Label cardinality is bounded: ``rank`` (``dp_size`` values), ``code`` (reject/fail codes,
a small fixed set), and ``policy``/``reason`` pairs, capped by the controller at
:data:`~dpcore.runtime.controller.MAX_REASONS` (beyond it: ``reason="other"``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dpcore.runtime.controller import LATENCY_BUCKETS

if TYPE_CHECKING:
    from dpcore.runtime.controller import Controller


def imbalance(loads: Sequence[int]) -> float:
    """max/mean of *loads*; 1.0 is perfect balance (and what an idle cluster reports)."""
    if not loads:
        return 1.0
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean > 0 else 1.0


def _per_rank(name: str, doc: str, values: Sequence[float], kind: type = CounterMetricFamily) -> Any:
    fam = kind(name, doc, labels=["rank"])
    for r, v in enumerate(values):
        fam.add_metric([str(r)], v)
    return fam


class ControllerCollector(Collector):
    """Reads a :class:`~dpcore.runtime.controller.Controller`'s counters at scrape time."""

    def __init__(self, controller: Controller) -> None:
        self.c = controller

    def collect(self) -> Iterator[Any]:
        c = self.c
        ledger = c.ledger
        yield CounterMetricFamily("dpcore_requests_received", "Requests received at the ingress", value=c.received)
        yield _per_rank("dpcore_rank_dispatched", "Requests dispatched to the rank", c.dispatched)
        yield _per_rank("dpcore_rank_completed", "Requests the rank reported done", c.completed)
        yield _per_rank("dpcore_rank_failed", "Requests failed on the rank (it died, or shutdown)", c.failed)
        yield _per_rank("dpcore_rank_rejected", "Requests rejected that named or chose the rank", c.rejected)
        yield _per_rank(
            "dpcore_rank_redispatched", "Unadmitted requests moved off the rank when it died", c.redispatched
        )
        yield _per_rank("dpcore_rank_in_flight_requests", "Dispatched, not completed or failed", c.in_flight(), GaugeMetricFamily)
        yield _per_rank(
            "dpcore_rank_in_flight_tokens", "Prompt tokens of in-flight requests", c.in_flight_tokens(), GaugeMetricFamily
        )
        yield _per_rank(
            "dpcore_rank_load_requests", "Effective requests (last report + unacknowledged)", ledger.requests, GaugeMetricFamily
        )
        yield _per_rank(
            "dpcore_rank_load_tokens", "Effective tokens (last report + unacknowledged)", ledger.tokens, GaugeMetricFamily
        )
        yield _per_rank(
            "dpcore_rank_active", "1 if the rank is alive", [int(ledger.is_active(r)) for r in range(c.dp_size)], GaugeMetricFamily
        )
        imb = GaugeMetricFamily("dpcore_load_imbalance", "max/mean effective load over active ranks", labels=["load"])
        active = ledger.active_ranks
        imb.add_metric(["requests"], imbalance([ledger.requests[r] for r in active]))
        imb.add_metric(["tokens"], imbalance([ledger.tokens[r] for r in active]))
        yield imb
        rej = CounterMetricFamily("dpcore_rejected", "Requests rejected, by code", labels=["code"])
        for code, n in sorted(c.rejected_by_code.items()):
            rej.add_metric([code], n)
        yield rej
        fail = CounterMetricFamily("dpcore_failed", "Requests failed after dispatch, by code", labels=["code"])
        for code, n in sorted(c.failed_by_code.items()):
            fail.add_metric([code], n)
        yield fail
        dec = CounterMetricFamily("dpcore_decisions", "Rank decisions by policy and reason", labels=["policy", "reason"])
        for (policy, reason), n in sorted(dict(c.decision_reasons).items()):
            dec.add_metric([policy or "none", reason or "none"], n)
        yield dec
        counts = list(c.latency_counts)
        buckets = []
        acc = 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
            acc += n
            buckets.append((bound, acc))
        yield HistogramMetricFamily(
            "dpcore_decision_latency_seconds", "Time in the policy chain per decision", buckets=buckets, sum_value=c.latency_sum
        )
        yield CounterMetricFamily("dpcore_bad_frames", "Ingress frames that could not be decoded", value=c.bad_frames)
        yield CounterMetricFamily("dpcore_bad_reports", "Load reports that could not be decoded", value=c.bad_reports)


def make_registry(controller: Controller) -> CollectorRegistry:
    """A registry with only the controller's metrics (no process/platform collectors)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ControllerCollector(controller))
    return reg


def serve(controller: Controller, port: int, host: str = "127.0.0.1") -> tuple[Any, int]:
    """Serve ``/metrics`` in a daemon thread; returns the server and the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=make_registry(controller))
    return server, int(server.server_address[1])
