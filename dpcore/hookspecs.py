"""The dpcore hook contract: the hooks a policy may implement.

Who calls what, and when (all on the controller's single loop thread, never concurrently):

* :func:`select_rank` once per request that needs a rank, after the controller decoded the
  request header and before anything is sent;
* :func:`on_dispatch` once per request actually sent to a rank, whoever chose the rank
  (a policy, a router in front, or a PD rule);
* :func:`on_load_report` once per load report the ledger accepted (stale reports are dropped
  before any hook sees them);
* :func:`on_rank_state` when a rank goes inactive, comes back, or comes back as a new life.

Hooks are called with keyword arguments; an implementation may take any subset of a spec's
arguments (pluggy's opt-in arguments). Arguments are frozen; loads and liveness are read
through ``ctx``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from dpcore.model import LoadReport, PolicyContext, Request

PROJECT = "dpcore"

#: The hook contract's version, ``(major, minor)``. A plugin written for ``1.x`` keeps
#: working on every later ``1.y``: a minor release only adds hooks or optional arguments
#: (implementations take the subset they name, so an added argument breaks nobody); removing
#: or changing the meaning of a hook, an argument, a ``ctx`` or ledger attribute bumps the
#: major version, with a release of deprecation warnings first.
HOOK_API_VERSION = (1, 0)

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def specs() -> dict[str, Callable[..., Any]]:
    """Every hook this module defines, by name, in definition order."""
    return {n: f for n, f in globals().items() if callable(f) and hasattr(f, f"{PROJECT}_spec")}


# --------------------------------------------------------------------------- placement


@hookspec(firstresult=True)
def select_rank(request: Request, ctx: PolicyContext) -> int | None:
    """Choose the data-parallel rank that serves *request*.

    Called once per request, before it is sent. Policies are asked in chain order
    (``--load-balance-method a,b``: ``a`` first). A built-in implementation runs before every
    policy and answers for requests that carry ``routed_dp_rank`` (or the deprecated
    ``data_parallel_rank``).

    Stops at first non-None result, see pluggy's firstresult.

    :param request: The request to place; frozen.
    :param ctx: Read access to ``dp_size``, ``active_ranks``, the load ledger and a logger.
    :returns: A rank in ``ctx.active_ranks``, or ``None`` to let the next policy in the
        chain answer. When no policy answers, the request is rejected with
        :class:`~dpcore.errors.NoRankSelectedError`. Raise a
        :class:`~dpcore.errors.RequestRejected` subclass to reject this request only.
    """


# --------------------------------------------------------------------------- accounting


@hookspec
def on_dispatch(request: Request, rank: int, seq: int, ctx: PolicyContext) -> None:
    """*request* was sent to *rank*.

    Called once per dispatched request, after the shared ledger counted it, whoever chose
    the rank (policy, router-assigned ``routed_dp_rank``, PD rule). Keep per-policy state
    here, e.g. a prefix index. The return value is ignored; an exception is logged
    (``on_dispatch_failed``) and the request still goes.

    :param request: The request that was sent; frozen.
    :param rank: The rank it went to.
    :param seq: Its dispatch sequence number on *rank* (0, 1, 2... per rank and ledger).
        Load reports acknowledge dispatches by this number
        (:attr:`LoadReport.acked_seq <dpcore.model.LoadReport.acked_seq>`), so a policy can
        tell which of its dispatches a report already includes. Implementations written
        before this argument existed may leave it out.
    :param ctx: The policy context.
    """


@hookspec
def on_load_report(report: LoadReport, ctx: PolicyContext) -> None:
    """A rank reported its load, and the shared ledger applied it.

    Called once per accepted report, after ``ctx.ledger`` force-set that rank's load to the
    report plus the dispatches the report does not acknowledge yet. Reports that are not
    newer than the last one applied never reach this hook. The return value is ignored.

    :param report: The report; frozen.
    :param ctx: The policy context.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def on_rank_state(rank: int, active: bool, epoch: int | None, new_life: bool, ctx: PolicyContext) -> None:
    """*rank* went inactive, came back, or restarted.

    Called on the controller's loop thread:

    * ``active=False`` when the rank went silent past its heartbeat deadline (or a test or
      adapter marked it dead). The ledger has already forgotten its load, and the requests
      it held are being failed or re-dispatched. Whatever the rank cached may be gone.
    * ``active=True, new_life=False`` when an inactive rank is heard from again in the
      same life (same ``epoch``), e.g. after a network stall.
    * ``active=True, new_life=True`` when the rank reports a new ``epoch``: its process
      restarted, so its prefix cache is empty, whether or not it was missed first.

    A policy that keeps per-rank state drops or ages it here: a prefix index must not
    claim a hit on a rank for blocks it held before it went away. ``ctx.cache`` has
    already reset that rank to "unknown" when this fires. The return value is ignored.

    :param rank: The rank whose state changed.
    :param active: Whether it is active now.
    :param epoch: The life its reports carry (``None`` before its first report).
    :param new_life: True when it restarted (a new epoch): nothing it cached survived.
    :param ctx: The policy context.
    """
