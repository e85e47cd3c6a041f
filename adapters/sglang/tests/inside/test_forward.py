"""Requests forwarded as the tokenizer encoded them: placed from their route header, never decoded in the controller."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import msgpack
import msgspec
import pytest
from sglang.srt.managers.io_struct import TokenizedGenerateReqInput
from sglang.srt.observability.req_time_stats import APIServerReqTimeStats, SchedulerReqTimeStats
from sglang.srt.runtime_context import publish
from sglang.srt.server_args import ServerArgs

from dpcore_sglang import tokenizer_hashes
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.forward import route_header
from dpcore_sglang.testing import free_port, make_request, scrape
from dpcore_sglang.tokenizer_hashes import MAGIC

pytestmark = pytest.mark.sglang


@pytest.fixture
def hooked(hooked_tokenizer_manager: Any) -> tuple[Any, Any]:
    """The hooked ``_dispatch_to_scheduler`` and SGLang's original."""
    method = hooked_tokenizer_manager._dispatch_to_scheduler
    return method, method.__wrapped__


def full_request(rid: str, **fields: Any) -> TokenizedGenerateReqInput:
    """A tokenized request as TokenizerManager sends it, with its time stats and some options set."""
    req = make_request(rid, 300, first_token=7, **fields)
    req.time_stats = APIServerReqTimeStats()
    req.time_stats.set_created_time()
    req.time_stats.set_api_server_dispatch_time()
    req.sampling_params.temperature = 0.5
    req.priority = 3
    req.routing_key = "key"
    return req


def start(controller: Any, method: str | None, **kw: Any) -> tuple[Any, int | None]:
    port = free_port() if method else None
    adapter = AdapterConfig(method=method, metrics_port=port) if method else None
    h = controller(dp_size=4, sglang_method="round_robin", adapter=adapter, mode="echo", **kw)
    publish(h.server_args, role="tokenizer")  # as SGLang's launcher does before it builds the TokenizerManager
    return h, port


def tm_for(h: Any) -> SimpleNamespace:
    return SimpleNamespace(send_to_scheduler=h.tokenizer_out, tokenizer_ipc_name=None)


def delivered(h: Any, n: int = 1) -> list[tuple[int, bytes]]:
    got = h.deliveries(n)
    assert len(got) == n, f"{len(got)} of {n} requests reached a scheduler"
    return [(d.rank, d.kind) for d in got]


def fields(req: Any) -> dict[str, Any]:
    """Every field of a received request, time stats as the scheduler's ``Req`` takes them."""
    out = msgspec.structs.asdict(req)
    out["sampling_params"] = msgspec.structs.asdict(out["sampling_params"])
    stats = SchedulerReqTimeStats.new_from_obj(out.pop("time_stats")).__dict__
    # Only converts the *time keys of a state that has none (see dpcore_sglang.forward);
    # each process sends its own reading of time.time() - time.perf_counter().
    out["time_stats.diff_realtime_monotonic"] = pytest.approx(stats.pop("diff_realtime_monotonic"), abs=0.05)
    out["time_stats.trace_ctx"] = type(stats.pop("trace_ctx")).__name__
    out.update({f"time_stats.{k}": v for k, v in stats.items() if k != "scheduler_recv_time"})
    return out


def metric(port: int, name: str) -> dict[str, float]:
    return {next(iter(dict(labels).values()), ""): v for (n, labels), v in scrape(port).items() if n == name}


def test_a_forwarded_request_reaches_the_scheduler_as_sglangs_own_controller_delivers_it(controller, hooked):
    hooked_send, original_send = hooked
    own, _ = start(controller, None)
    original_send(tm_for(own), full_request("r1"))
    [(_, own_bytes)] = delivered(own)
    ours, port = start(controller, "cache_aware")
    req = full_request("r1")
    expected_bytes = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
    hooked_send(tm_for(ours), req)
    [(_, fwd_bytes)] = delivered(ours)
    assert fwd_bytes == expected_bytes  # the tokenizer's own encoding, byte for byte
    assert fields(pickle.loads(fwd_bytes)) == fields(pickle.loads(own_bytes))
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 1, "decoded": 0}
    # Without the hook (SGLang's own send), the adapter decodes it: the same fields again.
    original_send(tm_for(ours), full_request("r1"))
    [(_, decoded_bytes)] = delivered(ours)
    assert fields(pickle.loads(decoded_bytes)) == fields(pickle.loads(own_bytes))
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 1, "decoded": 1}
    assert metric(port, "dpcore_block_hashes_total") == {"tokenizer": 1, "controller": 1}


