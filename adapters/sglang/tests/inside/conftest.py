"""Fixtures for tests that run inside the pinned SGLang venv (see ``dpcore_sglang.testing``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dpcore_sglang import tokenizer_hashes
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.testing import ControllerHarness, tokenizer_manager_class


@pytest.fixture
def controller() -> Iterator[Callable[..., ControllerHarness]]:
    """Start SGLang's controller (with draining schedulers); stopped after the test.

    Every controller is checked to be still alive with no SIGQUIT sent, unless the test
    started it with ``expect_crash=True``.
    """
    started: list[tuple[ControllerHarness, bool]] = []

    def start(expect_crash: bool = False, **kwargs: Any) -> ControllerHarness:
        h = ControllerHarness(**kwargs)
        started.append((h, expect_crash))
        h.start()
        return h

    yield start
    try:
        for h, expect_crash in started:
            if not expect_crash:
                assert h.quit_signals == 0, "SGLang's controller hit an exception and signalled its parent"
                assert h.proc is None or h.alive(), "SGLang's controller process died"
    finally:
        for h, _ in started:
            h.stop()


@pytest.fixture(scope="module")
def hooked_tokenizer_manager() -> Iterator[Any]:
    """SGLang's real TokenizerManager class, its ``_dispatch_to_scheduler`` hooked as the launcher
    does for a chain that reads block hashes (the original is its ``__wrapped__``)."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    TokenizerManager = tokenizer_manager_class()  # noqa: N806 - the class
    original = TokenizerManager._dispatch_to_scheduler
    config = AdapterConfig(method="cache_aware")
    tokenizer_hashes.register(lambda page: config.hashed_block_size(True, page))
    HookRegistry.apply_hooks()  # what SGLang's load_plugins does next in the server's process
    try:
        yield TokenizerManager
    finally:
        TokenizerManager._dispatch_to_scheduler = original
        HookRegistry.reset()
