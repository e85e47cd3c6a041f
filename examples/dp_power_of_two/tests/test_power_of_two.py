from __future__ import annotations

from dp_power_of_two import PowerOfTwoPolicy

from dpcore.testing import PolicyHarness


def test_prefers_the_less_loaded_of_two():
    h = PolicyHarness(PowerOfTwoPolicy, dp_size=2, options={"seed": 1})
    h.report(0, num_tokens=10_000)
    h.report(1, num_tokens=0)
    assert all(h.pick() == 1 for _ in range(20))


def test_single_active_rank():
    h = PolicyHarness(PowerOfTwoPolicy, dp_size=3, options={"seed": 1})
    h.kill(0)
    h.kill(2)
    assert h.select() == 1
