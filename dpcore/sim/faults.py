"""Rank faults for the simulator: which rank goes down when, and when it comes back.

``--faults`` takes a comma-separated list of ``RANK@DOWN-UP`` (seconds from the first
arrival, e.g. ``2@60-120``; ``2@60`` never comes back), or ``random:N`` for N faults drawn
from the run's seed: each a random rank, down at a uniform time in the trace, back 5 to 60 s
later. A rank comes back with an empty cache.
"""

from __future__ import annotations

import random

from attrs import frozen

from dpcore.errors import ConfigError

#: Bounds of a random outage, in seconds.
RANDOM_OUTAGE_S = (5.0, 60.0)


@frozen
class Fault:
    """Rank *rank* goes down at *down_s* and comes back at *up_s* (``None``: never)."""

    rank: int
    down_s: float
    up_s: float | None = None

    def check(self, dp_size: int) -> None:
        if not 0 <= self.rank < dp_size:
            raise ConfigError(f"fault on rank {self.rank}, but ranks are 0..{dp_size - 1}")
        if self.down_s < 0 or (self.up_s is not None and self.up_s <= self.down_s):
            raise ConfigError(f"fault on rank {self.rank}: need 0 <= down < up, got {self.down_s} and {self.up_s}")


def parse_faults(text: str | None, *, dp_size: int, duration_s: float, seed: int) -> tuple[Fault, ...]:
    """The fault schedule *text* means (see the module doc); raises :class:`ConfigError`."""
    if not text:
        return ()
    text = text.strip()
    if text.startswith("random:"):
        try:
            count = int(text.removeprefix("random:"))
        except ValueError:
            raise ConfigError(f"--faults {text!r}: random:N needs a whole number N") from None
        if count < 0:
            raise ConfigError(f"--faults {text!r}: N must be >= 0")
        rng = random.Random(f"faults-{seed}")
        out = []
        for _ in range(count):
            down = rng.uniform(0.0, max(duration_s, 1.0))
            out.append(Fault(rng.randrange(dp_size), round(down, 3), round(down + rng.uniform(*RANDOM_OUTAGE_S), 3)))
        return tuple(sorted(out, key=lambda f: f.down_s))
    out = []
    for part in text.split(","):
        part = part.strip()
        rank_s, at, when = part.partition("@")
        down_s, dash, up_s = when.partition("-")
        try:
            fault = Fault(int(rank_s), float(down_s), float(up_s) if dash else None)
        except ValueError:
            msg = f"--faults {part!r}: expected RANK@DOWN-UP in seconds (e.g. 2@60-120), RANK@DOWN, or random:N"
            raise ConfigError(msg) from None
        if not at:
            raise ConfigError(f"--faults {part!r}: expected RANK@DOWN-UP, e.g. 2@60-120")
        fault.check(dp_size)
        out.append(fault)
    return tuple(out)
