"""Policies named by where their code is, for trying an idea without packaging it.

Wherever a policy name is accepted (``--load-balance-method``, ``simulate --policy``), two
more forms load a class directly instead of through an entry point:

- ``path/to/file.py`` or ``path/to/file.py:ClassName``: a Python file (the class may be left out
  when the file defines exactly one class with a ``select_rank`` method);
- ``package.module:ClassName``: an importable module (the class name starts with a capital,
  which tells it apart from ``peer:NAME`` and ``ref:NAME`` in the simulator).

Such a name keeps its letter case and is its own policy name, e.g. for options:
``--policy-option my_policy.py:MyPolicy.max_tokens=64``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
from pathlib import Path
from types import ModuleType

from dpcore.errors import PolicyDefinitionError

_MODULE_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Z]\w*$")


def is_spec(name: str) -> bool:
    """Whether *name* points at code (a ``.py`` file or ``module:Class``), not an entry point."""
    return name.partition(":")[0].endswith(".py") or bool(_MODULE_SPEC.match(name))


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of *exc*'s traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        msg = f"policy file {str(path)!r} does not exist"
        raise PolicyDefinitionError(msg)
    resolved = path.resolve()
    mod_name = f"dpcore_local_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        msg = f"policy file {str(path)!r} cannot be imported as Python"
        raise PolicyDefinitionError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        msg = f"policy file {str(path)!r} failed to import: {exc!r}{_where(exc)}"
        raise PolicyDefinitionError(msg) from exc
    return module


def _policy_classes(module: ModuleType) -> list[type]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and hasattr(obj, "select_rank")
    ]


def load_spec(name: str) -> type:
    """The policy class *name* points at; one-line :class:`PolicyDefinitionError` otherwise."""
    head, _, cls_name = name.partition(":")
    if head.endswith(".py"):
        module = _import_file(Path(head))
        where = head
    else:
        mod_name = head
        try:
            module = importlib.import_module(mod_name)
        except Exception as exc:
            msg = f"policy module {mod_name!r} failed to import: {exc!r}{_where(exc)}"
            raise PolicyDefinitionError(msg) from exc
        where = mod_name
    if not cls_name:
        found = _policy_classes(module)
        if len(found) != 1:
            names = ", ".join(c.__name__ for c in found) or "none"
            msg = f"{where} defines {len(found)} policy classes ({names}); name one: {where}:ClassName"
            raise PolicyDefinitionError(msg)
        return found[0]
    obj = getattr(module, cls_name, None)
    if obj is None:
        classes = ", ".join(c.__name__ for c in _policy_classes(module)) or "none"
        msg = f"{where} has no {cls_name!r} (policy classes there: {classes})"
        raise PolicyDefinitionError(msg)
    if not callable(obj):
        msg = f"{where}:{cls_name} is not a class or factory"
        raise PolicyDefinitionError(msg)
    return obj  # type: ignore[no-any-return]
