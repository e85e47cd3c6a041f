"""``load``: a rank's load report, and the decoder of the report socket, which also carries the
rank's KV event batches (:mod:`dpcore.wire.kv`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from dpcore.cacheindex import KvEventBatch
from dpcore.errors import WireError
from dpcore.model import LoadReport
from dpcore.wire.header import _MAX_INT, KV, LOAD, VERSION, _expect, _opt_int, _req_int, _unpack
from dpcore.wire.kv import _kv_from_header

#: Requests a rank can hold (running or waiting): far above any engine's batch.
MAX_REPORT_REQUESTS = 1 << 32
#: Tokens a rank can hold (KV capacity, tokens in use): 2**40, a thousand times the KV of
#: the largest GPU node today, and small enough that a sum over a million ranks fits int64.
MAX_REPORT_TOKENS = 1 << 40

_MAX_DONE = 1 << 16
#: Largest output token count a load report's ``out`` carries for one finished request.
MAX_OUTPUT_TOKENS = 1 << 32


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
