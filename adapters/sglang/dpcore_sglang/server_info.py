"""SGLang's ``/server_info`` (and the deprecated ``/get_server_info``) naming the dpcore chain.

SGLang builds the answer with ``sglang.srt.utils.common.build_server_info`` (0.5.23), which
``sglang.srt.entrypoints.http_server`` imports by name. The launcher runs SGLang's server in
its own process, so before SGLang starts it wraps that function in both modules: the answer's
``load_balance_method`` becomes the dpcore chain actually dispatching (SGLang's field would
otherwise name the method the adapter told SGLang, see ``launch_server.sglang_method``), and a
``dpcore`` object gives the details. No SGLang file changes.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

#: Modules holding a ``build_server_info`` name that SGLang's endpoints call.
MODULES = ("sglang.srt.utils.common", "sglang.srt.entrypoints.http_server")


def describe(plan: Mapping[str, Any]) -> dict[str, Any]:
    """The ``dpcore`` object added to SGLang's server info, from the launcher's plan."""
    return {
        "load_balance_method": plan["requested"],
        "chain": list(plan["chain"]),
        "reason": plan["reason"],
        "policies": list(plan["policies"]),
        "sglang_load_balance_method": plan["sglang_load_balance_method"],
    }


def install(plan: Mapping[str, Any], modules: Sequence[str] = MODULES) -> None:
    """Wrap SGLang's ``build_server_info`` in *modules* so that it names the chain in *plan*.

    Importing ``http_server`` here is what ``sglang.launch_server`` does next anyway; an
    environment that cannot import it cannot serve HTTP either.
    """
    info = describe(plan)
    for name in modules:
        module = importlib.import_module(name)
        original = module.build_server_info
        if getattr(original, "__dpcore__", False):
            continue

        @functools.wraps(original)
        def build_server_info(server_args: Any, scheduler_info: Any, _original: Any = original) -> dict[str, Any]:
            result = _original(server_args, scheduler_info)
            result["load_balance_method"] = ",".join(info["chain"])
            result["dpcore"] = dict(info)
            return result

        build_server_info.__dpcore__ = True  # type: ignore[attr-defined]
        module.build_server_info = build_server_info
