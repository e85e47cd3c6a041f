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
        self.used = 0
        self.hashed_here = 0
        self.refused: Counter[str] = Counter()

    def split(self, frame: bytes) -> bytes:
        """SGLang's message in *frame* (which starts with :data:`MAGIC`); keeps its keys.

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
            block_size, entries = msgpack.unpackb(frame[_HEAD:end])
            if len(entries) == 2:  # one request, the usual case
                pending = {entries[0]: entries[1]}
            else:
                pending = dict(zip(entries[::2], entries[1::2], strict=True))
        except Exception as exc:  # whatever the header is, the request itself still goes on
            self.pending = _NONE
            self._refuse("header", f"unreadable header ({exc!r})")
            return frame[end:]
        if block_size != self.block_size:
            self.pending = _NONE
            self._refuse("block_size", f"hashed every {block_size!r} tokens; this controller hashes every {self.block_size}")
        else:
            self.pending = pending
        # A copy, not a view: pickle reads bytes faster than a memoryview by more than it costs.
        return frame[end:]

    def take(self, rid: Any, num_tokens: int) -> tuple[int, ...] | None:
        """The keys that came for request *rid* of *num_tokens* token ids, or ``None`` (then
        the caller hashes; counted)."""
        raw = self.pending.pop(rid, None) if self.pending else None
        if raw is None:
            self.hashed_here += 1
            return None
        if type(raw) is not bytes or len(raw) != KEY_BYTES * (num_tokens // self.block_size):
            size = len(raw) if type(raw) is bytes else type(raw).__name__
            self._refuse("count", f"request {rid!r}: {num_tokens} token ids, keys of {size} bytes")
            self.hashed_here += 1
            return None
        try:
            keys = keys_of_bytes(raw)
        except ValueError as exc:
            self._refuse("value", f"request {rid!r}: {exc}")
            self.hashed_here += 1
            return None
        self.used += 1
        return keys

    def _refuse(self, reason: str, detail: str) -> None:
        self.refused[reason] += 1
        n = self.refused[reason]
        if n & (n - 1) == 0:  # the 1st, 2nd, 4th, 8th... of a kind: visible, never a flood
            log.warning("dpcore: block hashes from the tokenizer refused (%s, %d so far): %s; hashing here", reason, n, detail)

    def stats(self) -> dict[str, Any]:
        return {"from_tokenizer": self.used, "hashed_here": self.hashed_here, "refused": dict(self.refused)}


# ---------------------------------------------------------------------------- tokenizer side


class TokenizerHook:
    """The ``AROUND`` hook on ``TokenizerManager._dispatch_to_scheduler``.

    :param block_size: Returns the tokens per block to hash in this process, ``0`` for none;
        asked once, at the first message (SGLang publishes its resolved settings before it
        builds the TokenizerManager).
    """

    def __init__(self, block_size: Callable[[], int]) -> None:
        self._block_size_of = block_size
        self._block_size: int | None = None
        self._kinds: tuple[type, ...] = ()
        self._encode: Callable[[Any], bytes] | None = None

    def __call__(self, original: Callable[..., Any], tm: Any, obj: Any) -> Any:
        if self._block_size is None:
            self._start()
        if not self._block_size or type(obj) not in self._kinds or tm.tokenizer_ipc_name is not None:
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

        self._kinds = (
            TokenizedGenerateReqInput,
            TokenizedEmbeddingReqInput,
            BatchTokenizedGenerateReqInput,
            BatchTokenizedEmbeddingReqInput,
        )
        self._encode = frame_encoder()
        self._block_size = self._block_size_of()
        log.info(
            "dpcore: block hashes %s",
            f"computed in the tokenizer process every {self._block_size} tokens" if self._block_size else "not computed in the tokenizer process",
        )


def tokenizer_block_size(hashed_block_size: Callable[[int], int]) -> int:
    """Tokens per block for the tokenizer to hash (``0``: none), from SGLang's published settings.

    :param hashed_block_size: The adapter's block size for a page size
        (``AdapterConfig.hashed_block_size`` with the chain's capability bound).
    """
    from sglang.srt.runtime_context import get_schedule

    if not dp_controller_reads():
        return 0
    return hashed_block_size(int(get_schedule().page_size or 1))


def dp_controller_reads() -> bool:
    """Whether SGLang's data-parallel controller (so the adapter) reads this process's
    messages as sent: there is one (else a scheduler reads them), and one tokenizer worker
    (several send through a router that decodes and re-encodes each message)."""
    from sglang.srt.runtime_context import get_exec, get_parallel, get_serving

    if not (get_parallel().num_dp_ranks > 1 or get_exec().moe.ep_join_mode == "scale"):
        return False
    return get_serving().tokenizer_worker_num == 1


def register(hashed_block_size: Callable[[int], int]) -> TokenizerHook:
    """Hook the TokenizerManager of this process through SGLang's plugin hook registry."""
    from sglang.srt import plugins
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hook = TokenizerHook(lambda: tokenizer_block_size(hashed_block_size))
    HookRegistry.register(TARGET, hook, HookType.AROUND)
    if getattr(plugins, "_plugins_loaded", False):  # SGLang applies hooks when it loads plugins
        HookRegistry.apply_hooks()
    return hook
