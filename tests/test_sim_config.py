"""The simulator's pinned engine defaults: DESIGN.md's numbers, shared with the mock engine."""

from __future__ import annotations

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
    c, m = EngineConfig(), EngineParams()
    assert m.prefill_tokens_per_s == c.prefill_tokens_per_s
    assert m.decode_step_s == c.decode_step_s
    assert m.decode_step_per_req_s == c.decode_step_per_request_s
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
