"""Round trips and rejections of every dpcore wire message."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgpack
import pytest

from dpcore import wire
from dpcore.errors import WireError
from dpcore.model import LoadReport, Request
from dpcore.wire import MalformedHeader


def _req(**fields):
    base = {"v": 1, "t": "req", "rid": "r1", "n": 10, "reply": "ipc:///tmp/x"}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not ...})


def test_request_round_trip_all_fields():
    hdr = wire.encode_request(
        "r1",
        num_tokens=130,
        reply="tcp://127.0.0.1:5555",
        block_hashes=[1, 2, (1 << 63) - 1],
        bootstrap_room=77,
        routed_dp_rank=3,
        data_parallel_rank=2,
        disagg_prefill_dp_rank=1,
        max_new_tokens=16,
    )
    req, reply = wire.decode_request(hdr)
    assert reply == "tcp://127.0.0.1:5555"
    assert req == Request("r1", 130, (1, 2, (1 << 63) - 1), 77, 3, 2, 1, 16)


def test_request_minimal_omits_optional_keys():
    hdr = wire.encode_request("r2", num_tokens=0, reply="ipc:///tmp/r")
    assert set(msgpack.unpackb(hdr)) == {"v", "t", "rid", "n", "reply"}
    req, _ = wire.decode_request(hdr)
    assert req == Request("r2")


def test_ranks_pass_through_for_the_core_to_validate():
    req, _ = wire.decode_request(_req(rdr="two", dpr=-1, pdr=99))
    assert (req.routed_dp_rank, req.data_parallel_rank, req.disagg_prefill_dp_rank) == ("two", -1, 99)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"rid": ""}, "'rid'"),
        ({"rid": 5}, "'rid'"),
        ({"n": -1}, "'n'"),
        ({"n": "10"}, "'n'"),
        ({"n": True}, "'n'"),
        ({"n": 100, "bh": [1, "x"]}, "'bh'"),
        ({"bh": 3}, "'bh'"),
        ({"room": 1.5}, "'room'"),
        ({"mnt": -2}, "'mnt'"),
    ],
)
def test_bad_request_field_names_reply_endpoint(fields, needle):
    with pytest.raises(MalformedHeader, match=needle) as ei:
        wire.decode_request(_req(**fields))
    assert ei.value.reply == "ipc:///tmp/x"
    assert ei.value.code == "malformed_request"
    assert isinstance(ei.value, WireError)


def test_bad_request_without_reply_is_plain_wire_error():
    with pytest.raises(WireError, match="'reply'") as ei:
        wire.decode_request(_req(reply=...))
    assert not isinstance(ei.value, MalformedHeader)
    with pytest.raises(WireError) as ei:
        wire.decode_request(_req(reply="not an endpoint", n=-5))
    assert not isinstance(ei.value, MalformedHeader)


@pytest.mark.parametrize(
    ("buf", "needle"),
    [
        (b"", "not a msgpack frame"),
        (b"\xc1", "not a msgpack frame"),
        (msgpack.packb([1, 2]), "expected a msgpack map"),
        (msgpack.packb({"t": "req"}), "unsupported wire version None"),
        (msgpack.packb({"v": 2, "t": "req"}), "unsupported wire version 2"),
        (msgpack.packb({"v": 1, "t": "nope"}), "unexpected message type 'nope'"),
        (msgpack.packb({"v": 1, "t": "load"}), "unexpected message type 'load'"),
        (pickle.dumps({"v": 1, "t": "req"}), "not a msgpack frame|expected a msgpack map|version"),
        (msgpack.packb({1: 2}), "not a msgpack frame"),
    ],
)
def test_garbage_is_a_wire_error(buf, needle):
    with pytest.raises(WireError, match=needle):
        wire.decode_request(buf)


def test_dispatch_forwards_header_bytes_and_payload():
    hdr = wire.encode_request("r3", num_tokens=5, reply="ipc:///tmp/y", bootstrap_room=9)
    frames = wire.dispatch_frames(2, 41, hdr, b"\x00payload", prefill_rank=3)
    assert frames[1] is hdr  # untouched, not re-encoded
    d = wire.decode_dispatch(frames)
    assert (d.rank, d.seq, d.prefill_rank, d.payload) == (2, 41, 3, b"\x00payload")
    assert d.header["rid"] == "r3" and d.header["room"] == 9
    assert wire.decode_dispatch(wire.dispatch_frames(0, 0, hdr, b"")).prefill_rank is None


def test_the_controller_loops_dispatch_encoder_writes_the_same_frames():
    """The loop's encoder (one reused packer, :func:`dpcore.wire.dispatch_encoder`) and
    :func:`dpcore.wire.encode_dispatch` are one format, and a rank decodes it."""
    encode = wire.dispatch_encoder()
    hdr = wire.encode_request("r3", num_tokens=5, reply="ipc:///tmp/y")
    for rank, seq, prefill_rank in ((2, 41, 3), (0, 0, None), (7, 2**40, 0)):
        first = encode(rank, seq, prefill_rank)
        assert first == wire.encode_dispatch(rank, seq, prefill_rank)
        d = wire.decode_dispatch([first, hdr, b""])
        assert (d.rank, d.seq, d.prefill_rank) == (rank, seq, prefill_rank)


@pytest.mark.parametrize(
    "frames",
    [
        [wire.encode_dispatch(0, 1)],
        [wire.encode_dispatch(0, -1), wire.encode_request("r", num_tokens=1, reply="ipc:///a"), b""],
        [wire.encode_dispatch(0, 1), wire.encode_ctl("x"), b""],
        [wire.encode_ctl("x"), wire.encode_request("r", num_tokens=1, reply="ipc:///a"), b""],
    ],
)
def test_bad_dispatch(frames):
    with pytest.raises(WireError):
        wire.decode_dispatch(frames)


def test_replies_round_trip():
    out = wire.decode_reply([wire.encode_out("r", 1, False, {"completion_tokens": 3}), b"abc"])
    assert out == wire.Reply("out", "r", 1, False, "", "", {"completion_tokens": 3}, b"abc")
    assert wire.decode_reply([wire.encode_out("r", 1, True)]).payload == b""
    rej = wire.decode_reply([wire.encode_rej("r", "invalid_rank", "routed_dp_rank=9 out of range")])
    assert (rej.kind, rej.rid, rej.rank, rej.final, rej.code) == ("rej", "r", None, True, "invalid_rank")
    fail = wire.decode_reply([wire.encode_fail("r", 2, "rank_died", "rank 2 died")])
    assert (fail.kind, fail.rank, fail.msg) == ("fail", 2, "rank 2 died")
    assert wire.decode_reply([wire.encode_rej(None, "malformed_request", "x")]).rid == ""


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [msgpack.packb({"v": 1, "t": "out", "rid": "r", "rank": 0, "final": 1})],
        [msgpack.packb({"v": 1, "t": "out", "rid": "r", "rank": 0, "final": True, "meta": [1]})],
        [wire.encode_out("r", 0, True), b"a", b"b"],
        [msgpack.packb({"v": 1, "t": "rej", "rid": "r", "code": 3, "msg": "m"})],
        [wire.encode_rej("r", "c", "m"), b"extra"],
        [wire.encode_ctl("x")],
    ],
)
def test_bad_reply(frames):
    with pytest.raises(WireError):
        wire.decode_reply(frames)


def test_load_round_trip():
    buf = wire.encode_load(3, epoch=7, seq=12, ack=40, run=2, wait=1, tok=900, kvu=800, kvc=10_000, done=[38, 39], lo=30)
    report, done, lo, out = wire.decode_load(buf)
    assert report == LoadReport(3, 7, 12, 40, 2, 1, 900, 800, 10_000)
    assert done == (38, 39) and lo == 30
    report, done, lo, out = wire.decode_load(wire.encode_load(0, epoch=1, seq=1))
    assert report.acked_seq == -1 and done == () and lo is None and out is None


def test_load_carries_output_tokens_per_done_request_optionally():
    _, done, _, out = wire.decode_load(wire.encode_load(1, epoch=1, seq=2, done=[5, 6, 7], out=[93, -1, 0]))
    assert done == (5, 6, 7) and out == (93, -1, 0)
    # A sender that never heard of the field: its reports decode as before.
    old = msgpack.unpackb(wire.encode_load(1, epoch=1, seq=2, done=[5]))
    assert "out" not in old
    assert wire.decode_load(msgpack.packb(old))[3] is None


@pytest.mark.parametrize(
    "out",
    [[1], [1, 2, 3], [1, -2], [1, wire.MAX_OUTPUT_TOKENS + 1], [1, "2"], [1, 2.0], 5, {"a": 1}],
)
def test_bad_output_tokens_are_refused_with_the_field_named(out):
    h = msgpack.unpackb(wire.encode_load(0, epoch=1, seq=1, done=[3, 4]))
    h["out"] = out
    with pytest.raises(WireError, match="'out'"):
        wire.decode_load(msgpack.packb(h))


@pytest.mark.parametrize(
    "fields",
    [
        {"rank": -1},
        {"rank": "0"},
        {"ack": -2},
        {"run": None},
        {"done": [1, "2"]},
        {"done": 5},
        {"lo": -1},
    ],
)
def test_bad_load(fields):
    h = msgpack.unpackb(wire.encode_load(0, epoch=1, seq=1))
    h.update(fields)
    with pytest.raises(WireError):
        wire.decode_load(msgpack.packb(h))


def test_ctl_round_trip_and_errors():
    assert wire.decode_ctl(wire.encode_ctl("flush_cache", {"a": 1})) == wire.Control("flush_cache", {"a": 1})
    with pytest.raises(WireError, match="'op'"):
        wire.decode_ctl(msgpack.packb({"v": 1, "t": "ctl", "op": ""}))
    with pytest.raises(WireError, match="'op'"):
        wire.decode_ctl(msgpack.packb({"v": 1, "t": "ctl"}))
    assert wire.message_type(wire.encode_ctl("x")) == "ctl"


def test_every_public_name_of_the_wire_modules_is_wire_x_itself():
    """``wire`` is a package of one module per message; callers use ``wire.X``. Each public
    name a part defines is re-exported as the same object (no wrapper on a per-message path),
    and ``wire.__all__`` lists exactly those."""
    import ast
    import importlib
    import pkgutil

    defined = {}
    for info in pkgutil.iter_modules(wire.__path__):
        mod = importlib.import_module(f"dpcore.wire.{info.name}")
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [x.id for x in targets if isinstance(x, ast.Name)]
            else:
                continue
            for name in names:
                if not name.startswith("_"):
                    defined[name] = getattr(mod, name)
    assert len(defined) > 60
    assert sorted(wire.__all__) == sorted(defined)
    for name, obj in defined.items():
        assert getattr(wire, name) is obj, name


def test_token_ids_payload():
    ids = [0, 1, 151_643, (1 << 32) - 1]
    assert wire.unpack_token_ids(wire.pack_token_ids(ids)) == ids
    assert len(wire.pack_token_ids(range(1000))) == 4000
    with pytest.raises(WireError):
        wire.unpack_token_ids(b"abc")



def test_load_report_carries_prefill_tokens_and_defaults_to_unknown():
    from dpcore import wire as w

    rep, *_ = w.decode_load(w.encode_load(1, epoch=1, seq=2, pf=4096))
    assert rep.prefill_tokens == 4096
    rep, *_ = w.decode_load(w.encode_load(1, epoch=1, seq=2))
    assert rep.prefill_tokens == -1


# --------------------------------------------------------------------------- ranges

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_U64 = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(n=_U64, n_hashes=st.integers(0, 300), mnt=st.one_of(st.none(), _U64))
def test_request_numbers_are_accepted_exactly_inside_their_ranges(n, n_hashes, mnt):
    limits = wire.Limits(max_tokens=4096, min_block_size=16, max_block_hashes=100)
    fields = {"n": n, "bh": list(range(n_hashes)) or ..., "mnt": mnt if mnt is not None else ...}
    ok = (
        0 <= n <= 4096
        and n_hashes <= min(100, -(-n // 16) if n >= 0 else 0)
        and (mnt is None or 0 <= mnt <= 4096)
    )
    if ok:
        req, _ = wire.decode_request(_req(**fields), limits)
        assert (req.num_tokens, len(req.block_hashes), req.max_new_tokens) == (n, n_hashes, mnt)
    else:
        with pytest.raises(MalformedHeader) as ei:
            wire.decode_request(_req(**fields), limits)
        assert ei.value.code == "malformed_request"


def test_default_limits_refuse_the_poison_token_count():
    with pytest.raises(MalformedHeader, match="max-context-tokens"):
        wire.decode_request(_req(n=(1 << 64) - 1))
    with pytest.raises(MalformedHeader, match="at most 16384"):
        wire.decode_request(_req(n=1 << 24, bh=list(range(20_000))))
    # A sum of a million maximal requests still fits what msgpack carries.
    assert wire.DEFAULT_LIMITS.max_tokens * 1_000_000 < 1 << 63


def test_limits_validate_their_own_values():
    with pytest.raises(ValueError, match="max_tokens"):
        wire.Limits(max_tokens=1 << 40)
    with pytest.raises(ValueError, match="min_block_size"):
        wire.Limits(min_block_size=0)


_REPORT_FIELDS = {"run": wire.MAX_REPORT_REQUESTS, "wait": wire.MAX_REPORT_REQUESTS, "tok": wire.MAX_REPORT_TOKENS,
                  "kvu": wire.MAX_REPORT_TOKENS, "kvc": wire.MAX_REPORT_TOKENS, "pf": wire.MAX_REPORT_TOKENS}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(_REPORT_FIELDS)), value=_U64)
def test_load_report_numbers_have_ranges(key, value):
    h = msgpack.unpackb(wire.encode_load(0, epoch=1, seq=1))
    h[key] = value
    low = -1 if key == "pf" else 0
    if low <= value <= _REPORT_FIELDS[key]:
        wire.decode_load(msgpack.packb(h))
    else:
        with pytest.raises(WireError, match=repr(key)):
            wire.decode_load(msgpack.packb(h))


def test_load_done_items_must_be_sequence_numbers():
    h = msgpack.unpackb(wire.encode_load(0, epoch=1, seq=1))
    h["done"] = [1, -5]
    with pytest.raises(WireError, match="'done'"):
        wire.decode_load(msgpack.packb(h))


def test_control_frames_are_bounded_in_bytes():
    small = wire.encode_ctl("note", "x" * 100)
    assert wire.decode_ingress(small) == wire.Control("note", "x" * 100)
    big = wire.encode_ctl("note", "x" * (64 << 10))
    with pytest.raises(WireError, match="control frame limit"):
        wire.decode_ingress(big)


def test_abort_round_trip_and_errors():
    ctl = wire.decode_ingress(wire.encode_abort("r1", "ipc:///tmp/x"))
    assert ctl.op == wire.ABORT
    assert wire.abort_target(ctl) == ("r1", "ipc:///tmp/x")
    for data in (None, {"rid": 1, "reply": "ipc:///tmp/x"}, {"rid": "r", "reply": "nowhere"}):
        with pytest.raises(WireError, match="abort"):
            wire.abort_target(wire.Control(wire.ABORT, data))


def test_abort_reason_is_optional_and_counted_from_a_fixed_set():
    old = wire.decode_ingress(wire.encode_abort("r1", "ipc:///tmp/x"))
    assert old.data == {"rid": "r1", "reply": "ipc:///tmp/x"}  # an old sender's abort, as before
    assert wire.abort_reason(old) == wire.ABORT_UNSPECIFIED
    for reason in sorted(wire.ABORT_REASONS):
        ctl = wire.decode_ingress(wire.encode_abort("r1", "ipc:///tmp/x", reason))
        assert wire.abort_target(ctl) == ("r1", "ipc:///tmp/x") and wire.abort_reason(ctl) == reason
    # Anything else a peer sends is counted as "other" and never makes the abort invalid.
    for odd in ("bored", "x" * 10_000, 7, ["timeout"], {"a": 1}):
        ctl = wire.Control(wire.ABORT, {"rid": "r1", "reply": "ipc:///tmp/x", "reason": odd})
        assert wire.abort_target(ctl) == ("r1", "ipc:///tmp/x") and wire.abort_reason(ctl) == wire.ABORT_OTHER
    assert wire.abort_reason(wire.Control(wire.ABORT, None)) == wire.ABORT_UNSPECIFIED
    with pytest.raises(ValueError, match="not one of"):
        wire.encode_abort("r1", "ipc:///tmp/x", "bored")


def test_make_request_builds_the_same_frozen_request():
    """The decoder's faster constructor gives what ``Request(...)`` gives, field by field,
    and the value stays frozen and hashable like one."""
    import attrs

    from dpcore.model import make_request

    values = ("r9", 70, (5, 6), 8, 1, 2, 3, 12)
    fast = make_request(*values)
    slow = Request(*values)
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert [getattr(fast, a.name) for a in attrs.fields(Request)] == list(values)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.rid = "x"  # type: ignore[misc]
