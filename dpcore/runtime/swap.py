"""Hot policy swap: a running controller changes its policy chain between two decisions.

A swap has two halves:

1. **Build**, on the caller's thread (the status thread for an admin command): resolve the
   ``--load-balance-method`` string, import the policies, check their options against their
   constructors, construct them and register their hooks, exactly as ``dpcore serve`` does at
   start-up. Anything wrong (unknown policy, bad option, a constructor that raises, a hook
   with a bad signature) refuses the swap with a reason code and the message; the running
   chain never noticed.
   Then it is warmed up, still off the loop: ``on_rank_state`` for every rank with its
   liveness and epoch, then ``on_load_report`` with the last report applied for each rank.
2. **Install**, on the controller's loop thread between two messages
   (:meth:`Controller.on_loop <dpcore.runtime.controller.Controller.on_loop>`): what changed
   since the warm-up (a rank lost, a newer report; usually nothing) is told to the new chain,
   then the manager adopts it (:meth:`PolicyManager.adopt <dpcore.manager.PolicyManager.adopt>`).
   The next request is decided by the new chain. A warm-up hook that raises refuses the swap.

The ledger (loads, unacknowledged dispatches, liveness, rank lives) and the exact cache index
built from KV events stay: they belong to the controller, not to a chain. A policy's private
state starts as its constructor leaves it, plus what the warm-up tells it: e.g. cache_aware's
approximate prefix index starts empty and fills from the requests it sees after the swap
(ranks that publish KV events are matched exactly from the first request).

Requests in flight are untouched: a request is decided once, by the chain that was live at
that moment, so no request is lost, sent twice or decided twice. The install costs the loop
a comparison per rank and the adoption, measured and reported as ``install_us``.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from dpcore.errors import (
    ConfigError,
    DpcoreError,
    PolicyDefinitionError,
    PolicyOptionError,
    RemovedPolicyError,
    UnknownPolicyError,
)
from dpcore.ledger import LoadLedger
from dpcore.ledgerview import LedgerView
from dpcore.manager import PolicyManager
from dpcore.model import LoadReport, PolicyContext

if TYPE_CHECKING:
    from dpcore.runtime.controller import Controller

#: Why a swap was refused (the ``reason`` of :class:`SwapRefused`, and a metric label).
UNKNOWN_POLICY = "unknown_policy"
BAD_OPTIONS = "bad_options"
BROKEN_POLICY = "broken_policy"
CONSTRUCTOR_FAILED = "constructor_failed"
INVALID_CHAIN = "invalid_chain"
WARM_START_FAILED = "warm_start_failed"
PD_PAIRING = "pd_pairing"
LOOP_BUSY = "loop_busy"
REASONS = (UNKNOWN_POLICY, BAD_OPTIONS, BROKEN_POLICY, CONSTRUCTOR_FAILED, INVALID_CHAIN, WARM_START_FAILED,
           PD_PAIRING, LOOP_BUSY)  # fmt: skip
#: How long a swap waits for the loop thread to install the new chain.
INSTALL_TIMEOUT_S = 5.0
#: Swaps (done and refused) kept for ``dpcore policy show`` and ``/server_info``.
HISTORY = 16


class SwapRefused(DpcoreError):
    """A swap that did not happen; the running chain keeps serving.

    :ivar reason: One of :data:`REASONS`.
    """

    def __init__(self, reason: str, msg: str) -> None:
        super().__init__(msg)
        self.reason = reason


def _refusal(exc: Exception, method: str) -> SwapRefused:
    if isinstance(exc, (UnknownPolicyError, RemovedPolicyError)):
        return SwapRefused(UNKNOWN_POLICY, str(exc))
    if isinstance(exc, PolicyOptionError):
        return SwapRefused(BAD_OPTIONS, str(exc))
    if isinstance(exc, PolicyDefinitionError):
        return SwapRefused(BROKEN_POLICY, str(exc))
    if isinstance(exc, ConfigError):
        return SwapRefused(INVALID_CHAIN, str(exc))
    return SwapRefused(CONSTRUCTOR_FAILED, f"building {method!r} raised {type(exc).__name__}: {exc}")


def build(live: PolicyManager, method: str, options: Mapping[str, Mapping[str, Any]] | None = None,
          classes: Mapping[str, type] | None = None) -> PolicyManager:  # fmt: skip
    """A new chain for *live*'s controller, built and validated off the loop thread.

    The policies get *live*'s context with a view of its ledger of their own (so building
    never races the loop's reads); the candidate manager gets a ledger of its own too, so
    nothing reaches it before it is installed. Raises :class:`SwapRefused`.
    """
    ctx = attrs.evolve(live.ctx, ledger=LedgerView(live.ledger))
    mode = live.ctx.disaggregation_mode
    try:
        candidate = PolicyManager.from_method(
            method, dp_size=live.ctx.dp_size, disaggregation_mode=mode, options=options,
            ledger=LoadLedger(live.ctx.dp_size), ctx=ctx, classes=classes,
        )  # fmt: skip
    except Exception as exc:  # every way a chain can fail to build refuses the swap
        raise _refusal(exc, method) from exc
    if mode == "prefill" and live.places_by_bootstrap_room != candidate.places_by_bootstrap_room:
        msg = (
            f"PD prefill: the running chain {list(live.chain)} and {list(candidate.chain)} pair requests with "
            "decode differently (by bootstrap_room or through the bootstrap registry); that is fixed at start-up"
        )
        raise SwapRefused(PD_PAIRING, msg)
    return candidate


#: What the warm-up tells a new chain about one rank: (active, epoch, last applied report).
RankState = tuple[bool, "int | None", "LoadReport | None"]


def rank_states(live: PolicyManager) -> list[RankState]:
    """Each rank's liveness, life and last applied report (items read whole, so this is
    safe off the loop thread: at worst one rank is a step behind, and :func:`warm` on the loop
    catches up)."""
    ledger = live.ledger
    reports = ledger.reports
    return [(ledger.is_active(r), ledger.epoch(r), reports[r]) for r in range(ledger.dp_size)]


def warm(candidate: PolicyManager, ctx: PolicyContext, now: list[RankState], told: list[RankState] | None = None) -> None:
    """Tell *candidate*'s policies each rank's state in *now* (``on_rank_state``, then
    ``on_load_report`` with its last report), skipping what they were *told* already.

    A swap warms the new chain off the loop with everything, then again on the loop with what
    changed meanwhile (usually nothing), so the loop pays for a few comparisons. A hook that
    raises refuses the swap (:class:`SwapRefused`).
    """
    hook = "on_rank_state"
    try:
        for r, (active, epoch, _) in enumerate(now):
            if told is None or told[r][:2] != (active, epoch):
                candidate.pm.hook.on_rank_state(rank=r, active=active, epoch=epoch, new_life=False, ctx=ctx)
        hook = "on_load_report"
        for r, (_, _, report) in enumerate(now):
            if report is not None and (told is None or told[r][2] is not report):
                candidate.pm.hook.on_load_report(report=report, ctx=ctx)
    except Exception as exc:
        msg = f"{hook} raised {type(exc).__name__}: {exc} while warming up {list(candidate.chain)}"
        raise SwapRefused(WARM_START_FAILED, msg) from exc


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Swapper:
    """Swaps the chain of a running :class:`~dpcore.runtime.controller.Controller`.

    Thread-safe: swaps are serialized; call :meth:`swap` from any thread but the loop's.

    :param controller: The running controller.
    :param classes: Policy classes by name instead of entry points (tests).
    :param install_timeout_s: How long to wait for the loop to install the chain; past it
        the swap is refused (``loop_busy``) and will not happen later.
    """

    def __init__(self, controller: Controller, *, classes: Mapping[str, type] | None = None,
                 install_timeout_s: float = INSTALL_TIMEOUT_S, log: Any = None) -> None:  # fmt: skip
        self.controller = controller
        self.manager = controller.manager
        self.classes = classes
        self.install_timeout_s = install_timeout_s
        self.log = log if log is not None else structlog.get_logger("dpcore.swap")
        self._lock = threading.Lock()
        #: Swaps by result: ``{"ok": n, "refused": n}``.
        self.counts = {"ok": 0, "refused": 0}
        #: Refused swaps by reason.
        self.refused_by_reason: dict[str, int] = {}
        #: The last :data:`HISTORY` swaps, oldest first.
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)

    def swap(self, method: str, options: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Make *method* (with per-policy *options*) the running chain.

        Returns what happened (``chain``, ``previous``, ``build_ms``, ``install_us``); raises
        :class:`SwapRefused` (the running chain keeps serving).
        """
        with self._lock:
            previous = list(self.manager.chain)
            entry: dict[str, Any] = {"at": _now(), "requested": method, "previous": previous}
            t0 = time.perf_counter()
            try:
                candidate = build(self.manager, method, options, self.classes)
                told = rank_states(self.manager)
                warm(candidate, candidate.ctx, told)  # off the loop: everything known so far
                entry["build_ms"] = round((time.perf_counter() - t0) * 1000, 3)
                entry["install_us"] = round(self._install(candidate, told) * 1e6, 1)
            except SwapRefused as exc:
                entry.update(result="refused", reason=exc.reason, error=str(exc))
                self._record(entry)
                self.log.warning("policy_swap_refused", requested=method, reason=exc.reason, error=str(exc),
                                 chain=previous)  # fmt: skip
                raise
            entry.update(result="ok", chain=list(candidate.chain), reason=candidate.resolution.reason)
            self._record(entry)
            self.log.info("policy_swapped", chain=entry["chain"], previous=previous, requested=method,
                          build_ms=entry["build_ms"], install_us=entry["install_us"], swaps=self.counts["ok"])  # fmt: skip
            return dict(entry)

    def _install(self, candidate: PolicyManager, told: list[RankState]) -> float:
        """On the loop thread: tell *candidate* what changed since *told*, then adopt it;
        returns the seconds the loop spent on it."""
        state: dict[str, Any] = {"phase": "pending"}
        guard = threading.Lock()

        def install() -> None:
            with guard:
                if state["phase"] != "pending":
                    return  # the caller gave up: this swap must not happen late
                state["phase"] = "running"
            t = time.perf_counter()
            try:
                warm(candidate, self.manager.ctx, rank_states(self.manager), told)
                self.manager.adopt(candidate)
            except SwapRefused as exc:  # handed to the caller, never raised in the loop
                state["error"] = exc
            except Exception as exc:
                state["error"] = SwapRefused(BROKEN_POLICY, f"installing {list(candidate.chain)} failed: {exc!r}")
            state["took"] = time.perf_counter() - t

        try:
            self.controller.on_loop(install, self.install_timeout_s)
        except TimeoutError:
            with guard:
                if state["phase"] == "pending":
                    state["phase"] = "abandoned"
                    msg = f"the controller loop did not take the new chain within {self.install_timeout_s:g}s"
                    raise SwapRefused(LOOP_BUSY, msg) from None
            self.controller.on_loop(lambda: None, self.install_timeout_s)  # it started as the wait ended
        if "error" in state:
            raise state["error"]
        return float(state["took"])

    def _record(self, entry: dict[str, Any]) -> None:
        result = entry["result"]
        self.counts[result] += 1
        if result == "refused":
            self.refused_by_reason[entry["reason"]] = self.refused_by_reason.get(entry["reason"], 0) + 1
        self.history.append(entry)

    def info(self) -> dict[str, Any]:
        """For the status snapshot, ``/server_info`` and ``dpcore policy show`` (msgpack-able)."""
        return {
            "chain": list(self.manager.chain),
            "requested": self.manager.resolution.requested,
            "swaps": self.counts["ok"],
            "refused": self.counts["refused"],
            "refused_by_reason": dict(self.refused_by_reason),
            "last": dict(self.history[-1]) if self.history else None,
            "history": [dict(e) for e in self.history],
        }


class SwapCollector:
    """Prometheus families of a :class:`Swapper`: swaps by result and the running chain."""

    def __init__(self, swapper: Swapper) -> None:
        self.swapper = swapper

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.swapper
        fam = CounterMetricFamily("dpcore_policy_swaps", "Policy chain swaps, by result", labels=["result"])
        for result, n in sorted(s.counts.items()):
            fam.add_metric([result], n)
        yield fam
        ref = CounterMetricFamily("dpcore_policy_swaps_refused", "Refused policy swaps, by reason", labels=["reason"])
        for reason, n in sorted(s.refused_by_reason.items()):
            ref.add_metric([reason], n)
        yield ref
        chain = GaugeMetricFamily("dpcore_policy_chain", "The running policy chain (value 1)", labels=["chain"])
        chain.add_metric([",".join(s.manager.chain)], 1)
        yield chain
