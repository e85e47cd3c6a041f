"""The ``inside/`` tests run in the pinned SGLang venv (driven by ``test_inside_sglang.py``).

In any environment without SGLang they are not collected; there, the outer test builds the
venv and runs them in a subprocess.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq


def pytest_ignore_collect(collection_path: Path, config: object) -> bool | None:
    if collection_path.name == "inside" and importlib.util.find_spec("sglang") is None:
        return True
    return None


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A connected PUSH and PULL socket, as SGLang's tokenizer and controller hold them."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/in")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{tmp_path}/in")
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()
