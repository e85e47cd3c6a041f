"""The adapter's SGLang-free parts, in dpcore's own environment (no SGLang installed)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import msgpack
import pytest
import zmq

from dpcore.errors import ConfigError
from dpcore.hashing import block_hashes, block_key_bytes
from dpcore.ledger import LoadLedger
from dpcore_sglang import launch_server, versions
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.convert import SnapshotFeed, to_request
from dpcore_sglang.recv import BlockingReceiver
from dpcore_sglang.forward import FORWARDED, ROUTE_FIELDS, forwardable, route_header
from dpcore_sglang.tokenizer_hashes import MAGIC, Carried, carry, entries_for, frame_with_route
from dpcore_sglang.venv import pinned_file, venv_key


def snapshot(rank: int, ts: float, running: int = 0, waiting: int = 0, tokens: int = 0) -> SimpleNamespace:
    """The fields of SGLang's LoadSnapshot the feed reads."""
    return SimpleNamespace(
        dp_rank=rank,
        timestamp=ts,
        num_running_reqs=running,
        num_waiting_reqs=waiting,
        num_total_tokens=tokens,
        num_used_tokens=tokens,
        max_total_num_tokens=100_000,
    )


def tokenized(**fields) -> SimpleNamespace:
    base = dict(
        rid="r1",
        input_ids=list(range(200)),
        input_embeds=None,
        sampling_params=SimpleNamespace(max_new_tokens=32),
        bootstrap_room=None,
        routed_dp_rank=None,
        disagg_prefill_dp_rank=None,
    )
    base.update(fields)
    return SimpleNamespace(**base)


# ----------------------------------------------------------------------------- config


def test_config_round_trips_through_the_environment_variable():
    c = AdapterConfig(
        method="cache_aware,total_tokens", options={"cache_aware": {"balance_abs": 32}}, block_size=128, metrics_port=9464,
        record="/var/log/dpcore/traffic.jsonl", record_sample=0.25, record_hold_s=60.0,
    )
    assert AdapterConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"method": "x", "surprise": 1}', "unknown keys"),
        ('{"options": {"cache_aware": 3}}', "options must map"),
        ('{"block_hashes": "sometimes"}', "block_hashes must be one of"),
        ('{"block_size": 0}', "block_size must be a positive integer"),
    ],
)
def test_bad_config_is_a_config_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        AdapterConfig.from_json(raw)


def test_block_size_is_whole_pages_of_at_least_64_tokens():
    auto = AdapterConfig()
    assert auto.hashed_block_size(True, page_size=1) == 64
    assert auto.hashed_block_size(True, page_size=16) == 64
    assert auto.hashed_block_size(True, page_size=48) == 96
    assert auto.hashed_block_size(True, page_size=256) == 256
    assert AdapterConfig(block_size=256).hashed_block_size(True, page_size=64) == 256
    with pytest.raises(ConfigError, match="not a multiple of SGLang's page size 64"):
        AdapterConfig(block_size=100).hashed_block_size(True, page_size=64)


@pytest.mark.parametrize(
    ("method", "mode", "hashes"),
    [
        ("total_requests", None, False),
        ("follow_bootstrap_room,total_tokens", "prefill", False),
        ("cache_aware", None, True),
        ("round_robin,cache_aware", None, True),
    ],
)
def test_auto_hashes_only_for_chains_that_declare_they_read_prompt_contents(method, mode, hashes):
    from dpcore.manager import PolicyManager

    manager = PolicyManager.from_method(method, dp_size=2, disaggregation_mode=mode)
    assert manager.needs_block_hashes is hashes  # declared by the policies, not known by name
    assert AdapterConfig().hashed_block_size(manager.needs_block_hashes, 1) == (64 if hashes else 0)
    assert AdapterConfig(block_hashes="on").hashed_block_size(manager.needs_block_hashes, 1) == 64
    assert AdapterConfig(block_hashes="off").hashed_block_size(manager.needs_block_hashes, 1) == 0


# ----------------------------------------------------------------------------- requests


