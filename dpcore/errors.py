"""The dpcore error family.

Two branches matter to callers:

* :class:`ConfigError` is raised at start-up, before any socket is bound. Its message is
  written for the operator: what was asked for, what exists, and what to do instead.
* :class:`RequestRejected` fails one request. The controller catches it, answers the
  request's sender with ``code`` and the message, counts it, and keeps serving.
"""

from __future__ import annotations

from collections.abc import Sequence


class DpcoreError(Exception):
    """Base class of every error dpcore raises on purpose."""


# --------------------------------------------------------------------------- start-up


class ConfigError(DpcoreError, ValueError):
    """Invalid configuration; raised before the controller binds anything."""


class UnknownPolicyError(ConfigError, LookupError):
    """No installed policy has this name."""

    def __init__(self, msg: str, *, name: str, available: Sequence[str]) -> None:
        super().__init__(msg)
        self.name = name
        self.available = tuple(available)


class RemovedPolicyError(ConfigError):
    """The name was renamed or removed upstream; the message says what to use instead."""

    def __init__(self, msg: str, *, name: str, replacement: str) -> None:
        super().__init__(msg)
        self.name = name
        self.replacement = replacement


class DuplicatePolicyError(ConfigError):
    """Two installed distributions provide the same policy name."""

    def __init__(self, msg: str, *, name: str, dists: Sequence[str]) -> None:
        super().__init__(msg)
        self.name = name
        self.dists = tuple(dists)


class PolicyDefinitionError(ConfigError):
    """A policy class is broken: it cannot be built or implements no dpcore hook."""


class PolicyOptionError(ConfigError):
    """A ``--policy-option`` is malformed or names an option the policy does not take."""


class InvalidDisaggregationModeError(ConfigError):
    """``--disaggregation-mode`` is not one of null/none, prefill, decode."""


# --------------------------------------------------------------------------- per request


class RequestRejected(DpcoreError):
    """One request cannot be placed; only that request fails.

    ``code`` is a short, stable, machine-readable reason (it labels metrics and is sent to
    the request's sender); ``http_status`` is what an HTTP front door answers with.
    """

    code = "rejected"
    http_status = 400

    def __init__(self, msg: str, *, rid: str | None = None) -> None:
        super().__init__(msg)
        self.rid = rid


class InvalidRankError(RequestRejected):
    """An externally assigned rank is not an integer, out of range, or inactive."""

    code = "invalid_rank"


class InactiveRankError(InvalidRankError):
    """An externally assigned rank is valid but currently inactive."""

    code = "rank_inactive"
    http_status = 503


class NoActiveRankError(RequestRejected):
    """Every rank is inactive, so nothing can serve the request."""

    code = "no_active_rank"
    http_status = 503


class NoRankSelectedError(RequestRejected):
    """Every policy in the chain returned ``None``."""

    code = "no_rank_selected"
    http_status = 503


class MissingBootstrapRoomError(RequestRejected):
    """A PD policy needs ``bootstrap_room`` and the request has none."""

    code = "missing_bootstrap_room"


class MalformedRequestError(RequestRejected):
    """The request's header is not a valid dpcore request."""

    code = "malformed_request"


class PrefillRankUnresolvedError(RequestRejected):
    """PD decode: the prefill rank holding this request's KV could not be learned in time."""

    code = "prefill_rank_unresolved"
    http_status = 504


class PolicyFailedError(RequestRejected):
    """A policy raised an unexpected exception for this request (a bug in the policy)."""

    code = "policy_error"
    http_status = 500


class InvalidReportError(DpcoreError, ValueError):
    """A load report names a rank that does not exist or carries impossible values."""


class WireError(DpcoreError, ValueError):
    """A frame could not be decoded; the message says which part and why."""
