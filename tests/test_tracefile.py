"""Salted block ids (:mod:`dpcore.tracefile`): the keyed function, and what each kind keeps."""

from __future__ import annotations

import pytest

from dpcore import tracefile
from dpcore.tracefile import BLAKE2B, SIPHASH, Salted

np = pytest.importorskip("numpy")


def test_siphash_matches_the_reference_vector() -> None:
    """SipHash-2-4's published vector: key bytes 00..0f, message bytes 00..07."""
    key = bytes(range(16))
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    m = np.array([int.from_bytes(bytes(range(8)), "little")], dtype=np.uint64)
    assert int(tracefile.siphash24(np, k0, k1, m)[0]) == 0x93F5F5799A932462


@pytest.mark.parametrize("kind", [SIPHASH, BLAKE2B])
def test_ids_keep_prefixes_equal_and_hide_the_hashes(kind: str) -> None:
    s = Salted(4, b"k" * 16, kind)
    a, b = s.ids([11, 12, 13], 14), s.ids([11, 12, 99], 12)
    assert len(a) == 4 and len(b) == 3  # ceil(n / 4): a partial last block gets its own id
    assert a[:2] == b[:2] and a[2] != b[2]
    assert len(set(a[3:] + s.tails(50))) == 51  # ids of unhashed blocks match nothing
    assert all(0 <= x < 1 << 63 for x in a + b)
    assert not {11, 12, 13, 99} & set(a + b)
    assert Salted(4, b"j" * 16, kind).salt([11, 12]) != s.salt([11, 12])  # another recording, other ids
    assert s.salt([11, 12, 13]) == Salted(4, b"k" * 16, kind).salt([11, 12, 13])  # a restarted writer: the same
    assert s.ids([], 10) == [] and s.ids([], 10, known=True) != []
    assert s.ids([1, 2, 3, 4], 8) == []  # more hashes than 4-token blocks: made with a smaller block


def test_the_default_is_siphash_with_numpy_and_an_unknown_kind_is_refused() -> None:
    assert tracefile.default_kind() == SIPHASH
    with pytest.raises(ValueError, match="siphash"):
        Salted(4, kind="md5")


@pytest.mark.parametrize("kind", [SIPHASH, BLAKE2B])
def test_id_text_is_each_id_in_decimal(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch text of ids (cut per line by the writer) is ``str`` of each id, digit for digit,
    block ids then tail ids, also across the slices numpy works in."""
    monkeypatch.setattr(tracefile, "_CHUNK", 256)
    s, again = Salted(4, b"k" * 16, kind), Salted(4, b"k" * 16, kind)
    hashes = [*range(1, 3000), 1 << 62, (1 << 63) - 1]
    assert s.salt_text(hashes) == "".join(f"{x}, " for x in again.salt(hashes)).encode()
    assert s.tails_text(40) == "".join(f"{x}, " for x in again.tails(40)).encode()
    both = again.salt(hashes[:1000]) + again.tails(700)
    assert s.salt_text(hashes[:1000], 700) == "".join(f"{x}, " for x in both).encode()
    low, high = 10 ** (tracefile.ID_DIGITS - 1), 10**tracefile.ID_DIGITS - 1
    edges = [low, high, low + 10**9 - 1, low + 10**9, 123456789000000009, 900000000999999990, 100000000099999999]
    assert tracefile._digits(np, np.array(edges, np.uint64)) == "".join(f"{x}, " for x in edges).encode()


def test_tail_ids_are_siphash_of_a_counter_under_the_tweaked_key() -> None:
    """Tail ids stay what they were when salted one by one: the keyed function of 1, 2, ...
    under ``k1 ^ _TAIL_TWEAK``, also when computed with block ids in one pass."""
    key = b"k" * 16
    k0, k1 = int.from_bytes(key[:8], "little"), int.from_bytes(key[8:], "little")
    raw = tracefile.siphash24(np, k0, k1 ^ tracefile._TAIL_TWEAK, np.arange(1, 6, dtype=np.uint64))
    want = (raw % np.uint64(9 * 10**17) + np.uint64(10**17)).tolist()
    assert Salted(4, key, SIPHASH).tails(5) == want
    text = Salted(4, key, SIPHASH).salt_text([7, 8], 5)
    assert text[2 * tracefile.ID_TEXT :] == "".join(f"{x}, " for x in want).encode()


@pytest.mark.parametrize("kind", [SIPHASH, BLAKE2B])
def test_a_hash_outside_64_bits_is_salted_as_its_twos_complement(kind: str) -> None:
    """A sender's block hash is only checked to be an integer: a negative one (msgpack carries
    them) or a wider one is salted as its 64-bit word instead of stopping the writer."""
    s = Salted(64, b"k" * 16, kind)
    word = (1 << 64) - 5
    assert s.salt([-5, 3, 1 << 64 | 3]) == s.salt([word, 3, 3])
    assert s.salt_text([-5, 7], 2) == Salted(64, b"k" * 16, kind).salt_text([word, 7], 2)
