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

Each message type has a module of its own, as do the header checks, the limits and the
token-id payload; every name is re-exported here, so ``from dpcore import wire; wire.X``
reaches them all:

=============================  ==================================================================
module                         what
=============================  ==================================================================
:mod:`dpcore.wire.header`      the version, the type tags, the checks every decoder applies
:mod:`dpcore.wire.limits`      :class:`Limits`, frame sizes, valid reply endpoints
:mod:`dpcore.wire.request`     ``req``, and what a controller's ingress accepts
:mod:`dpcore.wire.dispatch`    ``dispatch``
:mod:`dpcore.wire.replies`     ``out``, ``rej``, ``fail``
:mod:`dpcore.wire.load`        ``load``, and the report socket's decoder
:mod:`dpcore.wire.kv`          ``kv`` (KV cache event batches)
:mod:`dpcore.wire.control`     ``ctl``, and ``abort``
:mod:`dpcore.wire.tokenids`    token ids as a payload
=============================  ==================================================================
"""

from __future__ import annotations

from dpcore.wire.control import (
    ABORT,
    ABORT_CALLER,
    ABORT_CLIENT_GONE,
    ABORT_OTHER,
    ABORT_REASONS,
    ABORT_TIMEOUT,
    ABORT_TOO_SLOW,
    ABORT_UNSPECIFIED,
    Control,
    abort_reason,
    abort_target,
    control_from_header,
    decode_ctl,
    encode_abort,
    encode_ctl,
)
from dpcore.wire.dispatch import Dispatch, decode_dispatch, dispatch_encoder, dispatch_frames, encode_dispatch
from dpcore.wire.header import (
    CTL,
    DISPATCH,
    FAIL,
    KV,
    LOAD,
    OUT,
    REJ,
    REPLY_TYPES,
    REQ,
    TYPES,
    VERSION,
    decode_header,
    int_problem,
    message_type,
    show,
)
from dpcore.wire.kv import KV_RESYNC, MAX_KV_EVENTS, MAX_KV_KEYS, encode_kv
from dpcore.wire.limits import (
    DEFAULT_LIMITS,
    MAX_MESSAGE_BYTES,
    MAX_REPORT_BYTES,
    WIDEST_LIMITS,
    Limits,
    valid_reply,
)
from dpcore.wire.load import (
    MAX_OUTPUT_TOKENS,
    MAX_REPORT_REQUESTS,
    MAX_REPORT_TOKENS,
    decode_load,
    decode_rank_message,
    encode_load,
)
from dpcore.wire.replies import Reply, decode_reply, encode_fail, encode_out, encode_rej
from dpcore.wire.request import (
    MalformedHeader,
    decode_ingress,
    decode_request,
    encode_request,
    request_from_header,
)
from dpcore.wire.tokenids import pack_token_ids, unpack_token_ids

__all__ = [
    "ABORT",
    "ABORT_CALLER",
    "ABORT_CLIENT_GONE",
    "ABORT_OTHER",
    "ABORT_REASONS",
    "ABORT_TIMEOUT",
    "ABORT_TOO_SLOW",
    "ABORT_UNSPECIFIED",
    "CTL",
    "Control",
    "DEFAULT_LIMITS",
    "DISPATCH",
    "Dispatch",
    "FAIL",
    "KV",
    "KV_RESYNC",
    "LOAD",
    "Limits",
    "MAX_KV_EVENTS",
    "MAX_KV_KEYS",
    "MAX_MESSAGE_BYTES",
    "MAX_OUTPUT_TOKENS",
    "MAX_REPORT_BYTES",
    "MAX_REPORT_REQUESTS",
    "MAX_REPORT_TOKENS",
    "MalformedHeader",
    "OUT",
    "REJ",
    "REPLY_TYPES",
    "REQ",
    "Reply",
    "TYPES",
    "VERSION",
    "WIDEST_LIMITS",
    "abort_reason",
    "abort_target",
    "control_from_header",
    "decode_ctl",
    "decode_dispatch",
    "decode_header",
    "decode_ingress",
    "decode_load",
    "decode_rank_message",
    "decode_reply",
    "decode_request",
    "dispatch_encoder",
    "dispatch_frames",
    "encode_abort",
    "encode_ctl",
    "encode_dispatch",
    "encode_fail",
    "encode_kv",
    "encode_load",
    "encode_out",
    "encode_rej",
    "encode_request",
    "int_problem",
    "message_type",
    "pack_token_ids",
    "request_from_header",
    "show",
    "unpack_token_ids",
    "valid_reply",
]