def test_the_route_header_decides_the_body_is_never_decoded(controller):
    # The header pins each request to a rank its body does not name, and the body is not a
    # request at all: it reaches that rank unread and unchanged.
    h, port = start(controller, "total_requests")
    for rank in (3, 1, 2):
        req = make_request(f"pinned{rank}", 100, routed_dp_rank=rank)
        header = msgpack.packb(route_header(req, 0))
        body = b"not a pickle: only the scheduler reads this " + bytes([rank])
        h.send_raw(MAGIC + len(header).to_bytes(4, "little") + header + body)
        assert delivered(h) == [(rank, body)]
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 3, "decoded": 0}


def bad_route_frames(req: Any) -> list[tuple[str, bytes]]:
    body = pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL)
    good = route_header(req, 0)

    def frame(header: Any) -> bytes:
        raw = header if type(header) is bytes else msgpack.packb(header)
        return MAGIC + len(raw).to_bytes(4, "little") + raw + body

    return [
        ("short", frame(good[:-1])),  # a field missing
        ("rid", frame([0, 17, *good[2:]])),  # the rid not a string
        ("max_new_tokens", frame([*good[:4], "many", *good[5:]])),
        ("rank", frame([*good[:5], 1.5, *good[6:]])),
        ("num_tokens", frame([*good[:3], -1, *good[4:]])),
        ("unreadable", frame(b"\xc1\xc1")),
    ]


def test_a_wrong_or_short_route_header_is_refused_counted_and_the_request_still_served(controller):
    h, port = start(controller, "total_requests")
    req = make_request("bad-header", 100, routed_dp_rank=2)
    frames = bad_route_frames(req)
    for _name, frame in frames:
        h.send_raw(frame)
    got = delivered(h, len(frames))
    # Each was decoded and placed from its body (pinned to rank 2), and arrived as SGLang encodes it.
    assert [rank for rank, _ in got] == [2] * len(frames)
    assert all(pickle.loads(raw).rid == "bad-header" for _, raw in got)
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 0, "decoded": len(frames)}
    assert metric(port, "dpcore_route_headers_refused_total") == {"header": len(frames)}


def test_a_chain_that_reads_block_hashes_decodes_a_request_whose_header_has_none(controller):
    h, port = start(controller, "cache_aware")
    req = make_request("no-keys", 300)
    header = msgpack.packb(route_header(req, 0))  # hashed by nobody
    h.send_raw(MAGIC + len(header).to_bytes(4, "little") + header + pickle.dumps(req))
    assert len(delivered(h)) == 1
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 0, "decoded": 1}
    assert metric(port, "dpcore_route_headers_refused_total") == {"keys": 1}
    assert metric(port, "dpcore_block_hashes_total") == {"tokenizer": 0, "controller": 1}


def test_health_checks_and_multimodal_requests_take_sglangs_path(controller, hooked):
    hooked_send, _ = hooked
    h, port = start(controller, "total_requests")
    hooked_send(tm_for(h), make_request("HEALTH_CHECK_1", 10))
    mm = make_request("mm", 10)
    mm.mm_inputs = {"mm_items": []}  # anything set: the controller must see it as SGLang does
    hooked_send(tm_for(h), mm)
    assert len(delivered(h, 2)) == 2
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 0, "decoded": 1}  # + 1 health check


def test_a_request_whose_header_cannot_be_built_is_sent_as_sglang_sends_it(controller, hooked):
    import numpy as np

    hooked_send, _ = hooked
    h, port = start(controller, "total_requests")
    # SGLang's structs do not check types on assignment; msgpack cannot carry a numpy integer.
    hooked_send(tm_for(h), make_request("np-rank", 10, bootstrap_room=np.int64(5)))
    assert len(delivered(h)) == 1
    assert metric(port, "dpcore_requests_forwarded_total") == {"forwarded": 0, "decoded": 1}


