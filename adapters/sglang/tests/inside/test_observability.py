"""What an operator sees: the adapter's Prometheus metrics and SGLang's server info."""

from __future__ import annotations

import importlib
import time

import pytest
from sglang.srt.server_args import ServerArgs

from dpcore_sglang import server_info
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.testing import free_port, make_request, scrape

pytestmark = pytest.mark.sglang


def test_metrics_count_decisions_rejections_and_name_the_chain(controller):
    port = free_port()
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method="round_robin", metrics_port=port))
    for i in range(5):
        h.send(make_request(f"ok{i}"))
    h.send(make_request("bad", routed_dp_rank=9))
    h.send(make_request("routed", routed_dp_rank=1))
    assert len(h.deliveries(6)) == 6
    assert len(h.answers(1)) == 1
    # A request reaches its rank before the adapter counts its decision: read the metrics
    # once all seven are counted (or at the deadline, and let the asserts say what is off).
    deadline = time.monotonic() + 10.0
    while True:
        m = scrape(port)
        decided = sum(v for (name, _), v in m.items() if name in ("dpcore_decisions_total", "dpcore_rejected_total"))
        if decided >= 7 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    by_policy: dict[str, float] = {}
    for (name, labels), v in m.items():
        if name == "dpcore_decisions_total":
            by_policy[dict(labels)["policy"]] = by_policy.get(dict(labels)["policy"], 0) + v
    assert by_policy == {"round_robin": 5, "router": 1}
    assert m[("dpcore_decisions_total", (("policy", "router"), ("reason", "routed_dp_rank")))] == 1
    assert m[("dpcore_rejected_total", (("code", "invalid_rank"),))] == 1
    assert sum(v for (name, _), v in m.items() if name == "dpcore_rank_dispatched_total") == 6
    info = [labels for (name, labels), v in m.items() if name == "dpcore_chain_info" and v == 1]
    assert info == [(("block_size", "0"), ("chain", "round_robin"), ("reason", "chosen explicitly"), ("requested", "round_robin"))]


def test_bad_metrics_port_is_refused_before_start():
    with pytest.raises(Exception, match="metrics_port must be a port number"):
        AdapterConfig(metrics_port=70000)


def test_server_info_names_the_dpcore_chain(monkeypatch):
    # SGLang's HTTP module needs uvloop, which the CPU test venv does not carry: wrap the
    # function where SGLang defines it (http_server imports that name from there).
    common = importlib.import_module("sglang.srt.utils.common")
    monkeypatch.setattr(common, "build_server_info", common.build_server_info)  # restored after the test
    plan = {
        "requested": "cache_aware,total_tokens",
        "chain": ["cache_aware", "total_tokens"],
        "reason": "chosen explicitly",
        "policies": [{"name": "cache_aware"}, {"name": "total_tokens"}],
        "sglang_load_balance_method": "total_requests",
    }
    modules = ["sglang.srt.utils.common"]
    server_info.install(plan, modules)
    wrapped = common.build_server_info
    server_info.install(plan, modules)  # idempotent: wrapped once
    assert common.build_server_info is wrapped

    args = ServerArgs(model_path="dummy", dp_size=2, load_balance_method="total_requests")
    info = common.build_server_info(args, {})
    assert info["load_balance_method"] == "cache_aware,total_tokens"
    assert info["dpcore"]["chain"] == ["cache_aware", "total_tokens"]
    assert info["dpcore"]["sglang_load_balance_method"] == "total_requests"
    assert info["dp_size"] == 2  # SGLang's own fields are kept
