"""The recording writer's compiled pass (dpcore-speedups) against its Python path: the same
records from the same batch frames, the same bytes in the file, on ordinary and hostile
headers; and the compiled pass is the one in use wherever it is installed."""

from __future__ import annotations

import json
import random
from array import array
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dpcore import tracefile
from dpcore.model import Request
from dpcore.runtime import recordframes
from dpcore.runtime.recorder import Recorder, RecordConfig
from dpcore.runtime.tracewriter import COMPILED, PYTHON, TraceWriter

import dpcore_speedups  # noqa: E402 - `make setup` and the record extra install it: its absence fails here

SALT = b"k" * 16


def python_decode(body: bytes, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The Python path's (records, completions), or the exception it raises."""
    with monkeypatch.context() as m:
        m.setattr(recordframes, "speedups", None)
        try:
            records, ends = recordframes.decode_batch(body)
        except Exception as e:  # noqa: BLE001 - the outcome compared, whatever it is
            return type(e)
    return records, normal(ends)


def normal(ends: Any) -> Any:
    """Completions as a list of tuples (msgpack gives a tuple of them), when they are pairs."""
    try:
        return [tuple(e) for e in ends]
    except TypeError:
        return ends


def compiled_decode(body: bytes) -> Any:
    got = dpcore_speedups.decode_batch(body)
    return None if got is None else (got[0], normal(got[1]))


def written(tmp_path: Path, name: str, batches: list[tuple[list[Any], list[Any]]], *, compiled: bool,
            monkeypatch: pytest.MonkeyPatch, hold_s: float = 5.0) -> bytes:  # fmt: skip
    """The file a writer makes of *batches* (records, completions) through one path."""
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(recordframes, "speedups", None)
        w = TraceWriter(str(tmp_path / name), block_size=16, max_bytes=1 << 30, rotate_s=0.0, keep=1, salt=SALT,
                        kind=tracefile.SIPHASH, t0=99.25, hold_s=hold_s, clock=lambda: 100.0)  # fmt: skip
        assert w.writer_path == (COMPILED if compiled else PYTHON)
        w.open(fresh=True)
        for records, ends in batches:
            w.take([list(r) for r in records], ends)
        w.close()
    return (tmp_path / name).read_bytes()


def ordinary_batch(rng: random.Random, first: int, count: int) -> bytes:
    headers, ends = [], []
    for i in range(first, first + count):
        n = rng.choice([0, 1, 15, 16, 17, 700, 4096])
        h: dict[str, Any] = {"v": 1, "t": "req", "rid": f"r{i}", "n": n, "reply": "ipc:///x"}
        blocks = rng.choice([0, n // 16, max(n // 16 - 2, 0), n // 16 + 3])
        if blocks or rng.random() < 0.5:
            h["bh"] = [rng.getrandbits(63) * rng.choice([1, -1]) for _ in range(blocks)]
        if rng.random() < 0.7:
            h["mnt"] = rng.randrange(0, 1 << 20)
        headers.append(msgpack.packb(h))
        if rng.random() < 0.6:
            ends.append((f"r{i - rng.randrange(0, 8)}", rng.choice([-1, 0, 5, 1 << 40])))
    times = array("d", [100.0 + i / 1000 for i in range(first, first + count)])
    return recordframes.batch_body(times, headers, ends)


def test_ordinary_batches_give_the_same_records_and_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Headers as senders write them (with or without hashes and budget, hashes of both signs,
    more or fewer than the prompt's blocks): the compiled pass reads every batch itself, and
    its file is the Python path's, byte for byte."""
    rng = random.Random(7)
    bodies = [ordinary_batch(rng, 40 * b, 40) for b in range(6)]
    batches = []
    for body in bodies:
        got = compiled_decode(body)
        assert got is not None and got == python_decode(body, monkeypatch)
        batches.append(got)
    fast = written(tmp_path, "c.jsonl", batches, compiled=True, monkeypatch=monkeypatch)
    assert fast == written(tmp_path, "p.jsonl", batches, compiled=False, monkeypatch=monkeypatch)
    assert fast.count(b"\n") == 240 and b'"output_from": "generated"' in fast
    # Without holding (every line written at once, tail ids numbered across whole batches).
    at_once = [written(tmp_path, f"{c}0.jsonl", batches, compiled=c, monkeypatch=monkeypatch, hold_s=0)
               for c in (True, False)]  # fmt: skip
    assert at_once[0] == at_once[1]


def test_the_compiled_pass_is_the_one_in_use(tmp_path: Path) -> None:
    """Installed, the compiled pass is what a writer uses (a real writer process says so, and
    writes ordinary batches without handing any to Python)."""
    assert recordframes.speedups is dpcore_speedups
    w = TraceWriter(str(tmp_path / "w.jsonl"), block_size=16, max_bytes=1 << 30, rotate_s=0.0, keep=1,
                    salt=SALT)  # fmt: skip
    assert w.writer_path == COMPILED
    w.open(fresh=True)
    w.take(*recordframes.decode_batch(ordinary_batch(random.Random(1), 0, 50)))
    w.close()
    assert (w.recorded, w.python_batches) == (50, 0)
    rec = Recorder(RecordConfig(path=str(tmp_path / "rec.jsonl")))
    rec.start()
    try:
        assert rec.stats()["writer_path"] == COMPILED
    finally:
        rec.close()


def test_batches_handed_to_python_are_counted_outside_the_writer(tmp_path: Path) -> None:
    """A batch the compiled decoder hands back (here a header whose ``mnt`` is nil) is still
    written, and a real writer process's count of such batches reaches the recorder's stats,
    its Prometheus counter and ``dpcore serve``'s closing line; ordinary batches count none."""
    from prometheus_client import CollectorRegistry, generate_latest

    def recorded(name: str, mnt: Any) -> Recorder:
        rec = Recorder(RecordConfig(path=str(tmp_path / name), hold_s=0.0))
        rec.start()
        try:
            for i in range(5):
                header = msgpack.packb({"v": 1, "t": "req", "rid": f"r{i}", "n": 20, "reply": "", "mnt": mnt})
                rec.offer(Request(f"r{i}", num_tokens=20), header)
                rec.pack()  # one batch each
        finally:
            rec.close()
        assert rec.recorded == 5 and (tmp_path / name).read_text().count("\n") == 5
        return rec

    plain = recorded("plain.jsonl", 7)
    assert plain.stats()["python_batches"] == 0 and "Python path" not in plain.summary()
    odd = recorded("odd.jsonl", None)
    assert odd.stats()["python_batches"] == 5
    assert odd.summary().endswith("compiled path (5 batches handed to its Python path)")
    registry = CollectorRegistry()
    registry.register(odd.collector())
    assert b"dpcore_record_python_batches_total 5.0" in generate_latest(registry)


# ------------------------------------------------------------------ hostile headers

_INT = st.integers(-(1 << 63), (1 << 64) - 1)
_VALUE = st.one_of(st.none(), st.booleans(), _INT, st.floats(allow_nan=False), st.text(max_size=4),
                   st.binary(max_size=4), st.lists(_INT, max_size=3))  # fmt: skip
_SANE = st.fixed_dictionaries(
    {"rid": st.text(max_size=6), "n": st.integers(0, 5000)},
    optional={"mnt": st.integers(0, 1 << 20), "bh": st.lists(_INT, max_size=20), "reply": st.text(max_size=8)},
)
_HOSTILE = st.fixed_dictionaries(
    {},
    optional={
        "rid": st.one_of(st.text(max_size=6), _VALUE),
        "n": st.one_of(st.integers(-5, 5000), _VALUE),
        "mnt": st.one_of(st.integers(0, 100), _VALUE),
        "bh": st.one_of(st.lists(_INT, max_size=20), st.lists(st.integers(0, 1 << 63), max_size=20), _VALUE),
        "reply": st.one_of(st.text(max_size=8), st.dictionaries(st.text(max_size=3), _VALUE, max_size=3)),
    },
)


def seldom(odd: Any, usual: Any) -> Any:
    """*odd* one time in ten, else *usual* (so that most batches are read by the compiled pass)."""
    return st.integers(0, 9).flatmap(lambda i: odd if i == 0 else usual)


_HEADER = seldom(_HOSTILE, _SANE)
_END = st.tuples(st.text(max_size=3), _INT)
_ODD_END = st.tuples(st.one_of(st.text(max_size=3), _VALUE), st.one_of(_INT, _VALUE))
_ENDS = st.lists(seldom(_ODD_END, _END), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(_HEADER, max_size=8), ends=_ENDS, extra_times=st.integers(-2, 2),
       cut=seldom(st.integers(0, 400), st.none()),
       flip=seldom(st.tuples(st.integers(0, 400), st.integers(0, 255)), st.none()))  # fmt: skip
def test_hostile_batches_end_as_the_python_path_ends_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headers: list, ends: list, extra_times: int, cut: Any, flip: Any
) -> None:
    """Wrong types, huge and negative numbers, strings for ids, more or fewer arrival times
    than headers, truncated and corrupted frames: whatever the compiled decoder returns is the
    Python path's answer, and anything else it hands to the Python path (``None``), so the
    writer's outcome, records or error, is the same; lines are the same bytes, or again
    handed over."""
    times = array("d", [100.0 + i for i in range(max(len(headers) + extra_times, 0))])
    body = bytearray(recordframes.batch_body(times, [msgpack.packb(h) for h in headers], ends))
    if flip is not None and flip[0] < len(body):
        body[flip[0]] = flip[1]
    if cut is not None:
        del body[cut:]
    data = bytes(body)
    want = python_decode(data, monkeypatch)
    got = compiled_decode(data)
    assert got is None or got == want
    try:
        public = recordframes.decode_batch(data)
    except Exception as e:  # noqa: BLE001
        public = type(e)
    assert (public if isinstance(public, type) else (public[0], normal(public[1]))) == want
    if isinstance(want, type):
        return
    outcome = {}
    for compiled in (True, False):
        try:
            outcome[compiled] = written(tmp_path, f"{compiled}.jsonl", [want], compiled=compiled,
                                        monkeypatch=monkeypatch)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the Python path's error on a record it cannot write
            outcome[compiled] = type(e)
    assert outcome[True] == outcome[False]


_TIMES = st.one_of(
    st.floats(),  # any double: huge, tiny, negative, infinite, nan
    st.integers(0, 1 << 42).map(lambda k: 99.25 + k / 2048),  # exact halves of a thousandth
    st.integers(0, 10**12).map(lambda k: 99.25 + (k + 0.5) / 1000),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(times=st.lists(_TIMES, min_size=1, max_size=40))
def test_timestamps_are_written_as_python_formats_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, times: list[float]
) -> None:
    """The compiled pass writes ``timestamp`` itself (the exact value rounded to thousandths,
    a half to even), as Python's ``%.3f`` does, for any arrival time."""
    records = [[t, 1, 0, b"", None, "r"] for t in times]
    files = [written(tmp_path, f"{c}.jsonl", [(records, [])], compiled=c, monkeypatch=monkeypatch, hold_s=0)
             for c in (True, False)]  # fmt: skip
    assert files[0] == files[1]


# ------------------------------------------------------------------ the compiled hold

_RID = st.sampled_from(["a", "b", "c", "dé", "e"])  # few ids: completions match, ids are sent again
_HELD_HEADER = seldom(_HOSTILE, st.fixed_dictionaries(
    {"rid": _RID, "n": st.integers(0, 300)},
    optional={"mnt": st.integers(0, 1 << 20), "bh": st.lists(_INT, max_size=20), "reply": st.text(max_size=8)},
))  # fmt: skip
_HELD_END = seldom(_ODD_END, st.tuples(_RID, st.sampled_from([-1, 0, 5, 1 << 40, 1 << 63])))


def held_file(tmp_path: Path, name: str, bodies: list[tuple[bytes, float]], *, compiled: bool, max_held: int,
              monkeypatch: pytest.MonkeyPatch) -> Any:  # fmt: skip
    """What a writer holding records up to 5 s makes of batch frames, each taken *dt* seconds
    after the last: the file and counts, or the error the Python path raised."""
    now = [100.0]
    with monkeypatch.context() as m:
        if not compiled:
            m.setattr(recordframes, "speedups", None)
        w = TraceWriter(str(tmp_path / name), block_size=16, max_bytes=1 << 30, rotate_s=0.0, keep=1, salt=SALT,
                        kind=tracefile.SIPHASH, t0=99.25, hold_s=5.0, max_held=max_held,
                        clock=lambda: now[0])  # fmt: skip
        assert (w._hold is not None) == compiled
        w.open(fresh=True)
        try:
            for body, dt in bodies:
                now[0] += dt
                w.take_batch(body)
                w.flush()
            w.close()
        except Exception as e:  # noqa: BLE001 - the Python path's error on a frame it cannot read
            return type(e)
    return (tmp_path / name).read_bytes(), w.recorded, w.generated


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.tuples(st.lists(_HELD_HEADER, max_size=6), st.lists(_HELD_END, max_size=6),
                                  st.sampled_from([0.0, 1.0, 6.0])), min_size=1, max_size=6),
       max_held=st.integers(0, 8))  # fmt: skip
@example(batches=[([{"n": 1.0, "bh": [0]}, {"rid": "a", "n": 17, "bh": [0]}, {}], [], 0.0)], max_held=1)
def test_the_compiled_hold_writes_what_the_python_hold_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batches: list, max_held: int
) -> None:
    """Batches of records waiting for their completions (ids sent again, completions before,
    after and without their request, too late, of odd types), records leaving after 5 s or
    when more than *max_held* wait, and now and then a header only the Python path reads:
    the compiled hold writes the same bytes, in the same order, as the Python one."""
    bodies, t = [], 100.0
    for headers, ends, dt in batches:
        t += dt
        times = array("d", [t + i / 1000 for i in range(len(headers))])
        bodies.append((recordframes.batch_body(times, [msgpack.packb(h) for h in headers], ends), dt))
    fast = held_file(tmp_path, "c.jsonl", bodies, compiled=True, max_held=max_held, monkeypatch=monkeypatch)
    assert fast == held_file(tmp_path, "p.jsonl", bodies, compiled=False, max_held=max_held, monkeypatch=monkeypatch)


