"""The adapter's settings, handed from the launcher to SGLang's controller process.

SGLang starts the controller in a process of its own (spawned, so nothing set in the
launcher's memory survives), so the settings travel as JSON in one environment variable,
which every SGLang process inherits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from dpcore.errors import ConfigError

ENV_VAR = "DPCORE_SGLANG_CONFIG"

BLOCK_HASH_MODES = ("auto", "on", "off")

#: Smallest hashed block, in tokens. SGLang's default page is one token; hashing every token
#: would cost more than the rest of a dispatch, so blocks are whole pages of at least this.
MIN_BLOCK_TOKENS = 64



def _positive_or_none(_inst: object, attr: Any, value: int | None) -> None:
    if value is not None and (type(value) is not int or value < 1):
        msg = f"{attr.name} must be a positive integer, got {value!r}"
        raise ConfigError(msg)


def _port_or_none(_inst: object, attr: Any, value: int | None) -> None:
    if value is not None and (type(value) is not int or not 0 <= value <= 65535):
        msg = f"{attr.name} must be a port number in 0..65535, got {value!r}"
        raise ConfigError(msg)


def _mode(_inst: object, _attr: object, value: str) -> None:
    if value not in BLOCK_HASH_MODES:
        msg = f"block_hashes must be one of {', '.join(BLOCK_HASH_MODES)}, got {value!r}"
        raise ConfigError(msg)


@frozen
class AdapterConfig:
    """What the adapter does inside SGLang's controller.

    :ivar method: ``--load-balance-method``: a dpcore policy, ``auto``, or a chain.
    :ivar options: Per-policy constructor options (``--policy-option``).
    :ivar block_size: Tokens per hashed block; ``None``: the smallest whole number of SGLang
        pages that is at least :data:`MIN_BLOCK_TOKENS`. Must be a multiple of the page size.
    :ivar block_hashes: ``on``/``off``, or ``auto``: hash prompts when a policy in the chain
        declares it reads them (:data:`dpcore.policy.NEEDS_BLOCK_HASHES`).
    :ivar poll_timeout_ms: Longest the idle controller sleeps in ``poll`` before SGLang's
        loop feeds its watchdog again.
    :ivar metrics_port: Serve the adapter's Prometheus metrics from the controller process
        on this port (0: any free port); ``None``: no metrics endpoint. Range 0-65535.
    :ivar metrics_host: Address the metrics endpoint binds (default loopback).
    :ivar record: Record every request as a trace for ``dpcore simulate`` to this path
        (``--dpcore-record``; see :mod:`dpcore.runtime.recorder`); ``None``: off.
    :ivar record_sample: Fraction of requests recorded, in (0, 1].
    :ivar record_hold_s: Longest a recorded line waits for its request's output length from
        the tokenizer process, in 0..86,400 seconds (0: write the budget at once).
    """

    method: str = "auto"
    options: Mapping[str, Mapping[str, Any]] = field(factory=dict)
    block_size: int | None = field(default=None, validator=_positive_or_none)
    block_hashes: str = field(default="auto", validator=_mode)
    poll_timeout_ms: int | None = field(default=1000, validator=_positive_or_none)
    metrics_port: int | None = field(default=None, validator=_port_or_none)
    metrics_host: str = "127.0.0.1"
    record: str | None = None
    record_sample: float = 1.0
    record_hold_s: float = 300.0

    def to_json(self) -> str:
        return json.dumps(
            {
                "method": self.method,
                "options": {k: dict(v) for k, v in self.options.items()},
                "block_size": self.block_size,
                "block_hashes": self.block_hashes,
                "poll_timeout_ms": self.poll_timeout_ms,
                "metrics_port": self.metrics_port,
                "metrics_host": self.metrics_host,
                "record": self.record,
                "record_sample": self.record_sample,
                "record_hold_s": self.record_hold_s,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> AdapterConfig:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            msg = f"{ENV_VAR} is not valid JSON ({exc}); start SGLang with python -m dpcore_sglang.launch_server"
            raise ConfigError(msg) from exc
        if not isinstance(data, dict):
            msg = f"{ENV_VAR} must hold a JSON object, got {type(data).__name__}"
            raise ConfigError(msg)
        unknown = set(data) - {
            "method", "options", "block_size", "block_hashes", "poll_timeout_ms", "metrics_port", "metrics_host",
            "record", "record_sample", "record_hold_s",
        }
        if unknown:
            msg = f"{ENV_VAR} has unknown keys {sorted(unknown)}"
            raise ConfigError(msg)
        options = data.get("options") or {}
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            msg = f"{ENV_VAR}: options must map policy names to objects, got {options!r}"
            raise ConfigError(msg)
        return cls(
            method=str(data.get("method", "auto")),
            options=options,
            block_size=data.get("block_size"),
            block_hashes=data.get("block_hashes", "auto"),
            poll_timeout_ms=data.get("poll_timeout_ms", 1000),
            metrics_port=data.get("metrics_port"),
            metrics_host=str(data.get("metrics_host", "127.0.0.1")),
            record=data.get("record"),
            record_sample=data.get("record_sample", 1.0),
            record_hold_s=data.get("record_hold_s", 300.0),
        )

    def hashed_block_size(self, needs_block_hashes: bool, page_size: int) -> int:
        """Tokens per hashed block on pages of *page_size* for a chain that does (or does not)
        declare it reads block hashes (``PolicyManager.needs_block_hashes``); ``0``: do not hash."""
        if self.block_hashes == "off" or (self.block_hashes == "auto" and not needs_block_hashes):
            return 0
        return self.whole_pages(page_size)

    def whole_pages(self, page_size: int) -> int:
        """Tokens per hashed block on pages of *page_size*, whether or not the chain hashes
        (a recording hashes prompts for the simulator either way)."""
        page = max(1, int(page_size))
        if self.block_size is None:
            return page * math.ceil(MIN_BLOCK_TOKENS / page)
        if self.block_size % page:
            msg = (
                f"--dpcore-block-size {self.block_size} is not a multiple of SGLang's page size {page}: "
                "a hashed block must cover whole KV pages"
            )
            raise ConfigError(msg)
        return self.block_size
