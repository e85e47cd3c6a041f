"""Tokenized requests sent on to their scheduler as the bytes SGLang's tokenizer encoded.

SGLang 0.5.23's controller decodes every tokenized request (``sock_recv``: ``pickle.loads``,
msgspec's struct rebuild, ``SamplingParams.__post_init__``) and encodes it again for the
chosen scheduler (``sock_send``), most of its per-request cost on long prompts, only to read
a handful of fields (``data_parallel_controller.py``: ``DataParallelController``'s
``*_scheduler`` methods, ``maybe_external_dp_rank_routing``, ``dispatching_with_trace``).
With ``python -m dpcore_sglang.launch_server``, the tokenizer process's hook
(:mod:`dpcore_sglang.tokenizer_hashes`) puts those fields in a small msgpack header in front
of a single tokenized request, :func:`route_header`; the adapter places the request from the
header alone and sends the bytes behind it to the chosen scheduler unchanged.

What the controller would have changed on the request, and why leaving it is harmless:
``dispatching_with_trace`` swaps ``req.time_stats`` for a ``DPControllerReqTimeStats`` with
``dpc_dispatch_time`` set. Its ``__getstate__`` (``observability/req_time_stats.py``) sends
none of its timestamps on, only the base state (``disagg_mode``, ``enable_metrics=False``,
the trace context, ``diff_realtime_monotonic``), which the tokenizer's
``APIServerReqTimeStats`` sends too; the scheduler copies that state into its own
``SchedulerReqTimeStats.new_from_obj`` (``schedule_batch.py``, ``Req.__init__``), where only
keys ending in ``time`` are shifted by ``diff_realtime_monotonic``, and the base state has
none. What differs is the trace context when tracing is on (the controller opens and closes a
``DPC_DISPATCH`` span): with ``--enable-trace`` the hook adds no route header, so requests
take SGLang's own path. Requests with multimodal inputs (their features may be shared-memory
pointers the controller's decode touches), health checks (``is_health_check_generate_req``:
answered by ``dispatch_health_check``) and batches (SGLang places each item on its own)
take it too.

A header whose fields do not have the types below is refused, counted by reason, and the
request behind it is decoded and placed the usual way: nothing is lost. The header is read
with msgpack only; the bytes forwarded are never decoded here. Both of SGLang's IPC encodings
work: with pickle (``sock_recv`` calls ``recv_pyobj``) the receiver returns :data:`FORWARDED`;
with msgpack (``sock_recv`` decodes what ``recv`` returns) it returns the bytes of a marker
message the adapter registers with ``io_struct.hook_custom_types``.
"""

from __future__ import annotations

from typing import Any

from dpcore.hashing import block_key_bytes

#: Fields of a route header, in order (a keys-only header has two: block size, entries).
ROUTE_FIELDS = (
    "block_size",
    "rid",
    "keys",
    "num_tokens",
    "max_new_tokens",
    "routed_dp_rank",
    "data_parallel_rank",
    "disagg_prefill_dp_rank",
    "bootstrap_room",
    "http_worker_ipc",
)
NUM_ROUTE_FIELDS = len(ROUTE_FIELDS)
#: rids SGLang's health checks carry (``sglang/srt/managers/utils.py``: ``HEALTH_CHECK_RID_PREFIX``).
HEALTH_CHECK_PREFIX = "HEALTH_CHECK"


class Forwarded:
    """What the receiver hands SGLang's dispatcher for a request to forward (one instance;
    the request is the adapter's ``carried.route``). SGLang dispatches on exact type."""

    __slots__ = ()


FORWARDED = Forwarded()


def prompt_length(req: Any) -> int:
    """Tokens in *req*'s prompt: its token ids, else its embedding rows (``0`` for neither)."""
    ids = req.input_ids
    if ids is not None:
        return len(ids)
    embeds = getattr(req, "input_embeds", None)
    return len(embeds) if embeds is not None else 0


def forwardable(req: Any) -> bool:
    """Whether a single tokenized request can be placed from its header alone (see the module)."""
    rid = req.rid
    return type(rid) is str and getattr(req, "mm_inputs", None) is None and not rid.startswith(HEALTH_CHECK_PREFIX)


def route_header(req: Any, block_size: int) -> list[Any]:
    """The header in front of *req* (fields :data:`ROUTE_FIELDS`); keys when *block_size* > 0."""
    ids = req.input_ids
    params = getattr(req, "sampling_params", None)
    return [
        block_size,
        req.rid,
        block_key_bytes(ids, block_size) if block_size and ids is not None else None,
        prompt_length(req),
        getattr(params, "max_new_tokens", None),
        getattr(req, "routed_dp_rank", None),
        # Left the tokenized message in SGLang 0.5.x (routed_dp_rank took its place); read in
        # case a producer still sets it, as convert.to_request does.
        getattr(req, "data_parallel_rank", None),
        getattr(req, "disagg_prefill_dp_rank", None),
        getattr(req, "bootstrap_room", None),
        getattr(req, "http_worker_ipc", None),
    ]


def _int_or_none(v: Any) -> bool:
    return v is None or type(v) is int


def route_problem(header: list[Any]) -> str | None:
    """Why *header* (a route header, already of the right length) cannot be used, or ``None``."""
    _bs, rid, keys, n, max_new, routed, dp_rank, prefill, room, ipc = header
    # The usual case in one expression: this runs for every request.
    if (
        type(rid) is str
        and type(n) is int
        and n >= 0
        and (max_new is None or (type(max_new) is int and max_new >= 0))
        and (routed is None or type(routed) is int)
        and dp_rank is None
        and prefill is None
        and (room is None or type(room) is int)
        and (keys is None or type(keys) is bytes)
        and ipc is None
    ):
        return None
    if type(rid) is not str:
        return f"rid is {type(rid).__name__}, not str"
    if type(n) is not int or n < 0:
        return f"request {rid!r}: num_tokens {n!r} is not a count"
    if not (_int_or_none(max_new) and _int_or_none(routed) and _int_or_none(dp_rank) and _int_or_none(prefill) and _int_or_none(room)):
        return f"request {rid!r}: a rank, the bootstrap room or max_new_tokens is not an integer or nil"
    if max_new is not None and max_new < 0:
        return f"request {rid!r}: max_new_tokens {max_new} is negative"
    if not (keys is None or type(keys) is bytes) or not (ipc is None or type(ipc) is str):
        return f"request {rid!r}: keys or http_worker_ipc of the wrong type"
    return None
