"""Optional features and the ``dpcore[...]`` extra that installs each.

The runtime wheel is small on purpose: the simulator's numerics, the HTTP front, the demo's
trace sample and the benchmark machinery come from extras. A command that needs one that is
missing ends with one line naming the ``pip install`` that fixes it, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

from dpcore.errors import ConfigError

#: Module (or its top-level package) -> the extra that provides it.
EXTRA_FOR_MODULE: dict[str, str] = {
    "numpy": "sim",
    "matplotlib": "sim",
    "starlette": "http",
    "uvicorn": "http",
    "httpx": "http",
    "dpcore.soak": "bench",
    "dpcore.bench_baseline": "bench",
    "dpcore.http.routers": "bench",
}

#: The trace sample that ``dpcore demo`` and ``dpcore simulate`` replay by default
#: (distribution ``dpcore-data``, extra ``demo``).
SAMPLE_TRACE = "mooncake_conversation_2000.jsonl"


class MissingExtraError(ConfigError):
    """An optional feature is not installed; the message says which extra installs it."""


def extra_for(module: str | None) -> str | None:
    """The extra that provides ``module`` (``"numpy.linalg"`` -> ``"sim"``), or None."""
    if not module:
        return None
    if module in EXTRA_FOR_MODULE:
        return EXTRA_FOR_MODULE[module]
    return EXTRA_FOR_MODULE.get(module.partition(".")[0])


def install_hint(extra: str) -> str:
    return f"pip install 'dpcore[{extra}]'"


def missing_extra(exc: ModuleNotFoundError, feature: str) -> MissingExtraError | None:
    """The one-line error for ``exc`` when an extra provides the missing module, else None."""
    extra = extra_for(exc.name)
    if extra is None:
        return None
    return MissingExtraError(f"{feature} needs {exc.name}, which is not installed: {install_hint(extra)}")


def sample_trace() -> Path:
    """Path of the bundled trace sample; a clear error when ``dpcore-data`` is not installed."""
    import dpcore

    path = Path(dpcore.__file__).parent / "data" / SAMPLE_TRACE
    if not path.is_file():
        msg = f"the bundled trace sample is not installed: {install_hint('demo')}, or pass --trace PATH"
        raise MissingExtraError(msg)
    return path
