"""``dpcore trace convert --format sglang-log`` on what SGLang's own ``RequestLogger`` writes
(``sglang/srt/utils/request_logger.py``, ``--log-requests --log-requests-format json``)."""

from __future__ import annotations

import time
from pathlib import Path

from dpcore.hashing import block_hashes
from dpcore.sim.convert import convert
from dpcore.sim.traces import read_trace

#: (rid, prompt token ids, completion tokens, seconds between this request and the next)
REQUESTS = [
    ("a", list(range(200)), 5, 0.05),
    ("b", [*range(150), *range(1000, 1050)], 7, 0.05),  # shares the first 128 tokens (2 blocks) with "a"
    ("c", list(range(5000, 5300)), 3, 0.0),
]


def write_log(directory: Path, level: int = 3) -> Path:
    """Log REQUESTS with SGLang's RequestLogger as a server would: received, then finished."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.utils.request_logger import RequestLogger

    logger = RequestLogger(
        log_requests=True, log_requests_level=level, log_requests_format="json", log_requests_target=[str(directory)]
    )
    objs = []
    for rid, ids, _, gap in REQUESTS:
        obj = GenerateReqInput(rid=rid, input_ids=ids, sampling_params={"max_new_tokens": 16})
        logger.log_received_request(obj)
        objs.append(obj)
        time.sleep(gap)
    for obj, (rid, ids, n_out, _) in reversed(list(zip(objs, REQUESTS))):  # finished in another order
        meta = {"id": rid, "prompt_tokens": len(ids), "completion_tokens": n_out, "cached_tokens": 0, "e2e_latency": 0.1}
        logger.log_finished_request(obj, {"text": "x" * n_out, "output_ids": list(range(n_out)), "meta_info": meta})
    for handler in logger.targets[0].handlers:
        handler.flush()
    (log,) = directory.glob("*.log")
    return log


def test_sglang_request_log_converts(tmp_path: Path) -> None:
    log = write_log(tmp_path / "logs")
    out = tmp_path / "trace.jsonl"
    counts = convert(str(log), str(out), "sglang-log", block_size=64)
    assert counts["requests"] == 3 and counts["with_block_ids"] == 3
    trace = read_trace(out, ticks="burst")
    assert [(r.input_length, r.output_length) for r in trace.requests] == [(len(i), n) for _, i, n, _ in REQUESTS]
    a, b, c = (r.hash_ids for r in trace.requests)
    assert a[:2] == b[:2] and a[2] != b[2] and not set(c) & set(a)
    assert not set(a) & set(block_hashes(REQUESTS[0][1], 64))  # salted
    assert 0.04 < trace.requests[1].arrival < 1.0  # the received lines' times, in arrival order
    assert "1000, 1001" not in out.read_text()


def test_a_log_without_whole_prompts_gives_no_block_ids(tmp_path: Path) -> None:
    log = write_log(tmp_path / "logs", level=0)  # level 0 logs no input_ids at all
    out = tmp_path / "trace.jsonl"
    counts = convert(str(log), str(out), "sglang-log", block_size=64)
    assert (counts["requests"], counts["with_block_ids"]) == (3, 0)
    assert [r.hash_ids for r in read_trace(out).requests] == [(), (), ()]


def test_level_two_cuts_long_prompts_which_get_no_block_ids(tmp_path: Path) -> None:
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.utils.request_logger import RequestLogger

    logger = RequestLogger(log_requests=True, log_requests_level=2, log_requests_format="json",
                           log_requests_target=[str(tmp_path / "logs")])  # fmt: skip
    for rid, n in (("short", 300), ("long", 3000)):
        obj = GenerateReqInput(rid=rid, input_ids=list(range(n)))
        meta = {"prompt_tokens": n, "completion_tokens": 1, "e2e_latency": 0.0}
        logger.log_finished_request(obj, {"meta_info": meta})
    (log,) = (tmp_path / "logs").glob("*.log")
    out = tmp_path / "trace.jsonl"
    convert(str(log), str(out), "sglang-log", block_size=64)
    short, long = read_trace(out, ticks="burst").requests
    assert (len(short.hash_ids), long.hash_ids) == (5, ())
