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


def _fenced_commands(text: str) -> list[str]:
    """Shell commands in ```` ``` ```` / ```` ```bash ```` blocks: continuations joined, comments cut."""
    out: list[str] = []
    lang: str | None = None
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            lang = None if lang is not None else stripped[3:].strip()
            pending = ""
            continue
        if lang not in ("", "bash", "sh", "console", "shell"):
            continue
        body = pending + " " + stripped if pending else stripped
        if body.endswith("\\"):
            pending = body[:-1].rstrip()
            continue
        pending = ""
        cmd = body.split(" #")[0].strip() if not body.startswith("#") else ""
        if cmd:
            out.append(cmd)
    return out


def documented_commands() -> list[tuple[str, str]]:
    """(page, command) for every shell command in README.md and docs/**/*.md."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    return [(str(p.relative_to(REPO)), c) for p in pages for c in _fenced_commands(p.read_text())]


@pytest.fixture
def doc_commands() -> list[tuple[str, str]]:
    return documented_commands()


@pytest.fixture
def fenced_commands():
    """The command extractor, for tests that read a page themselves."""
    return _fenced_commands
