"""Block hashes computed in SGLang's tokenizer process and carried to the controller with the request.

SGLang 0.5.23 tokenizes in the TokenizerManager, in the server's main process, and sends each
tokenized request to the data-parallel controller (``tokenizer_manager.py``:
``TokenizerManager._send_one_request`` / ``_send_batch_request`` call
``_dispatch_to_scheduler``, which is ``sock_send`` on a PUSH socket to the controller's
``scheduler_input_ipc_name``). The controller decodes and places every request on its one
thread (``data_parallel_controller.py``: ``DataParallelController.event_loop``). Hashing a
prompt's blocks (about 40 CPU µs for 1,000 token ids) is work the token ids allow anywhere, so
with ``python -m dpcore_sglang.launch_server`` it happens where they are made:

* :func:`register` puts an ``AROUND`` hook on ``TokenizerManager._dispatch_to_scheduler``
  through SGLang's own plugin hook registry (``sglang.srt.plugins.hook_registry``). For a
  tokenized request (or a batch of them) it computes :func:`dpcore.hashing.block_key_bytes`
  for each prompt and sends one frame: :data:`MAGIC`, the length of a msgpack header
  ``[block_size, [rid, keys, rid, keys, ...]]``, the header, then the request exactly as
  SGLang encodes it. Everything else is sent by SGLang's own code.
* In the controller, :meth:`Carried.split` (called by the adapter's receiver) takes the header
  off before SGLang decodes the request, and :meth:`Carried.take` hands the dispatcher a
  request's keys. Keys that do not fit the request (another block size, a count that is not
  the prompt's whole blocks, a value that is not a block hash, an unreadable header) are
  refused and counted by reason, and that request is hashed in the controller as before.
  Requests that arrive without keys (a tokenizer without the hook) are hashed there too.

The cost moved, it did not vanish: the tokenizer process pays it, beside its own tokenizing
(``dpcore bench --sglang`` reports it on a line of its own). The frame is only ever sent to a
controller running this adapter: the hook does nothing unless SGLang starts a data-parallel
controller (``entrypoints/engine.py``, ``Engine._launch_scheduler_processes``:
``num_dp_ranks > 1`` or ``ep_join_mode == "scale"``), nor with several tokenizer workers
(their router, ``MultiTokenizerRouter.router_worker_obj``, decodes and re-encodes each message).

Nothing here imports SGLang at module level: the controller-side parts are tested without it.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack

from dpcore.hashing import KEY_BYTES, block_key_bytes, keys_of_bytes
from dpcore_sglang.forward import NUM_ROUTE_FIELDS, forwardable, route_header, route_problem

log = logging.getLogger("dpcore_sglang")

#: First bytes of a frame that carries block hashes before SGLang's message. 0xC1 is the one
#: byte msgpack never uses and no pickle starts with, so neither of SGLang's IPC encodings
#: can be mistaken for it; the last byte is the layout's version.
MAGIC = b"\xc1dpcore-hashes\x01"
_MAGIC_LEN = len(MAGIC)
_LENGTH = struct.Struct("<I")
_HEAD = _MAGIC_LEN + _LENGTH.size
#: The hooked TokenizerManager method (SGLang 0.5.23).
TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._dispatch_to_scheduler"
_NONE: dict[str, bytes] = {}


def carry(frame: bytes, block_size: int, entries: list[Any]) -> bytes:
    """SGLang's encoded *frame* with the keys in *entries* (``[rid, keys, ...]``) in front."""
    header = msgpack.packb([block_size, entries])
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, frame))


def entries_for(obj: Any, block_size: int) -> list[Any]:
    """``[rid, keys, ...]`` for the tokenized requests in *obj* that have token ids."""
    batch = getattr(obj, "batch", None)
    out: list[Any] = []
    for req in (obj,) if batch is None else batch:
        ids = req.input_ids
        if ids is not None and type(req.rid) is str:
            out += (req.rid, block_key_bytes(ids, block_size))
    return out


def seldom(before: int, after: int) -> bool:
    """Whether a count of repeated problems that went from *before* to *after* passed a power
    of two: log the 1st, 2nd, 4th, 8th... of a kind, visible but never a flood."""
    return before.bit_length() != after.bit_length()


