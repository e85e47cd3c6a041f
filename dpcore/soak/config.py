"""What a soak is: its settings (:class:`SoakConfig`), its fault schedule and timings, and the
records a run keeps of what it did and what came back.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field, frozen

from dpcore.errors import ConfigError

#: Chaos cycle: one event per slot, spread evenly over the run.
SCHEDULE = ("kill", "flood", "pause", "stuck", "stall", "term", "kill", "flood2", "pause", "kill")
#: Disruptions that hit no rank (their ``rank`` is -1).
NO_RANK = ("flood", "flood2", "stall")
#: How long a killed rank stays down before it is restarted.
RESTART_AFTER_S = 1.5
#: The controller's ``--admission-timeout`` in the soak, and how long a stuck rank stays.
ADMISSION_TIMEOUT_S = 2.0
STUCK_FOR_S = 2.5 * ADMISSION_TIMEOUT_S


@frozen
class SoakConfig:
    duration_s: float = 60.0
    rate: float = 100.0
    dp_size: int = 4
    #: ``--load-balance-method``; ``None``: the load-aware baseline the installed distributions
    #: declare (:func:`dpcore.auto.baseline_policy`).
    method: str | None = None
    heartbeat_timeout_s: float = 1.0
    bad_fraction: float = 0.05
    flood_frames: int = 20_000
    speedup: float = 50.0
    seed: int = 0

    def check(self) -> None:
        if not 20 <= self.duration_s <= 3600:
            raise ConfigError(f"--duration must be in 20..3600 seconds, got {self.duration_s}")
        if not 1 <= self.rate <= 2000:
            raise ConfigError(f"--rate must be in 1..2000 requests/s, got {self.rate}")
        if self.dp_size < 2:
            raise ConfigError(f"--dp-size must be at least 2 (one rank is disrupted at a time), got {self.dp_size}")
        if not 0 <= self.bad_fraction <= 0.5:
            raise ConfigError(f"--bad-fraction must be in 0..0.5, got {self.bad_fraction}")
        if not self.heartbeat_timeout_s > 0:
            raise ConfigError(f"--heartbeat-timeout must be positive, got {self.heartbeat_timeout_s}")


@define
class Disruption:
    kind: str
    rank: int
    start: float
    #: When the rank was running again (restart or SIGCONT); ``None`` for floods.
    back: float | None = None
    #: First request submitted after ``back`` that this rank served, seconds after ``back``.
    rejoined_after_s: float | None = None


@define
class HttpBooks:
    """What the HTTP client did: requests (each left once, then asked until answered) and
    the outcome of every attempt."""

    requests: int = 0
    left: int = 0  # streams left after their first chunk
    ok: int = 0
    wrong_output: int = 0  # an answer that was not the request's own
    gave_up: int = 0
    rejected: int = 0  # answered with a controller rejection code (asked again)
    rid_in_use: int = 0  # 400 duplicate_rid: the front had not seen the client leave yet
    failed: int = 0  # answered with a controller failure code (asked again)
    other: dict[str, int] = field(factory=dict)  # any other status or error


@define
class Books:
    """What the driver sent and got back."""

    sent_at: dict[str, float] = field(factory=dict)
    good: set[str] = field(factory=set)
    bad_answered: dict[str, str] = field(factory=dict)  # rid -> expected rejection code
    bad_unanswered: int = 0
    finals: dict[str, Any] = field(factory=dict)  # rid -> Reply
    ended_at: dict[str, float] = field(factory=dict)
