"""What ``--load-balance-method`` means: ``auto``, renamed and removed names, chains.

This module only turns the user's string into a chain of policy names and the reason for
it. Whether those policies are installed is checked by :mod:`dpcore.discovery` when they
are loaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dpcore.discovery import INSTALL_HINT
from dpcore.errors import ConfigError, InvalidDisaggregationModeError, RemovedPolicyError
from dpcore.localpolicy import is_spec
from dpcore.model import DISAGGREGATION_MODES, Resolution

#: A declared preset role: (policy name, distribution, the distribution's summary).
Role = tuple[str, "str | None", str]
#: Disaggregation modes in words, for reasons and errors.
MODE_TEXT = {"null": "no PD disaggregation", "prefill": "PD prefill", "decode": "PD decode"}

AUTO = "auto"
ROADMAP = "roadmap"
#: Presets: names that resolve to a policy per disaggregation mode. What each preset means
#: is declared by the policy distributions (entry points ``PRESET.MODE = "POLICY"`` in the
#: ``dpcore.roles`` group, see :func:`dpcore.discovery.roles`), so the resolver names no
#: policy itself. ``auto`` is the default; ``roadmap`` is the opt-in preset following
#: SGLang #16080's guidance on defaults.
PRESETS: dict[str, str] = {
    AUTO: "the default",
    ROADMAP: "the opt-in preset from SGLang #16080's guidance on defaults",
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
            "or a comma-separated chain such as 'my_policy,auto'"
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


def preset_policy(preset: str, mode: str, roles: Mapping[str, Sequence[Role]]) -> tuple[str, str]:
    """The policy *preset* means in *mode*, and the reason, from the declared *roles*."""
    key = f"{preset}.{mode}"
    declared = roles.get(key, ())
    if len(declared) == 1:
        policy, dist, summary = declared[0]
        what = f"{summary}; " if summary else ""
        return policy, f"{MODE_TEXT[mode]}: {what}declared as {key} by {dist or 'an installed distribution'}"
    if not declared:
        msg = (
            f"--load-balance-method {preset!r} means, in {MODE_TEXT[mode]}, the policy an installed "
            f"distribution declares for it (entry point {key!r} in the 'dpcore.roles' group), and "
            f"none does; name a policy instead (`dpcore policies` lists them); {INSTALL_HINT}"
        )
        raise ConfigError(msg)
    both = " and ".join(f"{p!r} ({d})" for p, d, _ in declared)
    msg = f"--load-balance-method {preset!r} is ambiguous in {MODE_TEXT[mode]}: {both} all declare {key}; name the policy instead"
    raise ConfigError(msg)


def resolve(
    method: str,
    disaggregation_mode: str | None = None,
    roles: Mapping[str, Sequence[Role]] | None = None,
) -> Resolution:
    """Turn a ``--load-balance-method`` value into a policy chain and the reason for it.

    A preset (``auto``, ``roadmap``) may appear anywhere in a chain and expands to the
    policy the installed distributions declare for it in this mode (*roles*: default
    :func:`dpcore.discovery.roles`).
    """
    mode = normalize_mode(disaggregation_mode)
    names = split_method(method)
    chain: list[str] = []
    reasons: list[str] = []
    for name in names:
        check_name(name)
        if name in PRESETS:
            if roles is None:
                from dpcore.discovery import roles as declared_roles

                roles = declared_roles()
            resolved, why = preset_policy(name, mode, roles)
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
