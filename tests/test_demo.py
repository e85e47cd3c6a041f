"""``dpcore demo`` end to end (small sample, fast speed-up), and its helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.demo import percentile, sample_path
from dpcore.sim.traces import read_trace

DPCORE = [sys.executable, "-m", "dpcore"]


def run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [*DPCORE, "demo", "--no-live", "--speedup", "50", "--json", str(out), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return proc, json.loads(out.read_text()) if out.exists() else {}


def pids_in(text: str) -> list[int]:
    m = re.search(r"pids ([\d,\s]+);", text)
    assert m, text
    return [int(x) for x in re.findall(r"\d+", m.group(1))]


@pytest.mark.e2e
def test_demo_replays_the_sample_and_prints_the_table(tmp_path: Path) -> None:
    proc, s = run_demo(tmp_path, "--requests", "40", "--dp-size", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "dpcore demo: round_robin on 2 mock ranks" in out
    for col in ("requests", "prefix hit", "TTFT p50", "TTFT p99"):
        assert col in out
    assert s["completed"] == 40 and s["rejected"] == 0 and s["failed"] == 0
    assert [r["requests"] for r in s["ranks"]] == [20, 20]  # round robin, after one warm-up each
    trace = read_trace(sample_path(), limit=40)
    assert sum(r["prompt_tokens"] for r in s["ranks"]) == sum(t.input_length for t in trace.requests)
    assert 0 <= s["prefix_hit_ratio"] <= s["prefix_hit_ceiling"] <= 1
    assert all(r["ttft_p99_s"] >= r["ttft_p50_s"] > 0 for r in s["ranks"])
    for pid in pids_in(out):  # every process the demo started is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.e2e
def test_demo_takes_any_installed_policy(tmp_path: Path) -> None:
    proc, s = run_demo(tmp_path, "--requests", "30", "--dp-size", "3", "--load-balance-method", "cache_aware")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert s["load_balance_method"] == "cache_aware"
    assert s["completed"] == 30 and sum(r["requests"] for r in s["ranks"]) == 30


@pytest.mark.e2e
def test_demo_runs_the_engine_config_file_the_simulator_reads(tmp_path: Path) -> None:
    cfg = tmp_path / "engine.toml"
    cfg.write_text("[step]\nchunked_prefill_size = 4096\noverhead_s = 0.03\n")
    proc, s = run_demo(tmp_path, "--requests", "12", "--dp-size", "2", "--engine-config", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert s["completed"] == 12 and s["engine_config"] == str(cfg)
    # The barrier ran the file's step model: 4,096 // 2 tokens per rank and step.
    assert s["lockstep"]["step_model"]["overhead_s"] == 0.03
    assert s["lockstep"]["chunk_tokens"] == 2048


def test_demo_refuses_bad_input_before_starting_anything(tmp_path: Path) -> None:
    for args, words in (
        (["--load-balance-method", "nope"], "unknown"),
        (["--speedup", "0"], "--speedup"),
        (["--requests", "0"], "--requests"),
        (["--trace", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--engine-config", str(tmp_path / "missing.toml")], "--engine-config"),
    ):
        proc, _ = run_demo(tmp_path, *args)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr.lower()
        assert "pids" not in proc.stdout


def test_bundled_sample_is_a_mooncake_trace_with_attribution() -> None:
    path = sample_path()
    trace = read_trace(path)
    assert len(trace) == 2000 and trace.block_size == 512
    readme = (path.parent / "README.md").read_text()
    assert "Apache" in readme and "Mooncake" in readme and "FAST" in readme


def test_percentile_matches_linear_interpolation() -> None:
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.99) == pytest.approx(9.9)
    assert percentile([5.0], 0.99) == 5.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX signals")
@pytest.mark.e2e
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    import signal
    import time

    proc = subprocess.Popen(
        [*DPCORE, "demo", "--no-live", "--speedup", "5", "--requests", "400"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    head = ""
    while "replaying" not in head:
        line = proc.stdout.readline()
        assert line, head
        head += line
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, head + rest
    for pid in pids_in(head):
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
