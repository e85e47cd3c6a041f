"""The hook contract: specs, flags, docs, and a test per hook."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from dpcore import hookspecs

REPO = Path(__file__).resolve().parent.parent
HOOKS = ["select_rank", "on_dispatch", "on_load_report", "on_rank_state"]


def _spec_names():
    return sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "dpcore_spec"))


def test_exactly_the_contract_hooks():
    assert _spec_names() == sorted(HOOKS)


def test_select_rank_is_firstresult_and_others_broadcast():
    assert hookspecs.select_rank.dpcore_spec["firstresult"] is True
    assert hookspecs.on_dispatch.dpcore_spec["firstresult"] is False
    assert hookspecs.on_load_report.dpcore_spec["firstresult"] is False
    assert hookspecs.on_rank_state.dpcore_spec["firstresult"] is False


def test_every_hook_is_documented_in_the_guide_with_its_signature():
    readme = (REPO / "docs" / "guides" / "writing-a-policy.md").read_text()
    for name in HOOKS:
        sig = inspect.signature(getattr(hookspecs, name))
        params = ", ".join(sig.parameters)
        assert f"### `{name}({params})" in readme, f"hook reference in docs/guides/writing-a-policy.md lacks {name}({params})"


def test_every_hook_has_a_test():
    text = (REPO / "tests" / "test_manager.py").read_text()
    for name in HOOKS:
        assert re.search(rf"def test_hook_{name}\w*\(", text), f"no test_hook_{name}"


def test_every_spec_has_a_docstring():
    for name in HOOKS:
        doc = getattr(hookspecs, name).__doc__
        assert doc and ":param" in doc and "Called" in doc or "called" in doc
