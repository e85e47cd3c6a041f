from __future__ import annotations

import pytest

from dpcore.auto import baseline_policy, check_removed_flags, compare_policies, normalize_mode, resolve
from dpcore.errors import ConfigError, InvalidDisaggregationModeError, RemovedPolicyError


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (None, "round_robin"),
        ("null", "round_robin"),
        ("none", "round_robin"),
        ("prefill", "follow_bootstrap_room"),
        ("PREFILL", "follow_bootstrap_room"),
        ("decode", "round_robin"),
    ],
)
def test_auto_per_mode(mode, expected):
    res = resolve("auto", mode)
    assert res.chain == (expected,)
    assert res.reason.startswith(f"auto -> {expected}")


def test_names_are_case_insensitive_and_chains_split():
    res = resolve(" Cache_Aware , TOTAL_TOKENS ")
    assert res.chain == ("cache_aware", "total_tokens")
    assert "answers only when" in res.reason


def test_auto_inside_a_chain():
    assert resolve("cache_aware,auto", "decode").chain == ("cache_aware", "round_robin")


@pytest.mark.parametrize(("old", "new"), [("shortest_queue", "total_requests"), ("minimum_tokens", "total_tokens")])
def test_renamed_names(old, new):
    with pytest.raises(RemovedPolicyError, match=f"renamed to '{new}'") as exc:
        resolve(old.upper())
    assert exc.value.replacement == new


def test_decode_round_robin_removed():
    with pytest.raises(RemovedPolicyError, match="was removed: use 'round_robin'"):
        resolve("decode_round_robin", "decode")


def test_prefill_round_robin_flag_removed():
    with pytest.raises(RemovedPolicyError, match="--prefill-round-robin-balance was removed"):
        check_removed_flags(["serve", "--prefill-round-robin-balance"])
    check_removed_flags(["serve", "--dp-size", "2"])


@pytest.mark.parametrize("bad", ["", "a,,b", "round_robin,round_robin", "round_robin,auto"])
def test_bad_chains(bad):
    with pytest.raises(ConfigError):
        resolve(bad)


def test_invalid_disaggregation_mode():
    with pytest.raises(InvalidDisaggregationModeError, match="null \\(or none\\), prefill, decode"):
        normalize_mode("encode")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [(None, "total_tokens"), ("prefill", "total_tokens"), ("decode", "total_requests")],
)
def test_roadmap_preset_is_opt_in(mode, expected):
    assert resolve("roadmap", mode).chain == (expected,)
    assert resolve("ROADMAP", mode).reason.startswith(f"roadmap -> {expected}")
    # auto is unchanged by the preset's existence
    assert resolve("auto", "decode").chain == ("round_robin",)


def test_roadmap_in_a_chain():
    assert resolve("cache_aware,roadmap", "prefill").chain == ("cache_aware", "total_tokens")


def _declared(**keys: str) -> dict[str, list[tuple[str, str, str]]]:
    """Roles as :func:`dpcore.discovery.roles` gives them, each declared by one distribution."""
    return {k.replace("__", "."): [(v, "dp-test", "")] for k, v in keys.items()}


def test_legacy_names_are_what_the_distributions_declare():
    roles = _declared(renamed__old_name="new_policy", removed__gone="other", auto__decode="other")
    with pytest.raises(RemovedPolicyError, match="'old_name' was renamed to 'new_policy'") as exc:
        resolve("old_name", roles=roles)
    assert exc.value.replacement == "new_policy"
    with pytest.raises(RemovedPolicyError, match=r"'gone' was removed: use 'other' \(or 'auto', which picks other for PD decode\)"):
        resolve("gone", roles=roles)
    # Nobody declares them: the names are no longer special (discovery calls them unknown).
    assert resolve("shortest_queue", roles={}).chain == ("shortest_queue",)
    assert resolve("decode_round_robin", roles={}).chain == ("decode_round_robin",)


def test_the_removed_flag_names_what_auto_picks_for_prefill(monkeypatch):
    from dpcore import discovery

    monkeypatch.setattr(discovery, "roles", lambda: _declared(auto__prefill="room_policy"))
    with pytest.raises(RemovedPolicyError, match="use 'room_policy', the auto default for prefill"):
        check_removed_flags(["--prefill-round-robin-balance"])
    monkeypatch.setattr(discovery, "roles", dict)
    with pytest.raises(RemovedPolicyError, match=r"use 'auto', or any policy"):
        check_removed_flags(["--prefill-round-robin-balance"])


def test_the_baseline_is_declared_and_missing_or_ambiguous_is_an_error():
    assert baseline_policy("the tool", _declared(baseline__load="least_busy")) == "least_busy"
    with pytest.raises(ConfigError, match="the tool means the policy .*'baseline.load'.* none does; name a policy"):
        baseline_policy("the tool", {})
    both = {"baseline.load": [("a", "dist-a", ""), ("b", "dist-b", "")]}
    with pytest.raises(ConfigError, match="the tool is ambiguous: 'a' \\(dist-a\\) and 'b' \\(dist-b\\)"):
        baseline_policy("the tool", both)


def test_compare_set_is_ordered_by_the_declared_order():
    roles = {
        "compare.30": [("c", "d1", "")],
        "compare.4": [("b", "d2", ""), ("a", "d3", "")],
        "auto.null": [("z", "d4", "")],
    }
    assert compare_policies(roles) == ("a", "b", "c")
    assert compare_policies({}) == ()
    with pytest.raises(ConfigError, match="'compare.first' declared by d1: ORDER must be an integer 0..999"):
        compare_policies({"compare.first": [("c", "d1", "")]})


def test_the_installed_first_party_policies_keep_the_former_defaults():
    """With dpcore[policies] installed, the tools' defaults are the ones they always had."""
    from dpcore.sim.cli import default_policies

    assert baseline_policy("the tool") == "total_requests"
    assert default_policies()[:4] == ("round_robin", "total_requests", "total_tokens", "cache_aware")
    assert resolve("auto").chain == ("round_robin",)
