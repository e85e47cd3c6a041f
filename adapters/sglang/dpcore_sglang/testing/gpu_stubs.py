"""Stand-ins for SGLang's two GPU-only imports, so its controller imports on a CPU box.

For tests and the benchmark only; the adapter itself never imports this. SGLang imports
``triton`` at the top of ``sglang.srt.utils.common`` and ``torchvision`` (whose PyPI wheel
is a CUDA build that fails to load next to CPU torch) from its multimodal utilities; the
controller calls neither. The stand-ins are import-time shapes only: decorators that return
the function, classes that accept any arguments, and a GPU driver lookup that fails the way
it does on a machine without a GPU.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any
from unittest.mock import MagicMock

STUBBED = ("triton", "torchvision")


def _top(fullname: str) -> str:
    return fullname.partition(".")[0]


class _Meta(type):
    def __getattr__(cls, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return MagicMock(name=f"{cls.__name__}.{attr}")


class _StubClass(metaclass=_Meta):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return MagicMock(name=attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return MagicMock()


def _decorator(*args: Any, **kwargs: Any) -> Any:
    """``@jit`` and ``@jit(...)``: hand the function back."""
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


class _NoGpuDriver:
    @property
    def active(self) -> Any:
        raise RuntimeError("0 active drivers ([]). There should only be one.")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        name = module.__name__
        module.__path__ = []
        if name == "triton":
            module.__version__ = "3.9.0"
            module.jit = module.autotune = module.heuristics = _decorator
            module.cdiv = lambda a, b: -(-a // b)
            module.next_power_of_2 = lambda n: 1 << (max(n, 1) - 1).bit_length()
        elif name == "triton.runtime":
            module.driver = _NoGpuDriver()
        elif name == "torchvision":
            module.__version__ = "0.28.0"  # transformers compares it
        made: dict[str, Any] = {}

        def getattr_(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            if attr not in made:
                # Capitalised names are classes (isinstance targets, subclassed, configured).
                made[attr] = _Meta(attr, (_StubClass,), {}) if attr[:1].isupper() else MagicMock(name=f"{name}.{attr}")
            return made[attr]

        module.__getattr__ = getattr_


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if _top(fullname) in STUBBED:
            return importlib.machinery.ModuleSpec(fullname, _Loader(), is_package=True)
        return None


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if _top(fullname) in STUBBED:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return None


def install() -> None:
    """Import torch with the GPU modules absent (so it does not try to use them), then stub them."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    block = _Block()
    sys.meta_path.insert(0, block)
    try:
        import torch  # noqa: F401
    finally:
        sys.meta_path.remove(block)
    sys.meta_path.insert(0, _Finder())
