"""The measurement scripts under scripts/ run (their numbers are measured outside the tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dpcore.sim.traces import read_trace

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_agent_trace_is_a_valid_mooncake_trace_with_hot_shared_prompts(tmp_path: Path) -> None:
    out = tmp_path / "agent.jsonl"
    done = run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(out), "--requests", "400", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = read_trace(out)  # validates block counts against input lengths
    assert len(trace) == 400
    firsts = [q.hash_ids[0] for q in trace.requests]
    # Shared tool prompts: far fewer distinct first blocks than requests, one of them hot.
    assert len(set(firsts)) < 60
    assert max(firsts.count(h) for h in set(firsts)) > 400 / 10
    again = tmp_path / "again.jsonl"
    run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(again), "--requests", "400", cwd=tmp_path)
    assert again.read_bytes() == out.read_bytes()  # deterministic for a seed


def test_compare_policies_prints_one_row_per_cell(tmp_path: Path) -> None:
    trace = tmp_path / "agent.jsonl"
    run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(trace), "--requests", "300", cwd=tmp_path)
    done = run(
        str(SCRIPTS / "compare_policies.py"),
        "--trace", str(trace), "--cells", "2:1,2,3", "--seeds", "0", "--limit", "300", "--out", str(tmp_path / "t"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["1 (light)", "2 (busy)", "3 (heavy)"]
    assert done.stderr.count("$ dpcore simulate") == 3
    # Every run is measured with what the SGLang adapter reports, against all six peers.
    assert done.stderr.count("--report-profile sglang") == 3
    assert done.stderr.count("--policy peer:") == 3 * 6
    ratios = json.loads((tmp_path / "t" / "agent_cache_aware_ratios.json").read_text())
    assert [(r["load"], r["seed"], r["requests"]) for r in ratios] == [("light", 0, 300), ("busy", 0, 300), ("heavy", 0, 300)]
    for r in ratios:
        assert r["ratios"]["hits_over_oracle"] > 0
        assert set(r["ratios"]) >= {"ttft_p50_s", "ttft_p99_s", "tpot_p99_s", "straggler_waste", "p99_over_clairvoyant"}
    # The printed row is the JSON's ratios, rounded.
    row = rows[1].split("|")
    assert float(row[4]) == round(ratios[1]["ratios"]["ttft_p50_s"], 2)


def test_compare_policies_compares_the_policy_it_is_given(tmp_path: Path) -> None:
    trace = tmp_path / "agent.jsonl"
    run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(trace), "--requests", "200", cwd=tmp_path)
    done = run(
        str(SCRIPTS / "compare_policies.py"), "--trace", str(trace), "--policy", "total_tokens",
        "--cells", "2:1,2,3", "--load", "busy", "--seeds", "1", "--out", str(tmp_path / "t"),
        "--plot", str(tmp_path / "ratios.png"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--policy total_tokens --policy peer:" in done.stderr and "--seed 1 " in done.stderr
    doc = json.loads((tmp_path / "t" / "agent_dp2_ts2_s1.json").read_text())
    expected = doc["policies"]["total_tokens"]["ttft_p50_s"] / min(
        doc["policies"][p]["ttft_p50_s"] for p in doc["policies"] if p.startswith("peer:")
    )
    summary = json.loads((tmp_path / "t" / "agent_total_tokens_ratios.json").read_text())
    assert summary[0]["ratios"]["ttft_p50_s"] == expected


def test_compare_kv_events_runs_the_policy_without_with_and_with_lost_events(tmp_path: Path) -> None:
    trace = tmp_path / "agent.jsonl"
    run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(trace), "--requests", "200", cwd=tmp_path)
    done = run(
        str(SCRIPTS / "compare_kv_events.py"), "--trace", str(trace), "--cells", "2:1,2,3", "--load", "heavy",
        "--seeds", "0", "--kv-event-loss", "0.1", "--out", str(tmp_path / "t"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    cmds = [line for line in done.stderr.splitlines() if line.startswith("$ dpcore simulate")]
    assert len(cmds) == 3 and all("--policy cache_aware --report-profile sglang" in c for c in cmds)
    assert ["sglang-kv" in c for c in cmds] == [False, True, True] and "--kv-event-loss 0.1" in cmds[2]
    summary = json.loads((tmp_path / "t" / "agent_cache_aware_kv_ratios.json").read_text())
    assert [r["variant"] for r in summary] == ["events", "events, 0.1 lost"]
    without = json.loads((tmp_path / "t" / "agent_cache_aware_dp2_ts3_s0_sglang.json").read_text())
    with_kv = json.loads((tmp_path / "t" / "agent_cache_aware_dp2_ts3_s0_sglang-kv.json").read_text())
    a, b = without["policies"]["cache_aware"], with_kv["policies"]["cache_aware"]
    assert summary[0]["ratios"]["ttft_p99_s"] == b["ttft_p99_s"] / a["ttft_p99_s"]
    assert summary[0]["ratios"]["hits_over_oracle_with"] == b["prefix_hit_ratio"] / with_kv["oracle_prefix_hit_ratio"]


def test_load_levels_brackets_round_robins_divergence(tmp_path: Path) -> None:
    trace = tmp_path / "agent.jsonl"
    run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(trace), "--requests", "300", cwd=tmp_path)
    levels = tmp_path / "levels.json"
    done = run(
        str(SCRIPTS / "load_levels.py"),
        "--trace", str(trace), "--dp-size", "2", "--tolerance", "0.2", "--json", str(levels),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(levels.read_text())["agent.jsonl"]
    row = doc["dp"]["2"]
    limit = doc["diverge"] * row["idle_ttft_p50_s"]
    below = [p for ts, p in row["sweep"] if ts <= row["capacity"]]
    above = [p for ts, p in row["sweep"] if ts > row["capacity"]]
    # The capacity is the last time-scale whose p50 stayed under the limit; a faster one broke it.
    assert below and above and max(below) <= limit < min(above)
    assert row["light"] < row["busy"] < row["heavy"] < row["capacity"]
    assert row["heavy"] == round(0.95 * row["capacity"], 3)
    assert "| 2 |" in done.stdout


def test_compare_load_balancing_pairs_our_load_policies_with_upstreams(tmp_path: Path) -> None:
    done = run(
        str(SCRIPTS / "compare_load_balancing.py"),
        "--trace", str(REPO / "traces" / "AzureLLMInferenceTrace_conv.csv"), "--time-scale", "8", "--seeds", "0",
        "--limit", "300", "--out", str(tmp_path / "t"),
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # One fresh and one late-report run per seed.
    assert done.stderr.count("$ dpcore simulate") == 2
    assert done.stderr.count("--report-interval 1 --report-delay 5") == 1
    rows = [line.split("|")[1:3] for line in done.stdout.splitlines() if line.startswith("| total_")]
    assert [(a.strip(), b.strip()) for a, b in rows] == [
        ("total_tokens", "peer:sglang_total_tokens"),
        ("total_requests", "peer:sglang_total_requests"),
        ("total_requests", "peer:vllm"),
    ]


def test_compare_policies_refuses_a_bad_cell(tmp_path: Path) -> None:
    done = run(str(SCRIPTS / "compare_policies.py"), "--cells", "8:1,2", cwd=tmp_path)
    assert done.returncode == 2
    assert "DP:LIGHT,BUSY,HEAVY" in done.stderr


def test_cacheindex_memory_reports_rss_and_lookup_cost(tmp_path: Path) -> None:
    done = run(str(SCRIPTS / "cacheindex_memory.py"), "--dp", "4", "--blocks", "4000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4,000 blocks held (1,000 per rank)" in done.stdout
    assert "depths() for a 64-block prompt over 4 ranks" in done.stdout
