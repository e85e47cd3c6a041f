"""Which SGLang releases the adapter supports, checked before SGLang is imported.

The adapter relies on the controller's internals (``dispatching``, ``dp_budget``,
``recv_from_tokenizer``, the load-snapshot reader), which change between releases, so it
accepts only the releases its tests ran against.
"""

from __future__ import annotations

from importlib import metadata

from dpcore.errors import ConfigError

#: SGLang releases the adapter is tested against, oldest first.
SUPPORTED_SGLANG: tuple[str, ...] = ("0.5.23",)
DEFAULT_SGLANG = SUPPORTED_SGLANG[-1]


class UnsupportedSglangError(ConfigError):
    """SGLang is missing, or its version is not one the adapter supports."""


def installed_sglang_version() -> str | None:
    """The installed ``sglang`` distribution's version, without importing it."""
    try:
        return metadata.version("sglang")
    except metadata.PackageNotFoundError:
        return None


def check_sglang_version(version: str | None = None) -> str:
    """Return the installed (or given) version; raise if the adapter does not support it."""
    found = installed_sglang_version() if version is None else version
    supported = ", ".join(SUPPORTED_SGLANG)
    if found is None:
        msg = f"sglang is not installed; dpcore-sglang supports sglang {supported} (pip install sglang=={DEFAULT_SGLANG})"
        raise UnsupportedSglangError(msg)
    if found not in SUPPORTED_SGLANG:
        msg = (
            f"sglang {found} is installed, but dpcore-sglang supports only sglang {supported}: "
            f"the adapter replaces controller internals that change between releases. "
            f"Install a supported release (pip install sglang=={DEFAULT_SGLANG}) or a dpcore-sglang "
            "release that lists yours"
        )
        raise UnsupportedSglangError(msg)
    return found
