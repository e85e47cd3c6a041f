"""Calling a chain's hook implementations directly, in pluggy's order (the fast path).

The chain is fixed once built, so :class:`~dpcore.manager.PolicyManager` can call the
implementations of its two per-request hooks as plain functions, in the order and with the
argument selection pluggy would use, without pluggy's per-call machinery (about 1.5 µs a
request). This relies on how pluggy lists and orders implementations; :func:`fast_path_ok`
checks that once per process, and the manager uses pluggy's own call path when it fails.
"""

from __future__ import annotations

import functools
from typing import Any

import pluggy

from dpcore import hookspecs
from dpcore.hookspecs import hookimpl


def direct_calls(caller: Any) -> list[Any] | None:
    """Plain callables for *caller*'s implementations, in the order pluggy calls them.

    Each takes the hook's spec arguments positionally and passes on only the ones the
    implementation asked for (pluggy's opt-in arguments). ``None`` if any implementation
    is a wrapper, which only pluggy can run, or if the installed pluggy does not work the
    way this relies on (:func:`fast_path_ok`).
    """
    if not fast_path_ok():
        return None
    spec_names = tuple(caller.spec.argnames)
    calls = []
    for impl in reversed(caller.get_hookimpls()):
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            return None
        names = tuple(impl.argnames)
        f = impl.function
        if names == spec_names:
            calls.append(f)
        else:
            idx = tuple(spec_names.index(n) for n in names)
            calls.append(lambda *a, f=f, idx=idx: f(*[a[i] for i in idx]))
    return calls


@functools.cache
def fast_path_ok() -> bool:
    """Whether the installed pluggy exposes what :func:`direct_calls` reads, and calls
    implementations in the order it assumes; checked once per process.

    The fast path reads ``HookCaller.spec.argnames``, ``get_hookimpls()`` and each
    implementation's ``argnames``, ``function`` and ``hookwrapper``, and calls them in reverse
    registration order with ``tryfirst`` first, stopping at the first non-``None`` answer
    of a ``firstresult`` hook. A pluggy that differs gets its own (slower) call path.
    """
    try:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        seen: list[str] = []

        def plugin(tag: str, answer: int | None, **opts: bool) -> object:
            class P:
                @hookimpl(**opts)
                def select_rank(self, ctx: Any) -> int | None:
                    seen.append(tag)
                    return answer

            return P()

        pm.register(plugin("a", 1), name="a")
        pm.register(plugin("b", None), name="b")
        pm.register(plugin("first", None, tryfirst=True), name="first")
        caller = pm.hook.select_rank
        want = caller(request=None, ctx=None)
        pluggy_order = list(seen)
        seen.clear()
        spec_names = tuple(caller.spec.argnames)
        got = None
        for impl in reversed(caller.get_hookimpls()):
            if impl.hookwrapper or getattr(impl, "wrapper", False):
                return False
            if not set(impl.argnames) <= set(spec_names):
                return False
            got = impl.function(*[None] * len(impl.argnames))
            if got is not None:
                break
        return (want, pluggy_order) == (got, seen) == (1, ["first", "b", "a"])
    except Exception:  # any mismatch in pluggy's internals: use its own call path
        return False
