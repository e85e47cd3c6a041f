"""``dpcore simulate`` end to end on bundled trace slices: JSON schema, plot, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.cli import main
from dpcore.sim.report import METRIC_KEYS

DATA = Path(__file__).parent / "data"
MOONCAKE = str(DATA / "mooncake_conversation_head300.jsonl")
AZURE = str(DATA / "azure_conv_head300.csv")


def check_schema(doc: dict, policies: list[str], total: int) -> None:
    assert set(doc) == {"ceiling_prefix_hit_ratio", "oracle_prefix_hit_ratio", "policies"}
    assert isinstance(doc["ceiling_prefix_hit_ratio"], float)
    assert isinstance(doc["oracle_prefix_hit_ratio"], float)
    assert list(doc["policies"]) == policies
    for m in doc["policies"].values():
        assert tuple(m) == METRIC_KEYS
        assert isinstance(m["completed"], int) and isinstance(m["rejected"], int)
        assert m["completed"] + m["rejected"] == total
        for k in METRIC_KEYS[:-2]:
            assert isinstance(m[k], float), k
        assert m["ttft_p50_s"] <= m["ttft_p99_s"] <= m["e2e_p99_s"]
        assert 0.0 <= m["prefix_hit_ratio"] <= doc["ceiling_prefix_hit_ratio"] + 1e-9
        assert m["load_max_over_mean"] >= 1.0


def test_cli_mooncake_slice_json_plot_and_explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    policies = ["round_robin", "cache_aware", "peer:smg_cache_aware", "peer:dynamo", "ref:clairvoyant"]
    argv = ["simulate", "--trace", MOONCAKE, "--dp-size", "4", "--limit", "200", "--time-scale", "2"]
    argv += [a for p in policies for a in ("--policy", p)]
    argv += ["--json", str(out), "--plot", str(png), "--explain", "3", "--jobs", "1"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    check_schema(doc, policies, 200)
    assert 0 < doc["oracle_prefix_hit_ratio"] <= doc["ceiling_prefix_hit_ratio"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "equal-capacity oracle" in text and "500,000 tokens per rank" in text
    assert "policy=cache_aware reason=" in text and "policy=peer:dynamo reason=min_cost" in text


def test_cli_azure_slice_in_worker_processes(tmp_path: Path) -> None:
    out = tmp_path / "azure.json"
    cmd = [sys.executable, "-m", "dpcore", "simulate", "--trace", AZURE, "--time-scale", "20"]
    cmd += ["--policy", "total_tokens", "--policy", "peer:sglang_total_tokens", "--policy", "peer:vllm"]
    cmd += ["--jobs", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    check_schema(doc, ["total_tokens", "peer:sglang_total_tokens", "peer:vllm"], 300)
    assert doc["ceiling_prefix_hit_ratio"] == 0.0 == doc["oracle_prefix_hit_ratio"]
    assert all(m["prefix_hit_ratio"] == 0.0 for m in doc["policies"].values())


def test_cli_defaults_to_the_bundled_sample(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d.json"
    assert main(["simulate", "--limit", "40", "--policy", "round_robin", "--json", str(out)]) == 0
    assert "mooncake_conversation_2000.jsonl" in capsys.readouterr().out
    check_schema(json.loads(out.read_text()), ["round_robin"], 40)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--policy", "peer:nope"], "unknown baseline 'peer:nope'"),
        (["--policy", "no_such_policy"], "no_such_policy"),
        (["--dp-size", "0"], "--dp-size"),
        (["--time-scale", "-1"], "time scale"),
        (["--report-delay", "-1"], "report_delay_s"),
    ],
)
def test_cli_bad_arguments_are_one_line_errors(args: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--trace", MOONCAKE, "--limit", "5", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err


def test_cli_bad_trace_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    lines = Path(MOONCAKE).read_text().splitlines()[:3]
    bad.write_text("\n".join([*lines, '{"timestamp": 9000, "input_length": "many"}']) + "\n")
    assert main(["simulate", "--trace", str(bad), "--policy", "round_robin"]) == 2
    assert "bad.jsonl:4: input_length must be an integer" in capsys.readouterr().err
