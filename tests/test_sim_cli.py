"""``dpcore simulate`` end to end on bundled trace slices: JSON schema, plot, errors."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rich.console import Console

from dpcore import hookimpl
from dpcore.cli import main
from dpcore.ledger import LoadLedger
from dpcore.manager import PolicyManager
from dpcore.sim.routing import PluginRouter
from dpcore.sim.lockstep import LockstepSimulation
from dpcore.sim.report import METRIC_KEYS, print_errors
from dpcore.sim.runner import QUIET_LOG, RunSpec

DATA = Path(__file__).parent / "data"
MOONCAKE = str(DATA / "mooncake_conversation_head300.jsonl")
AZURE = str(DATA / "azure_conv_head300.csv")


def check_schema(doc: dict, policies: list[str], total: int) -> None:
    assert set(doc) == {"run", "ceiling_prefix_hit_ratio", "oracle_prefix_hit_ratio", "policies"}
    assert isinstance(doc["ceiling_prefix_hit_ratio"], float)
    assert isinstance(doc["oracle_prefix_hit_ratio"], float)
    assert list(doc["policies"]) == policies
    assert doc["run"]["policies"] == policies
    for m in doc["policies"].values():
        assert tuple(m) == METRIC_KEYS
        assert all(isinstance(m[k], int) for k in ("completed", "rejected", "failed"))
        assert m["completed"] + m["rejected"] + m["failed"] == total
        for k in METRIC_KEYS[:-3]:
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


def test_json_carries_what_it_takes_to_run_it_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    cfg = tmp_path / "hw.toml"
    cfg.write_text("kv_capacity_tokens = 200000\n[step]\nchunked_prefill_size = 4096\n")
    argv = ["simulate", "--trace", MOONCAKE, "--limit", "30", "--dp-size", "4", "--seed", "5"]
    argv += ["--policy", "round_robin", "--engine-config", str(cfg), "--json", str(out), "--faults", "1@2-9"]
    assert main(argv) == 0
    run = json.loads(out.read_text())["run"]
    assert run["trace"]["sha256"] == hashlib.sha256(Path(MOONCAKE).read_bytes()).hexdigest()
    assert (run["dp_size"], run["seed"], run["engine"], run["report_profile"]) == (4, 5, "lockstep", "sglang")
    assert run["engine_parameters"]["kv_capacity_tokens"] == 200_000
    assert run["engine_parameters"]["step"]["chunked_prefill_size"] == 4096
    assert run["faults"] == [{"rank": 1, "down_s": 2.0, "up_s": 9.0}]
    assert run["dpcore_version"]
    assert "1,024 tokens per rank (4,096 / dp 4)" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["markdown", "csv", "json", "table"])
def test_every_output_format_fits_100_columns_and_marks_the_best(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--trace", MOONCAKE, "--limit", "60", "--format", fmt, "--jobs", "1"]
    argv += ["--policy", "round_robin", "--policy", "peer:sglang_total_requests"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    if fmt == "json":
        assert list(json.loads(text)["policies"]) == ["round_robin", "peer:sglang_total_requests"]
    elif fmt == "csv":
        head, *rows = text.splitlines()
        assert head.split(",")[:3] == ["policy", "ttft_p50_s", "ttft_p99_s"] and len(rows) == 2
    elif fmt == "markdown":
        assert text.startswith("| policy |") and "**" in text
    else:
        assert max(len(line) for line in text.splitlines()) <= 100
        assert "*" in text and "straggler" in text and "TPOT" in text


class Boom:
    def __init__(self, ctx) -> None:
        pass

    @hookimpl
    def select_rank(self, request, ctx):
        raise RuntimeError("boom")


class Ninety:
    def __init__(self, ctx) -> None:
        pass

    @hookimpl
    def select_rank(self, request, ctx):
        return 99


@pytest.mark.parametrize(("cls", "words"), [(Boom, "RuntimeError: boom at "), (Ninety, "returned 99")])
def test_a_failing_policy_is_shown_once_per_distinct_error(cls: type, words: str) -> None:
    spec = RunSpec(trace_path=MOONCAKE, dp_size=4, limit=25)
    sim = LockstepSimulation(spec.load_trace(), 4, spec.config)
    manager = PolicyManager.from_method(
        "round_robin", dp_size=4, ledger=LoadLedger(4, clock=sim.clock), classes={"round_robin": cls}, log=QUIET_LOG
    )
    result = sim.run(PluginRouter(manager), "bad")
    assert result.rejected == 25 and result.reject_reasons == {"policy_error": 25}
    assert len(result.errors) == 1 and list(result.errors.values()) == [25]
    console = Console(file=io.StringIO(), width=200)
    print_errors(console, {"bad": result})
    lines = console.file.getvalue().splitlines()
    assert len(lines) == 1 and words in lines[0] and "25 request(s)" in lines[0]
    if cls is Boom:
        assert f"test_sim_cli.py:{Boom.select_rank.__code__.co_firstlineno + 2} in select_rank" in lines[0]


def test_the_replicas_engine_stays_available(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--trace", MOONCAKE, "--limit", "40", "--engine", "replicas", "--policy", "round_robin"]
    assert main([*argv, "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["run"]["engine"] == "replicas" and doc["run"]["report_profile"] == "sglang"
    m = doc["policies"]["round_robin"]
    assert m["completed"] == 40 and m["itl_p99_s"] is None and m["straggler_waste"] is None
    assert main([*argv, "--faults", "1@1-2"]) == 2
    assert "--faults needs --engine lockstep" in capsys.readouterr().err


def test_a_policy_file_that_fails_is_named_once_in_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "my_policy.py"
    src.write_text(
        "from dpcore import hookimpl\n"
        "class Boom:\n"
        "    def __init__(self, ctx):\n"
        "        pass\n"
        "    @hookimpl\n"
        "    def select_rank(self, request, ctx):\n"
        "        raise RuntimeError('boom')\n"
    )
    argv = ["simulate", "--trace", MOONCAKE, "--limit", "20", "--jobs", "1", "--policy", f"{src}:Boom"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if "policy failed" in line]
    assert len(lines) == 1 and f"{src}:Boom: policy failed on 20 request(s): RuntimeError: boom" in lines[0]
    assert f"{src}:Boom" in captured.out  # the name as written, not an emoji code
