"""The policy contract: what a policy class is and what it may declare.

A policy is a class registered under the ``dpcore.policies`` entry-point group; its name is
the entry point's name. The manager builds it with ``cls(ctx, **options)`` and registers
the instance with pluggy, so its ``@hookimpl`` methods answer the hooks in
:mod:`dpcore.hookspecs` (``select_rank`` is required, the others optional).

Everything else a policy may declare is an optional class attribute, read without building
the policy:

* ``name``: its canonical name (used in ``ctx.explain`` and metrics labels);
* ``capabilities``: what it needs from or promises to a deployment, from :data:`CAPABILITIES`,
  e.g. ``frozenset({NEEDS_BLOCK_HASHES})``: a deployment may skip computing block hashes when
  no policy in its chain declares that it reads them; :data:`PLACES_BY_BOOTSTRAP_ROOM`: PD
  decode can compute where prefill placed a request;
* its options: the keyword parameters of ``__init__`` after ``ctx``, with their annotations
  and defaults (:func:`options` reads them; ``:param name:`` lines in the class docstring
  become their help text).

Which policy ``auto`` picks for each disaggregation mode is not declared here: distributions
declare it in entry-point metadata (:mod:`dpcore.auto`), so resolving ``auto`` imports
nothing.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

from attrs import frozen

from dpcore.errors import PolicyDefinitionError
from dpcore.model import PolicyContext

#: The policy reads ``Request.block_hashes``; senders must compute them for it to work.
NEEDS_BLOCK_HASHES = "needs_block_hashes"
#: The policy places every PD prefill request on ``bootstrap_room % dp_size`` (or rejects it),
#: never elsewhere: prefill then registers no rooms and decode computes the prefill rank instead
#: of asking the bootstrap registry. It counts as the first policy of a prefill chain.
PLACES_BY_BOOTSTRAP_ROOM = "places_by_bootstrap_room"
#: Every capability a policy may declare.
CAPABILITIES = frozenset({NEEDS_BLOCK_HASHES, PLACES_BY_BOOTSTRAP_ROOM})

_PARAM = re.compile(r":param\s+(\w+):\s*(.+?)(?=\n\s*:|\n\s*\n|\Z)", re.S)


@runtime_checkable
class Policy(Protocol):
    """What the manager relies on (besides at least one ``@hookimpl`` method)."""

    def __init__(self, ctx: PolicyContext, **options: Any) -> None: ...


class DeclaresCapabilities(Protocol):
    """The optional declarations, for type checkers."""

    name: ClassVar[str]
    capabilities: ClassVar[frozenset[str]]


@frozen
class Option:
    """One constructor option of a policy.

    :ivar name: The keyword (``--policy-option POLICY.NAME=VALUE``).
    :ivar type: Its annotation as written, e.g. ``"float"``; ``""`` when unannotated.
    :ivar default: Its default (``inspect.Parameter.empty`` when it has none).
    :ivar help: From the class docstring's ``:param NAME:`` line, if any.
    """

    name: str
    type: str
    default: Any
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def capabilities(cls: type) -> frozenset[str]:
    """The capabilities *cls* declares; raises for one dpcore does not know."""
    declared = getattr(cls, "capabilities", frozenset())
    if isinstance(declared, str) or not all(isinstance(c, str) for c in declared):
        msg = f"{cls.__qualname__}.capabilities must be a set of strings from {sorted(CAPABILITIES)}"
        raise PolicyDefinitionError(msg)
    unknown = set(declared) - CAPABILITIES
    if unknown:
        msg = f"{cls.__qualname__} declares unknown capabilities {sorted(unknown)}; known: {sorted(CAPABILITIES)}"
        raise PolicyDefinitionError(msg)
    return frozenset(declared)


def options(cls: type) -> tuple[Option, ...]:
    """*cls*'s constructor options (everything after ``ctx``), in order."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return ()
    helps = {m.group(1): " ".join(m.group(2).split()) for m in _PARAM.finditer(inspect.getdoc(cls) or "")}
    out = []
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        type_name = "" if ann is p.empty else ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
        out.append(Option(p.name, type_name, p.default, helps.get(p.name, "")))
    return tuple(out)


def needs_block_hashes(policies: Mapping[str, object] | Mapping[str, type]) -> bool:
    """Whether any of *policies* (instances or classes, by name) declares it reads block hashes."""
    return any(
        NEEDS_BLOCK_HASHES in capabilities(p if isinstance(p, type) else type(p)) for p in policies.values()
    )


def places_by_bootstrap_room(cls: type) -> bool:
    """Whether policy class *cls* declares :data:`PLACES_BY_BOOTSTRAP_ROOM`."""
    return PLACES_BY_BOOTSTRAP_ROOM in capabilities(cls)
