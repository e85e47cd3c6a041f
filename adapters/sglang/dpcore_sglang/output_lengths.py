"""The tokens each request generated, from SGLang's tokenizer process to ``--dpcore-record``.

In SGLang 0.5.23 the data-parallel controller never learns how long an output was: the
scheduler counts generated tokens (``_GenerationStreamAccumulator.accept`` in
``scheduler_components/output_streamer.py``) and sends them through the detokenizer to the
TokenizerManager, in the server's main process; the controller reads only per-rank totals
(``DataParallelController.refresh_load_budget``, ``LoadSnapshot``). The TokenizerManager
(``managers/tokenizer_manager.py``) sees each request end in one of two places:

* ``TokenizerManager._handle_batch_output``: for each rid of a ``BatchStrOutput`` or
  ``BatchTokenIDOutput`` it fills ``meta_info["completion_tokens"]`` from
  ``recv_obj.completion_tokens[i]``; the request has finished when
  ``recv_obj.finished_reasons[i] is not None``, and its ``rid_to_state`` entry is then
  deleted. A ``BatchEmbeddingOutput`` carries no completion tokens: an embedding generates 0.
* ``TokenizerManager._handle_abort_req``: an aborted request (by the client, a scheduler, or
  the adapter's own rejection) gets ``meta_info["completion_tokens"] = len(state.output_ids)``
  and its ``rid_to_state`` entry is deleted.

:func:`register` puts a ``BEFORE`` hook on both through SGLang's plugin hook registry (as
:mod:`dpcore_sglang.tokenizer_hashes` does for block hashes). A request still in
``rid_to_state`` ends there exactly once, so each is reported once. For the requests that
end in one call, the hook sends one frame on the socket the TokenizerManager sends requests
on (``send_to_scheduler``, which the controller reads): :data:`MAGIC`, then msgpack
``[rid, tokens, rid, tokens, ...]``. A frame holds at most one output batch (SGLang's batch
size bounds it); nothing is sent when nothing ended, and nothing is held back for later.
The frame only ever goes to a controller running the adapter: the hook is silent unless
SGLang starts a data-parallel controller and runs one tokenizer worker (the same test as the
block-hash hook, :func:`dpcore_sglang.tokenizer_hashes.dp_controller_reads`).

In the controller, the adapter's receiver hands the frame to :meth:`Ended.take`, which checks
every pair (a text rid, an integer in -1 .. ``dpcore.wire.MAX_OUTPUT_TOKENS``) and passes it
to the recorder (:meth:`dpcore.runtime.recorder.Recorder.ended`); its lines then say
``"output_from": "generated"``. Pairs that are not, and frames that cannot be read, are
counted and logged, and never reach SGLang's own decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgpack

from dpcore.wire import MAX_OUTPUT_TOKENS
from dpcore_sglang.tokenizer_hashes import seldom

log = logging.getLogger("dpcore_sglang")

#: First bytes of a frame of ended requests. 0xC1 is the one byte msgpack never uses and no
#: pickle starts with; the rest differs from the block-hash frame's; the last byte is the
#: layout's version.
MAGIC = b"\xc1dpcore-ended\x01"
_MAGIC_LEN = len(MAGIC)
#: The hooked TokenizerManager methods (SGLang 0.5.23).
BATCH_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._handle_batch_output"
ABORT_TARGET = "sglang.srt.managers.tokenizer_manager.TokenizerManager._handle_abort_req"


def frame(entries: list[Any]) -> bytes:
    """The frame of *entries* ``[rid, tokens, ...]``."""
    return MAGIC + msgpack.packb(entries)


class EndedHook:
    """The ``BEFORE`` hooks on the TokenizerManager: report each request's output tokens as it ends.

    :param active: Whether this process's messages go to the adapter's controller; asked
        once, at the first call (SGLang publishes its settings before it builds the
        TokenizerManager).
    """

    def __init__(self, active: Callable[[], bool]) -> None:
        self._active_of = active
        self._active: bool | None = None
        self.sent = 0

    def _on(self, tm: Any) -> bool:
        if self._active is None:
            self._active = bool(self._active_of())
            log.info(
                "dpcore: output lengths %s",
                "sent to the recorder" if self._active else "not sent (no dpcore controller reads this process)",
            )
        return self._active and tm.tokenizer_ipc_name is None

    def batch_output(self, tm: Any, recv_obj: Any) -> None:
        """Before ``_handle_batch_output``: the requests of *recv_obj* that finish now."""
        if not self._on(tm):
            return
        states = tm.rid_to_state
        reasons = recv_obj.finished_reasons
        counts = getattr(recv_obj, "completion_tokens", None)  # an embedding batch has none
        entries: list[Any] = []
        for i, rid in enumerate(recv_obj.rids):
            if reasons[i] is not None and rid in states:
                entries += (rid, counts[i] if counts is not None else 0)
        if entries:
            self._send(tm, entries)

    def abort(self, tm: Any, recv_obj: Any) -> None:
        """Before ``_handle_abort_req``: the aborted request, with what it had generated."""
        state = tm.rid_to_state.get(recv_obj.rid)
        if state is not None and self._on(tm):
            self._send(tm, [recv_obj.rid, len(state.output_ids)])

    def _send(self, tm: Any, entries: list[Any]) -> None:
        tm.send_to_scheduler.send(frame(entries))
        self.sent += len(entries) // 2


class Ended:
    """The controller's side: checks frames of ended requests and tells *ended* ``(rid, tokens)``.

    :ivar received: Requests reported ended.
    :ivar refused: Pairs or frames refused (not a text rid and a count in range, or unreadable).
    """

    def __init__(self, ended: Callable[[str, int], None]) -> None:
        self.ended = ended
        self.received = 0
        self.refused = 0

    def take(self, data: bytes) -> None:
        """Handle one frame (it starts with :data:`MAGIC`)."""
        try:
            items = msgpack.unpackb(memoryview(data)[_MAGIC_LEN:], use_list=False)
        except Exception as exc:  # whatever the frame holds, SGLang's loop goes on
            self._refuse(1, f"unreadable frame of {len(data)} bytes ({exc!r})")
            return
        if type(items) is not tuple or len(items) % 2:
            self._refuse(1, f"expected [rid, tokens, ...], got {type(items).__name__} {items!r:.80}")
            return
        ended, bad = self.ended, 0
        for rid, n in zip(items[::2], items[1::2]):
            if type(rid) is str and type(n) is int and -1 <= n <= MAX_OUTPUT_TOKENS:
                ended(rid, n)
            else:
                bad += 1
        self.received += len(items) // 2 - bad
        if bad:
            self._refuse(bad, f"{bad} pairs that are not a text rid and a count in -1..{MAX_OUTPUT_TOKENS}")

    def _refuse(self, n: int, detail: str) -> None:
        before = self.refused
        self.refused += n
        if seldom(before, self.refused):
            log.warning("dpcore: output lengths from the tokenizer refused (%d so far): %s", self.refused, detail)

    def stats(self) -> dict[str, int]:
        return {"received": self.received, "refused": self.refused}


def register(active: Callable[[], bool]) -> EndedHook:
    """Hook the TokenizerManager of this process through SGLang's plugin hook registry."""
    from sglang.srt import plugins
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hook = EndedHook(active)
    HookRegistry.register(BATCH_TARGET, hook.batch_output, HookType.BEFORE)
    HookRegistry.register(ABORT_TARGET, hook.abort, HookType.BEFORE)
    if getattr(plugins, "_plugins_loaded", False):  # SGLang applies hooks when it loads plugins
        HookRegistry.apply_hooks()
    return hook