def test_request_fields_map_to_dpcore():
    req = to_request(tokenized(bootstrap_room=77, routed_dp_rank=2, disagg_prefill_dp_rank=1), block_size=64)
    assert (req.rid, req.num_tokens, req.bootstrap_room) == ("r1", 200, 77)
    assert (req.routed_dp_rank, req.disagg_prefill_dp_rank, req.max_new_tokens) == (2, 1, 32)
    assert len(req.block_hashes) == 3  # whole 64-token blocks of 200 tokens
    assert req.data_parallel_rank is None


def test_request_block_hashes_identify_shared_prefixes():
    a = to_request(tokenized(input_ids=list(range(256))), block_size=64)
    b = to_request(tokenized(input_ids=list(range(192)) + [9] * 64), block_size=64)
    assert a.block_hashes[:3] == b.block_hashes[:3]
    assert a.block_hashes[3] != b.block_hashes[3]
    assert to_request(tokenized(), block_size=0).block_hashes == ()


def test_embeddings_only_request_counts_embedding_rows():
    req = to_request(tokenized(input_ids=None, input_embeds=[[0.0] * 4] * 7), block_size=64)
    assert (req.num_tokens, req.block_hashes) == (7, ())


# ----------------------------------------------------------------------------- load snapshots


def test_first_snapshot_acknowledges_nothing_and_placeholders_are_ignored():
    feed = SnapshotFeed(2, clock=lambda: 10.0)
    feed.sent(0, 0)
    assert feed.reports([snapshot(0, 0.0)]) == []  # the writer's placeholder
    (rep,) = feed.reports([snapshot(0, 11.0, running=1)])
    assert (rep.rank, rep.seq, rep.acked_seq, rep.num_requests) == (0, 1, -1, 1)
    assert feed.reports([snapshot(0, 11.0, running=1)]) == []  # the same snapshot read again


def test_a_snapshot_acknowledges_what_was_sent_before_the_previous_one():
    now = [0.0]
    feed = SnapshotFeed(1, clock=lambda: now[0])
    ledger = LoadLedger(1)

    def send(t: float) -> None:
        now[0] = t
        feed.sent(0, ledger.record_dispatch(0, 100))

    send(1.0)
    send(2.0)
    (rep,) = feed.reports([snapshot(0, 2.5, waiting=1)])  # took only the first one in
    ledger.apply_report(rep)
    assert ledger.requests == [3]  # 1 reported + both dispatches kept: none acknowledged yet
    send(3.0)
    (rep,) = feed.reports([snapshot(0, 3.5, waiting=2)])
    ledger.apply_report(rep)
    assert rep.acked_seq == 1  # sent at 1.0 and 2.0, both before the previous snapshot (2.5)
    assert ledger.requests == [3]  # 2 reported + the one sent at 3.0
    (rep,) = feed.reports([snapshot(0, 4.5, waiting=0)])
    ledger.apply_report(rep)
    assert (rep.acked_seq, ledger.requests) == (2, [0])


def test_a_stale_snapshot_does_not_erase_a_burst():
    # SGLang #26058: upstream overwrites the budget with the snapshot and forgets the burst.
    now = [0.0]
    feed = SnapshotFeed(2, clock=lambda: now[0])
    ledger = LoadLedger(2)
    for rep in feed.reports([snapshot(0, 1.0), snapshot(1, 1.0)]):
        ledger.apply_report(rep)
    now[0] = 2.0
    for _ in range(5):
        feed.sent(0, ledger.record_dispatch(0, 10))
    for rep in feed.reports([snapshot(0, 1.5), snapshot(1, 1.5)]):  # taken before the burst
        ledger.apply_report(rep)
    assert ledger.requests == [5, 0]


# ----------------------------------------------------------------------------- receiving


def test_noblock_receive_waits_in_poll_until_a_message_arrives(pair):
    push, pull = pair
    recv = BlockingReceiver(pull, timeout_ms=5000)
    timer = threading.Timer(0.3, lambda: push.send_pyobj({"hello": 1}))
    timer.start()
    t0 = time.monotonic()
    assert recv.recv_pyobj(zmq.NOBLOCK) == {"hello": 1}
    assert 0.2 < time.monotonic() - t0 < 4.0  # it waited for the message, not the timeout
    assert recv.idle_waits == 1


