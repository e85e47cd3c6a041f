"""The launcher with SGLang's real argument parser, and the plugin path it switches on."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

from dpcore_sglang import launch_server
from dpcore_sglang.config import ENV_VAR, AdapterConfig
from dpcore_sglang.testing import make_request

pytestmark = pytest.mark.sglang


def dry_run(capfd, *args: str) -> tuple[int, dict | None, str]:
    # capfd, not capsys: SGLang's controller enables faulthandler, which needs a real stderr fd.
    code = launch_server.main(["--model-path", "dummy", "--dpcore-dry-run", *args])
    out, err = capfd.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_dry_run_resolves_a_chain_with_sglangs_parser(capfd):
    code, plan, _ = dry_run(
        capfd,
        "--dp-size", "4",
        "--load-balance-method", "Cache_Aware,total_tokens",
        "--policy-option", "cache_aware.balance_abs=32",
        "--page-size", "16",
    )
    assert code == 0
    assert plan["chain"] == ["cache_aware", "total_tokens"]
    assert plan["dp_size"] == 4
    assert plan["sglang"] == "0.5.23"
    # SGLang is told a load-aware method: it then reads snapshots and registers PD ranks.
    assert plan["sglang_load_balance_method"] == "total_requests"
    assert plan[ENV_VAR]["options"] == {"cache_aware": {"balance_abs": 32}}


@pytest.mark.parametrize(
    ("method", "mode", "chain", "told"),
    [
        ("auto", "null", ["round_robin"], "round_robin"),
        ("auto", "prefill", ["follow_bootstrap_room"], "follow_bootstrap_room"),
        ("total_tokens", "decode", ["total_tokens"], "total_tokens"),
    ],
)
def test_dry_run_keeps_sglangs_own_method_names(capfd, method, mode, chain, told):
    code, plan, _ = dry_run(
        capfd, "--dp-size", "2", "--load-balance-method", method, "--disaggregation-mode", mode
    )
    assert code == 0
    assert (plan["chain"], plan["sglang_load_balance_method"]) == (chain, told)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--load-balance-method", "shortest_queue"], "renamed to 'total_requests'"),
        (["--load-balance-method", "cache_awre"], "did you mean 'cache_aware'?"),
        (["--prefill-round-robin-balance"], "--prefill-round-robin-balance was removed"),
        (["--load-balance-method", "cache_aware", "--policy-option", "cache_aware.nope=1"], "does not accept options"),
        (["--disaggregation-mode", "both"], "invalid choice"),
        (["--load-balance-method", "cache_aware", "--page-size", "64", "--dpcore-block-size", "100"], "not a multiple"),
    ],
)
def test_bad_arguments_fail_before_sglang_starts(capfd, args, message):
    try:
        code = launch_server.main(["--model-path", "dummy", "--dp-size", "2", "--dpcore-dry-run", *args])
    except SystemExit as exc:  # SGLang's own argparse rejecting one of its arguments
        code = exc.code
    err = capfd.readouterr().err
    assert code == 2
    assert message in err


def test_dp_size_one_warns_that_nothing_changes(capfd):
    code, plan, err = dry_run(capfd, "--load-balance-method", "total_tokens")
    assert code == 0
    assert "runs no data-parallel controller" in err


def test_the_adapter_is_an_sglang_plugin():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dpcore"]
    assert ep.value == "dpcore_sglang.plugin:load"
    assert ep.dist.name == "dpcore-sglang"


def test_what_the_launcher_sets_makes_sglangs_controller_use_dpcore(controller, capfd):
    code, plan, _ = dry_run(capfd, "--dp-size", "4", "--load-balance-method", "total_requests", "--page-size", "8")
    assert code == 0
    config = AdapterConfig.from_json(json.dumps(plan[ENV_VAR]))
    h = controller(sglang_method=plan["sglang_load_balance_method"], adapter=config)
    h.send(make_request("bad", routed_dp_rank=9))
    (answer,) = h.answers(1)  # only dpcore answers a bad rank; SGLang's own dispatch dies
    assert answer.rid == "bad"


def test_a_policy_that_cannot_load_stops_the_controller_with_the_reason(controller, capfd):
    with pytest.raises(RuntimeError, match="failed during start-up"):
        controller(adapter=AdapterConfig(method="no_such_policy"), expect_crash=True)
    err = capfd.readouterr().err
    assert "unknown load balance method 'no_such_policy'" in err
