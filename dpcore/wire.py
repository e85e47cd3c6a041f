"""The dpcore wire format: msgpack header frames, opaque payload frames, no pickle.

Every message is a list of ZMQ frames. The first frame is a msgpack map with ``"v"`` (the
wire version) and ``"t"`` (the type tag); requests, dispatches and outputs carry one more
frame, the payload, which the controller forwards without looking at it.

========  ==========================  ====================================================
type      direction                   frames
========  ==========================  ====================================================
req       sender → controller ingress [header(rid, n, bh, room, rdr, dpr, pdr, mnt, reply), payload]
dispatch  controller → one rank       [header(rank, seq, pr), the req header bytes untouched, payload]
rej       controller → sender         [header(rid, code, msg)]
fail      controller → sender         [header(rid, rank, code, msg)]
out       rank → sender               [header(rid, rank, final, meta), payload]
load      rank → controller reports   [header(rank, epoch, seq, ack, run, wait, tok, kvu, kvc, done, out, lo)]
kv        rank → controller reports   [header(rank, epoch, seq, cap, ev)]: a batch of KV cache events
ctl       sender → ingress, and       [header(op, data)]
          controller → every rank     (an ``abort``: → the one rank holding its request)
========  ==========================  ====================================================

``abort`` is a control message (``op="abort"``, ``data={"rid", "reply", "reason"}``) a sender
sends when it gives a request up: the controller forwards it, byte for byte, to the one rank
holding the request, which drops it if it has not started and stops it if it has
(:func:`encode_abort`, :func:`abort_target`). The optional ``reason`` says why the request
was given up (:data:`ABORT_REASONS`); the controller counts aborts by it (:func:`abort_reason`),
and an abort without one is served all the same.

Every decoder raises :class:`~dpcore.errors.WireError` (never anything else) with the part
that is wrong and why, so a receiving loop catches one type and keeps going. A request
header that is broken but still names its sender's reply endpoint raises
:class:`MalformedHeader`, which carries that endpoint so the sender can be told.

Every number has a range (:class:`Limits`), chosen so that what a deployment can hold fits
and so that the controller's sums over in-flight requests stay far inside the 64-bit
integers msgpack carries (a poison value is refused at the door, never summed):

=====================================  =============================================
field                                  range
=====================================  =============================================
req ``n`` (num_tokens), ``mnt``        0 .. ``Limits.max_tokens`` (default 2**24)
req ``bh`` (block hashes)              at most ceil(n / ``Limits.min_block_size``)
                                       and at most ``Limits.max_block_hashes`` (16,384)
ctl frame                              at most ``Limits.max_control_bytes`` bytes
load ``run``, ``wait``                 0 .. 2**32
load ``tok``, ``kvu``, ``kvc``, ``pf`` 0 .. 2**40 tokens (``pf``: also -1, unknown)
load ``epoch``, ``seq``, ``lo``,       0 .. 2**63-1 (``ack`` also -1)
``done`` items, ``ack``
load ``out`` items                     -1 (not counted) .. ``MAX_OUTPUT_TOKENS`` (2**32);
                                       optional, one per ``done`` item
dispatch ``rank``, ``seq``, ``pr``     0 .. 2**63-1
abort ``reason``                       optional; one of :data:`ABORT_REASONS`; any other
                                       value (or none) is counted as ``other``
                                       (``unspecified`` when absent), never refused
=====================================  =============================================
"""

from __future__ import annotations

import re
import reprlib
import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import msgpack
from attrs import field, frozen

from dpcore.cacheindex import CLEARED, REMOVED, STORED, KvEventBatch
from dpcore.errors import MalformedRequestError, WireError
from dpcore.model import LoadReport, Request, make_request

VERSION = 1

REQ = "req"
DISPATCH = "dispatch"
REJ = "rej"
FAIL = "fail"
OUT = "out"
LOAD = "load"
CTL = "ctl"
KV = "kv"
TYPES = (REQ, DISPATCH, REJ, FAIL, OUT, LOAD, CTL, KV)
REPLY_TYPES = (OUT, REJ, FAIL)

