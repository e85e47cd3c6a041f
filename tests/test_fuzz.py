"""Property-based fuzzing of every input dpcore takes from the outside.

Four targets, more than 10,000 generated inputs in all (each test checks its own share;
the totals are printed at the end of the module):

* **wire decoders** (pure): every decoder raises :class:`~dpcore.errors.WireError` or
  returns well-typed values, whatever the bytes;
* **the live controller's ingress**: near-valid request headers with adversarial fields,
  control messages, extra frames, random bytes, truncations, deep nesting and oversized
  frames go to a real controller (rank processes behind it). After every input a good
  request is served; every frame is accounted for (``received + bad_frames + controls``),
  and every request naming this client's reply endpoint gets exactly one final reply;
* **the load-report channel**: broken, out-of-range and stale reports sent next to the
  real ranks' reports. Every one is counted bad or stale (none is lost or applied), the
  ledger stays sane and the real ranks keep serving;
* **the HTTP front**: generated bodies, paths, methods and headers; every answer is a
  JSON error with a 4xx/503 status or a 200, never a 500, and the server keeps serving.

Hypothesis runs derandomized (the same inputs every run, so CI is stable); set
``DPCORE_FUZZ_SEED`` to explore other inputs.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from dpcore import wire
from dpcore.errors import WireError
from dpcore.runtime.local import LocalCluster, wait_for

pytestmark = [pytest.mark.fuzz, pytest.mark.e2e]

COUNTS: collections.Counter[str] = collections.Counter()
#: Request headers sent to the live ingress that expect a reply (for failure messages).
HEADERS: dict[str, bytes] = {}
MAX_INT = (1 << 63) - 1
MSG_LIMIT = 256 * 1024

_seed = os.environ.get("DPCORE_FUZZ_SEED")


def fuzz_settings(n: int) -> Any:
    s = settings(
        max_examples=n,
        deadline=None,
        database=None,
        derandomize=_seed is None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )

    def wrap(fn: Any) -> Any:
        fn = s(fn)
        return seed(int(_seed))(fn) if _seed is not None else fn

    return wrap


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    total = sum(COUNTS.values())
    print(f"\nfuzz inputs tried: {dict(COUNTS)}, total {total}, crashes 0")


# --------------------------------------------------------------------------- strategies

EDGE_INTS = [0, 1, -1, 2, 3, 4, 7, 2**31 - 1, 2**31, 2**32, MAX_INT, MAX_INT + 1, 2**64 - 1, -(2**63)]
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-(2**63), 2**64 - 1))
floats = st.floats(allow_nan=True, allow_infinity=True)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=12), st.binary(max_size=12))
values = st.recursive(
    scalars,
    lambda ch: st.one_of(st.lists(ch, max_size=4), st.dictionaries(st.one_of(st.text(max_size=6), ints), ch, max_size=4)),
    max_leaves=12,
)
#: Valid msgpack with any structure, or no msgpack at all.
def st_prefix(t: str) -> str:
    """An endpoint-looking string: a scheme and random text."""
    return ("ipc://", "tcp://", "inproc://", "tcp://127.0.0.1:")[len(t) % 4] + t


def _pack(v: Any) -> bytes:
    return msgpack.packb(v, use_bin_type=True)


def nested(depth: int) -> bytes:
    """A list nested *depth* deep (msgpack's decoder refuses very deep ones: that must be a WireError)."""
    return b"\x91" * depth + b"\xc0"


def deep_in_map(depth: int, key: str) -> bytes:
    """A v1 request map whose *key* holds a list nested *depth* deep: msgpack decodes it
    (up to ~1,000 levels) and a naive ``repr`` of it in an error message would recurse out."""
    head = {"v": 1, "t": "req", "reply": "ipc:///tmp/x", "rid": "deep", "n": 1}
    head.pop(key, None)
    return bytes([0x80 | (len(head) + 1)]) + _pack(head)[1:] + _pack(key) + b"\x91" * depth + b"\xc0"


raw_frames = st.one_of(
    st.binary(max_size=64),
    values.map(_pack),
    st.integers(1, 20_000).map(nested),
    st.builds(deep_in_map, st.integers(900, 1100), st.sampled_from(["rid", "n", "room", "mnt", "bh", "v", "t", "reply"])),
    st.binary(min_size=1, max_size=8).map(lambda b: b"\xdd\xff\xff\xff\xff" + b),  # a 4-billion-item array header
    st.just(b""),
)


def truncations(frame: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(0, max(0, len(frame) - 1)).map(lambda i: frame[:i])


# --------------------------------------------------------------------------- 1. wire decoders

DECODERS = {
    "ingress": lambda f: wire.decode_ingress(f[0]),
    "request": lambda f: wire.decode_request(f[0]),
    "load": lambda f: wire.decode_load(f[0]),
    "ctl": lambda f: wire.decode_ctl(f[0]),
    "dispatch": wire.decode_dispatch,
    "reply": wire.decode_reply,
    "header": lambda f: wire.decode_header(f[0]),
    "token_ids": lambda f: wire.unpack_token_ids(f[0]),
}
VALID = [
    wire.encode_request("r1", num_tokens=40, reply="ipc:///tmp/x", block_hashes=[1, 2], routed_dp_rank=1),
    wire.encode_load(0, epoch=5, seq=1, ack=3, run=1, wait=2, tok=30, kvu=10, kvc=100, done=[1, 2], lo=0, out=[7, -1]),
    wire.encode_ctl("flush", {"a": 1}),
    wire.encode_out("r1", 0, True, {"prompt_tokens": 5}),
    wire.encode_rej("r1", "invalid_rank", "no"),
    wire.encode_fail("r1", 2, "rank_died", "gone"),
    wire.encode_dispatch(1, 7, None),
]


def _mutated_valid(v: bytes, draw: Any) -> bytes:
    obj = msgpack.unpackb(v, raw=False)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*obj, "x"]))
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(FIELD_VALUES.get(key, values))
    return _pack(obj)


