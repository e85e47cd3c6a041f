"""The header frame every dpcore message starts with: the wire version, the type tags, and the
checks every decoder applies to a header's fields (each failure a
:class:`~dpcore.errors.WireError` that names the field and why).
"""

from __future__ import annotations

import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from dpcore.errors import WireError

VERSION = 1

REQ = "req"
DISPATCH = "dispatch"
REJ = "rej"
FAIL = "fail"
OUT = "out"
LOAD = "load"
CTL = "ctl"
KV = "kv"
TYPES = (REQ, DISPATCH, REJ, FAIL, OUT, LOAD, CTL, KV)
REPLY_TYPES = (OUT, REJ, FAIL)


#: Dispatch sequence numbers and ranks travel as msgpack ints; anything bigger is a bug.
_MAX_INT = (1 << 63) - 1


_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxstring = 80
_REPR.maxother = 40


def show(x: Any) -> str:
    """*x* for an error message: short, and safe however deeply a peer nested it (a plain
    ``repr`` of a 20,000-level list raises ``RecursionError``)."""
    return _REPR.repr(x)


def _unpack(buf: Any, what: str) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(buf, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types; all mean "not ours"
        msg = f"{what}: not a msgpack frame ({type(exc).__name__}: {exc})"
        raise WireError(msg) from None
    if type(obj) is not dict:
        msg = f"{what}: expected a msgpack map, got {type(obj).__name__}"
        raise WireError(msg)
    v = obj.get("v")
    if v != VERSION:
        msg = f"{what}: unsupported wire version {show(v)} (this dpcore speaks {VERSION})"
        raise WireError(msg)
    return obj


def _expect(obj: dict[str, Any], types: Sequence[str], what: str) -> str:
    t = obj.get("t")
    if t not in types:
        msg = f"{what}: unexpected message type {show(t)}, expected one of {list(types)}"
        raise WireError(msg)
    return t  # type: ignore[no-any-return]


def int_problem(x: Any, minimum: int, maximum: int) -> str | None:
    """Why *x* is not an integer in ``minimum..maximum`` (``None``: it is one), for an error
    message that starts with the field's name. A bool is not an integer here (msgpack and
    JSON both keep them apart); a huge integer is shown shortened."""
    if type(x) is not int:
        return f"must be an integer, got {show(x)}"
    if not minimum <= x <= maximum:
        return f"must be an integer in {minimum}..{maximum}, got {show(x)}"
    return None


def _opt_int(obj: Mapping[str, Any], key: str, what: str, *, minimum: int = 0) -> int | None:
    x = obj.get(key)
    if x is None:
        return None
    problem = int_problem(x, minimum, _MAX_INT)
    if problem is not None:
        msg = f"{what}: field {key!r} {problem} (or absent)"
        raise WireError(msg)
    return x


def _req_int(obj: Mapping[str, Any], key: str, what: str, *, minimum: int = 0, maximum: int = _MAX_INT) -> int:
    x = obj.get(key)
    if type(x) is not int or not minimum <= x <= maximum:
        msg = f"{what}: field {key!r} must be an integer in {minimum}..{maximum}, got {show(x)}"
        raise WireError(msg)
    return x


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    x = obj.get(key)
    if type(x) is not str:
        msg = f"{what}: field {key!r} must be a string, got {show(x)}"
        raise WireError(msg)
    return x


def _frames(frames: Sequence[Any], n: tuple[int, ...], what: str) -> None:
    if len(frames) not in n:
        msg = f"{what}: expected {' or '.join(map(str, n))} frames, got {len(frames)}"
        raise WireError(msg)


def message_type(buf: Any) -> str:
    """The type tag of a header frame (validating version and tag)."""
    return _expect(_unpack(buf, "header"), TYPES, "header")


def decode_header(buf: Any, types: Sequence[str] = TYPES, what: str = "header") -> dict[str, Any]:
    """Decode and version-check any header frame, accepting only *types*."""
    h = _unpack(buf, what)
    _expect(h, types, what)
    return h
