"""The policy plugin in the README and in the writing-a-policy guide works when pasted."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import tomllib
from collections import Counter
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "docs/guides/writing-a-policy.md"]


def _block_after(text: str, marker: str, lang: str) -> str:
    m = re.search(re.escape(marker) + r"\s*```" + lang + r"\n(.*?)```", text, re.S)
    assert m, f"no {lang} block after {marker}"
    return m.group(1)


def _load(page: str, tmp_path: Path, monkeypatch) -> tuple[type, object]:
    text = (REPO / page).read_text()
    meta = tomllib.loads(_block_after(text, "`dp_least_loaded/pyproject.toml`:", "toml"))
    target = meta["project"]["entry-points"]["dpcore.policies"]["least_loaded"]
    module_name, cls_name = target.split(":")
    pkg = tmp_path / module_name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(_block_after(text, "`dp_least_loaded/dp_least_loaded/__init__.py`:", "python"))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module_name, None)
    cls = getattr(importlib.import_module(module_name), cls_name)
    tests = None
    m = re.search(r"```python\n(from dpcore.testing import PolicyHarness.*?)```", text, re.S)
    if m:
        test_file = tmp_path / "page_policy_test.py"
        test_file.write_text(m.group(1))
        spec = importlib.util.spec_from_file_location("page_policy_test", test_file)
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
    return cls, tests


@pytest.mark.parametrize("page", PAGES)
def test_the_example_policy_runs_and_its_tests_pass(page, tmp_path, monkeypatch):
    if not (REPO / page).read_text().count("dp_least_loaded/pyproject.toml"):
        pytest.fail(f"{page} has no least_loaded example")
    cls, tests = _load(page, tmp_path, monkeypatch)
    if tests is not None:
        names = [n for n in dir(tests) if n.startswith("test_")]
        assert names
        for name in names:  # the page's own tests
            getattr(tests, name)()
    from dpcore.testing import PolicyHarness

    # No load report yet: ten requests must not herd onto one rank.
    h = PolicyHarness(cls, dp_size=4)
    counts = Counter(h.select(num_tokens=500) for _ in range(10))
    assert max(counts.values()) <= 3, counts
    # Over its limit it passes, and the next policy in the chain answers.
    rr = importlib.import_module("dp_round_robin").RoundRobinPolicy
    h = PolicyHarness([("least_loaded", cls), ("round_robin", rr)], dp_size=2,
                      options={"least_loaded": {"max_requests": 3}})
    h.report(0, num_running=9)
    h.report(1, num_running=9)
    h.select()
    assert h.manager.last_decision.policy == "round_robin"
