"""dpcore: a data-parallel request controller for LLM serving, with policies as plugins.

This package is the core a policy author imports. Importing it loads only pluggy, attrs and
structlog; sockets, HTTP and plotting live in submodules imported on demand.
"""

from __future__ import annotations

from dpcore.errors import (
    ConfigError,
    DpcoreError,
    DuplicatePolicyError,
    InactiveRankError,
    InvalidRankError,
    MissingBootstrapRoomError,
    NoActiveRankError,
    NoRankSelectedError,
    PolicyDefinitionError,
    RemovedPolicyError,
    RequestRejected,
    UnknownPolicyError,
)
from dpcore.cacheindex import prefix_depths
from dpcore.hashing import block_hashes
from dpcore.hookspecs import HOOK_API_VERSION, hookimpl
from dpcore.ledger import LoadLedger
from dpcore.ledgerview import LedgerView
from dpcore.manager import PolicyManager
from dpcore.model import Decision, LoadReport, PolicyContext, Request, Resolution
from dpcore.policy import NEEDS_BLOCK_HASHES, PLACES_BY_BOOTSTRAP_ROOM, Option, Policy

__all__ = [
    "HOOK_API_VERSION",
    "ConfigError",
    "Decision",
    "DpcoreError",
    "DuplicatePolicyError",
    "InactiveRankError",
    "InvalidRankError",
    "LedgerView",
    "LoadLedger",
    "LoadReport",
    "MissingBootstrapRoomError",
    "NEEDS_BLOCK_HASHES",
    "NoActiveRankError",
    "NoRankSelectedError",
    "Option",
    "PLACES_BY_BOOTSTRAP_ROOM",
    "Policy",
    "PolicyContext",
    "PolicyDefinitionError",
    "PolicyManager",
    "RemovedPolicyError",
    "Request",
    "RequestRejected",
    "Resolution",
    "UnknownPolicyError",
    "__version__",
    "block_hashes",
    "hookimpl",
    "prefix_depths",
]


def __getattr__(name: str) -> str:
    if name == "__version__":
        from importlib.metadata import version

        return version("dpcore")
    raise AttributeError(name)