def test_noblock_receive_still_says_nothing_after_the_timeout(pair):
    _push, pull = pair
    recv = BlockingReceiver(pull, timeout_ms=50)
    with pytest.raises(zmq.Again):
        recv.recv(zmq.NOBLOCK)


def test_undecodable_frames_are_dropped_as_no_message(pair):
    push, pull = pair
    recv = BlockingReceiver(pull, timeout_ms=1000)
    push.send(b"\x00not a pickle")
    with pytest.raises(zmq.Again):
        recv.recv_pyobj(zmq.NOBLOCK)
    push.send(pickle.dumps("ok"))
    assert recv.recv_pyobj(zmq.NOBLOCK) == "ok"
    assert recv.bad_frames == 1
    assert recv.closed is False  # everything else is the socket's


# ----------------------------------------------------------------------------- block hashes from the tokenizer


def carried_frame(reqs, block_size=64, payload=b"sglang's own frame"):
    batch = SimpleNamespace(batch=reqs) if len(reqs) > 1 else reqs[0]
    return carry(payload, block_size, entries_for(batch, block_size))


def test_keys_from_the_tokenizer_are_the_controllers_own():
    a, b = tokenized(rid="a"), tokenized(rid="b", input_ids=list(range(7, 400)))
    frame = carried_frame([a, b])
    assert frame.startswith(MAGIC)
    c = Carried(64)
    assert bytes(c.split(frame)) == b"sglang's own frame"
    assert c.take("b", 393) == block_hashes(b.input_ids, 64)
    assert c.take("a", 200) == block_hashes(a.input_ids, 64)
    assert c.take("a", 200) is None  # taken once
    assert (c.used, c.hashed_here, dict(c.refused)) == (2, 1, {})
    assert to_request(b, 64, (1, 2)).block_hashes == (1, 2)  # the keys that came are the request's
    assert to_request(b, 64).block_hashes == block_hashes(b.input_ids, 64)


def test_keys_that_do_not_fit_are_refused_by_reason_and_the_request_goes_on():
    req = tokenized(rid="r")
    c = Carried(64)
    # another block size
    assert bytes(c.split(carried_frame([req], block_size=32))) == b"sglang's own frame"
    assert c.take("r", 200) is None
    # keys for a prompt of another length, and a value that is no block hash
    for raw, reason in ((block_key_bytes(range(64), 64), "count"), (b"\xff" * 24, "value")):
        c.split(carry(b"x", 64, ["r", raw]))
        assert c.take("r", 200) is None, reason
    # an unreadable header: the request behind it is still found
    header = b"\xc1\xc1\xc1"
    assert bytes(c.split(MAGIC + len(header).to_bytes(4, "little") + header + b"req")) == b"req"
    assert dict(c.refused) == {"block_size": 1, "count": 1, "value": 1, "header": 1}
    assert (c.used, c.hashed_here) == (0, 3)
    with pytest.raises(ValueError, match="cut short"):
        c.split(MAGIC)
    with pytest.raises(ValueError, match="claims 99 bytes"):
        c.split(MAGIC + (99).to_bytes(4, "little") + b"abc")


def test_the_receiver_hands_keys_to_the_adapter_and_the_request_to_sglang(pair):
    push, pull = pair
    carried = Carried(64)
    recv = BlockingReceiver(pull, timeout_ms=1000, carried=carried)
    req = tokenized(rid="r")
    push.send(carry(pickle.dumps({"rid": "r"}), 64, entries_for(req, 64)))
    assert recv.recv_pyobj(zmq.NOBLOCK) == {"rid": "r"}
    assert carried.take("r", 200) == block_hashes(req.input_ids, 64)
    # SGLang's msgpack IPC reads raw bytes through recv(): it gets the request's bytes only.
    push.send(carry(b"msgpack bytes", 64, entries_for(req, 64)))
    assert bytes(recv.recv(zmq.NOBLOCK)) == b"msgpack bytes"
    push.send(MAGIC + b"\x00")  # cut short: the request cannot be found; dropped and counted
    with pytest.raises(zmq.Again):
        recv.recv_pyobj(zmq.NOBLOCK)
    assert recv.bad_frames == 1


