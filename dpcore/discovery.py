"""The single seam over ``importlib.metadata`` entry points (group ``dpcore.policies``).

Listing reads metadata only; nothing is imported until :func:`load_policy_class` is asked
for one name.
"""

from __future__ import annotations

import difflib
import sys

from dpcore.errors import DuplicatePolicyError, PolicyDefinitionError, UnknownPolicyError
from dpcore.localpolicy import is_spec, load_spec
from dpcore.model import PolicyInfo

if sys.version_info >= (3, 12):  # pragma: no cover - depends on the interpreter
    from importlib.metadata import EntryPoint, entry_points
else:
    from importlib_metadata import EntryPoint, entry_points

GROUP = "dpcore.policies"
#: Entry points ``PRESET.MODE = "POLICY"`` by which a distribution declares that its policy
#: POLICY is what preset PRESET (``auto``, ``roadmap``) means in disaggregation mode MODE.
ROLES_GROUP = "dpcore.roles"
#: How to get the first-party policies, for hints about a policy that is not installed.
INSTALL_HINT = "pip install 'dpcore[policies]' installs the first-party policies"


def _entry_points() -> list[EntryPoint]:
    return list(entry_points(group=GROUP))


def _role_entry_points() -> list[EntryPoint]:
    return list(entry_points(group=ROLES_GROUP))


def _dist_of(ep: EntryPoint) -> tuple[str | None, str | None, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None, ""
    summary = (dist.metadata.get("Summary") or "").strip().splitlines()
    return dist.name, dist.version, summary[0] if summary else ""


def _grouped() -> dict[str, list[EntryPoint]]:
    by_name: dict[str, list[EntryPoint]] = {}
    for ep in _entry_points():
        eps = by_name.setdefault(ep.name.lower(), [])
        # The same distribution can show up twice (e.g. two sys.path entries); that is
        # not a conflict.
        if not any(_dist_of(e)[0] == _dist_of(ep)[0] and e.value == ep.value for e in eps):
            eps.append(ep)
    return by_name


def available() -> dict[str, PolicyInfo]:
    """Installed policies by name, without importing any of them.

    A name provided by two distributions is listed once, with ``dist`` naming both.
    """
    out: dict[str, PolicyInfo] = {}
    for name, eps in sorted(_grouped().items()):
        infos = [_dist_of(ep) for ep in eps]
        dist = " + ".join(str(d) for d, _, _ in infos) if len(eps) > 1 else infos[0][0]
        out[name] = PolicyInfo(
            name=name, value=eps[0].value, dist=dist, version=infos[0][1], summary=infos[0][2]
        )
    return out


def unknown_policy_error(name: str, installed: list[str], context: str = "") -> UnknownPolicyError:
    """Build the message for a name nobody provides: what exists, the closest, how to fix."""
    close = difflib.get_close_matches(name, installed, n=1, cutoff=0.5)
    parts = [f"unknown load balance method {name!r}{context}"]
    parts.append(f"installed policies: {', '.join(sorted(installed)) or '(none)'}")
    if close:
        parts.append(f"did you mean {close[0]!r}?")
    parts.append(
        f"to add a policy, pip install the distribution that provides it (it declares an entry "
        f"point in the {GROUP!r} group; {INSTALL_HINT}); `dpcore policies` lists what is installed"
    )
    return UnknownPolicyError("; ".join(parts), name=name, available=installed)


def roles() -> dict[str, list[tuple[str, str | None, str]]]:
    """Declared roles (presets, tool defaults, former names; :mod:`dpcore.auto`):
    ``{"auto.prefill": [(policy, distribution, its summary), ...]}``.

    Read from entry-point metadata only; nothing is imported.
    """
    out: dict[str, list[tuple[str, str | None, str]]] = {}
    for ep in _role_entry_points():
        dist, _, summary = _dist_of(ep)
        entry = (ep.value.strip().lower(), dist, summary)
        declared = out.setdefault(ep.name.strip().lower(), [])
        if entry not in declared:
            declared.append(entry)
    return out


def find(name: str, context: str = "") -> EntryPoint:
    """The entry point for *name*; raises unknown/duplicate errors with actionable text."""
    grouped = _grouped()
    eps = grouped.get(name.lower())
    if not eps:
        raise unknown_policy_error(name, sorted(grouped), context)
    if len(eps) > 1:
        dists = [f"{_dist_of(ep)[0]} ({ep.value})" for ep in eps]
        msg = (
            f"policy name {name!r} is provided by more than one installed distribution: "
            f"{' and '.join(dists)}; uninstall one of them"
        )
        raise DuplicatePolicyError(msg, name=name, dists=[str(_dist_of(ep)[0]) for ep in eps])
    return eps[0]


def load_policy_class(name: str, context: str = "") -> type:
    """Import the class behind *name* (and nothing else).

    A file path or ``module:Class`` (see :mod:`dpcore.localpolicy`) is imported directly.
    """
    if is_spec(name):
        return load_spec(name)
    ep = find(name, context)
    try:
        obj = ep.load()
    except Exception as exc:
        dist = _dist_of(ep)[0]
        msg = f"policy {name!r} from {dist} could not be imported ({ep.value}): {exc!r}"
        raise PolicyDefinitionError(msg) from exc
    if not callable(obj):
        msg = f"policy {name!r} entry point {ep.value} is not a class or factory"
        raise PolicyDefinitionError(msg)
    return obj  # type: ignore[return-value]
