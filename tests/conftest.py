from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def dpcore_exe() -> list[str]:
    """The ``dpcore`` command of the interpreter running the tests."""
    return [sys.executable, "-m", "dpcore"]


@pytest.fixture
def clean_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DPCORE_TRACE_HOOKS", None)
    return env
