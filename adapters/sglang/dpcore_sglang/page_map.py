"""SGLang's page events for one rank, as dpcore cache-index events.

SGLang's page hash is a SHA-256 chain over its pages (``compute_node_hash_values``, cut to a signed 64-bit int by ``hash_str_to_int64``);
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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from dpcore.cacheindex import CLEARED, REMOVED, STORED
from dpcore.hashing import ROOT, key_of, next_block

log = logging.getLogger("dpcore_sglang")

#: Storage tiers indexed: SGLang's device memory (``StorageMedium.GPU``; ``None`` from older senders).
GPU_MEDIA = (None, "GPU")
#: Pages remembered per rank at most when the rank did not say its capacity.
DEFAULT_MAX_PAGES = 1 << 22


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
