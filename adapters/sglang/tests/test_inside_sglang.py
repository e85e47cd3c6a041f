"""Runs the ``inside/`` tests in the pinned SGLang venv and reports each one here.

The venv (SGLang 0.5.23 and its CPU dependency set) is built once and cached
(:mod:`dpcore_sglang.venv`); this checkout's packages, the example third-party policy among
them, are pip-installed into a fresh overlay for every run. The inner pytest runs once per
session; every test function in ``inside/`` gets an outer test that fails with its inner
failure text.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpcore_sglang.venv import ensure_venv, install_overlay, overlay_env, repo_projects, venv_python

HERE = Path(__file__).parent
INSIDE = HERE / "inside"
REPO = HERE.parents[2]
THIRD_PARTY = REPO / "examples" / "dp_power_of_two"

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(1800)]


def inner_tests() -> list[str]:
    """``file::function`` of every test function in ``inside/``, read without importing it."""
    out = []
    for path in sorted(INSIDE.glob("test_*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                out.append(f"{path.stem}::{node.name}")
    return out


@pytest.fixture(scope="session")
def inner_results() -> Iterator[dict[str, list[tuple[str, str | None]]]]:
    venv = ensure_venv()
    # Short paths: SGLang's ipc endpoints live under TMPDIR and unix socket paths are short.
    tmp = Path(tempfile.mkdtemp(prefix="dpsg-"))
    try:
        overlay = tmp / "site"
        install_overlay(venv, overlay, repo_projects(REPO, extra=[THIRD_PARTY]))
        junit = tmp / "inner.xml"
        env = overlay_env(overlay)
        env["TMPDIR"] = str(tmp)
        proc = subprocess.run(
            [
                str(venv_python(venv)),
                "-m",
                "pytest",
                str(INSIDE.relative_to(REPO)),
                "-p",
                "no:cacheprovider",
                "-q",
                "-W",
                "ignore::DeprecationWarning",
                f"--junitxml={junit}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if not junit.is_file():
            pytest.fail(f"the inner pytest run produced no report (exit {proc.returncode}):\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}")
        results: dict[str, list[tuple[str, str | None]]] = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            module = case.get("classname", "").rsplit(".", 1)[-1]
            function = case.get("name", "").split("[", 1)[0]
            problem = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            detail = None if problem is None else f"{problem.tag}: {problem.get('message', '')}\n{problem.text or ''}"
            results.setdefault(f"{module}::{function}", []).append((case.get("name", ""), detail))
        yield results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.parametrize("inner", inner_tests())
def test_inside_sglang(inner_results, inner):
    cases = inner_results.get(inner)
    assert cases, f"{inner} did not run in the SGLang venv"
    failed = [f"{name}: {detail}" for name, detail in cases if detail is not None]
    assert not failed, "\n\n".join(failed)


def test_every_inner_test_is_reported(inner_results):
    assert set(inner_results) == set(inner_tests())


def test_venv_is_cached_under_dpcore_cache(inner_results):
    venv = ensure_venv()
    root = Path(os.environ.get("DPCORE_CACHE") or Path.home() / ".cache" / "dpcore")
    assert venv.parent == root
    assert venv.name.startswith("venv-sglang-")
    assert (venv / ".dpcore-complete").is_file()
