"""The pinned SGLang venv the tests and the benchmark run in, built once and cached.

SGLang's own metadata pulls CUDA wheels worth gigabytes; the controller imports none of
them. So the tests do not ``pip install sglang`` into the developer's environment: they build
a separate venv from the hand-pinned set in ``pinned/`` (``pip install --no-deps``), keyed
by a hash of that set, under ``${DPCORE_CACHE:-~/.cache/dpcore}``. The repository's own
packages (dpcore, the policies, this adapter) go into a per-run *overlay* directory instead,
installed by pip with their entry points, so a cached venv never holds stale project code.

This module imports nothing from SGLang; it runs in the outer environment.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from dpcore.venvcache import build_once, cache_dir
from dpcore_sglang.versions import DEFAULT_SGLANG

PINNED_DIR = Path(__file__).with_name("pinned")


class VenvBuildError(RuntimeError):
    """Building the pinned venv or installing the overlay failed; the message has pip's output."""


def pinned_file(sglang_version: str = DEFAULT_SGLANG) -> Path:
    path = PINNED_DIR / f"sglang-{sglang_version}.txt"
    if not path.is_file():
        known = sorted(p.stem.removeprefix("sglang-") for p in PINNED_DIR.glob("sglang-*.txt"))
        msg = f"no pinned dependency set for sglang {sglang_version}; pinned sets exist for {known}"
        raise VenvBuildError(msg)
    return path


def venv_key(pinned_text: str) -> str:
    """Hash of the pinned set and the interpreter it is built for."""
    h = hashlib.sha256(pinned_text.encode())
    h.update(f"{sys.version_info[:2]}-{platform.machine()}".encode())
    return h.hexdigest()[:12]


def venv_path(sglang_version: str = DEFAULT_SGLANG) -> Path:
    return cache_dir() / f"venv-sglang-{venv_key(pinned_file(sglang_version).read_text())}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _run(cmd: list[str], what: str, env: Mapping[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-30:]
        msg = f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail)
        raise VenvBuildError(msg)


def ensure_venv(
    sglang_version: str = DEFAULT_SGLANG, log: Callable[[str], None] = lambda _m: None
) -> Path:
    """Return the cached venv for *sglang_version*, building it first if needed."""
    pins = pinned_file(sglang_version)

    def build(venv: Path) -> str:
        log(f"building the pinned SGLang venv at {venv} (once; 1 to 3 minutes)")
        t0 = time.monotonic()
        _run([sys.executable, "-m", "venv", str(venv)], "creating the venv")
        py = str(venv_python(venv))
        _run(
            [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-r", str(pins)],
            f"installing {pins.name}",
        )
        took = time.monotonic() - t0
        log(f"built {venv} in {took:.0f} s")
        return f"{pins.name} built in {took:.0f} s\n"

    return build_once(venv_path(sglang_version), build)


def install_overlay(venv: Path, target: Path, projects: Iterable[Path]) -> None:
    """pip-install local *projects* (no dependencies, offline) into *target*.

    The cached venv already holds every dependency; ``--no-build-isolation`` builds with its
    hatchling, so nothing is downloaded.
    """
    cmd = [
        str(venv_python(venv)),
        "-m",
        "pip",
        "install",
        "-q",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(target),
        *[str(p) for p in projects],
    ]
    _run(cmd, "installing the repository's packages into the overlay")


def overlay_env(overlay: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a process of the venv's python that sees the overlay's packages."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = str(overlay)
    env.pop("PYTHONHOME", None)
    env.pop("VIRTUAL_ENV", None)
    return env


def repo_projects(repo: Path, *, extra: Iterable[Path] = ()) -> list[Path]:
    """dpcore, its first-party policies and this adapter, as found in a checkout."""
    projects = [repo, *sorted((repo / "plugins").glob("dp_*")), repo / "adapters" / "sglang", *extra]
    return [p for p in projects if (p / "pyproject.toml").is_file()]


def find_repo(start: Path | None = None) -> Path | None:
    """The dpcore checkout containing *start* (default: this file), if any."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        if (parent / "adapters" / "sglang" / "pyproject.toml").is_file() and (parent / "dpcore").is_dir():
            return parent
    return None