@st.composite
def wire_inputs(draw: Any) -> list[bytes]:
    kind = draw(st.sampled_from(["raw", "mutated", "truncated"]))
    if kind == "raw":
        first = draw(raw_frames)
    elif kind == "mutated":
        first = _mutated_valid(draw(st.sampled_from(VALID)), draw)
    else:
        first = draw(st.sampled_from(VALID).flatmap(truncations))
    rest = draw(st.lists(st.one_of(st.sampled_from(VALID), raw_frames), max_size=3))
    return [first, *rest]


def _check_result(name: str, out: Any) -> None:
    """What a decoder returns is well-typed, whatever it was fed."""
    if name in ("ingress", "request"):
        if isinstance(out, wire.Control):
            assert type(out.op) is str and out.op
            return
        req, reply = out
        limits = wire.DEFAULT_LIMITS
        assert type(req.rid) is str and req.rid and type(req.num_tokens) is int
        # Every number inside its documented range: nothing a ledger sum could overflow on.
        assert 0 <= req.num_tokens <= limits.max_tokens
        assert req.max_new_tokens is None or 0 <= req.max_new_tokens <= limits.max_tokens
        assert len(req.block_hashes) <= limits.max_hashes(req.num_tokens)
        assert all(type(h) is int for h in req.block_hashes)
        if reply is not None:  # a peer must be able to connect to it (or a rank would fail to answer)
            sock = zmq.Context.instance().socket(zmq.PUSH)
            try:
                sock.connect(reply)
            finally:
                sock.close(linger=0)
    elif name == "load":
        report, done, lo, counts = out
        for v in (report.rank, report.epoch, report.seq):
            assert type(v) is int and 0 <= v <= MAX_INT
        for v in (report.num_running, report.num_waiting):
            assert type(v) is int and 0 <= v <= wire.MAX_REPORT_REQUESTS
        for v in (report.num_tokens, report.kv_used, report.kv_capacity):
            assert type(v) is int and 0 <= v <= wire.MAX_REPORT_TOKENS
        assert type(report.acked_seq) is int and report.acked_seq >= -1
        assert all(type(x) is int and 0 <= x <= MAX_INT for x in done) and (lo is None or (type(lo) is int and lo >= 0))
        assert counts is None or (
            len(counts) == len(done) and all(type(x) is int and -1 <= x <= wire.MAX_OUTPUT_TOKENS for x in counts)
        )
    elif name == "reply":
        assert out.kind in wire.REPLY_TYPES and type(out.rid) is str and type(out.final) is bool
    elif name == "dispatch":
        assert type(out.rank) is int and type(out.seq) is int and out.rank >= 0 and out.seq >= 0
    elif name == "ctl":
        assert type(out.op) is str and out.op


WIRE_EXAMPLES = 3000


