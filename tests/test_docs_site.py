"""The documentation site builds offline with --strict: no broken link, page or reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _mkdocs() -> str:
    exe = Path(sys.executable).with_name("mkdocs")
    if not exe.exists():
        pytest.fail("mkdocs is not installed in this venv: pip install -e '.[docs]' (make setup does)")
    return str(exe)


def test_site_builds_strict_with_generated_references(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    from dpcore.cli import COMMANDS

    for name, _module, _help in COMMANDS:  # the CLI reference is generated from the parsers
        assert f"dpcore {name}" in cli and "--help" in cli
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    for hook in ("select_rank", "on_dispatch", "on_load_report", "HOOK_API_VERSION", "LoadLedger"):
        assert hook in api


def test_a_broken_link_fails_the_strict_build(tmp_path):
    site = tmp_path / "repo"
    shutil.copytree(REPO / "docs", site / "docs")
    shutil.copytree(REPO / "docs_hooks", site / "docs_hooks")
    shutil.copy(REPO / "mkdocs.yml", site / "mkdocs.yml")
    shutil.copy(REPO / "CHANGELOG.md", site / "CHANGELOG.md")
    (site / "docs" / "index.md").write_text("# x\n\n[gone](guides/no-such-page.md)\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([_mkdocs(), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=site,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode != 0 and "no-such-page.md" in proc.stderr


def test_every_page_is_in_the_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(REPO / "docs").as_posix() for p in (REPO / "docs").rglob("*.md"))
    missing = [p for p in pages if f": {p}" not in nav]
    assert not missing, f"add these pages to nav: in mkdocs.yml: {missing}"
