"""``dpcore trace convert``: SGLang request logs and OpenAI-style JSONL into traces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpcore.hashing import block_hashes
from dpcore.http.protocol import chat_prompt
from dpcore.http.tokenizer import ByteTokenizer
from dpcore.sim.convert import convert
from dpcore.sim.traces import TraceError, read_trace

DATA = Path(__file__).parent / "data"
SGLANG_LOG = DATA / "sglang_request_log.log"
DPCORE = [sys.executable, "-m", "dpcore"]
SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 6}


def jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_sglang_log_lengths_arrivals_and_prefixes(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    counts = convert(str(SGLANG_LOG), str(out), "sglang-log", block_size=64)
    assert (counts["requests"], counts["with_block_ids"]) == (3, 3)
    trace = read_trace(out, ticks="burst")
    # Logged finished in reverse order; the trace is in arrival order (the received lines).
    assert [(r.input_length, r.output_length) for r in trace.requests] == [(200, 5), (200, 7), (300, 3)]
    assert [r.arrival for r in trace.requests] == sorted(r.arrival for r in trace.requests)
    assert 0.04 < trace.requests[1].arrival < 2.0
    a, b, c = (r.hash_ids for r in trace.requests)
    assert a[:2] == b[:2] and a[2] != b[2] and not set(c) & set(a)  # 128 shared tokens = 2 blocks
    assert not set(a) & set(block_hashes(list(range(200)), 64))  # salted


def test_sglang_log_without_received_lines_uses_the_latency(tmp_path: Path) -> None:
    finished = [x for x in SGLANG_LOG.read_text().splitlines() if "request.finished" in x]
    log = tmp_path / "finished.log"
    log.write_text("some other server line\n" + "\n".join(finished) + "\n")
    convert(str(log), str(tmp_path / "t.jsonl"), "sglang-log")
    trace = read_trace(tmp_path / "t.jsonl", ticks="burst")
    # Arrival = finish time - e2e_latency (0.1 s each here): the order they were logged finishing.
    assert [(r.input_length, r.output_length) for r in trace.requests] == [(300, 3), (200, 7), (200, 5)]


def test_sglang_text_log_is_refused_with_the_flag_to_use(tmp_path: Path) -> None:
    log = tmp_path / "text.log"
    log.write_text("[2026-01-01 00:00:00] Finish: obj=GenerateReqInput(rid='x'), out={'meta_info': {}}\n")
    with pytest.raises(TraceError, match=r"text.log:1: .*--log-requests-format json"):
        convert(str(log), str(tmp_path / "t.jsonl"), "sglang-log")


def test_openai_jsonl_hashes_like_the_http_front(tmp_path: Path) -> None:
    msgs1 = [SYSTEM, {"role": "user", "content": "What is the capital of France?"}]
    msgs2 = [SYSTEM, {"role": "user", "content": "And of Spain?"}]
    src = jsonl(tmp_path / "p.jsonl", [
        {"timestamp": 10.0, "messages": msgs1, "max_tokens": 32},
        {"timestamp": 10.5, "messages": msgs2},
        {"prompt": "Once upon a time", "max_tokens": 64},
        {"custom_id": "q4", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8}},
        {"text": "native", "sampling_params": {"max_new_tokens": 3}},
    ])  # fmt: skip
    out = tmp_path / "t.jsonl"
    convert(str(src), str(out), "openai-jsonl", block_size=16, rate=2.0)
    trace = read_trace(out, ticks="burst")
    tok = ByteTokenizer()
    lengths = [len(tok.encode(chat_prompt(msgs1))), len(tok.encode(chat_prompt(msgs2))), 16]
    assert [r.input_length for r in trace.requests][:3] == lengths
    assert [r.output_length for r in trace.requests] == [32, 128, 64, 8, 3]  # 128: the front's chat default
    assert [r.arrival for r in trace.requests] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    a, b = trace.requests[0].hash_ids, trace.requests[1].hash_ids
    shared = len(tok.encode(chat_prompt([SYSTEM]))) // 16 - 1  # whole blocks of the shared system turn
    assert a[:shared] == b[:shared] and a[shared + 1] != b[shared + 1]
    text = out.read_text()
    assert "capital" not in text and "Once upon" not in text


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        (["not json"], r"p.jsonl:2: not valid JSON"),
        ([{"prompt": 5}], r"p.jsonl:2: completion request: prompt must be a string"),
        ([{"messages": []}], r"p.jsonl:2: chat request: messages must be a non-empty list"),
        ([{"model": "x"}], r"p.jsonl:2: no prompt"),
        ([{"prompt": "x", "timestamp": -1}], r"p.jsonl:2: timestamp must be a number of seconds"),
    ],
)
def test_bad_lines_name_the_line(tmp_path: Path, rows: list, match: str) -> None:
    path = tmp_path / "p.jsonl"
    good = json.dumps({"prompt": "fine"}) + "\n"
    path.write_text(good + "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    with pytest.raises(TraceError, match=match):
        convert(str(path), str(tmp_path / "t.jsonl"), "openai-jsonl")
    assert not (tmp_path / "t.jsonl").exists()  # nothing half-written


def test_cli_converts_and_simulate_replays(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    conv = subprocess.run([*DPCORE, "trace", "convert", "--format", "sglang-log", str(SGLANG_LOG), "-o", str(out)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert conv.returncode == 0, conv.stderr
    assert "3 requests" in conv.stdout and "dpcore simulate --trace" in conv.stdout
    sim = subprocess.run([*DPCORE, "simulate", "--trace", str(out), "--policy", "round_robin", "--dp-size", "2",
                          "--format", "json"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    assert json.loads(sim.stdout)["run"]["trace"]["requests"] == 3
    bad = subprocess.run([*DPCORE, "trace", "convert", "--format", "openai-jsonl", str(SGLANG_LOG), "-o", str(out)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "sglang_request_log.log:1: not valid JSON" in bad.stderr