@fuzz_settings(WIRE_EXAMPLES)
@given(frames=wire_inputs())
def _decode_everything(frames: list[bytes]) -> None:
    COUNTS["wire"] += 1
    for name, decode in DECODERS.items():
        try:
            out = decode(frames)
        except WireError as exc:
            assert str(exc)  # a reason, always
            continue
        _check_result(name, out)


def test_wire_decoders_raise_only_wire_errors() -> None:
    _decode_everything()
    assert COUNTS["wire"] >= WIRE_EXAMPLES


# --------------------------------------------------------------------------- 2. the live ingress


@pytest.fixture(scope="module")
def live() -> Iterator[LocalCluster]:
    with LocalCluster("round_robin", 2, heartbeat_timeout_s=5.0, max_message_bytes=MSG_LIMIT) as lc:
        yield lc


_rids = itertools.count()
RANK_VALUES = st.one_of(st.sampled_from([-1, 0, 1, 2, 7, MAX_INT, 2**64 - 1, -(2**63), True, 1.5, math.nan, "1", None]), values)
FIELD_VALUES = {
    "v": st.one_of(st.sampled_from([0, 2, 1.0, True, "1", None]), values),
    "t": st.one_of(st.sampled_from(["rej", "out", "load", "dispatch", "ctl", "REQ", "", None]), values),
    "rid": st.one_of(st.sampled_from(["", None, 0, b"r"]), values.filter(lambda v: not isinstance(v, str))),
    "n": st.one_of(st.sampled_from([None, -1, MAX_INT, 2**64 - 1, 1.0, "5", math.nan, [5]]), values),
    "bh": st.one_of(st.lists(ints, max_size=2000), st.lists(values, max_size=5), values),
    "room": st.one_of(ints, values),
    "rdr": RANK_VALUES,
    "dpr": RANK_VALUES,
    "pdr": RANK_VALUES,
    "mnt": st.one_of(ints, values),
    "reply": st.one_of(
        st.sampled_from(["", "ipc://", "tcp://", "tcp://127.0.0.1:1", "ipc:///nonexistent/dir/x", "inproc://nobody",
                         "bogus://x", "tcp://*:0", "ipc://" + "x" * 300, "ipc:///" + "é" * 60, "tcp://a b:1",
                         "tcp://[::1]:7", "tcp://h:99999", "inproc://", None, 5]),  # fmt: skip
        st.text(max_size=30).map(lambda t: st_prefix(t)),
        values,
    ),
    "op": st.one_of(st.text(max_size=10), values),
    "data": values,
    "stream": values,
    "x-unknown": values,
}


@st.composite
def ingress_messages(draw: Any, reply: str) -> tuple[list[bytes], str | None, bool]:
    """(frames, rid expecting exactly one final reply or None, a reply with no usable rid expected)"""
    rid = f"fz{next(_rids):09d}"  # fixed width: the draws must not depend on the counter
    kind = draw(st.sampled_from(["header", "header", "header", "ctl", "raw", "truncated"]))
    if kind in ("raw", "truncated"):
        if kind == "raw":
            frame = draw(raw_frames)
        else:
            frame = draw(truncations(wire.encode_request("fz-cut", num_tokens=3, reply=reply, routed_dp_rank=1)))
        return [frame, *draw(st.lists(st.binary(max_size=32), max_size=2))], None, False
    if kind == "ctl":
        h: dict[Any, Any] = {"v": 1, "t": "ctl", "op": "fuzz", "data": None}
    else:
        h = {"v": 1, "t": "req", "rid": rid, "n": draw(st.integers(0, 5000)), "reply": reply}
    for key in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            h.pop(key, None)
        else:
            h[key] = draw(FIELD_VALUES[key])
    try:
        header = _pack(h)
    except (OverflowError, ValueError, TypeError):  # msgpack cannot say it: send the rest raw
        header = draw(raw_frames)
        h = {}
    nframes = draw(st.sampled_from([1, 2, 2, 2, 3, 4]))
    payload = draw(st.one_of(st.binary(max_size=64), st.integers(0, MSG_LIMIT).map(lambda n: b"p" * n)))
    frames = [header, payload, *(b"extra" for _ in range(nframes - 2))][:nframes]
    try:  # map keys must be strings (msgpack's strict_map_key), anywhere in the header
        msgpack.unpackb(header, raw=False)
    except ValueError:
        h = {}
    ours = h.get("v") == 1 and h.get("t") == "req" and h.get("reply") == reply
    if ours and h.get("rid") == rid:
        return frames, rid, False
    # Ours but without a usable rid: answered, but the client cannot tell for which request.
    return frames, None, ours and not (type(h.get("rid")) is str and h.get("rid"))


