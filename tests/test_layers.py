"""Imports point one way: a lower layer never imports a higher one (docs/architecture.md).

The layers, bottom up: **core** (what a policy author imports), **protocol** (the wire and the
SDKs that speak it), **services** (controller runtime, HTTP front, mock engine, simulator),
**tools** (command line, benchmarks, demo, soak). Imports inside ``if TYPE_CHECKING:`` are
annotations only and do not count; imports inside functions do (they run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dpcore

ROOT = Path(dpcore.__file__).parent
PLUGINS = ROOT.parent / "plugins"

#: Module prefix -> layer; the longest matching prefix wins.
LAYERS = {
    "dpcore": 0,
    "dpcore.errors": 0,
    "dpcore.model": 0,
    "dpcore.hashing": 0,
    "dpcore.quantile": 0,
    "dpcore.extras": 0,
    "dpcore.log": 0,
    "dpcore.hookspecs": 0,
    "dpcore.policy": 0,
    "dpcore.ledger": 0,
    "dpcore.ledgerview": 0,
    "dpcore.cacheindex": 0,
    "dpcore.localpolicy": 0,
    "dpcore.auto": 0,
    "dpcore.discovery": 0,
    "dpcore.hookcalls": 0,
    "dpcore.manager": 0,
    "dpcore.testing": 0,
    "dpcore.wire": 1,
    "dpcore.security": 1,
    "dpcore.tracefile": 1,
    "dpcore.sdk": 1,
    "dpcore.runtime": 2,
    "dpcore.http": 2,
    "dpcore.mock": 2,
    "dpcore.sim": 2,
    "dpcore.venvcache": 2,
    "dpcore.cli": 3,
    "dpcore.policycli": 3,
    "dpcore.shadowreport": 3,
    "dpcore.__main__": 3,
    "dpcore.bench": 3,
    "dpcore.bench_baseline": 3,
    "dpcore.demo": 3,
    "dpcore.soak": 3,
    "dpcore.scaffold": 3,
    "dpcore.sim.cli": 3,
    "dpcore.sim.__main__": 3,
    "dpcore.runtime.serve": 3,
}
NAMES = ("core", "protocol", "services", "tools")
#: What ``import dpcore`` may never load: the edge's dependencies (rich may come with structlog).
HEAVY = ("zmq", "msgpack", "httpx", "starlette", "uvicorn", "prometheus_client", "numpy", "matplotlib")


def layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """``(line, imported module)`` for every dpcore import that runs."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dpcore"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "dpcore":
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                # `from dpcore import wire` imports the module dpcore.wire.
                is_module = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT.parent / sub.replace(".", "/") / "__init__.py"
                ).exists()
                out.append((node.lineno, sub if is_module else base))
    return out


def violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        for line, target in imports(path, mod):
            if layer(target) > layer(mod):
                bad.append(
                    f"{path.relative_to(root.parent)}:{line}: {mod} ({NAMES[layer(mod)]}) imports "
                    f"{target} ({NAMES[layer(target)]})"
                )
    return bad


def test_no_lower_layer_imports_a_higher_one() -> None:
    assert violations(ROOT) == []


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The SDK importing the runtime is what the rule exists to stop."""
    pkg = tmp_path / "dpcore"
    (pkg / "sdk").mkdir(parents=True)
    (pkg / "runtime").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "runtime" / "__init__.py").write_text("")
    (pkg / "runtime" / "status.py").write_text("X = 1\n")
    (pkg / "sdk" / "__init__.py").write_text("")
    (pkg / "sdk" / "client.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dpcore.cli import main\n"
        "from dpcore.runtime.status import X\n"
    )
    found = violations(pkg)
    assert len(found) == 1 and "dpcore.sdk.client (protocol) imports dpcore.runtime.status (services)" in found[0]


def test_every_module_has_a_layer() -> None:
    """A new module is placed on purpose (added to LAYERS and docs/architecture.md)."""
    for path in ROOT.rglob("*.py"):
        mod = module_name(path, ROOT)
        assert mod == "dpcore" or any(mod.startswith(p) for p in LAYERS if p != "dpcore"), f"{mod} has no layer"


@pytest.mark.parametrize("plugin", sorted(p.name for p in PLUGINS.iterdir() if (p / "pyproject.toml").exists()))
def test_plugins_import_only_the_core(plugin: str) -> None:
    """A policy distribution depends on the public core API only, never on the edge."""
    pkg = next(p for p in (PLUGINS / plugin).iterdir() if p.is_dir() and (p / "__init__.py").exists())
    for path in pkg.rglob("*.py"):
        for line, target in imports(path, module_name(path, pkg)):
            assert layer(target) == 0, f"{path}:{line} imports {target}"


def test_import_dpcore_loads_no_edge_dependency() -> None:
    code = f"import sys, dpcore; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


#: Strings in dpcore's code equal to a first-party policy's name that do not name that policy.
NOT_THE_POLICY = {
    ("dpcore.http.responses", "total_tokens"): "OpenAI's usage field",
    ("dpcore.http.app", "total_tokens"): "a field of the /v1/loads answer",
    ("dpcore.sim.baselines", "round_robin"): "SGLang's own method, re-implemented as a peer baseline",
    ("dpcore.sim.baselines", "total_requests"): "SGLang's own method, re-implemented as a peer baseline",
    ("dpcore.sim.baselines", "total_tokens"): "SGLang's own method, re-implemented as a peer baseline",
    ("dpcore.runtime.bootstrap", "follow_bootstrap_room"): "the registry's /info field decode reads",
    ("dpcore.http.routers", "round_robin"): "sglang-router's own --policy, for interop tests",
}


def first_party_policies() -> set[str]:
    import tomllib

    names: set[str] = set()
    for project in PLUGINS.glob("*/pyproject.toml"):
        eps = tomllib.loads(project.read_text())["project"].get("entry-points", {})
        names |= set(eps.get("dpcore.policies", {}))
    return names


def policy_names_in_code(root: Path, names: set[str]) -> list[tuple[str, int, str]]:
    """``(module, line, name)`` for each string constant equal to one of *names*, docstrings aside."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        docs = {
            id(body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and (body := node.body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        }  # fmt: skip
        out += [
            (module_name(path, root), node.lineno, node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in names and id(node) not in docs
        ]
    return out


def test_core_names_no_first_party_policy() -> None:
    """Defaults, presets, PD pairing and SGLang's former names come from what the installed
    distributions declare (entry points, capabilities), never from a policy name in dpcore."""
    names = first_party_policies()
    assert {"round_robin", "total_requests", "follow_bootstrap_room"} <= names
    found = [f for f in policy_names_in_code(ROOT, names) if (f[0], f[2]) not in NOT_THE_POLICY]
    assert found == []


def test_the_policy_name_check_catches_a_default(tmp_path: Path) -> None:
    pkg = tmp_path / "dpcore"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""round_robin in a docstring is prose."""\n')
    (pkg / "local.py").write_text('def start(method: str = "round_robin") -> None:\n    """Say round_robin."""\n')
    assert policy_names_in_code(pkg, {"round_robin"}) == [("dpcore.local", 1, "round_robin")]
