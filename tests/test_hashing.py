"""dpcore.hashing.block_hashes: stable values, whatever sequence type carries the token ids."""

from __future__ import annotations

from array import array

import pytest

from dpcore import hashing
from dpcore.hashing import KEY_BYTES, block_hashes, block_key_bytes, keys_of_bytes

# Pinned values: block hashes are compared across processes, hosts and releases (client SDK,
# adapters, KV events), so a change of output is a breaking change, not a refactor.
PINNED = [
    ((list(range(10, 210)), 64), (1207324254594777166, 8876362068557780396, 2734867753605859469)),
    (([-5, 2**62, 7, 0], 2), (952296815028638987, 1699195501593645684)),
]


@pytest.mark.parametrize(("args", "expected"), PINNED)
def test_pinned_values(args, expected):
    ids, size = args
    assert block_hashes(ids, size) == expected


@pytest.mark.parametrize("kind", [list, tuple, lambda x: array("q", x), lambda x: array("l", x), range])
def test_same_hashes_for_every_sequence_type(kind):
    ids = list(range(1000, 1000 + 333))
    ref = block_hashes(ids, 16)
    seq = range(1000, 1000 + 333) if kind is range else kind(ids)
    assert block_hashes(seq, 16) == ref
    assert len(ref) == 333 // 16


def test_only_whole_blocks_and_chaining():
    ids = array("q", range(130))
    full = block_hashes(ids, 64)
    assert len(full) == 2
    assert block_hashes(ids[:64], 64) == full[:1]  # a prefix's hashes are a prefix
    other = array("q", ids)
    other[0] = -1  # a change in block 0 changes every later hash
    assert all(a != b for a, b in zip(block_hashes(other, 64), full))
    assert block_hashes(ids[:63], 64) == ()


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        block_hashes([1, 2, 3], 0)


@pytest.mark.parametrize("little_endian", [True, False])
def test_key_bytes_carry_the_same_hashes(monkeypatch, little_endian):
    # The form block hashes travel in between processes (SGLang's tokenizer -> controller).
    monkeypatch.setattr(hashing, "_LITTLE_ENDIAN", little_endian)
    for (ids, size), expected in PINNED:
        raw = block_key_bytes(ids, size)
        assert len(raw) == KEY_BYTES * len(expected)
        assert raw == b"".join(k.to_bytes(KEY_BYTES, "little") for k in expected)
        assert keys_of_bytes(raw) == expected
        assert block_hashes(ids, size) == expected
    assert block_key_bytes([1, 2, 3], 64) == b""
    assert keys_of_bytes(b"") == ()


def test_key_bytes_refused_when_not_block_hashes():
    with pytest.raises(ValueError, match="8 bytes each, got 12 bytes"):
        keys_of_bytes(bytes(12))
    with pytest.raises(ValueError, match="bit 63 set"):
        keys_of_bytes((1 << 63).to_bytes(8, "little"))