class IngressBooks:
    def __init__(self, lc: LocalCluster) -> None:
        self.lc = lc
        self.c = lc.controller
        self.client = lc.client
        self.raw = zmq.Context.instance().socket(zmq.PUSH)
        self.raw.linger = 0
        self.raw.connect(self.c.endpoints.ingress)
        self.unattributed = 0
        self.sync_n = 0
        self.finals: collections.Counter[str] = collections.Counter()

    def poll(self, timeout_s: float) -> None:
        for r in self.client.poll(timeout_s):  # type: ignore[union-attr]
            self.finals[r.rid] += r.final

    def counted(self) -> int:
        return self.c.books.received + self.c.books.bad_frames + self.c.books.controls

    def sync(self) -> None:
        """A good request on the same connection (ZMQ keeps its order): once it is served,
        everything sent before it was handled."""
        self.sync_n += 1
        rid = f"sync{self.sync_n}"
        self.raw.send_multipart([wire.encode_request(rid, num_tokens=4, reply=self.client.reply_endpoint), b""])  # type: ignore[union-attr]
        self.client.pending.add(rid)  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while rid in self.client.pending:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the controller stopped serving"
            self.poll(0.05)


@pytest.fixture(scope="module")
def ingress_books(live: LocalCluster) -> Iterator[IngressBooks]:
    books = IngressBooks(live)
    yield books
    books.raw.close()


def test_live_ingress_survives_everything(ingress_books: IngressBooks) -> None:
    books = ingress_books
    c = books.c
    reply = books.client.reply_endpoint  # type: ignore[union-attr]
    expected: set[str] = set()

    @fuzz_settings(1200)
    @given(msgs=st.lists(ingress_messages(reply), min_size=1, max_size=3), oversized=st.integers(0, 40))
    def one(msgs: list[tuple[list[bytes], str | None, bool]], oversized: int) -> None:
        before = books.counted()
        for frames, rid, unattributed in msgs:
            COUNTS["ingress"] += 1
            books.raw.send_multipart(frames)
            if rid is not None:
                expected.add(rid)
                HEADERS[rid] = frames[0]
                books.client.pending.add(rid)  # type: ignore[union-attr]
            books.unattributed += unattributed
        if oversized == 0:  # over the frame limit: the transport drops that peer's connection
            COUNTS["ingress"] += 1
            big = zmq.Context.instance().socket(zmq.PUSH)
            big.linger = 0
            big.connect(c.endpoints.ingress)
            big.send_multipart([wire.encode_request("big", num_tokens=1, reply=reply), b"x" * (MSG_LIMIT + 1)])
            big.close()
        books.sync()
        assert c._thread.is_alive() and c.books.internal_errors == 0  # type: ignore[union-attr]
        assert books.counted() - before == len(msgs) + 1  # every frame accounted, once

    one()
    assert COUNTS["ingress"] >= 2500
    client = books.client
    deadline = time.monotonic() + 15
    while client.pending and time.monotonic() < deadline:  # type: ignore[union-attr]
        books.poll(0.1)
    missing = sorted(client.pending)[:3]  # type: ignore[union-attr]
    assert not missing, f"no final reply for {[msgpack.unpackb(HEADERS[r], raw=False) for r in missing]}"
    got = books.finals
    assert all(got[rid] == 1 for rid in expected), [rid for rid in expected if got[rid] != 1][:5]
    # Replies nobody could attribute arrived once each (and no duplicates of anything else).
    wait_for(lambda: client.stale + client.bad_replies >= books.unattributed, 10, "unattributed replies")  # type: ignore[union-attr]
    time.sleep(0.2)
    assert client.stale + client.bad_replies == books.unattributed  # type: ignore[union-attr]
    wait_for(lambda: c.stats()["in_flight"] == 0, 10, "in-flight requests")
    st_ = c.consistent_stats()
    assert st_["balanced"] == {"received": True, "dispatched": True} and st_["internal_errors"] == 0
    assert st_["received"] == st_["completed"] + st_["failed"] + st_["rejected"]
    print(f"ingress: {COUNTS['ingress']} inputs; controller counted received {st_['received']}, "
          f"bad frames {st_['bad_frames']}, controls {st_['controls']}, rejected {st_['rejected_by_code']}")  # fmt: skip


