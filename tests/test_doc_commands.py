"""Every command in README.md and docs/ runs as written (or in its --dry-run/--limit form).

Commands run in page order from a scratch directory that links the repo's ``traces/``,
``scripts/``, ``tests/``, ``docs/`` and ``.venv/``, so a command that writes ``out/...`` cannot touch the
checkout. Long-running or external parts (a rank process, a router, an SGLang server) are
listed in SKIP with the test that covers them; anything else unknown fails this test, so a new
command in the docs gets a rule here.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

#: Command prefix -> why it is not run here, and where it is checked.
SKIP = {
    "make test": "the suite itself",
    "make dist": "tests/test_distributions.py runs it",
    "make docs": "tests/test_docs_site.py builds the site",
    "pip install": "tests/test_distributions.py installs the same wheels offline",
    "pytest": "the suite itself",
    "dpcore mock-worker": "a long-running rank; the router setups run in tests/test_interop_*.py",
    "dpcore mock-barrier": "a long-running process; tests/test_mock_barrier.py runs one with two ranks",
    "for ": "a loop starting ranks for a router setup (tests/test_interop_*.py)",
    "done": "end of that loop",
    "vllm-router": "tests/test_interop_vllm_router.py",
    "HF_HUB_OFFLINE=1 sglang-router": "tests/test_interop_sglang_router.py",
    "curl": "a request to a running router (tests/test_interop_*.py)",
    ".venv/bin/python scripts/compare_policies.py": "minutes per cell even when limited; tests/test_scripts.py runs it",
    ".venv/bin/python scripts/compare_load_balancing.py": "minutes per run even when limited; tests/test_scripts.py runs it",
    ".venv/bin/python scripts/compare_kv_events.py": "minutes per cell even when limited; tests/test_scripts.py runs it",
    "dpcore policy": "needs a running dpcore serve; tests/test_swap.py runs show and swap against one",
    "dpcore shadow-report": "needs a running dpcore serve --shadow-policy; tests/test_shadow.py runs it",
    ".venv/bin/python scripts/load_levels.py": "a search over many full-trace runs; tests/test_scripts.py runs it",
    "python -m dpcore_sglang.launch_server": "needs SGLang: adapters/sglang/tests run it in the pinned venv",
    "dpcore bench --sglang": "builds the pinned SGLang venv (minutes); adapters/sglang/tests run its controller harness",
    ".venv/bin/python scripts/sglang_kv_replay.py": "builds the pinned SGLang venv (minutes); adapters/sglang/tests/inside/test_kv_events.py repairs gaps the same way",
}
#: Example input files the docs name as "your own"; a small real trace stands in.
PLACEHOLDERS = {"my_trace.jsonl", "synthetic_trace.jsonl"}
SAMPLE = REPO / "tests" / "data" / "mooncake_conversation_head300.jsonl"
#: Bounds that keep each command short (flag -> value), by command: what is checked here is
#: that each command runs as written, not the figures it prints (the results pages' own
#: tests and runs are about those).
BOUNDS = {
    "dpcore demo": {"--requests": "15", "--speedup": "40"},
    "dpcore simulate": {"--limit": "100"},
    "dpcore bench": {"--count": "200", "--repeat": "1", "--decisions": "200", "--idle-seconds": "0.5"},
    "dpcore soak": {"--duration": "5"},
    "scripts/make_agent_trace.py": {"--requests": "300"},
    "scripts/cacheindex_memory.py": {"--blocks": "20000"},
    "scripts/policy_decisions.py": {"--limit": "40", "--dp-size": "4"},
}
EXTRA_FLAGS = {"dpcore demo": ["--no-live"]}


def _pages() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _bounded(argv: list[str], bounds: dict[str, str]) -> list[str]:
    out = list(argv)
    for flag, value in bounds.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def plan(cmd: str) -> list[str] | str:
    """The argv to run for a documented command, or the reason it is skipped."""
    for prefix, why in SKIP.items():
        if cmd.startswith(prefix):
            return why
    if "least_loaded" in cmd:
        return "the guide's own plugin: tests/test_readme.py installs and runs it"
    argv = shlex.split(cmd.rstrip("&").strip())
    if argv[0] == ".venv/bin/dpcore":
        argv[0] = "dpcore"
    if argv[:2] == ["make", "demo"]:
        argv = ["dpcore", "demo"]
    if argv[0] == "dpcore" and argv[1] == "serve" and "--dry-run" not in argv:
        argv.append("--dry-run")
    key = " ".join(argv[:2]) if argv[0] == "dpcore" else next((a for a in argv if a.startswith("scripts/")), "")
    if argv[:2] == [".venv/bin/python", "-c"]:
        return argv
    if argv[0] not in ("dpcore", ".venv/bin/python") or (argv[0] == ".venv/bin/python" and not key):
        return ""  # unknown: the test fails and asks for a rule
    argv = _bounded(argv, BOUNDS.get(key, {})) + EXTRA_FLAGS.get(key, [])
    return argv


def _scratch(tmp_path: Path, page_text: str) -> Path:
    for name in ("traces", "scripts", "tests", "docs", ".venv"):
        (tmp_path / name).symlink_to(REPO / name)
    for name in PLACEHOLDERS:
        shutil.copy(SAMPLE, tmp_path / name)
    # A page's example file: a ```toml block whose first line is "# NAME.toml ...".
    for m in re.finditer(r"```toml\n# (\S+\.toml)[^\n]*\n(.*?)```", page_text, re.S):
        (tmp_path / m.group(1)).write_text(m.group(2))
    return tmp_path


@pytest.mark.parametrize("page", [str(p.relative_to(REPO)) for p in _pages()])
def test_every_documented_command_runs(page, tmp_path, fenced_commands):
    text = (REPO / page).read_text()
    cwd = _scratch(tmp_path, text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "MPLBACKEND": "Agg", "DPCORE_CACHE": str(tmp_path / "cache")}
    for cmd in fenced_commands(text):
        argv = plan(cmd)
        if isinstance(argv, str):
            assert argv, f"{page}: no rule for documented command {cmd!r}; add one to tests/test_doc_commands.py"
            continue
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, f"{page}: {' '.join(argv)}\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}"