# ----------------------------------------------------------------------------- requests forwarded as received


def test_a_route_header_carries_what_the_controller_reads_and_the_frame_behind_it_untouched():
    req = tokenized(rid="r", routed_dp_rank=2, bootstrap_room=7, http_worker_ipc=None)
    frame = frame_with_route(b"sglang's own frame", req, 64)
    c = Carried(64)
    assert c.split(frame, forward=True) is None  # nothing left to decode
    header, keys, body = c.route
    assert dict(zip(ROUTE_FIELDS, header, strict=True)) == {
        "block_size": 64,
        "rid": "r",
        "keys": block_key_bytes(req.input_ids, 64),
        "num_tokens": 200,
        "max_new_tokens": 32,
        "routed_dp_rank": 2,
        "data_parallel_rank": None,
        "disagg_prefill_dp_rank": None,
        "bootstrap_room": 7,
        "http_worker_ipc": None,
    }
    assert keys == block_hashes(req.input_ids, 64)
    assert bytes(body) == b"sglang's own frame"
    assert (c.used, c.hashed_here, dict(c.not_forwarded)) == (1, 0, {})
    # Not forwarding (SGLang's msgpack IPC): the request is decoded and its keys kept.
    assert bytes(c.split(frame)) == b"sglang's own frame"
    assert c.take("r", 200) == block_hashes(req.input_ids, 64)
    # A controller that reads no block hashes forwards without them.
    c0 = Carried(0)
    assert c0.split(frame_with_route(b"x", req, 0), forward=True) is None
    assert c0.route[1] == ()


@pytest.mark.parametrize(
    ("index", "value"),
    [(1, 17), (3, -1), (3, "200"), (4, -5), (4, 1.5), (5, "0"), (8, 2.0), (2, "keys"), (9, 3)],
)
def test_a_route_header_field_of_the_wrong_type_sends_the_request_to_be_decoded(index, value):
    header = route_header(tokenized(rid="r"), 64)
    header[index] = value
    raw = msgpack.packb(header)
    c = Carried(64)
    body = c.split(MAGIC + len(raw).to_bytes(4, "little") + raw + b"req", forward=True)
    assert bytes(body) == b"req"
    assert c.route is None and dict(c.not_forwarded) == {"header": 1}


def test_route_headers_whose_keys_do_not_fit_are_decoded_and_hashed_here():
    req = tokenized(rid="r")
    c = Carried(64)
    for frame in (
        frame_with_route(b"req", req, 0),  # nobody hashed
        frame_with_route(b"req", req, 32),  # another block size
    ):
        assert bytes(c.split(frame, forward=True)) == b"req"
        assert c.take("r", 200) is None
    header = route_header(req, 64)
    header[2] = b"\xff" * 24  # three values that are no block hashes, for a 3-block prompt
    header[3] = 200
    raw = msgpack.packb(header)
    assert bytes(c.split(MAGIC + len(raw).to_bytes(4, "little") + raw + b"req", forward=True)) == b"req"
    assert c.take("r", 200) is None
    assert dict(c.not_forwarded) == {"keys": 3}
    assert dict(c.refused) == {"block_size": 1, "value": 1}
    assert (c.used, c.hashed_here) == (0, 3)


def test_only_plain_requests_are_forwardable():
    assert forwardable(tokenized(rid="r", mm_inputs=None))
    assert not forwardable(tokenized(rid="HEALTH_CHECK_1"))
    assert not forwardable(tokenized(rid="r", mm_inputs={"mm_items": []}))
    assert not forwardable(tokenized(rid=None))


