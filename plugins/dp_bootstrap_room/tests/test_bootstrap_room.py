from __future__ import annotations

import pytest

from dpcore.errors import InactiveRankError, MalformedRequestError, MissingBootstrapRoomError
from dpcore.testing import PolicyHarness


def test_room_modulo_dp_size():
    h = PolicyHarness("follow_bootstrap_room", dp_size=4)
    assert [h.select(bootstrap_room=r) for r in (0, 1, 4, 5, 100, 101)] == [0, 1, 0, 1, 0, 1]


def test_missing_room_rejects_that_request_only():
    h = PolicyHarness("follow_bootstrap_room", dp_size=4)
    with pytest.raises(MissingBootstrapRoomError, match="through a PD router") as exc:
        h.select(rid="no-room")
    assert exc.value.rid == "no-room" and exc.value.code == "missing_bootstrap_room"
    assert h.select(bootstrap_room=7) == 3


def test_routed_rank_beats_the_room():
    h = PolicyHarness("follow_bootstrap_room", dp_size=4)
    assert h.select(bootstrap_room=5, routed_dp_rank=2) == 2


def test_inactive_target_is_rejected_not_remapped():
    h = PolicyHarness("follow_bootstrap_room", dp_size=4)
    h.kill(1)
    with pytest.raises(InactiveRankError, match="cannot remap"):
        h.select(bootstrap_room=5)
    assert h.select(bootstrap_room=6) == 2


@pytest.mark.parametrize("room", [-1, "12", 1.5])
def test_bad_room_values(room):
    h = PolicyHarness("follow_bootstrap_room", dp_size=4)
    with pytest.raises(MalformedRequestError):
        h.select(bootstrap_room=room)


def test_auto_picks_it_for_prefill():
    h = PolicyHarness("auto", dp_size=2, disaggregation_mode="prefill")
    assert h.manager.chain == ("follow_bootstrap_room",)
