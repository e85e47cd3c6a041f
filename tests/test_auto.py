from __future__ import annotations

import pytest

from dpcore.auto import check_removed_flags, normalize_mode, resolve
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
