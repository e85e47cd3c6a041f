from __future__ import annotations

import pytest

from dp_round_robin import RoundRobinPolicy
from dpcore.errors import NoActiveRankError
from dpcore.testing import PolicyHarness


def test_order_and_even_spread():
    h = PolicyHarness("round_robin", dp_size=4)
    assert [h.select() for _ in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert isinstance(h.policy, RoundRobinPolicy)


def test_skips_inactive_ranks():
    h = PolicyHarness("round_robin", dp_size=4)
    h.kill(1)
    h.kill(3)
    for _ in range(6):
        h.select()
    assert [h.dispatched[r] for r in range(4)] == [3, 0, 3, 0]


def test_rejoined_rank_gets_traffic_again():
    h = PolicyHarness("round_robin", dp_size=3)
    h.kill(2)
    assert [h.select() for _ in range(4)] == [0, 1, 0, 1]
    h.revive(2)
    assert sorted(h.select() for _ in range(3)) == [0, 1, 2]


def test_router_assigned_request_does_not_advance_the_counter():
    h = PolicyHarness("round_robin", dp_size=4)
    assert h.select() == 0
    assert h.select(routed_dp_rank=2) == 2
    assert h.select(routed_dp_rank=2) == 2
    assert h.select() == 1


def test_all_inactive_is_a_clear_rejection():
    h = PolicyHarness("round_robin", dp_size=2)
    h.kill(0)
    h.kill(1)
    with pytest.raises(NoActiveRankError, match="all 2 ranks are inactive"):
        h.select()
