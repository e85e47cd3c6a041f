"""Frozen value types passed to hooks.

Policies receive these and cannot mutate them. Everything that changes over time (loads,
liveness) lives in :class:`dpcore.ledger.LoadLedger`, reached through
:attr:`PolicyContext.ledger`.
"""

from __future__ import annotations

from collections.abc import Mapping
from operator import attrgetter
from typing import TYPE_CHECKING, Any

import attrs
from attrs import field, frozen

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from dpcore.cacheindex import CacheView
    from dpcore.ledgerview import LedgerView

DISAGGREGATION_MODES = ("null", "prefill", "decode")


@frozen
class Request:
    """What a policy sees of one request.

    :ivar rid: Request id, unique per sender.
    :ivar num_tokens: Prompt length in tokens.
    :ivar block_hashes: Chained hashes of the prompt's fixed-size token blocks
        (see :func:`dpcore.hashing.block_hashes`); empty when the sender did not compute them.
    :ivar bootstrap_room: PD bootstrap room, when a PD router set one.
    :ivar routed_dp_rank: Rank assigned by a router in front; beats every policy.
    :ivar data_parallel_rank: Deprecated spelling of ``routed_dp_rank``.
    :ivar disagg_prefill_dp_rank: For decode: the prefill rank that holds this request's KV.
    :ivar max_new_tokens: Expected output length, when known (a decode-pressure hint).
    """

    rid: str
    num_tokens: int = 0
    block_hashes: tuple[int, ...] = ()
    bootstrap_room: int | None = None
    routed_dp_rank: Any = None
    data_parallel_rank: Any = None
    disagg_prefill_dp_rank: Any = None
    max_new_tokens: int | None = None


def _request_maker() -> Any:
    # attrs' __init__ for a frozen class sets each field through a bound object.__setattr__;
    # the slots' own descriptors do the same assignment with less call overhead.
    new = object.__new__
    (s0, s1, s2, s3, s4, s5, s6, s7) = (getattr(Request, a.name).__set__ for a in attrs.fields(Request))

    def make_request(
        rid: str,
        num_tokens: int,
        block_hashes: tuple[int, ...],
        bootstrap_room: int | None,
        routed_dp_rank: Any,
        data_parallel_rank: Any,
        disagg_prefill_dp_rank: Any,
        max_new_tokens: int | None,
    ) -> Request:
        """``Request(...)`` with every field given, in field order, built faster (for the
        per-request paths of the controller and the adapters)."""
        r = new(Request)
        s0(r, rid)
        s1(r, num_tokens)
        s2(r, block_hashes)
        s3(r, bootstrap_room)
        s4(r, routed_dp_rank)
        s5(r, data_parallel_rank)
        s6(r, disagg_prefill_dp_rank)
        s7(r, max_new_tokens)
        return r

    return make_request


make_request = _request_maker()


@frozen
class LoadReport:
    """A rank's own view of its load, as of the moment it sent the report.

    :ivar rank: The reporting rank.
    :ivar epoch: Identifies one life of the rank's process; a new epoch (a restart) resets
        the report sequence.
    :ivar seq: Report sequence number, increasing per rank; an older report is ignored.
    :ivar acked_seq: Last dispatch sequence number the rank has admitted (``-1``: none).
        Dispatches after it are not in this report, and the ledger keeps counting them.
    :ivar num_running: Requests in the running batch.
    :ivar num_waiting: Requests admitted but queued.
    :ivar num_tokens: Tokens held: KV in use plus prompts of waiting requests.
    :ivar kv_used: KV cache tokens in use.
    :ivar kv_capacity: KV cache capacity in tokens (0: unknown).
    :ivar prefill_tokens: Prompt tokens the rank is still computing for requests whose
        prefill has started (uncached part only); ``-1`` when the engine does not say.
        Waiting requests are not included: they are counted by ``num_waiting``.
    """

    rank: int
    epoch: int = 0
    seq: int = 0
    acked_seq: int = -1
    num_running: int = 0
    num_waiting: int = 0
    num_tokens: int = 0
    kv_used: int = 0
    kv_capacity: int = 0
    prefill_tokens: int = -1

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting


@frozen
class Resolution:
    """The policy chain a ``--load-balance-method`` value resolved to, and why."""

    requested: str
    chain: tuple[str, ...]
    reason: str


@frozen
class PolicyInfo:
    """An installed policy, described without importing it."""

    name: str
    value: str
    dist: str | None
    version: str | None
    summary: str


@attrs.define(slots=True)
class Decision:
    """Why the last rank was chosen; policies fill it through :meth:`PolicyContext.explain`.

    Mutable on purpose: one instance per controller is reused for every decision, so
    explaining costs no allocation when nobody reads it.
    """

    policy: str = ""
    reason: str = ""
    scores: Mapping[str, Any] | None = None

    def clear(self) -> None:
        self.policy = ""
        self.reason = ""
        self.scores = None


def _check_dp_size(_inst: object, _attr: object, value: int) -> None:
    if type(value) is not int or value < 1:
        msg = f"dp_size must be a positive integer, got {value!r}"
        raise ValueError(msg)


def _empty_cache(dp_size: int) -> CacheView:
    from dpcore.cacheindex import CacheIndex  # (a core module that imports this one)

    return CacheIndex(dp_size).view


@frozen
class PolicyContext:
    """The only view a policy has of the controller.

    :ivar dp_size: Number of data-parallel ranks.
    :ivar disaggregation_mode: ``"null"``, ``"prefill"`` or ``"decode"``.
    :ivar ledger: The shared load ledger, read-only (:class:`~dpcore.ledgerview.LedgerView`):
        loads and liveness of every rank.
    :ivar log: A structlog logger; per-request events belong at debug level.
    :ivar decision: Scratch record of the current decision (see :meth:`explain`).
    :ivar cache: What each rank's cache holds, exactly, for ranks that publish KV events
        (read-only; see :mod:`dpcore.cacheindex`): ``cache.match(rank, block_hashes)`` is
        the number of leading blocks cached there, or ``None`` when the rank is unknown.
    """

    dp_size: int = field(validator=_check_dp_size)
    disaggregation_mode: str
    ledger: LedgerView
    log: FilteringBoundLogger
    decision: Decision = field(factory=Decision)
    cache: CacheView = field(default=attrs.Factory(lambda self: _empty_cache(self.dp_size), takes_self=True))

    # The ledger's cached tuple, through a C-level getter: policies read it on every decision.
    active_ranks = property(
        attrgetter("ledger.active_ranks"),
        doc="Ranks currently alive, ascending. Every policy must choose among these.",
    )

    def is_active(self, rank: int) -> bool:
        return self.ledger.is_active(rank)

    # The ledger's clock itself, through a C-level getter: policies read it on every decision.
    now = property(
        attrgetter("ledger.now"),
        doc=(
            "``now()``: current time in seconds; simulated time under ``dpcore simulate``. Policies "
            "must use this, never ``time.time()``, so they behave the same in the simulator and live."
        ),
    )

    def explain(self, policy: str, reason: str, scores: Mapping[str, Any] | None = None) -> None:
        """Record why *policy* chose as it did; metrics count ``reason`` per policy.

        ``reason`` must come from a small fixed set (it becomes a metric label);
        ``scores`` may hold anything useful for ``--explain`` and debug logs.
        """
        d = self.decision
        d.policy = policy
        d.reason = reason
        d.scores = scores
