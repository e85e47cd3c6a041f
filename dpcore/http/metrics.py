"""Prometheus metrics of one HTTP front, served at its ``/metrics`` (open without the API key).

The front's process has its own counts, which the controller's ``--metrics-port`` cannot
see: requests it ended because their client stopped reading, and replies it dropped. They
are read from :meth:`ControllerLink.stats <dpcore.http.link.ControllerLink.stats>` at
scrape time, so a request costs no metric call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from dpcore.http.link import ControllerLink

#: ``(stats key, metric name, help, kind)`` of each metric.
_METRICS = (
    ("client_too_slow", "dpcore_http_client_too_slow",
     "Requests ended because their client left too many replies unread", CounterMetricFamily),
    ("stale_replies", "dpcore_http_stale_replies",
     "Replies dropped because their request had already ended", CounterMetricFamily),
    ("bad_replies", "dpcore_http_bad_replies", "Replies that could not be decoded", CounterMetricFamily),
    ("aborts_unsent", "dpcore_http_aborts_unsent",
     "Aborts the controller's ingress could not take at once", CounterMetricFamily),
    ("unread_replies_peak", "dpcore_http_unread_replies_peak",
     "The most replies one request held unread", GaugeMetricFamily),
    ("max_unread_replies", "dpcore_http_max_unread_replies",
     "The bound on replies one request holds unread", GaugeMetricFamily),
)  # fmt: skip


class FrontCollector(Collector):
    """Reads a :class:`~dpcore.http.link.ControllerLink`'s counts at scrape time."""

    def __init__(self, link: ControllerLink) -> None:
        self.link = link

    def collect(self) -> Iterator[Any]:
        stats = self.link.stats()
        for key, name, doc, kind in _METRICS:
            yield kind(name, doc, value=stats[key])


def handler(link: ControllerLink) -> Callable[[Request], Awaitable[Response]]:
    """The ``GET /metrics`` endpoint of *link*'s front."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FrontCollector(link))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics
