"""The engine models' parameters, pinned so that results stay comparable.

The DP-attention step model's constants and their sources are in :mod:`dpcore.sim.stepmodel`;
the replicas engine's (independent ranks, whole-prompt prefill) are here. Change a default
only with a documented reason, never to make a policy look better; every run prints the
values it used, and ``--engine-config FILE`` sets them for other hardware.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from attrs import field, frozen

from dpcore.errors import ConfigError

from dpcore.sim.profiles import DEFAULT_PROFILE, PROFILES
from dpcore.sim.stepmodel import StepModel


def _positive(_inst: object, attr: object, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{attr.name} must be a positive number, got {value!r}")  # type: ignore[attr-defined]


def _non_negative(_inst: object, attr: object, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{attr.name} must be a number >= 0, got {value!r}")  # type: ignore[attr-defined]


def _fraction(_inst: object, attr: Any, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attr.name} must be in [0, 1), got {value!r}")


def _known_profile(_inst: object, _attr: object, value: str) -> None:
    if value not in PROFILES:
        raise ValueError(f"report_profile must be one of {', '.join(PROFILES)}, got {value!r}")


@frozen
class EngineConfig:
    """One rank of the modelled engine, and how it reports its load.

    :ivar prefill_tokens_per_s: Prefill throughput on uncached prompt tokens.
    :ivar decode_step_s: Fixed time of one continuous-batching decode step.
    :ivar decode_step_per_request_s: Extra decode-step time per running request.
    :ivar kv_capacity_tokens: KV cache per rank, shared by running requests and the prefix
        cache (cached blocks no running request uses are evicted LRU when space is needed).
    :ivar report_interval_s: A rank reports its load at least this often...
    :ivar report_steps: ...and after this many decode steps, whichever comes first
        (``0``: time only).
    :ivar report_delay_s: How late a report reaches the controller.
    :ivar report_profile: Which fields the reports carry (:mod:`dpcore.sim.profiles`).
    :ivar kv_event_loss: Fraction of KV event batches lost on the way (``[0, 1)``; with a
        profile that has KV events), drawn from the run's seed.
    :ivar step: The DP-attention step-time model (the ``lockstep`` engine).
    """

    prefill_tokens_per_s: float = field(default=12_000.0, validator=_positive)
    decode_step_s: float = field(default=0.025, validator=_positive)
    decode_step_per_request_s: float = field(default=0.00008, validator=_non_negative)
    kv_capacity_tokens: int = field(default=500_000, validator=_positive)
    report_interval_s: float = field(default=0.1, validator=_positive)
    report_steps: int = field(default=15, validator=_non_negative)
    report_delay_s: float = field(default=0.05, validator=_non_negative)
    report_profile: str = field(default=DEFAULT_PROFILE, validator=_known_profile)
    kv_event_loss: float = field(default=0.0, validator=_fraction)
    step: StepModel = field(factory=StepModel)

    def rows(self) -> list[tuple[str, str]]:
        """(parameter, value) pairs for the printed report."""
        return [
            ("prefill throughput", f"{self.prefill_tokens_per_s:,.0f} uncached tokens/s per rank"),
            (
                "decode step",
                f"{self.decode_step_s * 1e3:g} ms + {self.decode_step_per_request_s * 1e3:g} ms per running request",
            ),
            ("KV capacity", f"{self.kv_capacity_tokens:,} tokens per rank, shared with the LRU prefix cache"),
            (
                "load reports",
                f"every {self.report_steps} decode steps or {self.report_interval_s * 1e3:g} ms, "
                f"delivered {self.report_delay_s * 1e3:g} ms late",
            ),
        ]


#: ``--engine`` values: the DP-attention model (default) and independent replicas.
ENGINES = ("lockstep", "replicas")


def load_engine_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> EngineConfig:
    """The pinned defaults, changed by the TOML file *path* (top-level keys: the fields of
    :class:`EngineConfig`; a ``[step]`` table: the fields of
    :class:`~dpcore.sim.stepmodel.StepModel`), then by *overrides*. Raises :class:`ConfigError`
    naming the file and the key."""
    top: dict[str, Any] = {}
    step: dict[str, Any] = {}
    if path:
        import tomllib

        try:
            data = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"--engine-config {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--engine-config {path}: not valid TOML: {exc}") from None
        step = data.pop("step", {})
        if not isinstance(step, dict):
            raise ConfigError(f"--engine-config {path}: 'step' must be a table ([step])")
        _known(path, data, [f.name for f in attrs.fields(EngineConfig) if f.name != "step"], "")
        _known(path, step, [f.name for f in attrs.fields(StepModel)], "step.")
        top = data
    try:
        return EngineConfig(**{**top, **(overrides or {})}, step=StepModel(**step))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--engine-config {path}: {exc}" if path else str(exc)) from None


def add_engine_config_argument(p: argparse.ArgumentParser) -> None:
    """``--engine-config FILE.toml``, the same file for ``dpcore simulate``, ``dpcore demo`` and
    the mock ranks, so a simulated and a live run can share one set of engine constants."""
    p.add_argument(
        "--engine-config",
        metavar="FILE.toml",
        help="engine parameters for your own hardware (keys: see docs/reference/engine-model.md); "
        "command-line options win",
    )


def _known(path: str, given: Mapping[str, Any], names: list[str], prefix: str) -> None:
    unknown = sorted(set(given) - set(names))
    if unknown:
        msg = f"--engine-config {path}: unknown key {prefix}{unknown[0]}; known: {', '.join(prefix + n for n in names)}"
        raise ConfigError(msg)
