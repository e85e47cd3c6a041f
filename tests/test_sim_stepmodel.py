"""The DP-attention step-time model, on hand-computed numbers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dpcore.sim.stepmodel import (
    LMSYS_DECODE_TOKENS_PER_NODE_S,
    LMSYS_PREFILL_TOKENS_PER_NODE_S,
    StepModel,
    calibration,
)

# Round numbers so every expectation below can be checked by hand.
M = StepModel(
    overhead_s=0.010,
    graph_loss_s=0.005,
    extend_s_per_token=0.001,
    decode_s_per_request=0.002,
    moe_s_per_token=0.0005,
    chunked_prefill_size=8192,
)


def test_a_step_lasts_as_long_as_its_slowest_rank() -> None:
    # Decode on all ranks: 10 ms + max(3, 1, 0) x 2 ms + 0.5 ms x 4 gathered / 3 ranks.
    s = M.step([0, 0, 0], [3, 1, 0])
    assert s.duration_s == pytest.approx(0.010 + 0.006 + 0.0005 * 4 / 3)
    assert s.work_s == (0.006, 0.002, 0.0)
    assert s.graph


def test_an_idle_rank_waits_and_its_wait_is_waste() -> None:
    s = M.step([0, 0], [4, 0])
    # The idle rank runs an idle batch: no work, but the step is as long as rank 0's.
    assert s.work_s[1] == 0.0
    assert s.duration_s == pytest.approx(0.010 + 0.008 + 0.0005 * 4 / 2)
    assert s.waste_s == pytest.approx(0.008)


def test_cuda_graph_loss_only_while_some_rank_extends() -> None:
    decode_only = M.step([0, 0], [2, 2])
    with_extend = M.step([2, 0], [0, 2])
    assert decode_only.graph and not with_extend.graph
    # Same gathered tokens (4) and same slowest work (4 ms decode vs 2 ms extend + 4 ms decode):
    # the only difference is the eager step's graph loss.
    assert with_extend.duration_s - decode_only.duration_s == pytest.approx(0.005)


def test_extend_comes_before_decode_on_a_rank() -> None:
    # A rank with both prompt tokens and decoding requests extends; its decodes wait.
    s = M.step([100], [50])
    assert s.work_s == (0.1,)
    assert s.gathered_tokens == 100


def test_no_tokens_no_step() -> None:
    assert M.step_time_s([0, 0], [0, 0]) == 0.0


def test_chunk_budget_divides_the_global_size_by_dp() -> None:
    assert M.chunk_budget(8) == 1024
    assert M.chunk_budget(16) == 512
    assert M.chunk_budget(1) == 8192
    assert StepModel(chunked_prefill_size=4).chunk_budget(8) == 1


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"overhead_s": 0}, "overhead_s must be a positive number"),
        ({"graph_loss_s": -1}, "graph_loss_s must be a number >= 0"),
        ({"moe_s_per_token": float("nan")}, "moe_s_per_token"),
        ({"chunked_prefill_size": 0}, "chunked_prefill_size must be an integer >= 1"),
        ({"chunked_prefill_size": 2.5}, "chunked_prefill_size must be an integer >= 1"),
    ],
)
def test_bad_constants_are_named(kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        StepModel(**kwargs)


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="one entry per rank"):
        M.step([1, 2], [0])
    with pytest.raises(ValueError, match=">= 0"):
        M.step([-1], [0])


def test_defaults_reproduce_the_lmsys_operating_points() -> None:
    c = calibration()
    assert c["decode_itl_s"] == pytest.approx(0.100, rel=0.01)
    assert c["decode_tokens_per_node_s"] == pytest.approx(LMSYS_DECODE_TOKENS_PER_NODE_S, rel=0.01)
    assert c["prefill_tokens_per_node_s"] == pytest.approx(LMSYS_PREFILL_TOKENS_PER_NODE_S, rel=0.02)


def test_importing_it_pulls_no_numeric_stack() -> None:
    code = "import sys, dpcore.sim.stepmodel; print(sorted({'numpy', 'matplotlib'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
