"""`make dist` wheels install offline into a fresh venv and run what the docs say.

The wheels are built from this checkout; their third-party dependencies come from a
wheelhouse downloaded once into ``$DPCORE_CACHE`` (default ``~/.cache/dpcore``). The installs
themselves run with no index and no pip configuration, as on an air-gapped host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from dpcore.venvcache import cache_dir, locked

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent

#: Modules that must stay out of the runtime wheel (their own distributions ship them).
NOT_IN_CORE = ("dpcore/bench_baseline.py", "dpcore/soak/", "dpcore/http/routers.py", "dpcore/data/")


def _run(cmd: list[str], env: dict[str, str], timeout: float = 300, cwd: Path | None = None):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd, check=False)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _ok(_run(["make", "-C", str(REPO), "dist", f"DIST={out}"], dict(os.environ), timeout=900))
    return out


def _requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("Requires-Dist:")]


@pytest.fixture(scope="module")
def wheelhouse(dist: Path) -> Path:
    """Third-party wheels the runtime needs (core + policies + http), fetched once."""
    core = next(dist.glob("dpcore-*.whl"))
    reqs = sorted(
        r.split(";")[0].strip()
        for r in _requires(core)
        if "extra ==" not in r or "http" in r.split(";")[-1]
    )
    reqs = [r for r in reqs if not r.startswith("dp")]
    key = hashlib.sha256("\n".join([*reqs, sys.version]).encode()).hexdigest()[:12]
    house = cache_dir() / f"wheelhouse-{key}"
    with locked(house):
        if not (house / ".complete").exists():
            proc = _run([sys.executable, "-m", "pip", "download", "-q", "-d", str(house), *reqs],
                        dict(os.environ), timeout=900)
            _ok(proc)
            (house / ".complete").write_text("\n".join(reqs))
    return house


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def test_core_wheel_has_no_bench_or_test_machinery(dist: Path):
    with zipfile.ZipFile(next(dist.glob("dpcore-*.whl"))) as z:
        names = z.namelist()
    assert not [n for n in names if n.startswith(NOT_IN_CORE)]
    assert any(n.endswith("licenses/LICENSE") for n in names)
    meta = [r for r in _requires(next(dist.glob("dpcore-*.whl")))]
    assert any("dp-cache-aware" in r and "policies" in r.replace("'", '"') for r in meta)
    sglang = _requires(next(dist.glob("dpcore_sglang-*.whl")))
    assert any(r.replace(" ", "").startswith("dpcore[policies]") for r in sglang), sglang
    built = {p.name.split("-")[0] for p in dist.glob("*.whl")}
    assert built == {"dpcore", "dp_round_robin", "dp_bootstrap_room", "dp_load", "dp_cache_aware",
                     "dpcore_sglang", "dp_power_of_two", "dpcore_data", "dpcore_bench", "dpcore_speedups"}


def _serve_examples(doc_commands: list[tuple[str, str]]) -> list[list[str]]:
    """Every `dpcore serve` command in README and docs, as its --dry-run form."""
    out = []
    for _page, cmd in doc_commands:
        if not cmd.startswith("dpcore serve"):
            continue
        argv = shlex.split(cmd.rstrip("&").strip())[2:]
        out.append([a for a in argv if a != "--dry-run"] + ["--dry-run"])
    return out


def test_wheels_install_offline_and_run_the_documented_examples(dist, wheelhouse, tmp_path, doc_commands):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    env = _offline_env()
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--find-links", str(dist),
           "--find-links", str(wheelhouse)]
    dpcore = str(env_dir / "bin" / "dpcore")

    # Core only: every missing piece is one line naming the extra that adds it.
    _ok(_run([*pip, "dpcore"], env))
    assert "0.1.0" in _ok(_run([dpcore, "--version"], env))
    assert "COMMAND" in _ok(_run([dpcore], env))
    dry = _run([dpcore, "serve", "--dry-run"], env)
    assert dry.returncode == 2 and "pip install 'dpcore[policies]'" in dry.stderr, dry.stderr
    assert "did you mean" not in dry.stderr and "Traceback" not in dry.stderr
    for cmd, extra in ((["simulate", "--trace", "x.jsonl"], "sim"), (["soak"], "bench"),
                       (["bench"], "bench"), (["demo"], "policies"),
                       (["http-front", "--ingress", "ipc:///x/i", "--status", "ipc:///x/s", "--http-port", "0"], "http"),
                       (["bootstrap-registry", "--port", "0"], "http")):
        proc = _run([dpcore, *cmd], env)
        assert proc.returncode == 2, (cmd, proc.stderr)
        assert f"pip install 'dpcore[{extra}]'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

    # The documented server install: every first-party policy, auto works.
    _ok(_run([*pip, "dpcore[policies,http]"], env))
    names = {r["name"] for r in json.loads(_ok(_run([dpcore, "policies", "--json"], env)))}
    demo = _run([dpcore, "demo"], env)  # its trace sample is the demo extra's
    assert demo.returncode == 2 and "pip install 'dpcore[demo]'" in demo.stderr, demo.stderr
    assert {"round_robin", "follow_bootstrap_room", "total_requests", "total_tokens", "cache_aware"} <= names
    # The README's own plugin, written out as a user pastes it, built and installed.
    readme = (REPO / "README.md").read_text()
    example = tmp_path / "dp_least_loaded"
    (example / "dp_least_loaded").mkdir(parents=True)
    for rel, lang in (("pyproject.toml", "toml"), ("dp_least_loaded/__init__.py", "python")):
        m = re.search(re.escape(f"`dp_least_loaded/{rel}`:") + rf"\s*```{lang}\n(.*?)```", readme, re.S)
        assert m, f"README has no {rel}"
        (example / rel).write_text(m.group(1))
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
              str(tmp_path / "pw"), str(example)], dict(os.environ)))
    _ok(_run([*pip, "--find-links", str(tmp_path / "pw"), "dp-least-loaded"], env))
    # The docs' serve examples run where the docs' `dpcore new-policy` commands wrote their files.
    work = tmp_path / "work"
    work.mkdir()
    for _page, cmd in doc_commands:
        if cmd.startswith("dpcore new-policy"):
            _ok(_run([dpcore, *shlex.split(cmd)[1:]], env, cwd=work))
    examples = _serve_examples(doc_commands)
    assert len(examples) >= 5
    for argv in examples:
        proc = _run([dpcore, "serve", *argv], env, timeout=60, cwd=work)
        assert proc.returncode == 0, (argv, proc.stderr)

    # A plugin from the template builds and installs next to them, offline.
    _ok(_run([sys.executable, "-m", "dpcore", "new-policy", "fewest_tokens", "--dir", str(tmp_path)],
             dict(os.environ)))
    plugin_dir = tmp_path / "dp-fewest-tokens"
    _ok(_run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
              str(tmp_path / "pw"), str(plugin_dir)], dict(os.environ)))
    _ok(_run([*pip, "--find-links", str(tmp_path / "pw"), "dp-fewest-tokens"], env))
    rows = {r["name"]: r for r in json.loads(_ok(_run([dpcore, "policies", "--json"], env)))}
    assert rows["fewest_tokens"]["dist"] == "dp-fewest-tokens"
    chain = _ok(_run([dpcore, "serve", "--dry-run", "--json", "--load-balance-method", "fewest_tokens,round_robin"],
                     env))
    assert json.loads(chain)["chain"] == ["fewest_tokens", "round_robin"]
    assert re.search(r"fewest_tokens", _ok(_run([dpcore, "policies", "fewest_tokens"], env)))
