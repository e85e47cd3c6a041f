"""The ranges the decoders enforce: frame sizes, the numbers in a request header and a control
frame (:class:`Limits`), and which reply endpoints a request may name.
"""

from __future__ import annotations

import re
from typing import Any

from attrs import frozen

from dpcore.wire.header import show

#: Largest frame a controller's ingress or a sender's reply socket accepts by default (the
#: transport drops the connection of a peer that sends more; the client SDK refuses first).
MAX_MESSAGE_BYTES = 64 << 20
#: Largest load-report frame (a full ``done`` list of 65,536 seqs is about 600 KB).
MAX_REPORT_BYTES = 1 << 20

#: A reply endpoint the controller and the ranks can connect to. Anything else (``tcp://``,
#: a path too long for a unix socket, spaces...) makes ``connect`` fail, so such a request
#: has no usable sender: it is dropped and counted, and never reaches a rank.
_REPLY_RE = re.compile(
    r"(?:ipc://[^\x00]{1,100}|inproc://[^\x00]{1,256}|tcp://(?:\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9._-]{1,253}):[0-9]{1,5})\Z"
)
_REPLY_OK: dict[str, bool] = {}


def valid_reply(reply: Any) -> bool:
    """Whether *reply* is an endpoint string peers can connect to (cached: senders reuse theirs)."""
    if type(reply) is not str:
        return False
    ok = _REPLY_OK.get(reply)
    if ok is None:
        # Unix socket paths are limited in bytes, not characters.
        ok = _REPLY_RE.match(reply) is not None and (not reply.startswith("ipc://") or len(reply.encode()) <= 106)
        if len(_REPLY_OK) < 4096:
            _REPLY_OK[reply] = ok
    return ok


@frozen
class Limits:
    """The ranges the request and control decoders enforce.

    :ivar max_tokens: Largest prompt (``num_tokens``) and ``max_new_tokens`` accepted: the
        longest context a deployment serves. The default, 2**24 (16.7M tokens), is above
        every model's context today; lower it to your model's (``--max-context-tokens``).
        Per request at most 2**31, so the ledger's sum over in-flight requests cannot
        overflow.
    :ivar min_block_size: Smallest block size senders hash with: a request may carry at most
        ceil(num_tokens / min_block_size) block hashes.
    :ivar max_block_hashes: At most this many block hashes per request, whatever its length
        (bounds the work a cache-aware policy does for one request: 16,384 hashes, a 1M-token
        prefix at 64 tokens a block, take ``cache_aware`` about 0.1 s).
    :ivar max_control_bytes: Largest control frame; the controller copies each one to every
        rank, so it is kept small.
    """

    max_tokens: int = 1 << 24
    min_block_size: int = 16
    max_block_hashes: int = 1 << 14
    max_control_bytes: int = 64 << 10

    def __attrs_post_init__(self) -> None:
        for name, lo, hi in (
            ("max_tokens", 1, 1 << 31),
            ("min_block_size", 1, 1 << 20),
            ("max_block_hashes", 0, 1 << 24),
            ("max_control_bytes", 64, MAX_MESSAGE_BYTES),
        ):
            x = getattr(self, name)
            if type(x) is not int or not lo <= x <= hi:
                msg = f"wire limit {name} must be an integer in {lo}..{hi}, got {show(x)}"
                raise ValueError(msg)

    def max_hashes(self, num_tokens: int) -> int:
        """How many block hashes a request of *num_tokens* may carry."""
        return min(self.max_block_hashes, -(-num_tokens // self.min_block_size))


DEFAULT_LIMITS = Limits()
#: The widest ranges any controller can be configured with: what a rank applies to the
#: dispatches it receives (the controller already held them to its own limits).
WIDEST_LIMITS = Limits(max_tokens=1 << 31, min_block_size=1, max_block_hashes=1 << 24, max_control_bytes=MAX_MESSAGE_BYTES)
