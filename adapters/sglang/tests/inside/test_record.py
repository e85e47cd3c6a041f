"""``--dpcore-record``: SGLang's own controller, with the adapter, records what it dispatches,
with the output lengths SGLang's TokenizerManager (hooked) reports."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from sglang.srt.disaggregation.utils import DisaggregationMode
from sglang.srt.managers.io_struct import AbortReq, BatchStrOutput, GenerateReqInput
from sglang.srt.runtime_context import publish

from dpcore.sim.traces import read_trace
from dpcore_sglang import output_lengths
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.testing import free_port, make_request, scrape, tokenizer_manager_class

pytestmark = pytest.mark.sglang


def wait_lines(path: Path, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while (not path.exists() or len(path.read_text().splitlines()) < n) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("method", ["round_robin", "cache_aware"])
def test_the_adapter_records_a_replayable_trace(controller, tmp_path: Path, method: str) -> None:
    """round_robin hashes nothing for itself; the recording hashes the prompts anyway."""
    path = tmp_path / "rec.jsonl"
    # No waiting for output lengths: every line carries the budget at once, and says so.
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method=method, record=str(path), record_hold_s=0))
    sizes = [100, 300, 300, 64]
    for i, n in enumerate(sizes):
        h.send(make_request(f"r{i}", n, first_token=0 if i < 3 else 7))
    h.deliveries(len(sizes))
    assert {x["output_from"] for x in wait_lines(path, len(sizes))} == {"budget"}
    trace = read_trace(path, ticks="burst")
    assert trace.block_size == 64  # the adapter's block: whole pages of at least 64 tokens
    assert [(r.input_length, r.output_length) for r in trace.requests] == [(n, 16) for n in sizes]
    a, b, c, d = (r.hash_ids for r in trace.requests)
    assert (len(a), len(b), len(d)) == (2, 5, 1)  # ceil(n / 64)
    assert a[0] == b[0] and b[:4] == c[:4] and d[0] != a[0]  # equal whole-block prefixes, equal ids
    assert a[1] != b[1] and b[4] != c[4]  # a partial last block has an id of its own


@pytest.fixture
def tokenizer_manager() -> Iterator[Any]:
    """SGLang's real TokenizerManager class, its output and abort handlers hooked as the launcher
    does with ``--dpcore-record``, and an instance with the state those handlers read."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    TokenizerManager = tokenizer_manager_class()  # noqa: N806 - the class

    originals = (TokenizerManager._handle_batch_output, TokenizerManager._handle_abort_req)
    output_lengths.register(lambda: True)
    HookRegistry.apply_hooks()  # what SGLang's load_plugins does next in the server's process
    assert TokenizerManager._handle_batch_output.__wrapped__ is originals[0]
    try:
        yield TokenizerManager
    finally:
        TokenizerManager._handle_batch_output, TokenizerManager._handle_abort_req = originals
        HookRegistry.reset()


def manager(cls: Any, send_to_scheduler: Any) -> Any:
    """A TokenizerManager with what ``_handle_batch_output``/``_handle_abort_req`` read
    (building a whole one needs a model and a server)."""
    tm = object.__new__(cls)
    tm.__dict__.update(rid_to_state={}, enable_metrics=False, incremental_streaming_output=False, enable_lora=False,
                       dump_requests_folder="", crash_dump_folder="", tokenizer_ipc_name=None, model_path="dummy",
                       served_model_name="dummy", send_to_scheduler=send_to_scheduler)  # fmt: skip
    return tm


def track(tm: Any, rid: str) -> Any:
    """*rid*'s state, as TokenizerManager keeps it while the request runs."""
    from sglang.srt.managers.tokenizer_manager import ReqState
    from sglang.srt.observability.req_time_stats import APIServerReqTimeStats

    obj = GenerateReqInput(text="x", rid=rid)
    tm.rid_to_state[rid] = ReqState([], False, asyncio.Event(), obj, APIServerReqTimeStats(disagg_mode=DisaggregationMode.NULL))
    return tm.rid_to_state[rid]


def outputs(rids: list[str], finished: list[bool], completion_tokens: list[int]) -> BatchStrOutput:
    """The detokenizer's output batch for *rids* (fields a CPU test has no use for left empty)."""
    n = len(rids)
    fields: dict[str, Any] = {f.name: None for f in msgspec.structs.fields(BatchStrOutput) if f.required}
    fields.update(rids=rids, finished_reasons=[{"type": "stop"} if f else None for f in finished],
                  completion_tokens=completion_tokens, output_strs=["x"] * n, output_ids=[[1]] * n,
                  prompt_tokens=[0] * n, reasoning_tokens=[0] * n, cached_tokens=[0] * n, retraction_counts=[0] * n)  # fmt: skip
    return BatchStrOutput(**fields)


def test_the_tokenizers_output_lengths_reach_the_recording(controller, tokenizer_manager, tmp_path: Path) -> None:
    """Requests finished in SGLang's real output and abort handlers are recorded with the tokens
    they generated (``completion_tokens``; an abort: what it had), not their budget; a request the
    adapter rejects keeps its budget. Unreadable frames of output lengths are refused, and
    SGLang's controller goes on; the adapter's metrics count all of it."""
    path = tmp_path / "rec.jsonl"
    port = free_port()
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method="round_robin", record=str(path), metrics_port=port))
    publish(h.server_args, role="tokenizer")  # as SGLang's launcher does before it builds the TokenizerManager
    tm = manager(tokenizer_manager, h.tokenizer_out)
    for i in range(4):
        track(tm, f"r{i}")
        h.send(make_request(f"r{i}", 100))  # a budget of 16 tokens
    h.deliveries(4)
    h.send_raw(output_lengths.MAGIC + b"\xc1")  # not msgpack
    h.send_raw(output_lengths.frame(["r0", "many", "r1", -2]))  # not counts: neither pair is used

    async def finish() -> None:
        await tokenizer_manager._handle_batch_output(tm, outputs(["r0", "r1", "r2"], [True, False, True], [5, 3, 9]))
        await tokenizer_manager._handle_batch_output(tm, outputs(["r1"], [True], [7]))
        await tokenizer_manager._handle_batch_output(tm, outputs(["r1"], [True], [8]))  # r1 ended: not sent again

    asyncio.run(finish())
    tm.rid_to_state["r3"].output_ids.extend([1, 2])
    tokenizer_manager._handle_abort_req(tm, AbortReq(rid="r3"))
    assert tm.rid_to_state == {}  # SGLang's own handling ran
    # The adapter rejects r4 (a rank that does not exist): the budget, also after the tokenizer
    # handles the adapter's AbortReq for it.
    track(tm, "r4")
    h.send(make_request("r4", 100, routed_dp_rank=9))
    tokenizer_manager._handle_abort_req(tm, AbortReq(rid="r4"))
    lines = wait_lines(path, 5)
    assert [(x["output_length"], x["output_from"]) for x in lines] == [
        (5, "generated"), (7, "generated"), (9, "generated"), (2, "generated"), (16, "budget")
    ]
    deadline = time.monotonic() + 10  # the writer's counts reach the controller after its lines
    while (m := scrape(port))[("dpcore_record_generated_total", ())] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert m[("dpcore_record_generated_total", ())] == 4
    outcome = {dict(labels)["outcome"]: v for (name, labels), v in m.items() if name == "dpcore_record_output_lengths_total"}
    assert outcome == {"received": 5, "refused": 3}  # r4's late count too; one unreadable frame, two bad pairs
