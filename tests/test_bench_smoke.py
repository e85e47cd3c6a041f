"""``dpcore bench`` end to end with a small count: it runs all three loops and writes JSON.

No speed is asserted (that is what the benchmark itself reports, as ratios in one run).
"""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.e2e


def test_bench_small_count_writes_the_three_rates(dpcore_exe, tmp_path, clean_env):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [*dpcore_exe, "bench", "--count", "600", "--repeat", "1", "--decisions", "2000",
         "--idle-seconds", "0.3", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=clean_env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    for key in ("dpcore_msgs_per_s", "pickle_loop_msgs_per_s", "zmq_proxy_msgs_per_s"):
        assert isinstance(data[key], float) and data[key] > 0, key
    assert set(data["policy_decision_us"]) >= {  # every installed policy is timed
        "round_robin", "follow_bootstrap_room", "total_requests", "total_tokens", "cache_aware", "cache_aware+kv",
    }  # fmt: skip
    assert all(us > 0 for us in data["policy_decision_us"].values())
    assert data["idle_cpu_percent"] is not None and data["idle_cpu_percent"] >= 0
    assert data["dpcore_vs_pickle_loop"] == pytest.approx(data["dpcore_msgs_per_s"] / data["pickle_loop_msgs_per_s"])
    assert "zmq.proxy" in r.stdout and "µs / decision" in r.stdout


def test_bench_rejects_bad_arguments(dpcore_exe):
    r = subprocess.run([*dpcore_exe, "bench", "--count", "5"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--count must be >= 100" in r.stderr


def test_bench_record_counts_the_whole_loops_cpu(dpcore_exe, tmp_path, clean_env):
    """With --record, the CPU per request of every process of each loop (sender, controller,
    receivers, and the writer when recording) is reported beside the controller's own, so
    recording's share can be read on a host where msgs/s varies from run to run."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [*dpcore_exe, "bench", "--record", "--count", "600", "--repeat", "1", "--decisions", "200",
         "--idle-seconds", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=180, env=clean_env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    loop, router = data["loop_cpu_us_per_msg"], data["router_cpu_us_per_msg"]
    assert set(loop) >= {"dpcore", "record"}
    for mode in ("dpcore", "record"):
        assert loop[mode] > router[mode] > 0, mode  # the sender and receivers spend CPU too
    assert loop["record"] >= router["record"] + data["record_writer_cpu_us_per_msg"]
    assert "the whole loop's CPU per request" in r.stdout
    # The recording the cost is measured on holds every request of the run.
    assert data["recorded_per_run"] == [600]
    assert "every request was recorded: 600 lines" in r.stdout
    # The writer says how it formatted: compiled here, since `make setup` installs dpcore-speedups.
    assert data["record_writer_path"] == ["compiled"]
    assert "writer formats lines in its compiled path" in r.stdout
