"""dpcore-sglang: dpcore's policy chain inside SGLang's own data-parallel controller.

SGLang keeps its processes, sockets and message formats; the adapter replaces only what the
controller's dispatch path decides (see :mod:`dpcore_sglang.adapter`). It is switched on per
server by :mod:`dpcore_sglang.launch_server`, through SGLang's plugin entry point group
``sglang.srt.plugins`` (:mod:`dpcore_sglang.plugin`).
"""

from __future__ import annotations

from dpcore_sglang.versions import SUPPORTED_SGLANG, UnsupportedSglangError, check_sglang_version

__all__ = ["SUPPORTED_SGLANG", "UnsupportedSglangError", "check_sglang_version"]
