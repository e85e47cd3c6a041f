"""SGLang's plugin hook: switch the adapter on inside the controller process.

SGLang calls every entry point in the ``sglang.srt.plugins`` group early in each of its
processes (``sglang.srt.plugins.load_plugins``); in the data-parallel controller's process
that happens inside ``run_data_parallel_controller_process``, before it builds the
controller. :func:`load` then wraps ``DataParallelController.__init__`` so that, once
SGLang's own constructor has bound the sockets and started the schedulers,
:func:`dpcore_sglang.adapter.install` takes over the dispatch. No SGLang file is changed.

It does nothing unless ``DPCORE_SGLANG_CONFIG`` is set (``python -m
dpcore_sglang.launch_server`` sets it), so installing dpcore-sglang leaves plain ``sglang``
servers as they were. When it is set but cannot be honoured, the process exits with the
reason: SGLang only logs a plugin's exceptions, and serving with SGLang's own dispatch while
the operator asked for a dpcore policy would be worse than not serving.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
from typing import Any

from dpcore.errors import ConfigError
from dpcore_sglang.config import ENV_VAR, AdapterConfig
from dpcore_sglang.versions import check_sglang_version

log = logging.getLogger("dpcore_sglang")

CONTROLLER_MODULE = "sglang.srt.managers.data_parallel_controller"


def _wrap_init(original: Any, config: AdapterConfig) -> Any:
    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        # Only node 0's controller dispatches (others launch schedulers and wait).
        if getattr(self, "recv_from_tokenizer", None) is not None:
            from dpcore_sglang.adapter import install

            install(self, config)
            freeze_startup_heap()

    __init__.__dpcore__ = True  # type: ignore[attr-defined]
    return __init__


def freeze_startup_heap() -> None:
    """Leave what the controller process holds now out of every later garbage collection.

    The controller keeps its start-up objects (SGLang's modules, torch, the server
    arguments: about 620,000 once the pinned CPU venv's controller module is imported) for
    its whole life. SGLang's own dispatch keeps nothing per request, so its collector never
    runs; the adapter keeps per-request state (the ledger's, the policies'), so now and then
    a full collection walks the whole heap while every request waits: 0.3 s on a 2-core test
    machine, against 0.02 s once the start-up heap is frozen. Garbage is collected first,
    so freezing keeps nothing that is garbage now.
    SGLang freezes its scheduler, tokenizer and detokenizer processes the same way when asked
    (``freeze_gc`` in ``sglang/srt/utils/common.py``, the ``/freeze_gc`` endpoint), not this one.
    """
    gc.collect()
    gc.freeze()


def load() -> None:
    """Entry point ``dpcore`` in group ``sglang.srt.plugins``."""
    raw = os.environ.get(ENV_VAR)
    if not raw:
        return
    module = sys.modules.get(CONTROLLER_MODULE)
    if module is None:  # not the controller's process
        return
    try:
        check_sglang_version()
        config = AdapterConfig.from_json(raw)
        cls = module.DataParallelController
    except (ConfigError, AttributeError) as exc:
        raise SystemExit(f"dpcore-sglang cannot take over SGLang's controller: {exc}") from exc
    original = cls.__init__
    if getattr(original, "__dpcore__", False):
        return
    cls.__init__ = _wrap_init(original, config)
    log.info("dpcore-sglang: DataParallelController will dispatch with %r", config.method)