@pytest.mark.parametrize(
    ("args", "plan"),
    [
        ({"dp_size": 4}, (64, True)),
        ({"dp_size": 4, "enable_trace": True}, (64, False)),  # SGLang's controller records a span per request
        ({"dp_size": 1}, (0, False)),  # no controller: a scheduler reads the tokenizer's messages
        ({"dp_size": 4, "tokenizer_worker_num": 2}, (0, False)),  # a router between re-encodes messages
    ],
)
def test_route_headers_only_for_a_dpcore_controller_without_tracing(args, plan):
    config = AdapterConfig(method="cache_aware")
    publish(ServerArgs(model_path="dummy", **args), role="tokenizer")
    assert tokenizer_hashes.tokenizer_plan(lambda page: config.hashed_block_size(True, page)) == plan
    assert tokenizer_hashes.tokenizer_plan(lambda page: config.hashed_block_size(True, page), forward=False)[1] is False


MSGPACK_IPC_RUN = """
import json, sys
from dpcore_sglang.testing import ControllerHarness, free_port, make_request, scrape
from sglang.srt.managers import io_struct
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.tokenizer_hashes import frame_with_route

import msgspec
from sglang.srt.observability.req_time_stats import APIServerReqTimeStats, SchedulerReqTimeStats

def fields(raw):
    d = msgspec.structs.asdict(io_struct.msgpack_decode(raw))
    d["sampling_params"] = msgspec.structs.asdict(d["sampling_params"])
    stats = SchedulerReqTimeStats.new_from_obj(io_struct.unwrap_from_pickle(d.pop("time_stats"))).__dict__
    d["time_stats"] = {k: type(v).__name__ if k == "trace_ctx" else v for k, v in stats.items()
                       if k not in ("diff_realtime_monotonic", "scheduler_recv_time")}
    return repr(sorted(d.items()))

assert not io_struct._USE_PICKLE_IPC
req = make_request("m1", 300, routed_dp_rank=1)
req.time_stats = APIServerReqTimeStats()
req.wrap_pickle_fields()  # as TokenizerManager._send_one_request does before sending
encoded = io_struct.msgpack_encode(req)
out = {}
for name, adapter in (("sglang", None), ("dpcore", AdapterConfig(method="total_requests", metrics_port=free_port()))):
    with ControllerHarness(dp_size=2, adapter=adapter, mode="echo") as h:
        frames = [encoded] if adapter is None else [frame_with_route(encoded, req, 0), encoded]
        for frame in frames:
            h.send_raw(frame)
        got = h.deliveries(len(frames))
        out[name] = [(d.rank, d.kind == encoded, fields(d.kind)) for d in got]
        if adapter is not None:
            m = scrape(adapter.metrics_port)
            out["paths"] = {dict(l)["path"]: v for (n, l), v in m.items() if n == "dpcore_requests_forwarded_total"}
        assert h.alive() and not h.quit_signals
print(json.dumps(out))
"""


def test_with_sglangs_msgpack_ipc_requests_are_forwarded_too(tmp_path):
    # SGLang reads SGLANG_USE_PICKLE_IPC once, at import: a process of its own.
    env = {**os.environ, "SGLANG_USE_PICKLE_IPC": "0"}
    proc = subprocess.run([sys.executable, "-c", MSGPACK_IPC_RUN], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    [(own_rank, _, own_fields)] = out["sglang"]
    assert own_rank == 1
    # Forwarded: the tokenizer's bytes; decoded (no header): encoded again, as SGLang does.
    # Both reach rank 1 with the fields SGLang's own controller delivers.
    [forwarded, decoded] = out["dpcore"]
    assert forwarded == [1, True, own_fields]
    assert decoded[0] == 1 and decoded[2] == own_fields
    assert out["paths"] == {"forwarded": 1, "decoded": 1}