def test_the_compiled_hold_takes_ordinary_batches_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ordinary batches stay in the compiled hold (none handed to Python), with completions
    joined across batches, and give the Python hold's file."""
    rng = random.Random(3)
    bodies = [(ordinary_batch(rng, 40 * b, 40), 1.0) for b in range(8)]
    fast = held_file(tmp_path, "c.jsonl", bodies, compiled=True, max_held=30, monkeypatch=monkeypatch)
    assert fast == held_file(tmp_path, "p.jsonl", bodies, compiled=False, max_held=30, monkeypatch=monkeypatch)
    w = TraceWriter(str(tmp_path / "w.jsonl"), block_size=16, max_bytes=1 << 30, rotate_s=0.0, keep=1, salt=SALT,
                    hold_s=60.0, clock=lambda: 100.0)  # fmt: skip
    w.open(fresh=True)
    for body, _ in bodies:
        w.take_batch(body)
    assert w._hold is not None and w.python_batches == 0 and w.held == 320
    w.close()
    assert w.recorded == 320 and 0 < w.generated < 320


def test_a_record_that_left_unended_does_not_take_a_later_completion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An id sent again after its first record left without its completion (more than
    *max_held* waited): the completion that comes goes to the record still waiting."""

    def body(t: float, rids: list[str], ends: list[tuple[str, int]]) -> bytes:
        headers = [msgpack.packb({"rid": r, "n": 16, "mnt": 9}) for r in rids]
        return recordframes.batch_body(array("d", [t + i / 1000 for i in range(len(rids))]), headers, ends)

    bodies = [(body(100.0, ["a"], []), 0.0), (body(100.1, ["b", "a"], []), 0.0), (body(100.2, [], [("a", 5)]), 0.0)]
    for compiled in (True, False):
        text, recorded, generated = held_file(tmp_path, f"{compiled}.jsonl", bodies, compiled=compiled, max_held=1,
                                              monkeypatch=monkeypatch)  # fmt: skip
        assert (recorded, generated) == (3, 1)
        assert [json.loads(x)["output_length"] for x in text.splitlines()] == [9, 9, 5]
