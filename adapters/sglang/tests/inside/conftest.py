"""Fixtures for tests that run inside the pinned SGLang venv (see ``dpcore_sglang.testing``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dpcore_sglang.testing import ControllerHarness


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
