"""Build directories cached across runs (the interop routers' venv, the pinned SGLang venv,
the wheelhouse of the packaging tests), under ``$DPCORE_CACHE`` (default ``~/.cache/dpcore``).

Each is built once: a lock file beside it makes concurrent runs (other test sessions, CI)
wait for one build instead of racing, and a marker written last tells a complete build
from an interrupted one, which is thrown away and built again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

#: Written into a build directory when its build finished.
MARKER = ".dpcore-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("DPCORE_CACHE") or Path.home() / ".cache" / "dpcore")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold *path*'s lock (the file ``<path>.lock`` beside it) exclusively."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(path: Path, build: Callable[[Path], str]) -> Path:
    """*path*, built by ``build(path)`` unless a complete build is already there; returns it.

    *build* fills *path* (a venv cannot be moved, so it is built in place) and returns the
    text of the completion marker.
    """
    if (path / MARKER).is_file():
        return path
    with locked(path):
        if (path / MARKER).is_file():  # another process built it while we waited
            return path
        shutil.rmtree(path, ignore_errors=True)
        text = build(path)
        (path / MARKER).write_text(text)
    return path
