"""The CLI as an operator meets it: real subprocesses, exit codes and stderr."""

from __future__ import annotations

import json
import subprocess


def run(exe, *args):
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=60)


def test_policies_json_lists_first_party(dpcore_exe):
    p = run(dpcore_exe, "policies", "--json")
    assert p.returncode == 0, p.stderr
    rows = {r["name"]: r for r in json.loads(p.stdout)}
    expected = {
        "round_robin": "dp-round-robin",
        "follow_bootstrap_room": "dp-bootstrap-room",
        "total_requests": "dp-load",
        "total_tokens": "dp-load",
        "cache_aware": "dp-cache-aware",
    }
    for name, dist in expected.items():
        assert rows[name]["dist"] == dist


def test_policies_table(dpcore_exe):
    p = run(dpcore_exe, "policies")
    assert p.returncode == 0 and "cache_aware" in p.stdout


def test_dry_run_auto_prefill(dpcore_exe):
    p = run(dpcore_exe, "serve", "--dry-run", "--json", "--dp-size", "4", "--disaggregation-mode", "prefill")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["chain"] == ["follow_bootstrap_room"] and "auto" in d["reason"]


def test_dry_run_chain_with_options(dpcore_exe):
    p = run(
        dpcore_exe, "serve", "--dry-run", "--load-balance-method", "Cache_Aware,total_tokens",
        "--policy-option", "cache_aware.balance_abs=32",
    )
    assert p.returncode == 0, p.stderr
    assert "cache_aware -> total_tokens" in p.stdout


def _fails(exe, *args, expect):
    p = run(exe, "serve", "--dry-run", *args)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert expect in p.stderr
    assert "Traceback" not in p.stderr
    return p


def test_renamed_names_fail(dpcore_exe):
    _fails(dpcore_exe, "--load-balance-method", "shortest_queue", expect="renamed to 'total_requests'")
    _fails(dpcore_exe, "--load-balance-method", "minimum_tokens", expect="renamed to 'total_tokens'")


def test_removed_names_fail(dpcore_exe):
    _fails(dpcore_exe, "--load-balance-method", "decode_round_robin", expect="was removed: use 'round_robin'")
    _fails(dpcore_exe, "--prefill-round-robin-balance", expect="--prefill-round-robin-balance was removed")


def test_unknown_name_fails_with_close_match(dpcore_exe):
    p = _fails(dpcore_exe, "--load-balance-method", "total_token", expect="did you mean 'total_tokens'?")
    assert "installed policies:" in p.stderr and "pip install" in p.stderr


def test_invalid_mode_and_sizes_fail(dpcore_exe):
    _fails(dpcore_exe, "--disaggregation-mode", "both", expect="invalid --disaggregation-mode")
    _fails(dpcore_exe, "--dp-size", "0", expect="--dp-size must be at least 1")
    _fails(dpcore_exe, "--policy-option", "balance_abs=3", expect="expected POLICY.OPTION=VALUE")
    _fails(dpcore_exe, "--load-balance-method", "cache_aware", "--policy-option", "cache_aware.min_match=7",
           expect="min_match in [0, 1]")
