"""The ``inside/`` tests run in the pinned SGLang venv (driven by ``test_inside_sglang.py``).

In any environment without SGLang they are not collected; there, the outer test builds the
venv and runs them in a subprocess.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def pytest_ignore_collect(collection_path: Path, config: object) -> bool | None:
    if collection_path.name == "inside" and importlib.util.find_spec("sglang") is None:
        return True
    return None
