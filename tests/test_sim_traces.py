"""Trace readers: both formats, tick spreading, time scale, limit, and line-numbered errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpcore.errors import DpcoreError
from dpcore.sim.traces import TraceError, read_trace

DATA = Path(__file__).parent / "data"
MOONCAKE = DATA / "mooncake_conversation_head300.jsonl"
AZURE = DATA / "azure_conv_head300.csv"


def test_mooncake_fields_and_block_hashes() -> None:
    t = read_trace(MOONCAKE)
    assert t.format == "mooncake" and t.block_size == 512 and len(t) == 300
    first = t.requests[0]
    assert (first.input_length, first.output_length) == (6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert all(len(r.hash_ids) == -(-r.input_length // 512) for r in t.requests)


def test_quantized_ticks_are_spread_evenly_in_file_order() -> None:
    burst = read_trace(MOONCAKE, ticks="burst")
    spread = read_trace(MOONCAKE, seed=3)
    assert burst.tick_s == 0.0 and spread.tick_s == pytest.approx(3.0, abs=0.01)
    raw = [r.arrival for r in burst.requests]
    arr = [r.arrival for r in spread.requests]
    assert arr == sorted(arr)
    # every request stays inside its own tick, and one tick's requests are evenly spaced
    assert all(a <= s < a + 3.01 for a, s in zip(raw, arr))
    tick0 = [s for a, s in zip(raw, arr) if a == 0.0]
    gaps = {round(b - a, 9) for a, b in zip(tick0, tick0[1:])}
    assert len(tick0) > 2 and len(gaps) == 1
    assert arr != [r.arrival for r in read_trace(MOONCAKE, seed=4).requests]
    assert arr == [r.arrival for r in read_trace(MOONCAKE, seed=3).requests]


def test_azure_reads_seconds_and_has_no_prefixes() -> None:
    t = read_trace(AZURE)
    assert t.format == "azure" and t.block_size == 0 and t.tick_s == 0.0 and len(t) == 300
    assert t.requests[0].arrival == 0.0
    # 18:15:46.6805900 -> 18:15:50.9951690
    assert t.requests[1].arrival == pytest.approx(4.314579)
    assert (t.requests[1].input_length, t.requests[1].output_length) == (396, 109)
    assert all(r.hash_ids == () for r in t.requests)


def test_time_scale_divides_inter_arrivals_and_limit_truncates() -> None:
    base = read_trace(AZURE, limit=50)
    fast = read_trace(AZURE, limit=50, time_scale=2.5)
    assert len(base) == 50
    for a, b in zip(base.requests, fast.requests):
        assert b.arrival == pytest.approx(a.arrival / 2.5)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n{"oops"\n', 2, "JSON"),
        ('{"timestamp": 0, "input_length": 10, "hash_ids": [1]}\n', 1, "output_length"),
        ('{"timestamp": 0, "input_length": 1030, "output_length": 1, "hash_ids": [1]}\n', 1, "need 3"),
        ('{"timestamp": 5, "input_length": 9, "output_length": 1, "hash_ids": [1]}\n'
         '{"timestamp": 1, "input_length": 9, "output_length": 1, "hash_ids": [2]}\n', 2, "backwards"),
        ('{"timestamp": 0, "input_length": -4, "output_length": 1, "hash_ids": []}\n', 1, "input_length"),
    ],
)
def test_bad_mooncake_lines_name_the_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(TraceError, match=words) as info:
        read_trace(p)
    assert info.value.line == line and f"bad.jsonl:{line}:" in str(info.value)
    assert isinstance(info.value, DpcoreError)


def test_bad_azure_rows_name_the_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\nnot-a-time,1,1\n")
    with pytest.raises(TraceError, match="TIMESTAMP") as info:
        read_trace(p)
    assert info.value.line == 3
    p.write_text("when,ContextTokens\n1,2\n")
    with pytest.raises(TraceError, match="lacks"):
        read_trace(p)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no such file"):
        read_trace(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(empty)
    with pytest.raises(TraceError, match="time scale"):
        read_trace(MOONCAKE, time_scale=0)
