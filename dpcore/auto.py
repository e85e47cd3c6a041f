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

#: A declared role: (policy name, distribution, the distribution's summary).
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

# Roles besides the presets' ``PRESET.MODE``, declared the same way (``KEY = "POLICY"`` in
# the ``dpcore.roles`` group), so that no tool names a policy itself.
#: The load-aware policy dpcore's own tools run when none is named (``dpcore bench``'s
#: dpcore loop, ``dpcore soak``).
BASELINE = "baseline.load"
#: ``compare.ORDER = "POLICY"``: compared by ``dpcore simulate`` when no ``--policy`` is given,
#: by ORDER (an integer, 0 to 999; ties by name).
COMPARE = "compare"
COMPARE_ORDER_MAX = 999
#: ``renamed.OLD = "NEW"``: a name SGLang used to accept that NEW now answers to.
RENAMED = "renamed"
#: ``removed.OLD = "NEW"``: a name SGLang used to accept whose job NEW does.
REMOVED = "removed"
#: Flags that no longer exist, and what to do instead (``{prefill}``: what ``auto`` picks
#: for PD prefill).
REMOVED_FLAGS = {
    "--prefill-round-robin-balance": (
        "the flag --prefill-round-robin-balance was removed: prefill placement is chosen by "
        "--load-balance-method (use {prefill}, or any policy together with the decode side "
        "querying the bootstrap registry)"
    ),
}
#: What to do when a role is declared by none or by several, where the user can name a policy.
NAME_ONE = "name a policy instead (`dpcore policies` lists them)"
#: Declared roles by key, as :func:`dpcore.discovery.roles` returns them.
Roles = Mapping[str, Sequence[Role]]


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


def declared_roles(roles: Roles | None = None) -> Roles:
    """*roles*, or else what the installed distributions declare (metadata only)."""
    if roles is not None:
        return roles
    from dpcore.discovery import roles as installed_roles

    return installed_roles()


def declared_policy(
    key: str, subject: str, roles: Roles | None = None, where: str = "", remedy: str = NAME_ONE
) -> Role:
    """The one policy declared for role *key*; a :class:`ConfigError` naming *subject* (what
    needs it, e.g. ``"--load-balance-method 'auto'"``) and *remedy* when none or several are."""
    declared = declared_roles(roles).get(key, ())
    if len(declared) == 1:
        return declared[0]
    if not declared:
        msg = (
            f"{subject} means{f', {where},' if where else ''} the policy an installed distribution "
            f"declares for it (entry point {key!r} in the 'dpcore.roles' group), and none does; "
            f"{remedy}; {INSTALL_HINT}"
        )
        raise ConfigError(msg)
    both = " and ".join(f"{p!r} ({d})" for p, d, _ in declared)
    msg = f"{subject} is ambiguous{f' {where}' if where else ''}: {both} all declare {key}; {remedy}"
    raise ConfigError(msg)


def baseline_policy(subject: str, roles: Roles | None = None, remedy: str = NAME_ONE) -> str:
    """The load-aware policy dpcore's own tools run when none is named (role :data:`BASELINE`)."""
    return declared_policy(BASELINE, subject, roles, remedy=remedy)[0]


def compare_policies(roles: Roles | None = None) -> tuple[str, ...]:
    """The policies declared as ``compare.ORDER``, by ORDER then name (none: empty)."""
    ranked: list[tuple[int, str]] = []
    for key, declared in declared_roles(roles).items():
        role, _, order = key.partition(".")
        if role != COMPARE:
            continue
        if not order.isdigit() or int(order) > COMPARE_ORDER_MAX:
            dists = ", ".join(str(d) for _, d, _ in declared)
            msg = f"role {key!r} declared by {dists}: ORDER must be an integer 0..{COMPARE_ORDER_MAX}"
            raise ConfigError(msg)
        ranked += [(int(order), policy) for policy, _, _ in declared]
    return tuple(dict.fromkeys(policy for _, policy in sorted(ranked)))


def _auto_picks(roles: Roles) -> dict[str, list[str]]:
    """What ``auto`` picks: ``{policy: [mode in words, ...]}`` for the modes declared once."""
    picks: dict[str, list[str]] = {}
    for mode in DISAGGREGATION_MODES:
        declared = roles.get(f"{AUTO}.{mode}", ())
        if len(declared) == 1:
            picks.setdefault(declared[0][0], []).append(MODE_TEXT[mode])
    return picks


def check_name(name: str, roles: Roles | None = None) -> None:
    """Raise :class:`RemovedPolicyError` for a name a distribution declares renamed or removed."""
    roles = declared_roles(roles)
    renamed = roles.get(f"{RENAMED}.{name}", ())
    if renamed:
        new = renamed[0][0]
        msg = (
            f"load balance method {name!r} was renamed to {new!r}: "
            f"use --load-balance-method {new}"
        )
        raise RemovedPolicyError(msg, name=name, replacement=new)
    removed = roles.get(f"{REMOVED}.{name}", ())
    if removed:
        new = removed[0][0]
        msg = f"{name!r} was removed: use {new!r}"
        picks = _auto_picks(roles)
        if new in picks:
            said = ", ".join(f"{p} for {' and '.join(modes)}" for p, modes in picks.items())
            msg += f" (or 'auto', which picks {said})"
        raise RemovedPolicyError(msg, name=name, replacement=new)


def preset_policy(preset: str, mode: str, roles: Roles) -> tuple[str, str]:
    """The policy *preset* means in *mode*, and the reason, from the declared *roles*."""
    key = f"{preset}.{mode}"
    subject, where = f"--load-balance-method {preset!r}", f"in {MODE_TEXT[mode]}"
    policy, dist, summary = declared_policy(key, subject, roles, where)
    what = f"{summary}; " if summary else ""
    return policy, f"{MODE_TEXT[mode]}: {what}declared as {key} by {dist or 'an installed distribution'}"


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
    roles = declared_roles(roles)
    for name in names:
        check_name(name, roles)
        if name in PRESETS:
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
            prefill = declared_roles().get(f"{AUTO}.prefill", ())
            use = f"{prefill[0][0]!r}, the auto default for prefill" if len(prefill) == 1 else "'auto'"
            raise RemovedPolicyError(REMOVED_FLAGS[flag].format(prefill=use), name=flag, replacement="")