def test_the_receiver_hands_sglang_a_marker_for_a_request_to_forward(pair):
    push, pull = pair
    carried = Carried(0)
    recv = BlockingReceiver(pull, timeout_ms=1000, carried=carried)
    recv.forward = True
    push.send(frame_with_route(pickle.dumps({"rid": "r"}), tokenized(rid="r"), 0))
    assert recv.recv_pyobj(zmq.NOBLOCK) is FORWARDED
    assert bytes(carried.route[2]) == pickle.dumps({"rid": "r"})
    recv.forward = False  # then it is decoded as before
    push.send(frame_with_route(pickle.dumps({"rid": "r"}), tokenized(rid="r"), 0))
    assert recv.recv_pyobj(zmq.NOBLOCK) == {"rid": "r"}


# ----------------------------------------------------------------------------- versions and launcher


def test_only_tested_sglang_releases_are_accepted():
    assert versions.check_sglang_version("0.5.23") == "0.5.23"
    with pytest.raises(versions.UnsupportedSglangError, match="sglang 0.5.22 is installed, but dpcore-sglang supports only sglang 0.5.23"):
        versions.check_sglang_version("0.5.22")


def test_launcher_refuses_an_unsupported_sglang(monkeypatch, capsys):
    monkeypatch.setattr(versions, "installed_sglang_version", lambda: "0.6.0")
    assert launch_server.main(["--model-path", "m", "--dp-size", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "sglang 0.6.0 is installed, but dpcore-sglang supports only sglang 0.5.23" in err


def test_launcher_without_sglang_says_how_to_install_it():
    # dpcore's own environment has no SGLang: one line, exit 2, before anything starts.
    proc = subprocess.run(
        [sys.executable, "-m", "dpcore_sglang.launch_server", "--model-path", "m", "--load-balance-method", "cache_aware"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "sglang is not installed" in proc.stderr
    assert "pip install sglang==0.5.23" in proc.stderr


@pytest.mark.parametrize(
    ("chain", "told"),
    [
        (("round_robin",), "round_robin"),
        (("follow_bootstrap_room",), "follow_bootstrap_room"),
        (("total_tokens",), "total_tokens"),
        (("cache_aware",), "total_requests"),
        (("follow_bootstrap_room", "total_tokens"), "total_requests"),
    ],
)
def test_sglang_is_told_its_own_name_or_a_load_aware_one(chain, told):
    assert launch_server.sglang_method(chain) == told


def test_venv_key_follows_the_pinned_set():
    text = pinned_file().read_text()
    assert "sglang==0.5.23" in text
    assert "torch==2.13.0" in text
    assert venv_key(text) == venv_key(text)
    assert venv_key(text) != venv_key(text + "extra==1\n")


def test_dpcore_bench_sglang_hands_over_to_the_adapters_benchmark(monkeypatch):
    import argparse

    import dpcore_sglang.bench
    from dpcore import bench

    seen = []
    monkeypatch.setattr(dpcore_sglang.bench, "main", lambda argv: seen.append(argv) or 0)
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    assert bench.run(p.parse_args(["--sglang", "--tokens", "500", "--json", "out.json"])) == 0
    assert seen == [["--tokens", "500", "--dp-size", "4", "--repeat", "3", "--json", "out.json"]]


def test_the_controller_freezes_its_start_up_heap_after_the_adapter_takes_over(monkeypatch):
    import gc
    import types

    from dpcore_sglang import plugin

    installed = []
    fake_adapter = types.ModuleType("dpcore_sglang.adapter")
    fake_adapter.install = lambda ctl, config: installed.append((ctl, config, gc.get_freeze_count()))
    monkeypatch.setitem(sys.modules, "dpcore_sglang.adapter", fake_adapter)

    def sglang_init(self):
        self.recv_from_tokenizer = object()  # node 0: the dispatching controller

    config = AdapterConfig(method="total_requests")
    wrapped = plugin._wrap_init(sglang_init, config)
    gc.unfreeze()
    ctl = SimpleNamespace()
    try:
        wrapped(ctl)
        assert installed == [(ctl, config, 0)]  # frozen after the adapter is in place
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
