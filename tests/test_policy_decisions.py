"""cache_aware decides exactly as when its results were measured.

``tests/data/cache_aware_decisions.json`` holds digests of every decision (rank, reason and
the explanation's scores) of 28 short simulator runs: the Mooncake conversation trace and the
tool-agent trace, dp 4 and 8, without and with KV events, with lost event batches, with rank
faults, and with a small KV cache and small policy memory bounds. A change that makes the
policy cheaper must leave them alone; a change meant to alter decisions re-records them
(``scripts/policy_decisions.py --out tests/data/cache_aware_decisions.json --digests --limit 300``)
and re-measures the results pages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "cache_aware_decisions.json"
sys.path.insert(0, str(REPO / "scripts"))
import policy_decisions  # noqa: E402


def test_every_recorded_decision_is_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = policy_decisions.read(GOLDEN)
    assert len(runs) == 28
    assert {h["variant"] for h, _ in runs} == set(policy_decisions.VARIANTS)
    assert policy_decisions.check(GOLDEN, tmp_path, as_digests=True) == 0, capsys.readouterr().out


def test_a_changed_decision_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same run with a slightly different cost weight must not match its digests: the
    # check sees decisions, not just that the runs finished.
    header, want = next((h, w) for h, w in policy_decisions.read(GOLDEN) if h["variant"] == "small")
    scenario = {k: v for k, v in header.items() if k != "policy"}
    monkeypatch.setitem(policy_decisions.VARIANTS, "small", (*policy_decisions.VARIANTS["small"][:1],
                        {**policy_decisions.BY_COUNT, "work_weight": 7.5}, None))  # fmt: skip
    assert policy_decisions.digests("cache_aware", scenario, tmp_path) != json.loads(want[0])
