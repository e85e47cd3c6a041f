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


def test_cache_aware_targets_prints_one_row_per_cell(tmp_path: Path) -> None:
    trace = tmp_path / "agent.jsonl"
    run(str(SCRIPTS / "make_agent_trace.py"), "--out", str(trace), "--requests", "300", cwd=tmp_path)
    done = run(
        str(SCRIPTS / "cache_aware_targets.py"),
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
    assert [(r["load"], r["seed"]) for r in ratios] == [("light", 0), ("busy", 0), ("heavy", 0)]
    for r in ratios:
        assert r["ratios"]["hits_over_oracle"] > 0
        assert set(r["within"]) >= {"ttft_p50_s", "ttft_p99_s", "tpot_p99_s", "straggler_waste"}


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


def test_load_targets_pairs_our_load_policies_with_upstreams(tmp_path: Path) -> None:
    done = run(
        str(SCRIPTS / "load_targets.py"),
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


def test_cache_aware_targets_refuses_a_bad_cell(tmp_path: Path) -> None:
    done = run(str(SCRIPTS / "cache_aware_targets.py"), "--cells", "8:1,2", cwd=tmp_path)
    assert done.returncode == 2
    assert "DP:LIGHT,BUSY,HEAVY" in done.stderr


def test_cacheindex_memory_reports_rss_and_lookup_cost(tmp_path: Path) -> None:
    done = run(str(SCRIPTS / "cacheindex_memory.py"), "--dp", "4", "--blocks", "4000", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "4,000 blocks held (1,000 per rank)" in done.stdout
    assert "depths() for a 64-block prompt over 4 ranks" in done.stdout
