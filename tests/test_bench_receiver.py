"""``dpcore bench``'s ranks report load on a cadence of their own: a real receiver process on
real ZMQ sockets, fed one message at a time (so it finds its socket empty after each), reports
at most once a :data:`~dpcore.bench.REPORT_GAP_S` once drained, and still acknowledges every
message it received."""

from __future__ import annotations

import multiprocessing as mp
import time

import msgpack
import pytest
import zmq

from dpcore import bench, wire
from dpcore.sdk import endpoints as ep

pytestmark = pytest.mark.e2e

MESSAGES = 120
SPACING_S = 0.002


def test_a_drained_receiver_reports_at_most_once_a_gap_and_acknowledges_everything() -> None:
    ctx = mp.get_context("spawn")
    run_dir = ep.make_run_dir("dpcore-bench-test-")
    eps = {"dispatch": [ep.ipc(run_dir, "d0")], "report": ep.ipc(run_dir, "rep")}
    zctx = zmq.Context()
    push = zctx.socket(zmq.PUSH)
    push.linger = 0
    push.bind(eps["dispatch"][0])
    pull = zctx.socket(zmq.PULL)
    pull.linger = 0
    pull.bind(eps["report"])
    counts, first, last = ctx.Array("i", 1), ctx.Array("d", 1), ctx.Array("d", 1)
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=bench._receiver, args=("dpcore", 0, eps, counts, first, last, ready, stop), daemon=True)
    proc.start()
    try:
        assert ready.wait(60), "the receiver did not start"
        assert pull.poll(10_000), "no first report"
        wire.decode_load(pull.recv())  # the report it sends when it starts
        t0 = time.monotonic()
        for seq in range(MESSAGES):
            push.send_multipart([msgpack.packb({"seq": seq}), b""])
            time.sleep(SPACING_S)
        sent_s = time.monotonic() - t0
        reports, done = 0, []
        deadline = time.monotonic() + 10
        while len(done) < MESSAGES and time.monotonic() < deadline:
            if pull.poll(100):
                _, d, _, _ = wire.decode_load(pull.recv())
                reports += 1
                done.extend(d)
        elapsed_s = time.monotonic() - t0
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        push.close()
        pull.close()
        zctx.term()
        ep.remove_run_dir(run_dir)
    assert done == list(range(MESSAGES)), "every message is acknowledged, in order"
    # One report per gap at most (plus the one that ends a gap begun before the first
    # message); reporting after every drained burst sends about one per message here.
    assert reports <= elapsed_s / bench.REPORT_GAP_S + 2, (reports, elapsed_s, sent_s)
