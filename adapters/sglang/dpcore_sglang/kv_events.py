"""SGLang's own KV events, per DP rank, into dpcore's exact cache index.

With ``--kv-events-config '{"publisher": "zmq", "endpoint": "tcp://127.0.0.1:5557", "bind": true}'``
every DP rank's scheduler publishes what its radix cache stores and evicts (SGLang 0.5.23):

* ``SchedulerKvEventsPublisher.init_kv_events``
  (``sglang/srt/managers/scheduler_components/kv_events_publisher.py``) makes one publisher per
  independent KV cache, indexed by ``select_kv_publisher_dp_rank`` (the attention-DP rank
  under DP attention), and ``publish_kv_events`` sends the cache's queued events as one
  ``KVEventBatch(ts, events, attn_dp_rank)`` per scheduler step;
* ``ZmqEventPublisher`` (``sglang/srt/disaggregation/kv_events.py``) binds a PUB socket at the
  configured endpoint with the port offset by that rank (``offset_endpoint_port``) and sends
  ``[topic, seq as 8 big-endian bytes, msgpack payload]``; ``seq`` counts from 0 per
  publisher (a scheduler restart starts again at 0);
* ``KVCacheEventRecorder`` (``sglang/srt/mem_cache/events.py``) emits ``BlockStored`` per
  ``page_size`` page (``block_hashes``, ``parent_block_hash``, the page's ``token_ids``),
  coalescing a chain of pages into one event; ``BlockRemoved`` per evicted radix node;
  ``AllBlocksCleared`` when the cache is flushed.

**Mapping SGLang pages onto dpcore blocks.** SGLang's page hash is a SHA-256 chain over its
pages (``compute_node_hash_values``, cut to a signed 64-bit int by ``hash_str_to_int64``);
dpcore's block keys are BLAKE2b chains over ``block_size``-token blocks
(:mod:`dpcore.hashing`), which the adapter computes for every request. The page hashes
cannot be converted, so :class:`PageMapper` rebuilds each page's position in its prefix from
the stored chain (``parent_block_hash``) and its tokens, and computes dpcore's key for every
dpcore block that ends inside the page; its parent is the previous dpcore block of the same
prefix. Page and block sizes need not divide each other: a 64-token dpcore block over
1-token pages (SGLang's default page size) ends in every 64th page; a 128-token page holds
two dpcore blocks. Evicting a page removes the dpcore blocks that end in it. Pages in a
namespace dpcore's keys do not have (LoRA, ``cache_salt``) and pages of other tiers than
GPU memory (HiCache's host copies) are not indexed: they are counted and skipped.

A missing sequence number (ZMQ drops a PUB message when the subscriber's queue is full), or a
subscription that starts after the scheduler did, leaves that rank "unknown" in the index
(policies then use their own estimate) until its cache is cleared or its scheduler restarts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import zmq

from dpcore.cacheindex import CLEARED, REMOVED, STORED, CacheIndex, KvEventBatch
from dpcore.hashing import ROOT, key_of, next_block

log = logging.getLogger("dpcore_sglang")

#: Storage tiers indexed: SGLang's device memory (``StorageMedium.GPU``; ``None`` from older senders).
GPU_MEDIA = (None, "GPU")
#: Pages remembered per rank at most when the rank did not say its capacity.
DEFAULT_MAX_PAGES = 1 << 22
#: Batches read per rank per :meth:`SglangKvEvents.poll` at most (bounded work per dispatch).
MAX_BATCHES_PER_POLL = 64


class _Page:
    """One SGLang page: its parent page, tokens, where it ends in its prefix, the dpcore
    chain digest of the last whole block ending at or before that, and the dpcore keys of
    the blocks that end inside it."""

    __slots__ = ("parent", "tokens", "end", "digest", "keys")

    def __init__(self, parent: int | None, tokens: tuple[int, ...], end: int, digest: bytes, keys: tuple[int, ...]) -> None:
        self.parent = parent
        self.tokens = tokens
        self.end = end
        self.digest = digest
        self.keys = keys


class PageMapper:
    """SGLang's page events for one rank, as dpcore cache-index events.

    :param block_size: dpcore's block size (the one the adapter hashes requests with).
    :param max_pages: Pages remembered at most; past it the mapper resets (and says so).
    """

    def __init__(self, block_size: int, max_pages: int = DEFAULT_MAX_PAGES) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.max_pages = max_pages
        self._pages: dict[int, _Page] = {}
        #: Pages not mapped because their parent page is unknown (missed events).
        self.unmapped = 0
        #: Pages skipped: another storage tier, or a LoRA / cache-salt namespace.
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._pages)

    def reset(self) -> None:
        self._pages.clear()

    def translate(self, events: Iterable[Any]) -> tuple[tuple, ...]:
        """dpcore events for SGLang's ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``."""
        out: list[tuple] = []
        for ev in events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                stored = self._stored(ev)
                if stored is not None:
                    out.append(stored)
            elif kind == "BlockRemoved":
                if getattr(ev, "medium", None) not in GPU_MEDIA:
                    self.skipped += len(ev.block_hashes)
                    continue
                keys: list[int] = []
                pages = self._pages
                for h in ev.block_hashes:
                    page = pages.pop(h, None)
                    if page is not None:
                        keys.extend(page.keys)
                if keys:
                    out.append((REMOVED, tuple(keys)))
            elif kind == "AllBlocksCleared":
                self._pages.clear()
                out.append((CLEARED,))
        return tuple(out)

    def _stored(self, ev: Any) -> tuple | None:
        hashes: Sequence[int] = ev.block_hashes
        n = len(hashes)
        if (
            getattr(ev, "medium", None) not in GPU_MEDIA
            or getattr(ev, "lora_id", None) is not None
            or getattr(ev, "lora_name", None) is not None
            or getattr(ev, "cache_salt", None) is not None
        ):
            self.skipped += n
            return None
        tokens = [t if type(t) is int else t[0] for t in ev.token_ids]  # bigram pages: (t, next)
        if not n or len(tokens) % n:
            self.unmapped += n
            return None
        size = len(tokens) // n
        pages = self._pages
        parent_hash = ev.parent_block_hash
        if parent_hash is None:
            end, digest = 0, ROOT
        else:
            parent = pages.get(parent_hash)
            if parent is None:
                self.unmapped += n
                return None
            end, digest = parent.end, parent.digest
        first_parent = None if digest == ROOT else key_of(digest)
        bs = self.block_size
        chain: list[int] = []
        for i, h in enumerate(hashes):
            page_tokens = tuple(tokens[i * size : (i + 1) * size])
            start, end = end, end + size
            keys: list[int] = []
            page = _Page(parent_hash, page_tokens, end, digest, ())
            b = (start // bs + 1) * bs
            while b <= end:
                block = self._span(page, b - bs, b)
                if block is None:
                    self.unmapped += n - i
                    return (STORED, first_parent, tuple(chain)) if chain else None
                digest = next_block(digest, block)
                keys.append(key_of(digest))
                b += bs
            page.digest = digest
            page.keys = tuple(keys)
            pages[h] = page
            chain.extend(keys)
            parent_hash = h
        if len(pages) > self.max_pages:
            log.warning("dpcore: KV event page map over %d pages; resetting it", self.max_pages)
            self.reset()
        return (STORED, first_parent, tuple(chain)) if chain else None

    def _span(self, page: _Page, lo: int, hi: int) -> list[int] | None:
        """Tokens ``[lo, hi)`` of *page*'s prefix (``hi <= page.end``), walking back its parents."""
        parts: list[tuple[int, ...]] = []
        p: _Page | None = page
        while hi > lo:
            if p is None:
                return None
            start = p.end - len(p.tokens)
            if start < hi:
                a = lo if lo > start else start
                parts.append(p.tokens[a - start : hi - start])
                hi = a
            if hi > lo:
                p = self._pages.get(p.parent) if p.parent is not None else None
        out: list[int] = []
        for part in reversed(parts):
            out.extend(part)
        return out


def subscriber_endpoint(endpoint: str, rank: int) -> str:
    """Where rank *rank*'s publisher is reachable: SGLang's ``offset_endpoint_port`` (port +
    rank for tcp, ``_dp<rank>`` suffix for inproc), with a wildcard host made loopback."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        if host in ("*", "0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"tcp://{host}:{int(port) + rank}"
    if rank and endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{rank}"
    if endpoint.startswith(("ipc://", "inproc://")):
        return endpoint
    raise ValueError(f"KV events endpoint {endpoint!r}: expected tcp://, ipc:// or inproc://")


class SglangKvEvents:
    """One SUB socket per DP rank on SGLang's KV event publishers, feeding *index*.

    Call :meth:`poll` on the thread that makes decisions (the adapter does, before each
    dispatch): it reads what arrived, without blocking.

    :param index: The manager's cache index.
    :param endpoint: ``endpoint`` of SGLang's ``--kv-events-config`` (rank 0's).
    :param dp_size: Number of DP ranks.
    :param block_size: dpcore's block size for requests.
    :param topic: ``topic`` of SGLang's config.
    :param capacity_blocks: Per-rank cache capacity in dpcore blocks (0: not known).
    """

    def __init__(
        self,
        index: CacheIndex,
        endpoint: str,
        dp_size: int,
        block_size: int,
        *,
        topic: str = "",
        zmq_ctx: zmq.Context | None = None,  # type: ignore[type-arg]
        capacity_blocks: int = 0,
    ) -> None:
        import msgspec
        from sglang.srt.disaggregation.kv_events import KVEventBatch

        self.index = index
        self._decode = msgspec.msgpack.Decoder(KVEventBatch).decode
        self._decode_error = msgspec.DecodeError
        self._ctx = zmq_ctx or zmq.Context.instance()
        self.capacity_blocks = capacity_blocks
        self.mappers = [PageMapper(block_size) for _ in range(dp_size)]
        self._epoch = [1] * dp_size
        self._next: list[int | None] = [None] * dp_size
        self._socks = []
        for r in range(dp_size):
            s = self._ctx.socket(zmq.SUB)
            s.linger = 0
            s.setsockopt(zmq.SUBSCRIBE, topic.encode())
            s.connect(subscriber_endpoint(endpoint, r))
            self._socks.append(s)
        #: Frames that were not SGLang KV event batches; batches whose seq skipped some;
        #: publisher restarts seen (seq went back).
        self.bad_frames = self.gaps = self.restarts = 0

    @classmethod
    def from_server_args(cls, server_args: Any, index: CacheIndex, dp_size: int, block_size: int) -> SglangKvEvents | None:
        """Subscribe as SGLang's ``--kv-events-config`` says, or ``None`` when it publishes nothing."""
        raw = getattr(server_args, "kv_events_config", None)
        if not raw:
            return None
        from sglang.srt.disaggregation.kv_events import KVEventsConfig

        cfg = KVEventsConfig.from_cli(raw)
        if cfg.publisher != "zmq":
            return None
        log.info("dpcore: subscribing to SGLang KV events at %s (+rank)", cfg.endpoint)
        return cls(index, cfg.endpoint, dp_size, block_size, topic=cfg.topic)

    def poll(self) -> int:
        """Apply every batch that arrived (at most :data:`MAX_BATCHES_PER_POLL` per rank); returns how many."""
        done = 0
        for r, s in enumerate(self._socks):
            for _ in range(MAX_BATCHES_PER_POLL):
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.handle(r, frames)
                done += 1
        return done

    def handle(self, rank: int, frames: Sequence[bytes]) -> bool:
        """One ``[topic, seq, payload]`` message from *rank*'s publisher; returns whether the
        index applied it."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self.bad_frames += 1
            return False
        seq = int.from_bytes(frames[1], "big", signed=True)
        try:
            batch = self._decode(frames[2])
        except self._decode_error:
            self.bad_frames += 1
            return False
        if seq < 0:
            self.bad_frames += 1
            return False
        expect = self._next[rank]
        mapper = self.mappers[rank]
        if expect is not None and seq < expect:
            # The scheduler restarted: a new publisher counts from 0 again, its cache is empty.
            self.restarts += 1
            self._epoch[rank] += 1
            mapper.reset()
        elif expect is not None and seq > expect:
            self.gaps += 1
            mapper.reset()  # the pages it missed are parents of what comes next
        self._next[rank] = seq + 1
        events = mapper.translate(batch.events)
        return self.index.apply(KvEventBatch(rank, self._epoch[rank], seq, events, self.capacity_blocks))

    def close(self) -> None:
        for s in self._socks:
            s.close(linger=0)
        self._socks.clear()