# --------------------------------------------------------------------------- 3. the report channel

REPORT_FIELDS = ("rank", "epoch", "seq", "ack", "run", "wait", "tok", "kvu", "kvc")
BAD_FIELD = st.sampled_from([-2, -(2**63), MAX_INT + 1, 2**64 - 1, 1.5, math.nan, math.inf, True, "3", None, [1], {"a": 1}, b"1"])
#: Inside the wire's range for some fields, past it for the counts and tokens.
BAD_COUNT = st.sampled_from([wire.MAX_REPORT_TOKENS + 1, MAX_INT, -1])


@st.composite
def bad_reports(draw: Any, dp_size: int, real_epoch_floor: int) -> tuple[bytes, str]:
    """(frame, 'bad' or 'stale'): frames the controller must count and never apply."""
    rank = draw(st.integers(0, dp_size - 1))
    h: dict[Any, Any] = {"v": 1, "t": "load", "rank": rank, "epoch": draw(st.integers(0, real_epoch_floor - 1)),
                         "seq": draw(st.integers(0, MAX_INT)), "ack": draw(st.integers(-1, MAX_INT)),
                         "run": draw(st.integers(0, 10**6)), "wait": draw(st.integers(0, 10**6)),
                         "tok": draw(st.integers(0, wire.MAX_REPORT_TOKENS)), "kvu": 0, "kvc": 0,
                         "done": draw(st.lists(st.integers(0, MAX_INT), max_size=50)), "lo": None}  # fmt: skip
    kind = draw(st.sampled_from(["stale", "field", "rank", "done", "shape", "raw", "truncated"]))
    if kind == "stale":  # well-formed, but from an older life than the rank's current one
        return _pack(h), "stale"
    if kind == "field":
        h[draw(st.sampled_from(REPORT_FIELDS))] = draw(BAD_FIELD)
        if draw(st.booleans()):
            h[draw(st.sampled_from(("run", "wait", "tok", "kvu", "kvc")))] = draw(BAD_COUNT)
    elif kind == "rank":
        h["rank"] = draw(st.one_of(st.integers(dp_size, MAX_INT), st.integers(-(2**63), -1)))
    elif kind == "done":
        h["done"] = draw(st.one_of(st.just(list(range(70_000))), st.lists(values.filter(lambda v: type(v) is not int), min_size=1, max_size=3), BAD_FIELD.filter(lambda v: v is not None and not isinstance(v, list))))
    elif kind == "shape":
        h = draw(st.sampled_from([{**h, "v": 2}, {**h, "t": "req"}, {k: v for k, v in h.items() if k != "seq"}]))
    elif kind == "raw":
        return draw(raw_frames), "bad"
    else:
        return draw(truncations(_pack(h))), "bad"
    try:
        return _pack(h), "bad"
    except (OverflowError, ValueError, TypeError):
        return draw(st.binary(max_size=16)), "bad"


def test_load_reports_never_applied_when_bad(live: LocalCluster) -> None:
    c = live.controller
    floor = min(e for e in map(c.ledger.epoch, range(c.dp_size)) if e is not None)  # the real ranks' lives
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.linger = 0
    push.connect(c.endpoints.report)
    active = list(c.ledger.active_ranks)

    @fuzz_settings(1200)
    @given(batch=st.lists(bad_reports(c.dp_size, floor), min_size=1, max_size=8))
    def one(batch: list[tuple[bytes, str]]) -> None:
        bad0, stale0 = c.books.bad_reports, c.books.stale_reports
        for frame, _ in batch:
            COUNTS["reports"] += 1
            push.send(frame)
        want_bad = sum(kind == "bad" for _, kind in batch)
        want_stale = len(batch) - want_bad
        wait_for(lambda: c.books.bad_reports - bad0 + c.books.stale_reports - stale0 >= len(batch), 10, "reports counted", poll_s=0.001)
        assert (c.books.bad_reports - bad0, c.books.stale_reports - stale0) == (want_bad, want_stale)
        assert c._thread.is_alive() and c.books.internal_errors == 0  # type: ignore[union-attr]
        assert all(type(x) is int and x >= 0 for x in c.ledger.requests + c.ledger.tokens)

    try:
        one()
    finally:
        push.close()
    assert COUNTS["reports"] >= 2500
    assert list(c.ledger.active_ranks) == active and all(e >= floor for e in map(c.ledger.epoch, range(c.dp_size)) if e is not None)
    # The real ranks still serve, and their books were never touched by a forged report.
    for i in range(20):
        live.client.submit(f"after-reports{i}", num_tokens=8)  # type: ignore[union-attr]
    replies = live.client.wait_all(10)  # type: ignore[union-attr]
    assert len(replies) == 20 and all(r.kind == "out" for r in replies)
    wait_for(lambda: c.stats()["in_flight"] == 0, 10, "in-flight requests")
    assert c.consistent_stats()["balanced"] == {"received": True, "dispatched": True}
    print(f"reports: {COUNTS['reports']} inputs; bad {c.books.bad_reports}, stale {c.books.stale_reports}")


