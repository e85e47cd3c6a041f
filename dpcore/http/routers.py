"""The real routers dpcore is tested behind: a cached venv and a safe environment.

``sglang-router`` and ``vllm-router`` are installed from PyPI, at pinned versions, into a venv
outside the repository (``$DPCORE_CACHE``, default ``~/.cache/dpcore``), named after a hash
of the pins and the Python version, so a fresh machine builds it once and later runs reuse
it (:mod:`dpcore.venvcache`: one build at a time, an interrupted one built again).

:func:`router_env` is the environment to run them in: Hugging Face offline and every proxy
variable pointing at a closed loopback port, so a router that tries to fetch a tokenizer
for the model name it discovers cannot reach anything but 127.0.0.1.

``python -m dpcore.http.routers`` builds (or finds) the venv and prints its path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from dpcore.venvcache import build_once, cache_dir

#: Exact versions the interop tests were written against (checked on PyPI).
PINS = ("sglang-router==0.3.2", "vllm-router==0.1.17")
#: A loopback port nothing listens on: proxies and the HF endpoint go nowhere.
DEAD_END = "http://127.0.0.1:9"


class RouterVenvError(RuntimeError):
    """The router venv could not be built; the message holds pip's last output lines."""


def venv_path(pins: tuple[str, ...] = PINS) -> Path:
    key = "\n".join((*pins, sys.version, sys.platform)).encode()
    return cache_dir() / f"venv-interop-{hashlib.sha256(key).hexdigest()[:12]}"


def ensure_venv(pins: tuple[str, ...] = PINS, *, timeout_s: float = 900.0) -> Path:
    """The venv with *pins* installed, building it on first use; returns its directory."""

    def build(venv: Path) -> str:
        steps = (
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins],
        )
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                msg = f"building {venv} failed at {' '.join(cmd[:4])}...:\n{tail}"
                raise RouterVenvError(msg)
        return "\n".join(pins) + "\n"

    return build_once(venv_path(pins), build)


def executable(name: str, pins: tuple[str, ...] = PINS) -> str:
    """Path of ``sglang-router`` or ``vllm-router`` in the (built) venv."""
    return str(ensure_venv(pins) / "bin" / name)


def router_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """*base* (default ``os.environ``) with downloads disabled and proxies dead-ended.

    ``NO_PROXY`` lets the router reach the loopback servers it fronts; every other address
    goes to a closed port.
    """
    env = dict(os.environ if base is None else base)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        env[key] = DEAD_END
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["HF_ENDPOINT"] = DEAD_END
    return env


# --------------------------------------------------------------------------- command lines


def _loopback(url: str) -> str:
    if not url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
        msg = f"{url!r}: the routers are only ever pointed at loopback servers here"
        raise ValueError(msg)
    return url


def sglang_pd_command(
    exe: str, *, port: int, metrics_port: int, prefill_url: str, bootstrap_port: int, decode_url: str,
    policy: str = "round_robin", extra: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    """``sglang-router launch --pd-disaggregation`` bound to 127.0.0.1 (router and metrics).

    ``--dp-aware`` is refused: it makes the router expand workers by the ``dp_size`` it
    discovers, which is not what these tests exercise.
    """
    if "--dp-aware" in extra:
        raise ValueError("never pass --dp-aware to sglang-router here")
    return [
        exe, "launch", "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--pd-disaggregation", "--prefill", _loopback(prefill_url), str(bootstrap_port),
        "--decode", _loopback(decode_url), "--policy", policy, *extra,
    ]  # fmt: skip


def vllm_dp_command(
    exe: str, *, port: int, metrics_port: int, worker_url: str, dp_size: int, policy: str = "random",
    extra: tuple[str, ...] = (),
) -> list[str]:  # fmt: skip
    """``vllm-router`` expanding one worker into *dp_size* DP-aware workers (it then sends
    ``X-data-parallel-rank``), bound to 127.0.0.1."""
    return [
        exe, "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        "--worker-urls", _loopback(worker_url), "--intra-node-data-parallel-size", str(dp_size),
        "--policy", policy, *extra,
    ]  # fmt: skip


def worker_counts(metrics_text: str, metric: str) -> dict[str, float]:
    """Per-``worker`` label values of one counter in a router's ``/metrics`` text."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == metric and "worker" in sample.labels:
                out[sample.labels["worker"]] = sample.value
    return out


if __name__ == "__main__":  # pragma: no cover
    print(ensure_venv())
