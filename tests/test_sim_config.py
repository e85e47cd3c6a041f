"""The simulator's pinned engine defaults: the published numbers, shared with the mock engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpcore.mock.engine import EngineParams
from dpcore.sim.config import EngineConfig


def test_design_defaults() -> None:
    c = EngineConfig()
    assert (c.prefill_tokens_per_s, c.decode_step_s, c.decode_step_per_request_s) == (12_000.0, 0.025, 0.00008)
    assert (c.kv_capacity_tokens, c.report_interval_s, c.report_steps, c.report_delay_s) == (500_000, 0.1, 15, 0.05)
    printed = dict(c.rows())
    assert "25 ms + 0.08 ms per running request" in printed["decode step"]
    assert "delivered 50 ms late" in printed["load reports"]


def test_mock_engine_pins_the_same_numbers() -> None:
    # Two models of one engine (discrete-event here, real processes in dpcore.mock): if a
    # default moves in one, it must move in the other.
    # (Step times come from one module, dpcore.sim.stepmodel, in both.)
    c, m = EngineConfig(), EngineParams()
    assert m.kv_capacity == c.kv_capacity_tokens
    assert m.report_every_steps == c.report_steps
    assert m.report_interval_s == c.report_interval_s


@pytest.mark.parametrize(
    "bad",
    [{"prefill_tokens_per_s": 0}, {"decode_step_s": -1}, {"report_delay_s": -0.1}, {"kv_capacity_tokens": float("nan")}],
)
def test_bad_values_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineConfig(**bad)


def test_the_documented_engine_file_loads_and_bad_files_are_named(tmp_path) -> None:
    from pathlib import Path

    from dpcore.errors import ConfigError
    from dpcore.sim.config import load_engine_config

    example = Path(__file__).parent.parent / "docs" / "reference" / "engine-example.toml"
    cfg = load_engine_config(str(example), {"report_profile": "full"})
    assert cfg.kv_capacity_tokens == 900_000 and cfg.step.chunked_prefill_size == 16384
    assert cfg.report_profile == "full" and cfg.step.overhead_s == 0.020  # defaults kept
    for text, words in [
        ("nope = 1\n", "unknown key nope"),
        ("[step]\nfast = 1\n", "unknown key step.fast"),
        ("[step]\noverhead_s = -1\n", "overhead_s must be a positive number"),
        ("kv_capacity_tokens = \n", "not valid TOML"),
        ("report_profile = 'psychic'\n", "report_profile must be one of sglang, full"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=words):
            load_engine_config(str(bad))
    with pytest.raises(ConfigError, match="missing.toml"):
        load_engine_config(str(tmp_path / "missing.toml"))


def test_a_file_sets_the_report_profile_unless_the_command_line_does(tmp_path) -> None:
    from dpcore.cli import main

    cfg = tmp_path / "e.toml"
    cfg.write_text("report_profile = 'full'\n")
    trace = str(Path(__file__).parent / "data" / "mooncake_conversation_head300.jsonl")
    base = ["simulate", "--trace", trace, "--limit", "10", "--policy", "round_robin", "--engine-config", str(cfg)]
    for extra, want in (([], "full"), (["--report-profile", "sglang"], "sglang")):
        out = tmp_path / "r.json"
        assert main([*base, *extra, "--json", str(out)]) == 0
        assert json.loads(out.read_text())["run"]["report_profile"] == want