#: Dispatch sequence numbers and ranks travel as msgpack ints; anything bigger is a bug.
_MAX_INT = (1 << 63) - 1
#: Requests a rank can hold (running or waiting): far above any engine's batch.
MAX_REPORT_REQUESTS = 1 << 32
#: Tokens a rank can hold (KV capacity, tokens in use): 2**40, a thousand times the KV of
#: the largest GPU node today, and small enough that a sum over a million ranks fits int64.
MAX_REPORT_TOKENS = 1 << 40

_MAX_DONE = 1 << 16
#: Largest output token count a load report's ``out`` carries for one finished request.
MAX_OUTPUT_TOKENS = 1 << 32

#: Largest frame a controller's ingress or a sender's reply socket accepts by default (the
#: transport drops the connection of a peer that sends more; the client SDK refuses first).
MAX_MESSAGE_BYTES = 64 << 20
#: Largest load-report frame (a full ``done`` list of 65,536 seqs is about 600 KB).
MAX_REPORT_BYTES = 1 << 20

#: A reply endpoint the controller and the ranks can connect to. Anything else (``tcp://``,
#: a path too long for a unix socket, spaces...) makes ``connect`` fail, so such a request
#: has no usable sender: it is dropped and counted, and never reaches a rank.
_REPLY_RE = re.compile(
    r"(?:ipc://[^\x00]{1,100}|inproc://[^\x00]{1,256}|tcp://(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):[0-9]{1,5})\Z"
)
_REPLY_OK: dict[str, bool] = {}


def valid_reply(reply: Any) -> bool:
    """Whether *reply* is an endpoint string peers can connect to (cached: senders reuse theirs)."""
    if type(reply) is not str:
        return False
    ok = _REPLY_OK.get(reply)
    if ok is None:
        # Unix socket paths are limited in bytes, not characters.
        ok = _REPLY_RE.match(reply) is not None and (not reply.startswith("ipc://") or len(reply.encode()) <= 106)
        if len(_REPLY_OK) < 4096:
            _REPLY_OK[reply] = ok
    return ok
_BIG_ENDIAN = sys.byteorder == "big"

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 80
_REPR.maxother = 40


def show(x: Any) -> str:
    """*x* for an error message: short, and safe however deeply a peer nested it (a plain
    ``repr`` of a 20,000-level list raises ``RecursionError``)."""
    return _REPR.repr(x)


