"""The policy manager: one pluggy ``PluginManager`` per controller behind a typed facade.

This is the only module that calls the chain's hooks (``pm.hook.*``, or the implementations
directly through :mod:`dpcore.hookcalls`). It loads exactly the policies the chain
names, registers them so that pluggy asks them in chain order, and turns pluggy's silence
(``None``) or a policy's bad answer into typed per-request errors.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pluggy
import structlog

from dpcore import discovery, hookspecs, policy
from dpcore.auto import AUTO, normalize_mode, resolve
from dpcore.errors import (
    InactiveRankError,
    InvalidRankError,
    NoActiveRankError,
    NoRankSelectedError,
    PolicyDefinitionError,
    PolicyFailedError,
    PolicyOptionError,
    RequestRejected,
)
from dpcore.hookcalls import direct_calls, fast_path_ok
from dpcore.hookspecs import hookimpl
from dpcore.ledger import LoadLedger
from dpcore.ledgerview import LedgerView
from dpcore.model import LoadReport, PolicyContext, Request, Resolution

CORE_PLUGIN_NAME = "dpcore.core"


def validate_rank(value: Any, ctx: PolicyContext, field: str, rid: str | None = None) -> int:
    """Check an externally assigned rank: an integer in ``[0, dp_size)`` that is active."""
    if type(value) is not int:  # bool is an int subclass and is refused too
        msg = f"{field}={value!r} is not an integer rank"
        raise InvalidRankError(msg, rid=rid)
    if not 0 <= value < ctx.dp_size:
        msg = f"{field}={value} out of range [0, {ctx.dp_size})"
        raise InvalidRankError(msg, rid=rid)
    if not ctx.ledger.is_active(value):
        msg = f"{field}={value} names an inactive rank (active: {list(ctx.active_ranks)})"
        raise InactiveRankError(msg, rid=rid)
    return value


#: A deprecated field is logged on its 1st use and then every this many uses.
DEPRECATION_LOG_EVERY = 10_000


class CoreHooks:
    """Built-in plugin, asked before every policy: a rank assigned from outside beats every
    policy (``routed_dp_rank`` first, else the deprecated ``data_parallel_rank``, with a
    warning); otherwise, with no active rank at all, the request is rejected here, so no
    policy is ever asked to choose among no ranks.
    """

    def __init__(self) -> None:
        self.deprecated_seen = 0

    @hookimpl(tryfirst=True)
    def select_rank(self, request: Request, ctx: PolicyContext) -> int | None:
        value = request.routed_dp_rank
        field = "routed_dp_rank"
        if value is None:
            value = request.data_parallel_rank
            if value is None:
                # The one "no active rank" check: policies are only asked when one is.
                if not ctx.ledger.active_ranks:
                    msg = f"no active rank for request {request.rid!r}: all {ctx.dp_size} ranks are inactive"
                    raise NoActiveRankError(msg, rid=request.rid)
                return None
            field = "data_parallel_rank"
            self.deprecated_seen += 1
            if self.deprecated_seen == 1 or self.deprecated_seen % DEPRECATION_LOG_EVERY == 0:
                ctx.log.warning(
                    "deprecated_field",
                    field="data_parallel_rank",
                    use="routed_dp_rank",
                    seen=self.deprecated_seen,
                )
        rank = validate_rank(value, ctx, field, request.rid)
        ctx.explain("router", field)
        return rank


def _instantiate(name: str, cls: type, ctx: PolicyContext, options: Mapping[str, Any]) -> object:
    policy.capabilities(cls)  # an unknown capability is a broken policy, said before it runs
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        try:
            sig.bind(ctx, **options)
        except TypeError as exc:
            takes = [p for p in list(sig.parameters)[1:] if p not in ("args", "kwargs")]
            msg = (
                f"policy {name!r} does not accept options {dict(options)!r} ({exc}); "
                f"it takes: {', '.join(takes) or 'no options'}"
            )
            raise PolicyOptionError(msg) from exc
    try:
        return cls(ctx, **options)
    except (ValueError, TypeError) as exc:
        msg = f"policy {name!r}: bad options {dict(options)!r}: {exc}"
        raise PolicyOptionError(msg) from exc


def _owner(ledger: LoadLedger | LedgerView) -> LoadLedger:
    return ledger._ledger if isinstance(ledger, LedgerView) else ledger


def _hook_methods(obj: object) -> list[tuple[str, Callable[..., Any]]]:
    """``(attribute name, method)`` for each attribute of *obj* marked ``@hookimpl``."""
    out = []
    for attr in dir(obj):
        if attr.startswith("__"):
            continue
        try:
            method = getattr(obj, attr)
        except Exception:  # a property that fails is not a hook
            continue
        if callable(method) and hasattr(method, f"{hookspecs.PROJECT}_impl"):
            out.append((attr, method))
    return out


def check_hooks(name: str, obj: object) -> None:
    """One-line errors for a policy's hook implementations that dpcore cannot call.

    pluggy's own messages for these span several lines and name neither dpcore's hooks nor
    what to write instead; these name the policy, the hook and the argument.
    """
    specs = hookspecs.specs()
    who = f"policy {name!r} ({type(obj).__qualname__})"
    for attr, method in _hook_methods(obj):
        opts = getattr(method, f"{hookspecs.PROJECT}_impl")
        hook = opts.get("specname") or attr
        if hook not in specs:
            close = difflib.get_close_matches(hook, list(specs), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            msg = f"{who}: method {attr!r} is marked @hookimpl, but dpcore has no hook {hook!r} (hooks: {', '.join(specs)}){hint}"
            raise PolicyDefinitionError(msg)
        allowed = list(inspect.signature(specs[hook]).parameters)
        try:
            params = inspect.signature(method).parameters.values()
        except (TypeError, ValueError):
            continue
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                msg = f"{who}: hook {hook} takes *{p.name}; name the arguments it uses, from: {', '.join(allowed)}"
                raise PolicyDefinitionError(msg)
            if p.default is p.empty and p.name not in allowed:
                msg = f"{who}: hook {hook} takes argument {p.name!r}, which dpcore does not pass; its arguments are: {', '.join(allowed)}"
                raise PolicyDefinitionError(msg)


def _trace(pm: pluggy.PluginManager, log: Any) -> None:
    """``DPCORE_TRACE_HOOKS``: log every hook call and result at debug level."""

    def before(hook_name: str, impls: object, kwargs: Mapping[str, Any]) -> None:
        log.debug("hook_call", hook=hook_name, impls=[i.plugin_name for i in impls])  # type: ignore[attr-defined]

    def after(outcome: Any, hook_name: str, impls: object, kwargs: object) -> None:
        log.debug("hook_result", hook=hook_name, result=repr(outcome.get_result()))

    pm.add_hookcall_monitoring(before, after)


#: What :meth:`PolicyManager.adopt` takes from the new chain; every other attribute (the
#: ledger, the cache index, the context) stays. A new attribute of the manager belongs here
#: when it depends on the chain (tests/test_swap.py checks that each one is classified).
CHAIN_STATE = (
    "chain", "policies", "resolution", "pm", "core",
    "_select", "_on_dispatch", "_on_load_report", "_on_rank_state", "_select_calls", "_dispatch_calls", "_policy_calls",
)  # fmt: skip


class PolicyManager:
    """Runs a policy chain through the dpcore hooks and keeps the shared ledger.

    Build one with :meth:`from_method` (entry points) or the constructor (already
    instantiated policies, e.g. in tests).

    :param ctx: The context every policy sees.
    :param policies: ``(name, instance)`` pairs in chain order.
    :param resolution: How the chain was chosen, for ``--dry-run`` and logs.
    """

    def __init__(
        self,
        ctx: PolicyContext,
        policies: Sequence[tuple[str, object]],
        resolution: Resolution | None = None,
        ledger: LoadLedger | None = None,
    ) -> None:
        self.ctx = ctx
        #: The ledger itself (policies see it read-only, as ``ctx.ledger``).
        self.ledger: LoadLedger = ledger if ledger is not None else _owner(ctx.ledger)
        #: The writable cache index behind ``ctx.cache`` (fed by the controller's KV events).
        self.cache = ctx.cache._index
        self.chain = tuple(name for name, _ in policies)
        self.policies = dict(policies)
        self.resolution = resolution or Resolution(
            requested=",".join(self.chain), chain=self.chain, reason="given"
        )
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        self.core = CoreHooks()
        pm.register(self.core, name=CORE_PLUGIN_NAME)
        # pluggy calls the most recently registered implementation first, so register the
        # chain back to front: chain[0] answers first.
        for name, obj in reversed(policies):
            check_hooks(name, obj)
            try:
                pm.register(obj, name=f"policy:{name}")
            except (ValueError, pluggy.PluginValidationError) as exc:
                msg = f"policy {name!r} could not be registered: {exc}"
                raise PolicyDefinitionError(msg) from exc
            callers = {c.name for c in (pm.get_hookcallers(obj) or [])}
            if "select_rank" not in callers:
                msg = (
                    f"policy {name!r} ({type(obj).__qualname__}) implements no select_rank "
                    "hook; did you forget @dpcore.hookimpl?"
                )
                raise PolicyDefinitionError(msg)
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            msg = f"a policy implements a hook dpcore does not define: {exc}"
            raise PolicyDefinitionError(msg) from exc
        traced = bool(os.environ.get("DPCORE_TRACE_HOOKS"))
        if traced:
            _trace(pm, ctx.log)
        self.pm = pm
        # Bound callers, looked up once: this is the hot path.
        self._select = pm.hook.select_rank
        self._on_dispatch = pm.hook.on_dispatch
        self._on_load_report = pm.hook.on_load_report
        self._on_rank_state = pm.hook.on_rank_state
        self.ledger.on_state = self.rank_state
        # The chain is fixed once built, so the two per-request hooks can call their
        # implementations directly, in pluggy's order and with pluggy's argument binding,
        # without its per-call machinery (about 1.5 µs a request). Hook tracing, wrappers
        # and a pluggy that does not work as the fast path expects use pluggy's own path.
        self._select_calls = None if traced else direct_calls(self._select)
        self._dispatch_calls = None if traced else direct_calls(self._on_dispatch)
        # The policies after the core hook, when it is asked first: for a request no router
        # placed, with an active rank, the core hook answers nothing, so it need not be asked.
        calls = self._select_calls
        self._policy_calls = calls[1:] if calls and calls[0] == self.core.select_rank else None
        if not traced and not fast_path_ok():
            ctx.log.warning("pluggy_fast_path_off", pluggy=getattr(pluggy, "__version__", "?"))

    @property
    def needs_block_hashes(self) -> bool:
        """Whether a policy in the chain declares it reads ``Request.block_hashes``
        (:data:`dpcore.policy.NEEDS_BLOCK_HASHES`); senders may skip hashing otherwise."""
        return policy.needs_block_hashes(self.policies)

    @property
    def places_by_bootstrap_room(self) -> bool:
        """Whether the chain's first policy declares :data:`dpcore.policy.PLACES_BY_BOOTSTRAP_ROOM`
        (it decides every request it can place, so the chain places PD prefill by room)."""
        return policy.places_by_bootstrap_room(type(self.policies[self.chain[0]]))

    @property
    def fast_path(self) -> bool:
        """Whether hooks are called directly (``False``: through pluggy's own call path)."""
        return self._select_calls is not None

    @classmethod
    def from_method(
        cls,
        method: str = AUTO,
        *,
        dp_size: int,
        disaggregation_mode: str | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        ledger: LoadLedger | None = None,
        log: Any = None,
        classes: Mapping[str, type] | None = None,
        ctx: PolicyContext | None = None,
    ) -> PolicyManager:
        """Resolve *method* and load only the policies it names.

        :param options: Per-policy constructor options, ``{"cache_aware": {"balance_abs": 32}}``.
        :param classes: Policy classes by name to use instead of entry points (tests).
        :param ctx: The context to build the policies with (a hot swap builds the new chain
            with the running controller's); default: a new one on *ledger*.
        """
        resolution = resolve(method, disaggregation_mode)
        owner = ledger if ledger is not None else LoadLedger(dp_size)
        if ctx is None:
            ctx = PolicyContext(
                dp_size=dp_size,
                disaggregation_mode=normalize_mode(disaggregation_mode),
                ledger=LedgerView(owner),
                log=log if log is not None else structlog.get_logger("dpcore"),
            )
        options = dict(options or {})
        unknown_opts = set(options) - set(resolution.chain)
        if unknown_opts:
            msg = (
                f"options given for {sorted(unknown_opts)}, which are not in the chain "
                f"{list(resolution.chain)}"
            )
            raise PolicyOptionError(msg)
        context = f" (from --load-balance-method {method!r}: {resolution.reason})"
        loaded = []
        for name in resolution.chain:
            if classes is not None and name in classes:
                policy_cls = classes[name]
            else:
                policy_cls = discovery.load_policy_class(name, context if name != method else "")
            loaded.append((name, _instantiate(name, policy_cls, ctx, options.get(name, {}))))
        return cls(ctx, loaded, resolution, ledger=owner)

    # ------------------------------------------------------------------ hot path

    def select(self, request: Request) -> int:
        """The rank for *request*; raises a :class:`RequestRejected` subclass otherwise."""
        ctx = self.ctx
        ledger = self.ledger
        d = ctx.decision
        d.policy = d.reason = ""
        d.scores = None
        try:
            calls = self._policy_calls
            if (
                calls is None
                or request.routed_dp_rank is not None
                or request.data_parallel_rank is not None
                or not ledger._active_ranks
            ):
                calls = self._select_calls
            if calls is None:
                rank = self._select(request=request, ctx=ctx)
            else:
                rank = None
                for call in calls:
                    rank = call(request, ctx)
                    if rank is not None:
                        break
        except RequestRejected as exc:
            if exc.rid is None:
                exc.rid = request.rid
            raise
        except Exception as exc:
            who = ctx.decision.policy or "/".join(self.chain)
            msg = f"policy {who} failed on request {request.rid!r}: {exc!r}"
            ctx.log.error("policy_failed", policy=who, rid=request.rid, error=repr(exc))
            raise PolicyFailedError(msg, rid=request.rid) from exc
        if rank is None:
            msg = (
                f"no policy in the chain {list(self.chain)} chose a rank for request "
                f"{request.rid!r}; end the chain with a policy that always answers, e.g. 'auto'"
            )
            raise NoRankSelectedError(msg, rid=request.rid)
        if type(rank) is not int or not 0 <= rank < ledger.dp_size or not ledger._active[rank]:
            who = d.policy or "/".join(self.chain)
            msg = f"policy {who} returned {rank!r}, not an active rank {list(ledger._active_ranks)}"
            raise PolicyFailedError(msg, rid=request.rid)
        if not d.policy and len(self.chain) == 1:
            d.policy = self.chain[0]
            d.reason = "selected"
        return rank

    def dispatched(self, request: Request, rank: int) -> int:
        """Count *request* on *rank* in the ledger, then call ``on_dispatch``.

        Returns the dispatch sequence number the ledger gave it.
        """
        seq = self.ledger.record_dispatch(rank, request.num_tokens)
        calls = self._dispatch_calls
        if calls is None or calls:
            try:
                if calls is None:
                    self.notify_dispatch(request, rank, seq)
                else:  # notify_dispatch's direct path, inlined: this runs for every request
                    ctx = self.ctx
                    for call in calls:
                        call(request, rank, seq, ctx)
            except Exception as exc:  # the request is already on its way; only log
                self.ctx.log.error("on_dispatch_failed", rid=request.rid, rank=rank, error=repr(exc))
        return seq

    def notify_dispatch(self, request: Request, rank: int, seq: int) -> None:
        """Call ``on_dispatch`` without counting anything in the ledger (a shadow chain is
        told where the live chain sent a request); raises what a policy raised."""
        calls = self._dispatch_calls
        if calls is None:
            self._on_dispatch(request=request, rank=rank, seq=seq, ctx=self.ctx)
        else:
            ctx = self.ctx
            for call in calls:
                call(request, rank, seq, ctx)

    def route(self, request: Request) -> int:
        """:meth:`select` then :meth:`dispatched`; for callers that send after choosing."""
        rank = self.select(request)
        self.dispatched(request, rank)
        return rank

    def report(self, report: LoadReport) -> bool:
        """Apply *report* to the ledger and, if it was newer, call ``on_load_report``."""
        if not self.ledger.apply_report(report):
            return False
        try:
            self._on_load_report(report=report, ctx=self.ctx)
        except Exception as exc:
            self.ctx.log.error("on_load_report_failed", rank=report.rank, error=repr(exc))
        return True

    def rank_state(self, rank: int, active: bool, epoch: int | None, new_life: bool) -> None:
        """Tell the policies that *rank* went inactive, came back, or restarted (the
        ledger calls this on every such change)."""
        self.ctx.log.debug("rank_state", rank=rank, active=active, epoch=epoch, new_life=new_life)
        if not active:
            self.cache.reset(rank)
        elif new_life:
            self.cache.new_life(rank, epoch)
        try:
            self._on_rank_state(rank=rank, active=active, epoch=epoch, new_life=new_life, ctx=self.ctx)
        except Exception as exc:
            self.ctx.log.error("on_rank_state_failed", rank=rank, error=repr(exc))

    # ------------------------------------------------------------------ hot swap

    def adopt(self, other: PolicyManager) -> None:
        """Serve with *other*'s chain from the next decision on (call on the loop thread).

        The ledger, the cache index and the context stay this manager's, so loads, liveness
        and rank lives carry over; *other* must have been built with this manager's context
        (:meth:`from_method` with ``ctx=``). See :mod:`dpcore.runtime.swap`.
        """
        if other.ctx.dp_size != self.ctx.dp_size:
            msg = f"a chain built for dp_size {other.ctx.dp_size} cannot serve dp_size {self.ctx.dp_size}"
            raise PolicyDefinitionError(msg)
        other.core.deprecated_seen = self.core.deprecated_seen
        for name in CHAIN_STATE:
            setattr(self, name, getattr(other, name))

    @property
    def last_decision(self) -> Any:
        """The :class:`~dpcore.model.Decision` of the last :meth:`select` call."""
        return self.ctx.decision

    def describe(self) -> dict[str, Any]:
        """The resolved chain, for ``--dry-run``, ``/server_info`` and logs."""
        infos = discovery.available()
        return {
            "requested": self.resolution.requested,
            "chain": list(self.chain),
            "reason": self.resolution.reason,
            "dp_size": self.ctx.dp_size,
            "disaggregation_mode": self.ctx.disaggregation_mode,
            "policies": [
                {
                    "name": n,
                    "dist": infos[n].dist if n in infos else None,
                    "version": infos[n].version if n in infos else None,
                    "class": f"{type(o).__module__}.{type(o).__qualname__}",
                }
                for n, o in self.policies.items()
            ],
        }
