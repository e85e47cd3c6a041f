"""Output lengths from SGLang's tokenizer process to the recorder: the controller's side, without SGLang.

The hooks on SGLang's real TokenizerManager, and the whole path into a recording, are tested
inside the pinned SGLang venv (``inside/test_record.py``)."""

from __future__ import annotations

import pickle
from typing import Any

import msgpack
import pytest
import zmq

from dpcore.wire import MAX_OUTPUT_TOKENS
from dpcore_sglang.output_lengths import MAGIC, Ended, frame
from dpcore_sglang.recv import BlockingReceiver


def test_pairs_in_range_reach_the_recorder_and_the_rest_are_counted() -> None:
    got: list[tuple[str, int]] = []
    e = Ended(lambda rid, n: got.append((rid, n)))
    e.take(frame(["a", 5, "b", -1, "c", MAX_OUTPUT_TOKENS]))
    assert got == [("a", 5), ("b", -1), ("c", MAX_OUTPUT_TOKENS)]
    e.take(frame(["d", -2, "e", MAX_OUTPUT_TOKENS + 1, 7, 3, "f", "3", "g", 1.0, "h", 4]))
    assert got[3:] == [("h", 4)]
    for bad in (MAGIC + b"\xc1", MAGIC + msgpack.packb({"a": 1}), MAGIC + msgpack.packb(["a", 1, "b"]), MAGIC):
        e.take(bad)
    assert got[4:] == []
    assert (e.received, e.refused) == (4, 5 + 4)
    assert e.stats() == {"received": 4, "refused": 9}


def test_the_receiver_hands_ended_frames_to_the_recorder_and_sglang_sees_no_message(pair: Any) -> None:
    push, pull = pair
    got: list[tuple[str, int]] = []
    recv = BlockingReceiver(pull, timeout_ms=1000)
    push.send(frame(["x", 1]))  # no recorder: dropped all the same, never decoded by SGLang
    with pytest.raises(zmq.Again):
        recv.recv_pyobj(zmq.NOBLOCK)
    recv.ended = Ended(lambda rid, n: got.append((rid, n))).take
    # SGLang's default pickle IPC (recv_pyobj), then its msgpack IPC (recv: raw bytes).
    for receive, message in ((recv.recv_pyobj, pickle.dumps("req")), (recv.recv, b"msgpack bytes")):
        push.send(frame(["a", 3, "b", 0]))
        push.send(message)
        with pytest.raises(zmq.Again):  # SGLang's loop: "no message now", then it asks again
            receive(zmq.NOBLOCK)
        assert receive(zmq.NOBLOCK) in ("req", b"msgpack bytes")
    assert got == [("a", 3), ("b", 0)] * 2
    assert recv.bad_frames == 0
