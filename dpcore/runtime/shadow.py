"""A shadow policy chain: decides every request beside the live chain and never dispatches.

``dpcore serve --shadow-policy NAME`` runs a second chain (any ``--load-balance-method``
string) on the controller's loop. For each request the live chain placed, the shadow is
asked on exactly the state the live chain was asked on (the same ledger, before the request
is counted in it), then told what actually happened: its ``on_dispatch`` gets the live rank
and dispatch seq, its ``on_load_report`` every report the ledger applies, its
``on_rank_state`` every rank change. So its private state follows the real cluster, and what
it would have done is measured against what was done:

* agreement: how often it chose the live rank;
* the load it would have produced: requests, prompt tokens and claimed prefix blocks per rank
  (``matched_blocks`` from its explanation, e.g. cache_aware's), beside the live chain's;
* its decisions by ``(policy, reason)``, and the requests it would have rejected, by code.

**Cost bound.** The shadow runs on the loop thread, between the live decision and the moment
the request is staged: a request's frames leave with the rest of its loop turn's batch, after
every decision of the batch, so the shadow adds its own decision time to that batch and
nothing else. Its time is measured per decision; a decision over ``--shadow-budget-ms`` is an
overrun. A shadow that raises is caught and counted. After :data:`MAX_STRIKES` overruns or
errors within :data:`STRIKE_WINDOW` decisions, or one decision over :data:`HARD_FACTOR` times
the budget, it is suspended for the rest of the run (logged with the reason, shown in the
report): a shadow can never fail a live request, and a slow one costs a bounded number of
budgets before it stops costing anything.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import structlog

from dpcore.errors import ConfigError, PolicyFailedError, RequestRejected
from dpcore.ledger import LoadLedger
from dpcore.ledgerview import LedgerView
from dpcore.manager import PolicyManager
from dpcore.model import Decision, LoadReport, Request

#: Default time budget of one shadow decision (``--shadow-budget-ms``).
BUDGET_S = 0.005
#: Overruns plus errors within :data:`STRIKE_WINDOW` decisions that suspend the shadow.
MAX_STRIKES = 10
STRIKE_WINDOW = 1000
#: One decision this many budgets long suspends the shadow at once.
HARD_FACTOR = 50
#: Distinct (policy, reason) pairs counted; beyond it they count as reason "other".
MAX_REASONS = 64


class Shadow:
    """The shadow chain and what it would have done.

    :param live: The live manager (its ledger, cache index and context are shared read-only).
    :param method: The shadow chain, as ``--load-balance-method``.
    :param options: Per-policy constructor options.
    :param budget_s: Time budget of one decision (> 0).
    :param clock: What times each shadow call, in seconds (a test passes a clock it moves
        itself, so its shadow's verdict does not depend on the machine's load).
    """

    def __init__(
        self,
        live: PolicyManager,
        method: str,
        options: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        budget_s: float = BUDGET_S,
        classes: Mapping[str, type] | None = None,
        log: Any = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not 0 < budget_s < float("inf"):
            raise ConfigError(f"--shadow-budget-ms must be a positive number, got {budget_s * 1000:g}")
        self.log = log if log is not None else structlog.get_logger("dpcore.shadow")
        # Its own decision record and view of the shared ledger; its own (unused) ledger, so
        # the shadow's manager never records a dispatch.
        self.ctx = attrs.evolve(live.ctx, ledger=LedgerView(live.ledger), decision=Decision(), log=self.log)
        self.manager = PolicyManager.from_method(
            method, dp_size=live.ctx.dp_size, disaggregation_mode=live.ctx.disaggregation_mode, options=options,
            ledger=LoadLedger(live.ctx.dp_size), ctx=self.ctx, classes=classes,
        )  # fmt: skip
        self.live = live
        self.budget_s = budget_s
        self.clock = clock
        self.method = method
        n = live.ctx.dp_size
        self.decisions = 0
        self.agreed = 0
        self.errors = 0
        self.overruns = 0
        #: Requests not shown to the shadow because it was suspended.
        self.skipped = 0
        self.seconds = 0.0
        self.max_seconds = 0.0
        #: Per rank, what the shadow would have sent and what the live chain sent.
        self.requests = [0] * n
        self.tokens = [0] * n
        self.matched = [0] * n
        self.live_requests = [0] * n
        self.live_tokens = [0] * n
        self.live_matched = [0] * n
        self.reasons: dict[tuple[str, str], int] = {}
        self.rejected: dict[str, int] = {}
        #: Why the shadow stopped, or ``None`` while it runs.
        self.suspended: str | None = None
        self._strikes = 0
        self._window_end = STRIKE_WINDOW
        self._asked = False  # the shadow decided the request being placed

    def attach(self) -> None:
        """Start following the live ledger: rank changes reach the shadow after the live chain
        (the controller calls this when it takes the shadow), and what the live chain already
        knows is replayed into it."""
        ledger = self.live.ledger
        before = ledger.on_state

        def on_state(rank: int, active: bool, epoch: int | None, new_life: bool) -> None:
            if before is not None:
                before(rank, active, epoch, new_life)
            self.rank_state(rank, active, epoch, new_life)

        ledger.on_state = on_state
        self._warm()

    def _warm(self) -> None:
        """What the live chain already knows, for a shadow started on a running ledger."""
        ledger = self.live.ledger
        for r in range(ledger.dp_size):
            if not ledger.is_active(r) or ledger.epoch(r) is not None:
                self.rank_state(r, ledger.is_active(r), ledger.epoch(r), False)
        for report in ledger.reports:
            if report is not None:
                self.report(report)

    # ------------------------------------------------------------------ loop thread

    def decide(self, request: Request, live_rank: int) -> None:
        """Ask the shadow where *request* would go; the live chain chose *live_rank*."""
        self._asked = False
        if self.suspended is not None:
            self.skipped += 1
            return
        live_scores = self.live.ctx.decision.scores
        clock = self.clock
        t0 = clock()
        try:
            rank: int | None = self.manager.select(request)
        except PolicyFailedError as exc:
            self._took(clock() - t0)
            self._error("select_rank", exc.__cause__ or exc)
            return
        except RequestRejected as exc:
            rank = None
            self.rejected[exc.code] = self.rejected.get(exc.code, 0) + 1
        self._took(clock() - t0)
        self._asked = True
        self.decisions += 1
        tokens = request.num_tokens
        self.live_requests[live_rank] += 1
        self.live_tokens[live_rank] += tokens
        self.live_matched[live_rank] += _matched(live_scores)
        if rank is None:
            return
        d = self.ctx.decision
        key = (d.policy, d.reason)
        if key not in self.reasons and len(self.reasons) >= MAX_REASONS:
            key = (d.policy, "other")
        self.reasons[key] = self.reasons.get(key, 0) + 1
        self.requests[rank] += 1
        self.tokens[rank] += tokens
        self.matched[rank] += _matched(d.scores)
        if rank == live_rank:
            self.agreed += 1

    def dispatched(self, request: Request, rank: int, seq: int) -> None:
        """The live chain's request went to *rank* as dispatch *seq*: tell the shadow."""
        if not self._asked or self.suspended is not None:
            return
        self._asked = False
        t0 = self.clock()
        try:
            self.manager.notify_dispatch(request, rank, seq)
        except Exception as exc:
            self._error("on_dispatch", exc)
        self.seconds += self.clock() - t0

    def report(self, report: LoadReport) -> None:
        """The ledger applied *report*."""
        if self.suspended is not None:
            return
        try:
            self.manager.pm.hook.on_load_report(report=report, ctx=self.ctx)
        except Exception as exc:
            self._error("on_load_report", exc)

    def rank_state(self, rank: int, active: bool, epoch: int | None, new_life: bool) -> None:
        if self.suspended is not None:
            return
        try:
            self.manager.pm.hook.on_rank_state(rank=rank, active=active, epoch=epoch, new_life=new_life, ctx=self.ctx)
        except Exception as exc:
            self._error("on_rank_state", exc)

    # ------------------------------------------------------------------ the bound

    def _took(self, seconds: float) -> None:
        self.seconds += seconds
        if seconds > self.max_seconds:
            self.max_seconds = seconds
        if seconds > self.budget_s:
            self.overruns += 1
            if seconds > HARD_FACTOR * self.budget_s:
                self._suspend(f"one decision took {seconds * 1000:.1f} ms, over {HARD_FACTOR} times the "
                              f"{self.budget_s * 1000:g} ms budget")  # fmt: skip
            else:
                self._strike(f"{seconds * 1000:.2f} ms over the {self.budget_s * 1000:g} ms budget")

    def _error(self, hook: str, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            self.log.warning("shadow_policy_error", hook=hook, error=repr(exc), count=self.errors)
        self._strike(f"{hook} raised {type(exc).__name__}: {exc}")

    def _strike(self, what: str) -> None:
        if self.decisions >= self._window_end:
            self._strikes = 0
            self._window_end = self.decisions + STRIKE_WINDOW
        self._strikes += 1
        if self._strikes >= MAX_STRIKES:
            self._suspend(f"{self._strikes} overruns or errors within {STRIKE_WINDOW} decisions (last: {what})")

    def _suspend(self, why: str) -> None:
        if self.suspended is None:
            self.suspended = why
            self.log.warning("shadow_suspended", chain=list(self.manager.chain), reason=why, decisions=self.decisions,
                             errors=self.errors, overruns=self.overruns)  # fmt: skip

    # ------------------------------------------------------------------ reading

    def summary(self) -> dict[str, Any]:
        """Everything the report and the metrics show (msgpack-able); read on the loop thread."""
        n = self.decisions
        return {
            "chain": list(self.manager.chain),
            "requested": self.method,
            "live_chain": list(self.live.chain),
            "decisions": n,
            "agreed": self.agreed,
            "agreement": round(self.agreed / n, 6) if n else None,
            "errors": self.errors,
            "overruns": self.overruns,
            "skipped": self.skipped,
            "budget_ms": self.budget_s * 1000,
            "us_per_decision": round(self.seconds / n * 1e6, 2) if n else None,
            "max_decision_us": round(self.max_seconds * 1e6, 1),
            "suspended": self.suspended,
            "per_rank": [
                {"rank": r, "shadow_requests": self.requests[r], "live_requests": self.live_requests[r],
                 "shadow_prompt_tokens": self.tokens[r], "live_prompt_tokens": self.live_tokens[r],
                 "shadow_matched_blocks": self.matched[r], "live_matched_blocks": self.live_matched[r]}
                for r in range(len(self.requests))
            ],  # fmt: skip
            "reasons": [[p, r, c] for (p, r), c in sorted(self.reasons.items())],
            "rejected": dict(self.rejected),
        }


def _matched(scores: Mapping[str, Any] | None) -> int:
    """Prefix blocks a decision claims to hit (its explanation's ``matched_blocks``)."""
    if not scores:
        return 0
    m = scores.get("matched_blocks")
    return m if type(m) is int and m > 0 else 0


class ShadowCollector:
    """Prometheus families of a :class:`Shadow`, read on the controller's loop thread."""

    def __init__(self, shadow: Shadow, on_loop: Any) -> None:
        self.shadow = shadow
        self.on_loop = on_loop

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.on_loop(self.shadow.summary)
        yield CounterMetricFamily("dpcore_shadow_decisions", "Requests the shadow chain decided", value=s["decisions"])
        yield CounterMetricFamily("dpcore_shadow_agreements", "Shadow decisions equal to the live rank", value=s["agreed"])
        yield GaugeMetricFamily("dpcore_shadow_agreement_ratio", "Shadow decisions equal to the live rank, over all",
                                value=s["agreement"] if s["agreement"] is not None else 0.0)  # fmt: skip
        for key, doc in (("requests", "Requests"), ("prompt_tokens", "Prompt tokens"),
                         ("matched_blocks", "Prefix blocks claimed")):  # fmt: skip
            fam = CounterMetricFamily(f"dpcore_shadow_rank_{key}", f"{doc} per rank, by the shadow and by the live chain",
                                      labels=["rank", "chain"])  # fmt: skip
            for row in s["per_rank"]:
                fam.add_metric([str(row["rank"]), "shadow"], row[f"shadow_{key}"])
                fam.add_metric([str(row["rank"]), "live"], row[f"live_{key}"])
            yield fam
        dec = CounterMetricFamily("dpcore_shadow_reasons", "Shadow decisions by policy and reason", labels=["policy", "reason"])
        for policy, reason, n in s["reasons"]:
            dec.add_metric([policy or "none", reason or "none"], n)
        yield dec
        yield CounterMetricFamily("dpcore_shadow_errors", "Shadow hook calls that raised", value=s["errors"])
        yield CounterMetricFamily("dpcore_shadow_overruns", "Shadow decisions over --shadow-budget-ms", value=s["overruns"])
        yield CounterMetricFamily("dpcore_shadow_skipped", "Requests not shown to a suspended shadow", value=s["skipped"])
        yield CounterMetricFamily("dpcore_shadow_seconds", "Time spent in the shadow chain", value=self.shadow.seconds)
        yield GaugeMetricFamily("dpcore_shadow_suspended", "1 once the shadow was suspended", value=int(bool(s["suspended"])))


def add_arguments(p: Any) -> None:
    """``dpcore serve``'s shadow flags."""
    g = p.add_argument_group("shadow policy")
    g.add_argument("--shadow-policy", default=None, metavar="NAME[,NAME...]",
                   help="also decide every request with this chain, never dispatching; see dpcore shadow-report")  # fmt: skip
    g.add_argument("--shadow-policy-option", action="append", default=[], metavar="POLICY.OPTION=VALUE",
                   help="constructor option for a policy in the shadow chain; repeatable")  # fmt: skip
    g.add_argument("--shadow-budget-ms", type=float, default=BUDGET_S * 1000, metavar="MS",
                   help="a shadow decision longer than this is an overrun; repeated overruns or errors suspend "
                        "the shadow (default %(default)g)")  # fmt: skip

