"""Prometheus metrics of a running controller.

The controller counts in plain integers on its hot path; this collector turns them into
metric families when ``/metrics`` is scraped, so a request costs no metric call at all. The
scrape runs on the metrics server's thread and reads one :meth:`Controller.snapshot
<dpcore.runtime.controller.Controller.snapshot>`, taken on the controller's loop thread, so
the numbers of one scrape are consistent with each other.
Label cardinality is bounded: ``rank`` (``dp_size`` values), ``code`` (reject/fail codes,
a small fixed set), ``reason``/``outcome`` of aborts (fixed sets: unknown reasons count as
``other``), and ``policy``/``reason`` pairs, capped by the controller at
:data:`~dpcore.runtime.books.MAX_REASONS` (beyond it: ``reason="other"``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from dpcore.errors import ConfigError
from dpcore.runtime.books import LATENCY_BUCKETS

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
        s = self.c.snapshot()
        ranks = s["per_rank"]

        def col(key: str) -> list[int]:
            return [row[key] for row in ranks]

        yield CounterMetricFamily("dpcore_requests_received", "Requests received at the ingress", value=s["received"])
        yield _per_rank("dpcore_rank_dispatched", "Requests dispatched to the rank", col("dispatched"))
        yield _per_rank("dpcore_rank_completed", "Requests the rank reported done", col("completed"))
        yield _per_rank("dpcore_rank_failed", "Requests failed on the rank (it died, or shutdown)", col("failed"))
        yield _per_rank("dpcore_rank_rejected", "Requests rejected that named or chose the rank", col("rejected"))
        yield _per_rank(
            "dpcore_rank_redispatched", "Unadmitted requests moved off the rank when it died", col("redispatched")
        )
        yield _per_rank("dpcore_rank_in_flight_requests", "Dispatched, not completed or failed", col("in_flight"), GaugeMetricFamily)
        yield _per_rank(
            "dpcore_rank_in_flight_tokens", "Prompt tokens of in-flight requests", s["in_flight_tokens"], GaugeMetricFamily
        )
        requests, tokens = s["load_requests"], s["load_tokens"]
        yield _per_rank(
            "dpcore_rank_load_requests", "Effective requests (last report + unacknowledged)", requests, GaugeMetricFamily
        )
        yield _per_rank(
            "dpcore_rank_load_tokens", "Effective tokens (last report + unacknowledged)", tokens, GaugeMetricFamily
        )
        yield _per_rank("dpcore_rank_active", "1 if the rank is alive", [int(a) for a in col("active")], GaugeMetricFamily)
        imb = GaugeMetricFamily("dpcore_load_imbalance", "max/mean effective load over active ranks", labels=["load"])
        active = s["active_ranks"]
        imb.add_metric(["requests"], imbalance([requests[r] for r in active]))
        imb.add_metric(["tokens"], imbalance([tokens[r] for r in active]))
        yield imb
        rej = CounterMetricFamily("dpcore_rejected", "Requests rejected, by code", labels=["code"])
        for code, n in sorted(s["rejected_by_code"].items()):
            rej.add_metric([code], n)
        yield rej
        fail = CounterMetricFamily("dpcore_failed", "Requests failed after dispatch, by code", labels=["code"])
        for code, n in sorted(s["failed_by_code"].items()):
            fail.add_metric([code], n)
        yield fail
        aborts = CounterMetricFamily(
            "dpcore_aborts", "Aborts received, by the reason their sender gave and what became of them",
            labels=["reason", "outcome"],
        )  # fmt: skip
        for (reason, outcome), n in sorted(s["aborts_by_reason_outcome"].items()):
            aborts.add_metric([reason, outcome], n)
        yield aborts
        dec = CounterMetricFamily("dpcore_decisions", "Rank decisions by policy and reason", labels=["policy", "reason"])
        for (policy, reason), n in sorted(s["decision_reasons"].items()):
            dec.add_metric([policy or "none", reason or "none"], n)
        yield dec
        counts = s["latency_counts"]
        buckets = []
        acc = 0
        for bound, n in zip([*map(str, LATENCY_BUCKETS), "+Inf"], counts):
            acc += n
            buckets.append((bound, acc))
        yield HistogramMetricFamily(
            "dpcore_decision_latency_seconds", "Time in the policy chain per decision", buckets=buckets, sum_value=s["latency_sum"]
        )
        yield CounterMetricFamily("dpcore_bad_frames", "Ingress frames that could not be decoded", value=s["bad_frames"])
        yield CounterMetricFamily("dpcore_bad_reports", "Load reports that could not be decoded", value=s["bad_reports"])
        yield CounterMetricFamily("dpcore_stale_reports", "Load reports older than one already applied", value=s["stale_reports"])
        yield CounterMetricFamily(
            "dpcore_loop_stalls", "Liveness checks that ran late because the loop was held up", value=s["loop_stalls"]
        )
        yield CounterMetricFamily(
            "dpcore_policy_overruns", "Policy chain calls longer than --policy-budget-ms", value=s["policy_overruns"]
        )
        yield CounterMetricFamily(
            "dpcore_unconnected_reports",
            "Load reports for a rank with no connection on its dispatch socket (not signs of life)",
            value=s["unconnected_reports"],
        )
        yield CounterMetricFamily(
            "dpcore_unproven_restarts",
            "Reports claiming a new life for a live rank without a reconnection on its dispatch socket (dropped)",
            value=s["unproven_restarts"],
        )


class ThreadsCollector(Collector):
    """Restarts of the process's supervised threads (:mod:`dpcore.runtime.supervise`)."""

    def __init__(self, threads: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.threads = threads

    def collect(self) -> Iterator[Any]:
        fam = CounterMetricFamily(
            "dpcore_thread_restarts", "Times a background thread raised and was restarted", labels=["thread"]
        )
        alive = GaugeMetricFamily("dpcore_thread_alive", "1 if the background thread is running", labels=["thread"])
        for name, t in sorted(self.threads().items()):
            fam.add_metric([name], t["restarts"])
            alive.add_metric([name], int(bool(t["alive"])))
        yield fam
        yield alive


def make_registry(
    controller: Controller,
    threads: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
    extra: Sequence[Collector] = (),
) -> CollectorRegistry:
    """A registry with only the controller's metrics (no process/platform collectors), and
    *extra* collectors (e.g. policy swaps)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ControllerCollector(controller))
    if threads is not None:
        reg.register(ThreadsCollector(threads))
    for collector in extra:
        reg.register(collector)
    return reg


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Scrapes are not logged (every few seconds, forever)."""


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def _unready(environ: Any, start_response: Any) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"the controller is starting\n"]


def bind(port: int, host: str = "127.0.0.1") -> tuple[WSGIServer, int]:
    """A bound ``/metrics`` server and its port, bound before anything else starts so a taken
    port fails first. Give it the app (:func:`attach`), then run its ``serve_forever`` (in
    a supervised thread).

    Raises :class:`~dpcore.errors.ConfigError` (one line) when *host*:*port* cannot be bound.
    """
    cls = _Server6 if ":" in host else _Server
    try:
        server = make_server(host, port, _unready, cls, _Quiet)
    except OSError as exc:  # taken port, unknown address, no permission
        msg = f"metrics server cannot bind {host}:{port}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    return server, int(server.server_address[1])


def attach(
    server: WSGIServer,
    controller: Controller,
    threads: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
    extra: Sequence[Collector] = (),
) -> None:
    """Serve *controller*'s metrics (and *threads*' restarts, and *extra*) on *server*."""
    server.set_app(make_wsgi_app(make_registry(controller, threads, extra)))
