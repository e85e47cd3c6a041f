"""Test helpers for policy authors: drive a policy through the hooks, no sockets.

Example::

    from dpcore.testing import PolicyHarness

    def test_prefers_idle_rank():
        h = PolicyHarness("total_requests", dp_size=2)
        h.report(0, num_running=5)
        h.report(1, num_running=0)
        assert h.select(num_tokens=100) == 1

The harness uses the real :class:`~dpcore.manager.PolicyManager` and
:class:`~dpcore.ledger.LoadLedger`, exactly as the controller and the simulator do.
"""

from __future__ import annotations

import inspect
import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dpcore.hookspecs import hookimpl
from dpcore.ledger import LoadLedger
from dpcore.manager import PolicyManager
from dpcore.model import LoadReport, PolicyContext, Request

_rids = itertools.count()


def make_request(rid: str | None = None, **fields: Any) -> Request:
    """A :class:`Request` with a fresh ``rid`` unless one is given."""
    if "block_hashes" in fields:
        fields["block_hashes"] = tuple(fields["block_hashes"])
    return Request(rid=rid if rid is not None else f"req-{next(_rids)}", **fields)


def make_load_report(rank: int, **fields: Any) -> LoadReport:
    """A :class:`LoadReport` for *rank*; unspecified loads are zero."""
    return LoadReport(rank=rank, **fields)


class PolicyHarness:
    """A policy chain with its own ledger, fed by hand.

    :param policy: A ``--load-balance-method`` value (entry points are used), a policy class,
        or a sequence of ``(name, class)`` pairs for a chain of classes.
    :param dp_size: Number of ranks.
    :param disaggregation_mode: ``None``, ``"prefill"`` or ``"decode"``.
    :param options: Per-policy options, ``{"name": {...}}``; for a single class, its options.
    """

    def __init__(
        self,
        policy: str | type | Sequence[tuple[str, type]],
        *,
        dp_size: int = 4,
        disaggregation_mode: str | None = None,
        options: Mapping[str, Any] | None = None,
        clock: Any = None,
    ) -> None:
        ledger = LoadLedger(dp_size, clock=clock) if clock else LoadLedger(dp_size)
        classes: dict[str, type] | None = None
        if isinstance(policy, str):
            method = policy
            opts = options
        elif isinstance(policy, type):
            name = getattr(policy, "name", policy.__name__.lower())
            classes = {name: policy}
            method = name
            opts = {name: dict(options or {})}
        else:
            classes = dict(policy)
            method = ",".join(classes)
            opts = options
        self.manager = PolicyManager.from_method(
            method,
            dp_size=dp_size,
            disaggregation_mode=disaggregation_mode,
            options=opts,
            ledger=ledger,
            classes=classes,
        )
        self.ctx: PolicyContext = self.manager.ctx
        self.ledger = ledger
        self.dispatched: Counter[int] = Counter()
        self.tokens: Counter[int] = Counter()
        self._report_seq = [0] * dp_size

    @property
    def policy(self) -> object:
        """The (first) policy instance, for white-box assertions."""
        return self.manager.policies[self.manager.chain[0]]

    def pick(self, request: Request | None = None, **fields: Any) -> int:
        """Ask the chain for a rank without dispatching (no ledger or hook side effects)."""
        return self.manager.select(request or make_request(**fields))

    def select(self, request: Request | None = None, **fields: Any) -> int:
        """Choose a rank and dispatch to it, as the controller does; returns the rank."""
        req = request or make_request(**fields)
        rank = self.manager.select(req)
        self.manager.dispatched(req, rank)
        self.dispatched[rank] += 1
        self.tokens[rank] += req.num_tokens
        return rank

    def select_many(self, requests: Iterable[Request]) -> list[int]:
        return [self.select(r) for r in requests]

    def answer(self, request: Request | None = None, *, policy: str | None = None, **fields: Any) -> int | None:
        """What one policy of the chain answers by itself: a rank, or ``None`` for a pass.

        :meth:`select` and :meth:`pick` ask the whole chain, and raise
        :class:`~dpcore.errors.NoRankSelectedError` when no policy answers. To test that a
        policy passes (lets the next one in the chain decide), ask it alone::

            h = PolicyHarness(MyPolicy, dp_size=2, options={"max_tokens": 64})
            h.report(0, num_tokens=500)
            h.report(1, num_tokens=500)
            assert h.answer(num_tokens=100) is None

        Nothing is dispatched. *policy* names a policy of the chain (default: the first).
        """
        impl = self.manager.policies[policy or self.manager.chain[0]]
        select_rank = impl.select_rank
        offered = {"request": request or make_request(**fields), "ctx": self.ctx}
        wanted = inspect.signature(select_rank).parameters
        return select_rank(**{k: v for k, v in offered.items() if k in wanted})

    def dispatch(self, request: Request, rank: int) -> None:
        """Record a dispatch chosen elsewhere (a router), as the controller does."""
        self.manager.dispatched(request, rank)
        self.dispatched[rank] += 1
        self.tokens[rank] += request.num_tokens

    def report(self, rank: int, *, acked_seq: int | None = None, **fields: Any) -> bool:
        """Send a load report from *rank*.

        ``seq`` increases by itself; ``acked_seq`` defaults to everything dispatched so far
        (the rank admitted all of it). Returns whether the ledger applied it.
        """
        if "seq" not in fields:
            self._report_seq[rank] += 1
            fields["seq"] = self._report_seq[rank]
        if acked_seq is None:
            acked_seq = self.ledger.next_dispatch_seq(rank) - 1
        return self.manager.report(LoadReport(rank=rank, acked_seq=acked_seq, **fields))

    def kill(self, rank: int) -> None:
        """Mark *rank* inactive, as the controller does when it misses its heartbeat."""
        self.ledger.set_active(rank, False)

    def revive(self, rank: int) -> None:
        self.ledger.heard_from(rank)


class FakePolicy:
    """Always answers a fixed rank (or ``None``); for tests of chains and discovery."""

    name = "fake"

    def __init__(self, ctx: PolicyContext, rank: int | None = 0) -> None:
        self.rank = None if rank is None else int(rank)
        self.seen: list[str] = []

    @hookimpl
    def select_rank(self, request: Request, ctx: PolicyContext) -> int | None:
        self.seen.append(request.rid)
        return self.rank


def fake_entry_points(monkeypatch: Any, mapping: Mapping[str, str], roles: Mapping[str, str] | None = None) -> None:
    """Make discovery see exactly *mapping* (``{"name": "module:Class"}``) as installed.

    *roles* (``{"auto.null": "name"}``), when given, replaces the installed preset roles
    too; otherwise the installed distributions' roles stay visible.
    """
    from importlib.metadata import EntryPoint

    from dpcore import discovery

    eps = [EntryPoint(name=n, value=v, group=discovery.GROUP) for n, v in mapping.items()]
    monkeypatch.setattr(discovery, "_entry_points", lambda: list(eps))
    if roles is not None:
        reps = [EntryPoint(name=n, value=v, group=discovery.ROLES_GROUP) for n, v in roles.items()]
        monkeypatch.setattr(discovery, "_role_entry_points", lambda: list(reps))
