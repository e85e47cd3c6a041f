"""The adapter's Prometheus metrics, served from SGLang's controller process.

The hot path only bumps plain counters on the dispatcher (a dict entry per decision); this
collector turns them into metric families when Prometheus scrapes, on the HTTP server's
thread. It reads without locking: every counter is an int or a dict copied in one call under
the GIL, and counters only grow, so a scrape sees a consistent-enough moment.

Names and labels are the standalone controller's (:mod:`dpcore.runtime.metrics`), so one
dashboard serves both: ``dpcore_decisions_total{policy,reason}``,
``dpcore_rejected_total{code}``, ``dpcore_rank_dispatched_total{rank}``,
``dpcore_bad_frames_total``, plus ``dpcore_lost_peers_total``, ``dpcore_chain_info``, and
``dpcore_block_hashes_total{source}`` (``tokenizer``: computed in SGLang's tokenizer process;
``controller``: computed here) with ``dpcore_block_hashes_refused_total{reason}``;
``dpcore_requests_forwarded_total{path}`` (``forwarded``: sent on as the tokenizer encoded
them; ``decoded``: decoded and encoded again here) with
``dpcore_route_headers_refused_total{reason}``; with ``--dpcore-record``, the recorder's
``dpcore_record_*`` and ``dpcore_record_output_lengths_total{outcome}`` (``received``,
``refused``); with ``--kv-events-config``, ``dpcore_kv_event_gaps_total`` (batches missed in a
rank's KV event stream), ``dpcore_kv_event_gaps_repaired_total`` (filled from the publisher's
replay) and ``dpcore_kv_event_gaps_not_repaired_total{reason}`` (the rank became unknown).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class AdapterCollector:
    """Metric families from a :class:`~dpcore_sglang.adapter.DpcoreDispatcher`'s counters."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def collect(self) -> Iterator[Any]:
        a = self.adapter
        res = a.manager.resolution
        info = GaugeMetricFamily(
            "dpcore_chain_info",
            "The dpcore policy chain in SGLang's controller (value 1)",
            labels=["requested", "chain", "reason", "block_size"],
        )
        info.add_metric([res.requested, ",".join(a.manager.chain), res.reason, str(a.block_size)], 1)
        yield info
        dec = CounterMetricFamily("dpcore_decisions", "Rank decisions by policy and reason", labels=["policy", "reason"])
        for (policy, reason), n in sorted(a.decisions.copy().items()):
            dec.add_metric([policy or "none", reason or "none"], n)
        yield dec
        rej = CounterMetricFamily("dpcore_rejected", "Requests rejected, by code", labels=["code"])
        for code, n in sorted(a.rejected.copy().items()):
            rej.add_metric([code], n)
        yield rej
        disp = CounterMetricFamily("dpcore_rank_dispatched", "Requests dispatched to the rank", labels=["rank"])
        for r, n in enumerate(list(a.dispatched)):
            disp.add_metric([str(r)], n)
        yield disp
        active = GaugeMetricFamily("dpcore_rank_active", "1 if the rank is in rotation", labels=["rank"])
        alive = set(a.ledger.active_ranks)
        for r in range(len(a.dispatched)):
            active.add_metric([str(r)], int(r in alive))
        yield active
        recv = a.ctl.recv_from_tokenizer
        yield CounterMetricFamily(
            "dpcore_bad_frames", "Frames from the tokenizer that could not be decoded", value=getattr(recv, "bad_frames", 0)
        )
        carried = a.carried
        yield _counts(
            "dpcore_block_hashes", "Requests whose block hashes were computed where", "source",
            {"tokenizer": carried.used, "controller": carried.hashed_here},
        )
        yield _counts(
            "dpcore_block_hashes_refused", "Block hashes from the tokenizer refused (then hashed here), by reason",
            "reason", dict(sorted(carried.refused.copy().items())),
        )
        yield _counts(
            "dpcore_requests_forwarded",
            "Requests sent on as the tokenizer encoded them (forwarded) or decoded and encoded again here (decoded)",
            "path", {"forwarded": a.forwarded, "decoded": a.decoded},
        )
        yield _counts(
            "dpcore_route_headers_refused", "Route headers from the tokenizer not used (the request was decoded), by reason",
            "reason", dict(sorted(carried.not_forwarded.copy().items())),
        )
        yield CounterMetricFamily(
            "dpcore_lost_peers", "Sends that found no scheduler connected (rank left rotation)", value=a.lost_peers
        )
        if a.ended is not None:  # --dpcore-record
            lengths = CounterMetricFamily(
                "dpcore_record_output_lengths", "Output lengths from SGLang's tokenizer process", labels=["outcome"]
            )
            lengths.add_metric(["received"], a.ended.received)
            lengths.add_metric(["refused"], a.ended.refused)
            yield lengths
        if a.kv_events is not None:  # --kv-events-config
            yield from kv_event_families(a.kv_events)


def kv_event_families(kv: Any) -> Iterator[Any]:
    """Gaps in the ranks' KV event streams of a :class:`~dpcore_sglang.kv_events.SglangKvEvents`."""
    yield CounterMetricFamily("dpcore_kv_event_gaps", "Batches missed in a rank's KV event stream (gaps in seq)", value=kv.gaps)
    yield CounterMetricFamily(
        "dpcore_kv_event_gaps_repaired", "KV event gaps filled from the publisher's replay buffer", value=kv.repaired
    )
    yield _counts(
        "dpcore_kv_event_gaps_not_repaired", "KV event gaps not filled (the rank became unknown), by reason",
        "reason", dict(kv.not_repaired),
    )


def _counts(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, n in values.items():
        family.add_metric([value], n)
    return family


def make_registry(adapter: Any) -> CollectorRegistry:
    """A registry holding only the adapter's metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(AdapterCollector(adapter))
    if adapter.recorder is not None:  # dpcore serve's dpcore_record_* families
        reg.register(adapter.recorder.collector())
    return reg


def serve(adapter: Any, port: int, host: str = "127.0.0.1") -> int:
    """Serve ``/metrics`` on *host*:*port* from a daemon thread; returns the bound port."""
    server, _thread = start_http_server(port, addr=host, registry=make_registry(adapter))
    return int(server.server_address[1])