# --------------------------------------------------------------------------- 4. the HTTP front

HTTP_BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from dpcore.http.launch import launch

    front_args = ("--max-body-bytes", str(HTTP_BODY_LIMIT), "--request-timeout", "5")
    with launch(2, log_dir=tmp_path_factory.mktemp("fuzz-http"), front_args=front_args) as stack, \
            httpx.Client(base_url=stack.url, timeout=30) as http:  # fmt: skip
        yield stack, http


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=16)),
    lambda ch: st.one_of(st.lists(ch, max_size=4), st.dictionaries(st.text(max_size=8), ch, max_size=4)),
    max_leaves=10,
)
GENERATE_PATHS = ["/generate", "/v1/completions", "/v1/chat/completions"]
HTTP_FIELDS = ["text", "input_ids", "prompt", "messages", "rid", "stream", "sampling_params", "max_tokens",
               "max_completion_tokens", "routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank",
               "bootstrap_room", "bootstrap_port", "bootstrap_host", "n", "stream_options", "model"]  # fmt: skip
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e", "🙂" * 20]))


@st.composite
def http_requests(draw: Any) -> tuple[str, str, dict[str, str], bytes]:
    path = draw(st.sampled_from([*GENERATE_PATHS * 3, "/health", "/get_load", "/v1/loads", "/server_info", "/nope"]))
    usual = "POST" if path in GENERATE_PATHS else "GET"
    method = draw(st.sampled_from([usual] * 8 + ["GET", "PUT", "DELETE", "POST"]))
    body: Any = {
        "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 2}},
        "/v1/completions": {"prompt": "hi", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    }.get(path, {})
    for key in draw(st.lists(st.sampled_from(HTTP_FIELDS), max_size=3, unique=True)):
        body[key] = draw(st.one_of(JSON_VALUES, TEXT, st.sampled_from([-1, 7, 2**63, 2**64, -(2**63) - 1, 10**30])))
    if draw(st.integers(0, 5)) == 0 and isinstance(body.get("sampling_params"), dict):
        body["sampling_params"]["max_new_tokens"] = draw(st.sampled_from([-1, 0, 1.5, "3", None, 2**64, 10**30]))
    headers = {}
    if draw(st.booleans()):
        headers["X-Data-Parallel-Rank"] = draw(st.sampled_from(["0", "1", "2", "-1", "+1", "1e3", "", "x", "9" * 40, "0x1"]))
    kind = draw(st.sampled_from(["json", "json", "json", "raw", "deep", "big", "invalid-utf8"]))
    if kind == "json":
        data = json.dumps(body, allow_nan=True).encode()
    elif kind == "raw":
        data = draw(st.binary(max_size=200))
    elif kind == "deep":
        d = draw(st.integers(100, 50_000))
        data = b'{"text": ' + b"[" * d + b"]" * d + b"}"
    elif kind == "big":
        data = b'{"text": "' + b"a" * (HTTP_BODY_LIMIT + draw(st.integers(1, 1000))) + b'"}'
    else:
        data = b'{"text": "\xff\xfe\xed"}'
    return method, path, headers, data


def test_http_front_answers_everything(front: Any) -> None:
    stack, http = front
    statuses: collections.Counter[int] = collections.Counter()

    @fuzz_settings(800)
    @given(req=http_requests())
    def one(req: tuple[str, str, dict[str, str], bytes]) -> None:
        method, path, headers, data = req
        COUNTS["http"] += 1
        resp = http.request(method, path, content=data, headers={"content-type": "application/json", **headers})
        statuses[resp.status_code] += 1
        if resp.status_code == 200:
            return
        body = resp.json()  # every error is JSON with a code and a reason, in the path's dialect
        if path.startswith("/v1/"):
            err = body["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], body
            code = err["code"]
        else:
            assert set(body) >= {"error", "detail"} and body["detail"], body
            code = body["error"]
        # 5xx only for "no rank can take it" or the engine's own verdict, never the front
        # or the controller failing.
        ok = resp.status_code in (400, 404, 405, 413, 503) or (resp.status_code, code) == (500, "engine_error")
        assert ok, (resp.status_code, body, data[:200])

    one()
    assert COUNTS["http"] >= 800
    assert stack.serve.alive()
    ok = http.post("/generate", json={"text": "still here", "sampling_params": {"max_new_tokens": 3}})
    assert ok.status_code == 200, ok.text
    time.sleep(0.1)
    counters = http.get("/server_info").json()["counters"]
    assert counters["balanced"] == {"received": True, "dispatched": True} and counters["internal_errors"] == 0
    print(f"http: {COUNTS['http']} inputs; statuses {dict(sorted(statuses.items()))}")


# --------------------------------------------------------------------------- 5. a live `dpcore serve`


def _status_frames(draw: Any) -> list[bytes]:
    ask = {"v": 1, "t": "status?", "id": draw(ints)}
    kind = draw(st.sampled_from(["raw", "mutated", "good"]))
    if kind == "raw":
        return [draw(raw_frames) for _ in range(draw(st.integers(1, 3)))]
    if kind == "mutated":
        ask[draw(st.sampled_from(["v", "t", "id", "x"]))] = draw(values)
    try:
        return [_pack(ask)]
    except (OverflowError, ValueError, TypeError):
        return [draw(raw_frames)]


@st.composite
def serve_inputs(draw: Any) -> tuple[str, list[bytes]]:
    """One hostile message for one of a live server's sockets."""
    target = draw(st.sampled_from(["ingress", "report", "status"]))
    if target == "status":
        return target, _status_frames(draw)
    if target == "report":
        return target, [_mutated_valid(wire.encode_load(0, epoch=1, seq=1), draw) if draw(st.booleans())
                        else draw(raw_frames)]  # fmt: skip
    return target, draw(wire_inputs())


def test_live_serve_keeps_health_and_books_under_hostile_frames(front: Any) -> None:
    """Frames generated for the ingress, the load-report and the status sockets of a running
    `dpcore serve` process (not an in-process controller), with /health polled throughout:
    it must answer 200 every time, and afterwards the books balance and no background
    thread was restarted."""
    stack, http = front
    ctx = zmq.Context.instance()
    socks = {}
    for name, kind in (("ingress", zmq.PUSH), ("report", zmq.PUSH), ("status", zmq.DEALER)):
        s = ctx.socket(kind)
        s.linger = 0
        s.sndtimeo = 1000
        s.connect(stack.endpoints[name])
        socks[name] = s
    health: collections.Counter[int] = collections.Counter()
    try:

        @fuzz_settings(1500)
        @given(msg=serve_inputs())
        def one(msg: tuple[str, list[bytes]]) -> None:
            target, frames = msg
            COUNTS["serve"] += 1
            try:
                socks[target].send_multipart(frames)
            except zmq.Again:  # a full pipe is the server's right; never its death
                pass
            if COUNTS["serve"] % 25 == 0:
                health[http.get("/health").status_code] += 1

        one()
    finally:
        for s in socks.values():
            s.close()
    # The one fuzzed rank-0 epoch makes rank 0 a new life; both ranks report again at once.
    wait_for(lambda: http.get("/health").status_code == 200, 10, "/health", poll_s=0.1)
    assert set(health) == {200}, health
    ok = http.post("/generate", json={"text": "after the storm", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200, ok.text
    info = http.get("/server_info").json()
    counters = info["counters"]
    assert counters["balanced"] == {"received": True, "dispatched": True} and counters["internal_errors"] == 0
    from dpcore.runtime.local import fetch_status

    threads = fetch_status(stack.endpoints["status"])["threads"]
    assert all(t["alive"] and t["restarts"] == 0 for t in threads.values()), threads
    print(f"serve: {COUNTS['serve']} inputs; /health {dict(health)}; bad frames {counters['bad_frames']}")
