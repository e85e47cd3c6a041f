"""``--dpcore-record``: SGLang's own controller, with the adapter, records what it dispatches."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dpcore.sim.traces import read_trace
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.testing import make_request

pytestmark = pytest.mark.sglang


@pytest.mark.parametrize("method", ["round_robin", "cache_aware"])
def test_the_adapter_records_a_replayable_trace(controller, tmp_path: Path, method: str) -> None:
    """round_robin hashes nothing for itself; the recording hashes the prompts anyway."""
    path = tmp_path / "rec.jsonl"
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method=method, record=str(path)))
    sizes = [100, 300, 300, 64]
    for i, n in enumerate(sizes):
        h.send(make_request(f"r{i}", n, first_token=0 if i < 3 else 7))
    h.deliveries(len(sizes))
    deadline = time.monotonic() + 20
    while (not path.exists() or len(path.read_text().splitlines()) < len(sizes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    trace = read_trace(path, ticks="burst")
    assert trace.block_size == 64  # the adapter's block: whole pages of at least 64 tokens
    assert [(r.input_length, r.output_length) for r in trace.requests] == [(n, 16) for n in sizes]
    # SGLang's controller never hears how long an output was: the budget, and the line says so.
    assert {json.loads(x)["output_from"] for x in path.read_text().splitlines()} == {"budget"}
    a, b, c, d = (r.hash_ids for r in trace.requests)
    assert (len(a), len(b), len(d)) == (2, 5, 1)  # ceil(n / 64)
    assert a[0] == b[0] and b[:4] == c[:4] and d[0] != a[0]  # equal whole-block prefixes, equal ids
    assert a[1] != b[1] and b[4] != c[4]  # a partial last block has an id of its own
