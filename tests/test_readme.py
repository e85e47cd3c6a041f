"""The "Writing a policy" guide's plugin works when pasted."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _block_after(readme: str, marker: str, lang: str) -> str:
    m = re.search(re.escape(marker) + r"\s*```" + lang + r"\n(.*?)```", readme, re.S)
    assert m, f"README has no {lang} block after {marker}"
    return m.group(1)


def test_writing_a_policy_example_runs(tmp_path, monkeypatch):
    readme = (REPO / "docs" / "guides" / "writing-a-policy.md").read_text()
    meta = tomllib.loads(_block_after(readme, "`dp_least_waiting/pyproject.toml`:", "toml"))
    target = meta["project"]["entry-points"]["dpcore.policies"]["least_waiting"]
    module_name, cls_name = target.split(":")
    pkg = tmp_path / module_name
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        _block_after(readme, "`dp_least_waiting/dp_least_waiting/__init__.py`:", "python")
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module_name, None)
    test_file = tmp_path / "readme_policy_test.py"
    test_file.write_text(_block_after(readme, "Test it without sockets with `dpcore.testing`:", "python"))
    spec = importlib.util.spec_from_file_location("readme_policy_test", test_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.test_picks_the_shortest_queue()  # the README's own test
    # And it falls through to the next policy when over its limit.
    from dpcore.testing import PolicyHarness

    cls = getattr(importlib.import_module(module_name), cls_name)
    h = PolicyHarness([("least_waiting", cls), ("round_robin", __import__("dp_round_robin").RoundRobinPolicy)],
                      dp_size=2, options={"least_waiting": {"max_waiting": 3}})
    h.report(0, num_waiting=9)
    h.report(1, num_waiting=9)
    assert h.select() == 0 and h.manager.last_decision.policy == "round_robin"
