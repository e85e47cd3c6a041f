"""What ``--load-balance-method`` means: ``auto``, renamed and removed names, chains.

This module only turns the user's string into a chain of policy names and the reason for
it. Whether those policies are installed is checked by :mod:`dpcore.discovery` when they
are loaded.
"""

from __future__ import annotations

from dpcore.errors import ConfigError, InvalidDisaggregationModeError, RemovedPolicyError
from dpcore.localpolicy import is_spec
from dpcore.model import DISAGGREGATION_MODES, Resolution

AUTO = "auto"

#: ``auto`` resolution, one row per disaggregation mode: (policy, reason).
AUTO_RULES: dict[str, tuple[str, str]] = {
    "null": ("round_robin", "no PD disaggregation: plain round robin over active ranks"),
    "prefill": (
        "follow_bootstrap_room",
        "PD prefill: rank = bootstrap_room % dp_size, which decode can compute without asking",
    ),
    "decode": ("round_robin", "PD decode: the decode rank is independent of the prefill rank"),
}

ROADMAP = "roadmap"

#: The opt-in ``roadmap`` preset (SGLang #16080's guidance on defaults), one row per mode.
#: ``auto`` stays as upstream has it; this is only used when asked for by name.
ROADMAP_RULES: dict[str, tuple[str, str]] = {
    "null": ("total_tokens", "roadmap preset: balance prompt tokens"),
    "prefill": ("total_tokens", "roadmap preset, PD prefill: balance prompt tokens"),
    "decode": ("total_requests", "roadmap preset, PD decode: balance running requests"),
}

#: Names upstream SGLang used to accept, and what to use instead.
RENAMED = {
    "shortest_queue": "total_requests",
    "minimum_tokens": "total_tokens",
}
REMOVED = {
    "decode_round_robin": (
        "round_robin",
        "'decode_round_robin' was removed: use 'round_robin' (or 'auto', which picks "
        "round_robin for decode and follow_bootstrap_room for prefill)",
    ),
}
REMOVED_FLAGS = {
    "--prefill-round-robin-balance": (
        "the flag --prefill-round-robin-balance was removed: prefill placement is chosen by "
        "--load-balance-method (use 'follow_bootstrap_room', the auto default for prefill, "
        "or any policy together with the decode side querying the bootstrap registry)"
    ),
}


def normalize_mode(mode: str | None) -> str:
    """``None``/``"none"``/``"null"`` → ``"null"``; ``prefill``/``decode`` kept; else an error."""
    if mode is None:
        return "null"
    m = str(mode).strip().lower()
    if m in ("", "none", "null"):
        return "null"
    if m in DISAGGREGATION_MODES:
        return m
    msg = (
        f"invalid --disaggregation-mode {mode!r}: choose one of null (or none), prefill, decode"
    )
    raise InvalidDisaggregationModeError(msg)


def _normalize_name(name: str) -> str:
    """Entry-point names are case-insensitive; a file or ``module:Class`` keeps its case."""
    name = name.strip()
    return name if is_spec(name) else name.lower().replace("-", "_")


def split_method(method: str) -> tuple[str, ...]:
    """Split ``"a, B"`` into ``("a", "b")``; case-insensitive, blanks are an error."""
    if not isinstance(method, str):
        msg = f"--load-balance-method must be a string, got {method!r}"
        raise ConfigError(msg)
    parts = tuple(_normalize_name(p) for p in method.split(","))
    if not parts or any(not p for p in parts):
        msg = (
            f"--load-balance-method {method!r} has an empty name; give a policy name, 'auto', "
            "or a comma-separated chain such as 'cache_aware,total_tokens'"
        )
        raise ConfigError(msg)
    if len(set(parts)) != len(parts):
        msg = f"--load-balance-method {method!r} names a policy twice"
        raise ConfigError(msg)
    return parts


def check_name(name: str) -> None:
    """Raise :class:`RemovedPolicyError` for renamed or removed names."""
    if name in RENAMED:
        new = RENAMED[name]
        msg = (
            f"load balance method {name!r} was renamed to {new!r}: "
            f"use --load-balance-method {new}"
        )
        raise RemovedPolicyError(msg, name=name, replacement=new)
    if name in REMOVED:
        new, msg = REMOVED[name]
        raise RemovedPolicyError(msg, name=name, replacement=new)


def resolve(method: str, disaggregation_mode: str | None = None) -> Resolution:
    """Turn a ``--load-balance-method`` value into a policy chain and the reason for it.

    ``auto`` may appear anywhere in a chain and expands to the rule for the mode.
    """
    mode = normalize_mode(disaggregation_mode)
    names = split_method(method)
    chain: list[str] = []
    reasons: list[str] = []
    for name in names:
        check_name(name)
        if name in (AUTO, ROADMAP):
            resolved, why = (AUTO_RULES if name == AUTO else ROADMAP_RULES)[mode]
            chain.append(resolved)
            reasons.append(f"{name} -> {resolved} ({why})")
        else:
            chain.append(name)
    if len(set(chain)) != len(chain):
        msg = f"--load-balance-method {method!r} resolves to a chain naming a policy twice: {chain}"
        raise ConfigError(msg)
    if not reasons:
        reasons.append("chosen explicitly" if len(chain) == 1 else "chain chosen explicitly")
    if len(chain) > 1:
        reasons.append("each policy answers only when the ones before it return None")
    return Resolution(requested=method, chain=tuple(chain), reason="; ".join(reasons))


def check_removed_flags(argv: list[str]) -> None:
    """Reject command-line flags that no longer exist, with what to do instead."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in REMOVED_FLAGS:
            raise RemovedPolicyError(REMOVED_FLAGS[flag], name=flag, replacement="")