@frozen
class Limits:
    """The ranges the request and control decoders enforce.

    :ivar max_tokens: Largest prompt (``num_tokens``) and ``max_new_tokens`` accepted: the
        longest context a deployment serves. The default, 2**24 (16.7M tokens), is above
        every model's context today; lower it to your model's (``--max-context-tokens``).
        Per request at most 2**31, so the ledger's sum over in-flight requests cannot
        overflow.
    :ivar min_block_size: Smallest block size senders hash with: a request may carry at most
        ceil(num_tokens / min_block_size) block hashes.
    :ivar max_block_hashes: At most this many block hashes per request, whatever its length
        (bounds the work a cache-aware policy does for one request: 16,384 hashes, a 1M-token
        prefix at 64 tokens a block, take ``cache_aware`` about 0.1 s).
    :ivar max_control_bytes: Largest control frame; the controller copies each one to every
        rank, so it is kept small.
    """

    max_tokens: int = 1 << 24
    min_block_size: int = 16
    max_block_hashes: int = 1 << 14
    max_control_bytes: int = 64 << 10

    def __attrs_post_init__(self) -> None:
        for name, lo, hi in (
            ("max_tokens", 1, 1 << 31),
            ("min_block_size", 1, 1 << 20),
            ("max_block_hashes", 0, 1 << 24),
            ("max_control_bytes", 64, MAX_MESSAGE_BYTES),
        ):
            x = getattr(self, name)
            if type(x) is not int or not lo <= x <= hi:
                msg = f"wire limit {name} must be an integer in {lo}..{hi}, got {show(x)}"
                raise ValueError(msg)

    def max_hashes(self, num_tokens: int) -> int:
        """How many block hashes a request of *num_tokens* may carry."""
        return min(self.max_block_hashes, -(-num_tokens // self.min_block_size))


DEFAULT_LIMITS = Limits()
#: The widest ranges any controller can be configured with: what a rank applies to the
#: dispatches it receives (the controller already held them to its own limits).
WIDEST_LIMITS = Limits(max_tokens=1 << 31, min_block_size=1, max_block_hashes=1 << 24, max_control_bytes=MAX_MESSAGE_BYTES)


class MalformedHeader(WireError):
    """A request header is invalid, but says where its sender listens.

    :ivar reply: The sender's reply endpoint.
    :ivar rid: The request id, when it could be read.
    """

    code = MalformedRequestError.code

    def __init__(self, msg: str, *, reply: str, rid: str | None) -> None:
        super().__init__(msg)
        self.reply = reply
        self.rid = rid


# --------------------------------------------------------------------------- value types


@frozen
class Reply:
    """What a sender receives for one of its requests.

    :ivar kind: ``"out"`` (output from the rank), ``"rej"`` (the controller refused the
        request) or ``"fail"`` (the request was lost with its rank, or could not be sent).
    :ivar rid: The request id.
    :ivar rank: The rank that served or lost it (``None`` for a rejection).
    :ivar final: Whether no more replies will come for *rid* (always true for rej/fail).
    :ivar code: Machine-readable reason for rej/fail (``RequestRejected.code``).
    :ivar msg: Human-readable reason for rej/fail.
    :ivar meta: For ``out``: token counts and whatever else the engine reports.
    :ivar payload: For ``out``: generated text or token bytes, opaque to dpcore.
    """

    kind: str
    rid: str
    rank: int | None = None
    final: bool = True
    code: str = ""
    msg: str = ""
    meta: Mapping[str, Any] = field(factory=dict)
    payload: bytes = b""


@frozen
class Dispatch:
    """One request as a rank receives it.

    :ivar rank: The rank it was sent to.
    :ivar seq: Its dispatch sequence number on that rank (acknowledge it in load reports).
    :ivar prefill_rank: For PD decode: the prefill rank holding its KV, else ``None``.
    :ivar header: The request header as the sender wrote it (see :func:`encode_request`).
    :ivar payload: The sender's opaque payload.
    """

    rank: int
    seq: int
    prefill_rank: int | None
    header: Mapping[str, Any]
    payload: bytes


@frozen
class Control:
    """A control message: ``op`` names it, ``data`` is any msgpack-able value."""

    op: str
    data: Any = None


# --------------------------------------------------------------------------- helpers


def _unpack(buf: Any, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(buf, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types; all mean "not ours"
        msg = f"{what}: not a msgpack frame ({type(exc).__name__}: {exc})"
        raise WireError(msg) from None
    if type(obj) is not dict:
        msg = f"{what}: expected a msgpack map, got {type(obj).__name__}"
        raise WireError(msg)
    v = obj.get("v")
    if v != VERSION:
        msg = f"{what}: unsupported wire version {show(v)} (this dpcore speaks {VERSION})"
        raise WireError(msg)
    return obj


def _expect(obj: dict[str, Any], types: Sequence[str], what: str) -> str:
    t = obj.get("t")
    if t not in types:
        msg = f"{what}: unexpected message type {show(t)}, expected one of {list(types)}"
        raise WireError(msg)
    return t  # type: ignore[no-any-return]


def int_problem(x: Any, minimum: int, maximum: int) -> str | None:
    """Why *x* is not an integer in ``minimum..maximum`` (``None``: it is one), for an error
    message that starts with the field's name. A bool is not an integer here (msgpack and
    JSON both keep them apart); a huge integer is shown shortened."""
    if type(x) is not int:
        return f"must be an integer, got {show(x)}"
    if not minimum <= x <= maximum:
        return f"must be an integer in {minimum}..{maximum}, got {show(x)}"
    return None


def _opt_int(obj: Mapping[str, Any], key: str, what: str, *, minimum: int = 0) -> int | None:
    x = obj.get(key)
    if x is None:
        return None
    problem = int_problem(x, minimum, _MAX_INT)
    if problem is not None:
        msg = f"{what}: field {key!r} {problem} (or absent)"
        raise WireError(msg)
    return x


def _req_int(obj: Mapping[str, Any], key: str, what: str, *, minimum: int = 0, maximum: int = _MAX_INT) -> int:
    x = obj.get(key)
    if type(x) is not int or not minimum <= x <= maximum:
        msg = f"{what}: field {key!r} must be an integer in {minimum}..{maximum}, got {show(x)}"
        raise WireError(msg)
    return x


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    x = obj.get(key)
    if type(x) is not str:
        msg = f"{what}: field {key!r} must be a string, got {show(x)}"
        raise WireError(msg)
    return x


def _frames(frames: Sequence[Any], n: tuple[int, ...], what: str) -> None:
    if len(frames) not in n:
        msg = f"{what}: expected {' or '.join(map(str, n))} frames, got {len(frames)}"
        raise WireError(msg)


def message_type(buf: Any) -> str:
    """The type tag of a header frame (validating version and tag)."""
    return _expect(_unpack(buf, "header"), TYPES, "header")


# --------------------------------------------------------------------------- req


def encode_request(
    rid: str,
    *,
    num_tokens: int,
    reply: str,
    block_hashes: Sequence[int] = (),
    bootstrap_room: int | None = None,
    routed_dp_rank: Any = None,
    data_parallel_rank: Any = None,
    disagg_prefill_dp_rank: Any = None,
    max_new_tokens: int | None = None,
) -> bytes:
    """The header frame of a request (the payload travels as the next frame)."""
    h: dict[str, Any] = {"v": VERSION, "t": REQ, "rid": rid, "n": num_tokens, "reply": reply}
    # Optional keys are omitted when unset: smaller frames, faster decode.
    if block_hashes:
        h["bh"] = list(block_hashes)
    if bootstrap_room is not None:
        h["room"] = bootstrap_room
    if routed_dp_rank is not None:
        h["rdr"] = routed_dp_rank
    if data_parallel_rank is not None:
        h["dpr"] = data_parallel_rank
    if disagg_prefill_dp_rank is not None:
        h["pdr"] = disagg_prefill_dp_rank
    if max_new_tokens is not None:
        h["mnt"] = max_new_tokens
    return msgpack.packb(h)


def request_from_header(h: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> tuple[Request, str | None]:
    """Validate a decoded ``req`` header; return the :class:`Request` and reply endpoint.

    Numbers are checked against *limits*. Ranks (``rdr``/``dpr``/``pdr``) are passed through
    unchecked: the core validates them against ``dp_size`` and liveness and rejects the
    request with its own reason.
    """
    get = h.get
    rid = get("rid")
    n = get("n")
    reply = get("reply")
    bh = get("bh")
    room = get("room")
    mnt = get("mnt")
    top = limits.max_tokens
    # The controller's hot path: one combined check; the slow path finds what is wrong.
    # The length of ``bh`` is checked before its items are looked at.
    if (
        type(rid) is str
        and rid
        and type(n) is int
        and 0 <= n <= top
        and valid_reply(reply)
        and (bh is None or (type(bh) is list and len(bh) <= limits.max_hashes(n) and all(type(x) is int for x in bh)))
        and (room is None or type(room) is int)
        and (mnt is None or (type(mnt) is int and 0 <= mnt <= top))
    ):
        return make_request(rid, n, tuple(bh) if bh else (), room, get("rdr"), get("dpr"), get("pdr"), mnt), reply
    raise _request_error(h, limits)


def _request_error(h: Mapping[str, Any], limits: Limits) -> WireError:
    """The precise error for a request header that failed the fast check."""
    reply = h.get("reply")
    if not valid_reply(reply):
        reply = None
    rid = h.get("rid")
    n = h.get("n")
    bh = h.get("bh")
    room = h.get("room")
    mnt = h.get("mnt")
    top = limits.max_tokens
    if type(rid) is not str or not rid:
        msg = f"request: field 'rid' must be a non-empty string, got {show(rid)}"
    elif type(n) is not int or not 0 <= n <= top:
        msg = (
            f"request {show(rid)}: field 'n' (num_tokens) must be an integer in 0..{top} "
            f"(the controller's --max-context-tokens), got {show(n)}"
        )
    elif bh is not None and type(bh) is not list:
        msg = f"request {show(rid)}: field 'bh' (block_hashes) must be a list of integers"
    elif bh is not None and len(bh) > limits.max_hashes(n):
        msg = (
            f"request {show(rid)}: field 'bh' has {len(bh)} block hashes for {n} tokens; at most "
            f"{limits.max_hashes(n)} (one per {limits.min_block_size} tokens, at most "
            f"{limits.max_block_hashes})"
        )
    elif bh is not None and not all(type(x) is int for x in bh):
        msg = f"request {show(rid)}: field 'bh' (block_hashes) must be a list of integers"
    elif room is not None and type(room) is not int:
        msg = f"request {show(rid)}: field 'room' (bootstrap_room) must be an integer, got {show(room)}"
    elif mnt is not None and (type(mnt) is not int or not 0 <= mnt <= top):
        msg = f"request {show(rid)}: field 'mnt' (max_new_tokens) must be an integer in 0..{top}, got {show(mnt)}"
    else:
        msg = f"request {show(rid)}: field 'reply' must be an endpoint string like ipc://... or tcp://..."
    if reply is None:
        return WireError(msg)
    return MalformedHeader(msg, reply=reply, rid=rid if type(rid) is str else None)


def decode_request(buf: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[Request, str | None]:
    """Decode a ``req`` header frame: the :class:`Request` and its sender's reply endpoint.

    Raises :class:`MalformedHeader` when the header is bad but names a reply endpoint,
    plain :class:`WireError` when it does not.
    """
    h = _unpack(buf, "request")
    _expect(h, (REQ,), "request")
    return request_from_header(h, limits)


def decode_ingress(buf: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[Request, str | None] | Control:
    """Decode what a controller's ingress receives: a request or a control message."""
    h = _unpack(buf, "ingress")
    t = _expect(h, (REQ, CTL), "ingress")
    if t == REQ:
        return request_from_header(h, limits)
    if len(buf) > limits.max_control_bytes:
        # The controller copies a control frame (other than an abort) to every rank: a big one multiplies.
        msg = f"ctl: {len(buf)} bytes is over the control frame limit of {limits.max_control_bytes}"
        raise WireError(msg)
    return control_from_header(h)


# --------------------------------------------------------------------------- dispatch


def _dispatch_header(rank: int, seq: int, prefill_rank: int | None) -> dict[str, Any]:
    return {"v": VERSION, "t": DISPATCH, "rank": rank, "seq": seq, "pr": prefill_rank}


def encode_dispatch(rank: int, seq: int, prefill_rank: int | None = None) -> bytes:
    """The first frame of a dispatch; the request header and payload follow unchanged."""
    return msgpack.packb(_dispatch_header(rank, seq, prefill_rank))


def dispatch_encoder() -> Callable[[int, int, int | None], bytes]:
    """:func:`encode_dispatch` with a packer of its own, for one thread's hot loop.

    Reusing one ``msgpack.Packer`` saves its construction per message; a packer is not
    thread-safe, so each caller (the controller's loop) takes its own.
    """
    pack = msgpack.Packer(use_bin_type=True).pack

    def encode(rank: int, seq: int, prefill_rank: int | None = None) -> bytes:
        return pack(_dispatch_header(rank, seq, prefill_rank))  # type: ignore[no-any-return]

    return encode


def dispatch_frames(rank: int, seq: int, req_header: Any, payload: Any, prefill_rank: int | None = None) -> list[Any]:
    """All frames of a dispatch."""
    return [encode_dispatch(rank, seq, prefill_rank), req_header, payload]


def decode_dispatch(frames: Sequence[Any]) -> Dispatch:
    """Decode the three frames of a dispatch (as a rank receives them)."""
    _frames(frames, (3,), "dispatch")
    d = _unpack(frames[0], "dispatch")
    _expect(d, (DISPATCH,), "dispatch")
    rank = _req_int(d, "rank", "dispatch")
    seq = _req_int(d, "seq", "dispatch")
    pr = _opt_int(d, "pr", "dispatch")
    h = _unpack(frames[1], "dispatch: request header")
    _expect(h, (REQ,), "dispatch: request header")
    return Dispatch(rank, seq, pr, h, bytes(frames[2]))


# --------------------------------------------------------------------------- replies


def encode_rej(rid: str | None, code: str, msg: str) -> bytes:
    return msgpack.packb({"v": VERSION, "t": REJ, "rid": rid, "code": code, "msg": msg})


def encode_fail(rid: str, rank: int | None, code: str, msg: str) -> bytes:
    return msgpack.packb({"v": VERSION, "t": FAIL, "rid": rid, "rank": rank, "code": code, "msg": msg})


def encode_out(rid: str, rank: int, final: bool, meta: Mapping[str, Any] | None = None) -> bytes:
    """The header frame of an output; the payload (text or token bytes) is the next frame."""
    return msgpack.packb({"v": VERSION, "t": OUT, "rid": rid, "rank": rank, "final": final, "meta": meta or {}})


def decode_reply(frames: Sequence[Any]) -> Reply:
    """Decode an ``out``, ``rej`` or ``fail`` message into a :class:`Reply`."""
    if not frames:
        raise WireError("reply: empty message")
    h = _unpack(frames[0], "reply")
    t = _expect(h, REPLY_TYPES, "reply")
    rid = h.get("rid")
    if t == OUT:
        _frames(frames, (1, 2), "out")
        rid = _str(h, "rid", "out")
        rank = _req_int(h, "rank", "out")
        final = h.get("final")
        if type(final) is not bool:
            msg = f"out {show(rid)}: field 'final' must be a boolean, got {show(final)}"
            raise WireError(msg)
        meta = h.get("meta")
        if meta is None:
            meta = {}
        elif type(meta) is not dict:
            msg = f"out {show(rid)}: field 'meta' must be a map, got {type(meta).__name__}"
            raise WireError(msg)
        payload = bytes(frames[1]) if len(frames) == 2 else b""
        return Reply(OUT, rid, rank, final, "", "", meta, payload)
    _frames(frames, (1,), t)
    if rid is not None and type(rid) is not str:
        msg = f"{t}: field 'rid' must be a string, got {show(rid)}"
        raise WireError(msg)
    code = _str(h, "code", t)
    text = _str(h, "msg", t)
    rank = _opt_int(h, "rank", t) if t == FAIL else None
    return Reply(t, rid or "", rank, True, code, text)


# --------------------------------------------------------------------------- load


def encode_load(
    rank: int,
    *,
    epoch: int,
    seq: int,
    ack: int = -1,
    run: int = 0,
    wait: int = 0,
    tok: int = 0,
    kvu: int = 0,
    kvc: int = 0,
    pf: int = -1,
    done: Iterable[int] = (),
    lo: int | None = None,
    out: Iterable[int] | None = None,
) -> bytes:
    """A load report. ``pf``: prefill tokens left in progress (``-1``: unknown); ``done``:
    dispatch seqs finished since the last report; ``lo``: the first dispatch seq this life
    of the rank received (``None``: none yet); ``out``: the output tokens each ``done``
    request generated (``-1``: not counted), or ``None`` to leave the field out."""
    h = {
        "v": VERSION,
        "t": LOAD,
        "rank": rank,
        "epoch": epoch,
        "seq": seq,
        "ack": ack,
        "run": run,
        "wait": wait,
        "tok": tok,
        "kvu": kvu,
        "kvc": kvc,
        "pf": pf,
        "done": list(done),
        "lo": lo,
    }
    if out is not None:
        h["out"] = list(out)
    return msgpack.packb(h)


def decode_load(buf: Any) -> tuple[LoadReport, tuple[int, ...], int | None, tuple[int, ...] | None]:
    """Decode a load report: the :class:`LoadReport`, the finished dispatch seqs, ``lo``, and
    the output tokens of each finished request (``None`` when the rank did not send them)."""
    h = _unpack(buf, "load")
    _expect(h, (LOAD,), "load")
    return _load_from_header(h)


def decode_rank_message(
    buf: Any,
) -> tuple[LoadReport, tuple[int, ...], int | None, tuple[int, ...] | None] | KvEventBatch:
    """Decode a frame from the report socket: a load report (as :func:`decode_load`) or a
    :class:`~dpcore.cacheindex.KvEventBatch`."""
    h = _unpack(buf, "report")
    if _expect(h, (LOAD, KV), "report") == KV:
        return _kv_from_header(h)
    return _load_from_header(h)


def _load_from_header(
    h: Mapping[str, Any],
) -> tuple[LoadReport, tuple[int, ...], int | None, tuple[int, ...] | None]:
    w = "load"
    rank = _req_int(h, "rank", w)
    epoch = _req_int(h, "epoch", w)
    seq = _req_int(h, "seq", w)
    ack = _req_int(h, "ack", w, minimum=-1)
    reqs, toks = MAX_REPORT_REQUESTS, MAX_REPORT_TOKENS
    report = LoadReport(
        rank,
        epoch,
        seq,
        ack,
        _req_int(h, "run", w, maximum=reqs),
        _req_int(h, "wait", w, maximum=reqs),
        _req_int(h, "tok", w, maximum=toks),
        _req_int(h, "kvu", w, maximum=toks),
        _req_int(h, "kvc", w, maximum=toks),
        -1 if h.get("pf") is None else _req_int(h, "pf", w, minimum=-1, maximum=toks),
    )
    done = h.get("done")
    if done is None:
        done = ()
    elif (
        type(done) is not list
        or len(done) > _MAX_DONE
        or not all(type(x) is int and 0 <= x <= _MAX_INT for x in done)
    ):
        msg = f"load from rank {rank}: field 'done' must be a list of at most {_MAX_DONE} integers in 0..2**63-1"
        raise WireError(msg)
    out = h.get("out")
    if out is not None:
        if (
            type(out) is not list
            or len(out) != len(done)
            or not all(type(x) is int and -1 <= x <= MAX_OUTPUT_TOKENS for x in out)
        ):
            msg = (
                f"load from rank {rank}: field 'out' must be a list of one integer in -1..2**32 per "
                f"'done' item ({len(done)})"
            )
            raise WireError(msg)
        out = tuple(out)
    return report, tuple(done), _opt_int(h, "lo", w), out


# --------------------------------------------------------------------------- kv

#: Control op (controller → one rank) asking it to resend everything its cache holds, as a
#: resync batch (``data``: ``{"rank": r}``).
KV_RESYNC = "kv_resync"
#: Most events in one KV batch, and most block keys in all its events together (a batch of
#: 65,536 keys is about 600 KB, under :data:`MAX_REPORT_BYTES`).
MAX_KV_EVENTS = 4096
MAX_KV_KEYS = 1 << 16
#: Block keys are 64-bit integers (dpcore's hashes are 63-bit; engines' may be signed).
_MIN_KEY = -(1 << 63)
_MAX_KEY = (1 << 64) - 1


def encode_kv(rank: int, *, epoch: int, seq: int, events: Sequence[Sequence[Any]], capacity: int = 0) -> bytes:
    """A batch of KV cache events from *rank*: ``[STORED, parent, keys]``,
    ``[REMOVED, keys]``, ``[CLEARED]`` (see :mod:`dpcore.cacheindex`). *seq* counts batches
    of this life from 0 without gaps; *capacity* is the rank's cache size in blocks (0: not said)."""
    return msgpack.packb({"v": VERSION, "t": KV, "rank": rank, "epoch": epoch, "seq": seq, "cap": capacity, "ev": events})


def _keys(x: Any, rank: int, budget: int) -> tuple[int, ...]:
    if type(x) is not list or len(x) > budget or not all(type(k) is int and _MIN_KEY <= k <= _MAX_KEY for k in x):
        msg = f"kv from rank {rank}: block keys must be a list of 64-bit integers, at most {MAX_KV_KEYS} per batch"
        raise WireError(msg)
    return tuple(x)


def _kv_from_header(h: Mapping[str, Any]) -> KvEventBatch:
    w = "kv"
    rank = _req_int(h, "rank", w)
    epoch = _req_int(h, "epoch", w)
    seq = _req_int(h, "seq", w)
    cap = _req_int(h, "cap", w)
    ev = h.get("ev")
    if type(ev) is not list or len(ev) > MAX_KV_EVENTS:
        msg = f"kv from rank {rank}: field 'ev' must be a list of at most {MAX_KV_EVENTS} events"
        raise WireError(msg)
    budget = MAX_KV_KEYS
    events: list[tuple[Any, ...]] = []
    for e in ev:
        kind = e[0] if type(e) is list and e else None
        if kind == STORED and len(e) == 3:
            parent = e[1]
            if parent is not None and not (type(parent) is int and _MIN_KEY <= parent <= _MAX_KEY):
                msg = f"kv from rank {rank}: a stored chain's parent must be a 64-bit integer or nil, got {parent!r}"
                raise WireError(msg)
            keys = _keys(e[2], rank, budget)
            events.append((STORED, parent, keys))
        elif kind == REMOVED and len(e) == 2:
            keys = _keys(e[1], rank, budget)
            events.append((REMOVED, keys))
        elif kind == CLEARED and len(e) == 1:
            events.append((CLEARED,))
            continue
        else:
            msg = f"kv from rank {rank}: bad event {e!r:.80}; expected [0, parent, keys], [1, keys] or [2]"
            raise WireError(msg)
        budget -= len(keys)
    return KvEventBatch(rank, epoch, seq, tuple(events), cap)


# --------------------------------------------------------------------------- ctl


def encode_ctl(op: str, data: Any = None) -> bytes:
    return msgpack.packb({"v": VERSION, "t": CTL, "op": op, "data": data})


def control_from_header(h: Mapping[str, Any]) -> Control:
    op = _str(h, "op", "ctl")
    if not op:
        raise WireError("ctl: field 'op' must not be empty")
    return Control(op, h.get("data"))


def decode_ctl(buf: Any) -> Control:
    h = _unpack(buf, "ctl")
    _expect(h, (CTL,), "ctl")
    return control_from_header(h)


#: The control op of an abort.
ABORT = "abort"


#: Why a sender gave a request up (the abort's ``reason``): its caller's connection closed;
#: no reply came in time; its reader fell too far behind; its caller asked.
ABORT_CLIENT_GONE = "client_gone"
ABORT_TIMEOUT = "timeout"
ABORT_TOO_SLOW = "too_slow"
ABORT_CALLER = "caller"
#: The reasons an abort may give; any other is counted as :data:`ABORT_OTHER`.
ABORT_REASONS = frozenset({ABORT_CLIENT_GONE, ABORT_TIMEOUT, ABORT_TOO_SLOW, ABORT_CALLER})
ABORT_OTHER = "other"
#: What an abort without a ``reason`` (an older sender's) is counted as.
ABORT_UNSPECIFIED = "unspecified"


def encode_abort(rid: str, reply: str, reason: str | None = None) -> bytes:
    """Ask the rank holding request *rid* of the sender listening at *reply* to drop it (not
    started) or stop it (started), because of *reason* (one of :data:`ABORT_REASONS`, or
    ``None``). No reply comes back for it."""
    if reason is None:
        return encode_ctl(ABORT, {"rid": rid, "reply": reply})
    if reason not in ABORT_REASONS:
        msg = f"abort reason {reason!r} is not one of {sorted(ABORT_REASONS)}"
        raise ValueError(msg)
    return encode_ctl(ABORT, {"rid": rid, "reply": reply, "reason": reason})


def abort_reason(ctl: Control) -> str:
    """The reason an abort gives, as counted: one of :data:`ABORT_REASONS`,
    :data:`ABORT_UNSPECIFIED` (none given) or :data:`ABORT_OTHER` (anything else). A reason
    never makes an abort invalid: the request is given up whatever it says."""
    d = ctl.data
    why = d.get("reason") if type(d) is dict else None
    if why is None:
        return ABORT_UNSPECIFIED
    return why if type(why) is str and why in ABORT_REASONS else ABORT_OTHER


def abort_target(ctl: Control) -> tuple[str, str]:
    """The ``(rid, reply)`` an abort control message names."""
    d = ctl.data
    if type(d) is not dict or type(d.get("rid")) is not str or not valid_reply(d.get("reply")):
        msg = f"abort: data must be a map with a string 'rid' and a reply endpoint 'reply', got {show(d)}"
        raise WireError(msg)
    return d["rid"], d["reply"]


def decode_header(buf: Any, types: Sequence[str] = TYPES, what: str = "header") -> dict[str, Any]:
    """Decode and version-check any header frame, accepting only *types*."""
    h = _unpack(buf, what)
    _expect(h, types, what)
    return h


# --------------------------------------------------------------------------- token ids


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32 bytes: a compact payload for engines that want ids."""
    a = array("I", token_ids)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tobytes()


def unpack_token_ids(buf: bytes) -> list[int]:
    """Inverse of :func:`pack_token_ids`."""
    if len(buf) % 4:
        msg = f"token ids: {len(buf)} bytes is not a whole number of uint32"
        raise WireError(msg)
    a = array("I")
    a.frombytes(buf)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tolist()
