"""The dpcore hook contract: the three hooks a policy may implement.

Who calls what, and when (all on the controller's single loop thread, never concurrently):

* :func:`select_rank` once per request that needs a rank, after the controller decoded the
  request header and before anything is sent;
* :func:`on_dispatch` once per request actually sent to a rank, whoever chose the rank
  (a policy, a router in front, or a PD rule);
* :func:`on_load_report` once per load report the ledger accepted (stale reports are dropped
  before any hook sees them).

Hooks are called with keyword arguments; an implementation may take any subset of a spec's
arguments (pluggy's opt-in arguments). Arguments are frozen; loads and liveness are read
through ``ctx``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from dpcore.model import LoadReport, PolicyContext, Request

PROJECT = "dpcore"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


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
def on_dispatch(request: Request, rank: int, ctx: PolicyContext) -> None:
    """*request* was sent to *rank*.

    Called once per dispatched request, after the shared ledger counted it, whoever chose
    the rank (policy, router-assigned ``routed_dp_rank``, PD rule). Keep per-policy state
    here, e.g. a prefix index. The return value is ignored.

    :param request: The request that was sent; frozen.
    :param rank: The rank it went to.
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