class Carried:
    """The controller's side: keys that came with the message being dispatched, and counts.

    :param block_size: Tokens per block the adapter hashes (``0``: it does not hash).
    :ivar used: Requests placed with keys from the tokenizer.
    :ivar hashed_here: Requests the controller hashed itself (none came, or they were refused).
    :ivar refused: Refused keys by reason: ``header`` (unreadable), ``block_size`` (another
        block size), ``count`` (not the prompt's whole blocks), ``value`` (not block hashes).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.pending = _NONE
        #: The request to forward: (its route header, its keys, SGLang's bytes); see split().
        self.route: tuple[list[Any], tuple[int, ...], memoryview] | None = None
        #: Route headers not used, by reason: ``header`` (a field of the wrong type) or
        #: ``keys`` (the chain reads block hashes the header lacks or that were refused).
        self.not_forwarded: Counter[str] = Counter()
        self.used = 0
        self.hashed_here = 0
        self.refused: Counter[str] = Counter()

    def split(self, frame: bytes, forward: bool = False) -> bytes | None:
        """SGLang's message in *frame* (which starts with :data:`MAGIC`); keeps its keys.

        With *forward*, a usable route header (:mod:`dpcore_sglang.forward`) puts the request
        in :attr:`route` instead and returns ``None``: nothing is left to decode.

        :raises ValueError: the frame is cut short, so SGLang's message cannot be found.
        """
        if len(frame) < _HEAD:
            msg = f"a {len(frame)}-byte frame starts like one with block hashes but is cut short"
            raise ValueError(msg)
        end = _HEAD + _LENGTH.unpack_from(frame, _MAGIC_LEN)[0]
        if end > len(frame):
            msg = f"the block-hash header claims {end - _HEAD} bytes; the frame has {len(frame) - _HEAD}"
            raise ValueError(msg)
        try:
            header = msgpack.unpackb(frame[_HEAD:end])
            if len(header) == NUM_ROUTE_FIELDS:
                return self._route(header, frame, end, forward)
            block_size, entries = header
            if len(entries) == 2:  # one request, the usual case
                pending = {entries[0]: entries[1]}
            else:
                pending = dict(zip(entries[::2], entries[1::2], strict=True))
        except Exception as exc:  # whatever the header is, the request itself still goes on
            self.pending = _NONE
            self._refuse("header", f"unreadable header ({exc!r})")
            if forward:
                self._not_forwarded("header", f"unreadable header ({exc!r})")
            return frame[end:]
        if block_size != self.block_size:
            self.pending = _NONE
            self._refuse("block_size", f"hashed every {block_size!r} tokens; this controller hashes every {self.block_size}")
        else:
            self.pending = pending
        # A copy, not a view: pickle reads bytes faster than a memoryview by more than it costs.
        return frame[end:]

    def _route(self, header: list[Any], frame: bytes, end: int, forward: bool) -> bytes | None:
        """A route header: the request to forward in :attr:`route`, else its keys kept and the
        rest of *frame* returned to be decoded (refused headers counted in :attr:`not_forwarded`)."""
        problem = route_problem(header)
        if problem is not None:
            self.pending = _NONE
            self._not_forwarded("header", problem)
            return frame[end:]
        block_size, rid, raw, n = header[0], header[1], header[2], header[3]
        keys: tuple[int, ...] = ()
        if self.block_size:
            if raw is None or block_size != self.block_size:
                # The chain reads keys the header lacks: decode, and hash the prompt here.
                self.pending = _NONE
                if raw is not None:
                    self._refuse("block_size", f"hashed every {block_size!r} tokens; this controller hashes every {self.block_size}")
                if forward:
                    self._not_forwarded("keys", f"request {rid!r} came without usable block hashes")
                return frame[end:]
            if not forward:
                self.pending = {rid: raw}
                return frame[end:]
            checked = self._check(rid, n, raw)
            if checked is None:  # refused, counted: decoded and hashed here
                self.pending = _NONE
                self._not_forwarded("keys", f"request {rid!r}: its block hashes were refused")
                return frame[end:]
            keys = checked
            self.used += 1
        elif not forward:
            self.pending = _NONE
            return frame[end:]
        self.pending = _NONE
        self.route = (header, keys, memoryview(frame)[end:])
        return None

    def _not_forwarded(self, reason: str, detail: str) -> None:
        self.not_forwarded[reason] += 1
        n = self.not_forwarded[reason]
        if seldom(n - 1, n):
            log.warning("dpcore: a request's route header was refused (%s, %d so far): %s; decoding it", reason, n, detail)

    def take(self, rid: Any, num_tokens: int) -> tuple[int, ...] | None:
        """The keys that came for request *rid* of *num_tokens* token ids, or ``None`` (then
        the caller hashes; counted)."""
        raw = self.pending.pop(rid, None) if self.pending else None
        keys = None if raw is None else self._check(rid, num_tokens, raw)
        if keys is None:
            self.hashed_here += 1
            return None
        self.used += 1
        return keys

    def _check(self, rid: Any, num_tokens: int, raw: Any) -> tuple[int, ...] | None:
        """*raw* as keys, or ``None`` when they do not fit a prompt of *num_tokens* (refusal counted)."""
        if type(raw) is not bytes or len(raw) != KEY_BYTES * (num_tokens // self.block_size):
            size = len(raw) if type(raw) is bytes else type(raw).__name__
            self._refuse("count", f"request {rid!r}: {num_tokens} token ids, keys of {size} bytes")
            return None
        try:
            return keys_of_bytes(raw)
        except ValueError as exc:
            self._refuse("value", f"request {rid!r}: {exc}")
            return None

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        n = self.refused[reason]
        if seldom(n - 1, n):
            log.warning("dpcore: block hashes from the tokenizer refused (%s, %d so far): %s; hashing here", reason, n, detail)

    def stats(self) -> dict[str, Any]:
        return {"from_tokenizer": self.used, "hashed_here": self.hashed_here, "refused": dict(self.refused)}


# ---------------------------------------------------------------------------- tokenizer side


class TokenizerHook:
    """The ``AROUND`` hook on ``TokenizerManager._dispatch_to_scheduler``.

    :param plan: Returns (tokens per block to hash in this process, ``0`` for none; whether
        single requests get a route header, :mod:`dpcore_sglang.forward`); asked once, at the
        first message (SGLang publishes its resolved settings before it builds the
        TokenizerManager).
    """

    def __init__(self, plan: Callable[[], tuple[int, bool]]) -> None:
        self._plan = plan
        self._started = False
        self._block_size = 0
        self._forward = False
        self._single: tuple[type, ...] = ()
        self._kinds: tuple[type, ...] = ()
        self._encode: Callable[[Any], bytes] | None = None
        #: Requests whose route header could not be built (sent as SGLang sends them).
        self.unroutable = 0

    def __call__(self, original: Callable[..., Any], tm: Any, obj: Any) -> Any:
        if not self._started:
            self._start()
        if tm.tokenizer_ipc_name is not None:
            return original(tm, obj)
        kind = type(obj)
        if self._forward and kind in self._single and forwardable(obj):
            try:
                frame = frame_with_route(self._encode(obj), obj, self._block_size)  # type: ignore[misc]
            except Exception as exc:  # a field msgpack cannot carry (a numpy integer...): SGLang's own send
                self.unroutable += 1
                n = self.unroutable
                if seldom(n - 1, n):
                    log.warning("dpcore: request %r sent without a route header (%d so far): %r", obj.rid, n, exc)
                return original(tm, obj)
            return tm.send_to_scheduler.send(frame)
        if not self._block_size or kind not in self._kinds:
            return original(tm, obj)
        entries = entries_for(obj, self._block_size)
        if not entries:
            return original(tm, obj)
        return tm.send_to_scheduler.send(carry(self._encode(obj), self._block_size, entries))  # type: ignore[misc]

    def _start(self) -> None:
        from sglang.srt.managers.io_struct import (
            BatchTokenizedEmbeddingReqInput,
            BatchTokenizedGenerateReqInput,
            TokenizedEmbeddingReqInput,
            TokenizedGenerateReqInput,
        )

        from dpcore_sglang.adapter import frame_encoder

        self._single = (TokenizedGenerateReqInput, TokenizedEmbeddingReqInput)
        self._kinds = (*self._single, BatchTokenizedGenerateReqInput, BatchTokenizedEmbeddingReqInput)
        self._encode = frame_encoder()
        self._block_size, self._forward = self._plan()
        self._started = True
        log.info(
            "dpcore: block hashes %s; requests %s",
            f"computed in the tokenizer process every {self._block_size} tokens" if self._block_size else "not computed in the tokenizer process",
            "sent with a route header (forwarded as encoded)" if self._forward else "decoded by the controller",
        )


def frame_with_route(frame: bytes, req: Any, block_size: int) -> bytes:
    """SGLang's encoded *frame* of the single request *req* with its route header in front."""
    header = msgpack.packb(route_header(req, block_size))
    return b"".join((MAGIC, _LENGTH.pack(len(header)), header, frame))


def tokenizer_plan(hashed_block_size: Callable[[int], int], forward: bool = True) -> tuple[int, bool]:
    """(tokens per block for the tokenizer to hash, ``0`` for none; whether to send route
    headers), from SGLang's published settings.

    :param hashed_block_size: The adapter's block size for a page size
        (``AdapterConfig.hashed_block_size`` with the chain's capability bound).
    :param forward: Route headers wanted (``--dpcore-forward``).
    """
    from sglang.srt.runtime_context import get_observability, get_schedule

    if not dp_controller_reads():
        return 0, False
    # With tracing on, SGLang's controller records a span per request: let it decode them.
    return hashed_block_size(int(get_schedule().page_size or 1)), forward and not get_observability().enable_trace


def tokenizer_block_size(hashed_block_size: Callable[[int], int]) -> int:
    """Tokens per block for the tokenizer to hash (``0``: none); see :func:`tokenizer_plan`."""
    return tokenizer_plan(hashed_block_size)[0]


def dp_controller_reads() -> bool:
    """Whether SGLang's data-parallel controller (so the adapter) reads this process's
    messages as sent: there is one (else a scheduler reads them), and one tokenizer worker
    (several send through a router that decodes and re-encodes each message)."""
    from sglang.srt.runtime_context import get_exec, get_parallel, get_serving

    if not (get_parallel().num_dp_ranks > 1 or get_exec().moe.ep_join_mode == "scale"):
        return False
    return get_serving().tokenizer_worker_num == 1


def register(hashed_block_size: Callable[[int], int], forward: bool = True) -> TokenizerHook:
    """Hook the TokenizerManager of this process through SGLang's plugin hook registry."""
    from sglang.srt import plugins
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hook = TokenizerHook(lambda: tokenizer_plan(hashed_block_size, forward))
    HookRegistry.register(TARGET, hook, HookType.AROUND)
    if getattr(plugins, "_plugins_loaded", False):  # SGLang applies hooks when it loads plugins
        HookRegistry.apply_hooks()
    return hook
