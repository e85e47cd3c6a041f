"""``dpcore serve --record``: what is written, rotation, sampling, drops, and a round trip
through real processes (``dpcore demo --record`` then ``dpcore simulate``)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import msgpack
import pytest

from dpcore.errors import ConfigError
from dpcore.extras import sample_trace
from dpcore.hashing import block_hashes
from dpcore.model import Request
from dpcore.runtime.recorder import PACK_EVERY, Recorder, RecordConfig
from dpcore.runtime.tracewriter import TraceWriter, rotated_path
from dpcore.tracefile import Salted
from dpcore.sim.traces import TraceError, read_trace

DPCORE = [sys.executable, "-m", "dpcore"]


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def recorder(tmp_path: Path, **kw: object) -> tuple[Recorder, Clock]:
    clock = Clock()
    return Recorder(RecordConfig(path=str(tmp_path / "rec.jsonl"), **kw), clock=clock), clock  # type: ignore[arg-type]


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_arrivals_lengths_and_salted_hashes_replay(tmp_path: Path) -> None:
    rec, clock = recorder(tmp_path, block_size=4)
    shared = list(range(8))
    a = block_hashes([*shared, 50, 51, 52, 53, 54], 4)  # 13 tokens: 3 whole blocks + 1 partial
    b = block_hashes([*shared, 60, 61], 4)  # 10 tokens: 2 whole blocks + 1 partial
    rec.offer(Request("a", num_tokens=13, block_hashes=a, max_new_tokens=7))
    clock.t += 0.25
    rec.offer(Request("b", num_tokens=10, block_hashes=b))
    clock.t += 1.5
    rec.offer(Request("c", num_tokens=9))  # no hashes sent
    rec.close()
    trace = read_trace(tmp_path / "rec.jsonl", ticks="burst")
    assert trace.block_size == 4
    assert [r.arrival for r in trace.requests] == pytest.approx([0.0, 0.25, 1.75])
    assert [(r.input_length, r.output_length) for r in trace.requests] == [(13, 7), (10, 0), (9, 0)]
    ra, rb, rc = (r.hash_ids for r in trace.requests)
    assert (len(ra), len(rb), rc) == (4, 3, ())  # ceil(n / 4) ids; none when none were sent
    assert ra[:2] == rb[:2]  # the shared 8-token prefix keeps equal ids
    assert len(set(ra[2:]) | set(rb[2:])) == 3  # the rest, and each partial block, is its own
    # Salted: no id is the sender's hash, and another recording maps the same prefix elsewhere.
    assert not set(ra) & set(a)
    (tmp_path / "x").mkdir()
    other, _ = recorder(tmp_path / "x", block_size=4)
    other.offer(Request("a", num_tokens=13, block_hashes=a))
    other.close()
    assert lines(tmp_path / "x" / "rec.jsonl")[0]["hash_ids"][0] != ra[0]


def test_hashes_of_a_smaller_block_are_not_passed_off_as_prefixes(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, block_size=64)
    tokens = list(range(256))
    rec.offer(Request("x", num_tokens=256, block_hashes=block_hashes(tokens, 16)))  # 16 hashes, 4 allowed
    rec.close()
    assert lines(tmp_path / "rec.jsonl")[0]["hash_ids"] == []


def test_no_text_or_token_ids_are_written(tmp_path: Path) -> None:
    """What a request carries beyond lengths and hashes (its id, its payload) never reaches the file."""
    from dpcore import wire

    rec, _ = recorder(tmp_path, block_size=2)
    tokens = [314159, 271828, 161803, 141421]
    bh = block_hashes(tokens, 2)
    rec.offer(Request("secret-user-42", num_tokens=4, block_hashes=bh))
    # As serve offers it: with the header frame the sender sent (request id, reply endpoint...).
    header = wire.encode_request("secret-user-43", num_tokens=4, reply="ipc:///tmp/secret-reply", block_hashes=bh,
                                 max_new_tokens=9)  # fmt: skip
    rec.offer(Request("secret-user-43", num_tokens=4, block_hashes=bh, max_new_tokens=9), header)
    rec.close()
    text = (tmp_path / "rec.jsonl").read_text()
    assert "secret" not in text
    assert not any(str(t) in text for t in (*tokens, *bh))
    rows = lines(tmp_path / "rec.jsonl")
    assert all(set(r) == {"timestamp", "input_length", "output_length", "hash_ids", "block_size", "output_from"} for r in rows)
    assert rows[0]["hash_ids"] == rows[1]["hash_ids"] and rows[1]["output_length"] == 9


def writer(tmp_path: Path, clock: Clock, **kw: object) -> TraceWriter:
    settings = {"block_size": 16, "max_bytes": 1 << 30, "rotate_s": 0.0, "keep": 10, **kw}
    return TraceWriter(str(tmp_path / "rec.jsonl"), clock=clock, **settings)  # type: ignore[arg-type]


def test_size_rotation_keeps_n_files_each_a_trace(tmp_path: Path) -> None:
    clock = Clock()
    w = writer(tmp_path, clock, max_bytes=4096, keep=2)
    for turn in range(8):
        batch = []
        for i in range(turn * 50, turn * 50 + 50):
            clock.t += 0.01
            batch.append((clock.t, {"n": 100 + i, "bh": block_hashes(list(range(i, i + 100)), 16)}))
        w.add(*zip(*batch))
    w.close()
    files = sorted(tmp_path.glob("rec*.jsonl"))
    assert [f.name for f in files] == ["rec.1.jsonl", "rec.2.jsonl", "rec.jsonl"]
    assert w.rotations >= 3  # more rotations than files kept: the oldest were deleted
    newest_first = [read_trace(f, ticks="burst") for f in (files[2], files[0], files[1])]
    longest = max(len(x) + 1 for f in files for x in f.read_text().splitlines())
    for f in files:
        # Rotated before the first write after it reached the size: at most one turn's 50 lines over.
        assert 0 < f.stat().st_size <= 4096 + 50 * longest
    # Each file is a trace of its own, and together they are the latest requests in order.
    lengths = [r.input_length for t in reversed(newest_first) for r in t.requests]
    assert lengths == list(range(500 - len(lengths), 500))
    assert w.recorded == 400


def test_time_rotation(tmp_path: Path) -> None:
    clock = Clock()
    w = writer(tmp_path, clock, rotate_s=60)
    w.open(fresh=True)
    for i in range(4):
        w.add([clock.t], [{"n": i + 1}])
        clock.t += 40
    # Written at 0, 40 | 80, 120: a file 60 s old is rotated before the next write.
    assert w.rotations == 1
    clock.t += 500
    w.add([], [])  # nothing to write: nothing rotates
    assert w.rotations == 1
    w.close()
    assert [r["input_length"] for r in lines(rotated_path(tmp_path / "rec.jsonl", 1))] == [1, 2]
    assert [r["input_length"] for r in lines(tmp_path / "rec.jsonl")] == [3, 4]


def test_an_earlier_recording_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    path.write_text('{"old": 1}\n')
    rec, _ = recorder(tmp_path)
    rec.offer(Request("a", num_tokens=5))
    rec.start()
    rec.close()
    assert (tmp_path / "rec.1.jsonl").read_text() == '{"old": 1}\n'
    assert len(lines(path)) == 1


def test_output_lengths_are_what_the_ranks_generated_in_arrival_order(tmp_path: Path) -> None:
    """A record waits for its request to end: the rank's count is written ("generated"); a
    request that failed or was rejected, or whose rank did not count, gets its budget at once
    ("budget"); one still running when the recording ends gets its budget too. Lines stay in
    arrival order whatever order the requests end in."""
    rec, clock = recorder(tmp_path)
    for i, rid in enumerate(["a", "b", "c", "d", "e"]):
        rec.offer(Request(rid, num_tokens=10 + i, max_new_tokens=100))
        clock.t += 0.01
    rec.offer(Request("b", num_tokens=20, max_new_tokens=100))  # the same id again (a retry)
    rec.ended("c", 7)
    rec.ended("b", 3)  # the first "b"
    rec.ended("a", -1)  # its rank did not count (or it failed)
    rec.ended("zz", 5)  # not recorded (sampled out, dropped): ignored
    rec.ended("b", 0)  # the second "b": ended at once
    rec.close()  # "d" and "e" never ended
    rows = lines(tmp_path / "rec.jsonl")
    assert [r["input_length"] for r in rows] == [10, 11, 12, 13, 14, 20]
    assert [(r["output_length"], r["output_from"]) for r in rows] == [
        (100, "budget"), (3, "generated"), (7, "generated"), (100, "budget"), (100, "budget"), (0, "generated"),
    ]  # fmt: skip
    assert rec.generated == 3 and rec.recorded == 6


def test_an_id_sent_again_in_a_later_batch_takes_its_own_completion(tmp_path: Path) -> None:
    """A batch whose ids are all new is taken at once; an id already held (a retry that came
    in a later batch) still gets the completions in order: the first to the first request."""
    clock = Clock()
    w = writer(tmp_path, clock, hold_s=10.0)
    w.open(fresh=True)
    w.add([clock.t, clock.t], [{"rid": "a", "n": 1, "mnt": 9}, {"rid": "b", "n": 2, "mnt": 9}])
    w.add([clock.t + 1, clock.t + 1], [{"rid": "c", "n": 3, "mnt": 9}, {"rid": "a", "n": 4, "mnt": 9}])
    w.add([], [], [("a", 5), ("c", 6), ("b", 7), ("a", 8)])
    w.close()
    rows = lines(tmp_path / "rec.jsonl")
    assert [(r["input_length"], r["output_length"]) for r in rows] == [(1, 5), (2, 7), (3, 6), (4, 8)]


def test_a_held_record_leaves_after_hold_s_or_when_too_many_wait(tmp_path: Path) -> None:
    clock = Clock()
    w = writer(tmp_path, clock, hold_s=10.0, max_held=3)
    w.open(fresh=True)
    w.add([clock.t, clock.t + 1], [{"rid": "a", "n": 1, "mnt": 9}, {"rid": "b", "n": 2, "mnt": 9}], [("b", 4)])
    assert (w.recorded, w.held) == (0, 2)  # "b" ended, but "a" arrived first and still runs
    clock.t += 10.5
    assert w.flush() is None  # "a" waited 10 s: written with its budget, then "b"
    w.add([clock.t + i for i in range(5)], [{"rid": f"r{i}", "n": 3, "mnt": 9} for i in range(5)])
    assert (w.recorded, w.held) == (4, 3)  # more than 3 waiting: the oldest left
    w.add([], [], [("a", 8), ("r1", 8), ("r2", 1)])  # too late for "a" and "r1"; "r2" is next
    w.close()
    rows = lines(tmp_path / "rec.jsonl")
    assert [(r["input_length"], r["output_length"], r["output_from"]) for r in rows] == [
        (1, 9, "budget"), (2, 4, "generated"), (3, 9, "budget"), (3, 9, "budget"), (3, 1, "generated"),
        (3, 9, "budget"), (3, 9, "budget"),
    ]  # fmt: skip


def test_sampling_is_by_request_id(tmp_path: Path) -> None:
    rids = [f"req-{i}" for i in range(4000)]
    kept = []
    for run in range(2):
        d = tmp_path / str(run)
        d.mkdir()
        rec, clock = recorder(d, sample=0.25)
        for i, rid in enumerate(rids):
            clock.t += 0.001
            rec.offer(Request(rid, num_tokens=i + 1))
        rec.close()
        assert rec.recorded + rec.sampled_out == 4000
        kept.append([r["input_length"] for r in lines(d / "rec.jsonl")])
    assert 800 < len(kept[0]) < 1200
    assert kept[0] == kept[1]  # the same ids are kept every time


def test_a_full_queue_drops_and_counts_never_blocks(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, queue=10)
    t = time.perf_counter()
    for i in range(25):
        rec.offer(Request(f"r{i}", num_tokens=3))
    assert time.perf_counter() - t < 1.0
    assert (rec.dropped, rec.stats()["queued"]) == (15, 10)
    rec.close()
    assert rec.recorded == 10 and len(lines(tmp_path / "rec.jsonl")) == 10


def test_the_queue_has_room_again_once_the_writer_took_the_batches(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, queue=10)
    for i in range(10):
        rec.offer(Request(f"a{i}", num_tokens=3))
    rec.pack()  # full: the room counted now is none
    rec.offer(Request("over", num_tokens=3))
    assert rec.dropped == 1
    rec._send()  # the writer thread's turn: the frame goes to the writer process
    for i in range(10):
        rec.offer(Request(f"b{i}", num_tokens=3))
    assert (rec.dropped, rec.stats()["queued"]) == (1, 10)
    rec.close()
    assert rec.recorded == 20


def wait_for(cond, timeout_s: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_dead_writer_process_is_replaced_and_its_losses_counted(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, block_size=2, max_bytes=4096, keep=1)
    hashes = block_hashes(list(range(200)), 2)  # 100 ids: a line of about 2 KB
    thread = rec.start()
    rec.offer(Request("a", num_tokens=200, block_hashes=hashes))
    rec.offer(Request("b", num_tokens=200, block_hashes=hashes))
    wait_for(lambda: rec.recorded == 2)
    first = rec._proc.child
    # The next write must rotate, and cannot: the rotated name is taken by a non-empty directory.
    (tmp_path / "rec.1.jsonl").mkdir()
    (tmp_path / "rec.1.jsonl" / "x").write_text("")
    rec.offer(Request("c", num_tokens=200, block_hashes=hashes))
    wait_for(lambda: first.poll() is not None)  # type: ignore[union-attr]
    (tmp_path / "rec.1.jsonl" / "x").unlink()
    (tmp_path / "rec.1.jsonl").rmdir()
    rec.offer(Request("d", num_tokens=3))  # a new writer process takes over
    wait_for(lambda: rec.recorded == 3)
    rec.close()
    assert rec.lost == 1 and thread.restarts == 0
    older, newest = lines(tmp_path / "rec.1.jsonl"), lines(tmp_path / "rec.jsonl")
    assert [r["input_length"] for r in older + newest] == [200, 200, 3]
    assert older[0]["hash_ids"] == older[1]["hash_ids"]


def test_a_broken_pipe_is_counted_and_the_thread_restarts(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path)
    thread = rec.start()
    rec.offer(Request("a", num_tokens=4))
    wait_for(lambda: rec.recorded == 1)
    child = rec._proc.child
    # The pipe breaks while the process still runs (stopped, so it cannot exit at the EOF
    # first and be replaced before anything is written).
    os.kill(child.pid, signal.SIGSTOP)  # type: ignore[union-attr]
    child.stdin.close()  # type: ignore[union-attr]
    rec.offer(Request("b", num_tokens=5))
    wait_for(lambda: thread.restarts == 1)
    assert rec.lost == 1 and thread.last_error.startswith("ValueError")
    rec.offer(Request("c", num_tokens=6))
    wait_for(lambda: rec.recorded == 2)
    rec.close()
    assert [r["input_length"] for r in lines(tmp_path / "rec.jsonl")] == [4, 6]


def test_the_writer_is_its_own_process(tmp_path: Path) -> None:
    """Salting and formatting run outside the controller's process (and its GIL)."""
    rec, _ = recorder(tmp_path)
    rec.start()
    rec.offer(Request("a", num_tokens=3))
    wait_for(lambda: rec.recorded == 1)
    assert rec._proc.child is not None and rec._proc.child.pid != os.getpid()
    rec.close()
    assert rec._proc.child is None


def test_a_batch_fits_the_pipe_into_the_writer(tmp_path: Path) -> None:
    """The pipe holds a whole batch of headers, so it goes in with one write (Linux)."""
    import fcntl

    from dpcore.runtime.recordprocess import PIPE_BYTES

    rec, _ = recorder(tmp_path)
    rec.start()
    try:
        stdin = rec._proc.child.stdin  # type: ignore[union-attr]
        assert fcntl.fcntl(stdin.fileno(), fcntl.F_GETPIPE_SZ) == PIPE_BYTES  # type: ignore[union-attr]
    finally:
        rec.close()
    header = msgpack.packb({"rid": "r1", "n": 1000, "bh": [1 << 62] * 16, "reply": "x" * 40})
    assert PIPE_BYTES >= PACK_EVERY * len(header)


@pytest.mark.parametrize("nice", [0, 7])
def test_the_writer_runs_at_its_lower_cpu_priority(tmp_path: Path, nice: int) -> None:
    """--record-nice N: the writer process's niceness is the controller's plus N."""
    rec, _ = recorder(tmp_path, nice=nice)
    rec.start()
    try:
        child = rec._proc.child
        assert child is not None
        assert os.getpriority(os.PRIO_PROCESS, child.pid) == min(os.getpriority(os.PRIO_PROCESS, 0) + nice, 19)
    finally:
        rec.close()


@pytest.mark.parametrize(
    ("kw", "flag"),
    [
        ({"sample": 0.0}, "--record-sample"),
        ({"sample": 1.5}, "--record-sample"),
        ({"block_size": 0}, "--record-block-size"),
        ({"max_bytes": 100}, "--record-max-bytes"),
        ({"rotate_s": 0.5}, "--record-rotate-s"),
        ({"keep": -1}, "--record-keep"),
        ({"queue": 0}, "--record-queue"),
        ({"hold_s": -1}, "--record-hold-s"),
        ({"hold_s": 86_401}, "--record-hold-s"),
        ({"nice": -1}, "--record-nice"),
        ({"nice": 20}, "--record-nice"),
        ({"nice": 1.5}, "--record-nice"),
    ],
)
def test_bad_settings_name_the_flag_and_range(tmp_path: Path, kw: dict, flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        RecordConfig(path=str(tmp_path / "r.jsonl"), **kw)


def test_serve_refuses_bad_recording_flags_before_starting(tmp_path: Path) -> None:
    base = [*DPCORE, "serve", "--dp-size", "2", "--dry-run"]
    bad = subprocess.run([*base, "--record", str(tmp_path / "r.jsonl"), "--record-sample", "2"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert bad.returncode != 0 and "--record-sample must be a number in (0, 1], got 2.0" in bad.stderr
    ok = subprocess.run([*base, "--record", str(tmp_path / "r.jsonl")], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nodir does not exist"):
        RecordConfig(path=str(tmp_path / "nodir" / "r.jsonl"))


def test_trace_reader_checks_the_block_size_field(tmp_path: Path) -> None:
    p = tmp_path / "t.jsonl"
    row = {"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1, 2, 3], "block_size": 2}
    p.write_text(json.dumps(row) + "\n" + json.dumps({**row, "block_size": 4}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: block_size 4 differs"):
        read_trace(p)
    p.write_text(json.dumps(row) + "\n" + json.dumps({**row, "hash_ids": [1]}) + "\n")
    with pytest.raises(TraceError, match=r"t.jsonl:2: 1 hash_ids for input_length 5; 2-token blocks need 3"):
        read_trace(p)


@pytest.mark.e2e
def test_a_recorded_demo_run_replays_in_simulate(tmp_path: Path) -> None:
    """Real processes: ``dpcore demo`` (controller, barrier, mock ranks) recording through
    ``serve --record``, then ``dpcore simulate`` on the file. The demo asks every request for
    a budget of 5,000 new tokens and its ranks stop each output at the trace's length (an
    end-of-sequence): the arrivals (in the demo's wall time), the lengths the ranks really
    generated and the prefix structure of what the demo sent come back."""
    n, speedup, budget = 40, 20, 5000
    rec_path = tmp_path / "demo.jsonl"
    demo = subprocess.run(
        [*DPCORE, "demo", "--no-live", "--requests", str(n), "--speedup", str(speedup), "--record", str(rec_path),
         "--max-new-tokens", str(budget)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    sent = read_trace(sample_trace(), time_scale=speedup * 0.25, limit=n).requests
    assert all(s.output_length < budget for s in sent)
    got = read_trace(rec_path, ticks="burst")
    # The demo's warm-up requests (one per rank, 1 token) come first.
    replay = [r for r in got.requests if r.input_length > 1 or r.hash_ids]
    assert len(replay) == n and got.block_size == 512
    assert [(r.input_length, r.output_length) for r in replay] == [(r.input_length, r.output_length) for r in sent]
    assert {r["output_from"] for r in lines(rec_path)} == {"generated"}
    t0 = replay[0].arrival
    assert max(abs((r.arrival - t0) - s.arrival) for r, s in zip(replay, sent)) < 0.5
    ids: dict[int, int] = {}
    for r, s in zip(replay, sent):
        for a, b in zip(r.hash_ids, s.hash_ids, strict=True):
            assert ids.setdefault(b, a) == a  # one recorded id per sent id, ...
    assert len(set(ids.values())) == len(ids)  # ... and one sent id per recorded id
    assert not set(ids) & set(ids.values())  # salted
    assert "ipc://" not in rec_path.read_text()  # the header's reply endpoint (and rid) never get written
    sim = subprocess.run(
        [*DPCORE, "simulate", "--trace", str(rec_path), "--time-scale", str(1 / speedup), "--dp-size", "4",
         "--policy", "round_robin", "--format", "json"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert sim.returncode == 0, sim.stderr
    doc = json.loads(sim.stdout)
    assert doc["run"]["trace"]["requests"] == len(got.requests)


@pytest.mark.e2e
def test_serve_records_http_traffic_without_its_text(tmp_path: Path) -> None:
    """``dpcore serve --record`` with the HTTP front and a mock rank, real processes: the
    chats' text appears nowhere in the recording, their shared system prompt does as equal ids,
    and serve's last line counts what it recorded."""
    import httpx

    eps_file, rec_path = tmp_path / "eps.json", tmp_path / "traffic.jsonl"
    serve = subprocess.Popen(
        [*DPCORE, "serve", "--dp-size", "1", "--http-port", "0", "--endpoints-file", str(eps_file),
         "--record", str(rec_path), "--drain-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    rank = None
    try:
        wait_for(eps_file.exists, 30)
        eps = json.loads(eps_file.read_text())
        rank = subprocess.Popen([*DPCORE, "mock-worker", "--rank", "0", "--dispatch", eps["dispatch"][0], "--report",
                                 eps["report"], "--exit-with-parent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        system = {"role": "system", "content": "You answer questions about the Zanzibar archive. " * 4}
        with httpx.Client(base_url=eps["http"], timeout=30) as client:

            def answered(body: dict) -> bool:
                try:
                    return client.post("/v1/chat/completions", json=body).status_code == 200
                except httpx.TransportError:  # the front is still starting
                    return False

            for question in ("Who catalogued the blue folios?", "When was the vault opened?"):
                body = {"messages": [system, {"role": "user", "content": question}], "max_tokens": 5}
                wait_for(lambda b=body: answered(b), 30)
    finally:
        serve.send_signal(signal.SIGTERM)
        out, _ = serve.communicate(timeout=30)
        if rank is not None:
            rank.kill()
            rank.wait()
    text = rec_path.read_text()
    assert "Zanzibar" not in text and "folios" not in text and "vault" not in text
    rows = [r for r in lines(rec_path) if r["output_length"] == 5]
    assert len(rows) >= 2
    assert rows[0]["hash_ids"][:3] == rows[-1]["hash_ids"][:3] and rows[0]["hash_ids"] != rows[-1]["hash_ids"]
    assert f"recorded {len(lines(rec_path))} of {len(lines(rec_path))} requests to {rec_path}" in out
    assert "lines formatted by the writer's compiled path" in out  # dpcore-speedups is installed here


@pytest.mark.parametrize("decode", ["text", "raw", "batch", "batch-python", "batch-msgpack", "batch-no-numpy"])
def test_the_writers_lines_are_trace_lines_of_the_salted_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, decode: str) -> None:
    """The writer's batch formatting gives, line for line, :func:`tracefile.line` of each
    request's :meth:`Salted.ids`: from headers decoded to text or kept as bytes, and from a
    batch frame as the writer process reads it, in the compiled pass (dpcore-speedups), in
    Python with msgspec and with msgpack alone, and without numpy (keyed BLAKE2b ids then,
    the hashes read one header at a time)."""
    import msgpack

    from dpcore import tracefile
    from dpcore.runtime import recordframes

    clock = Clock()
    if decode != "batch":  # the compiled pass only where asked for
        monkeypatch.setattr(recordframes, "speedups", None)
    if decode == "batch-no-numpy":
        monkeypatch.setattr(recordframes, "_NUMPY", False)
    kind = tracefile.BLAKE2B if decode == "batch-no-numpy" else None
    w = writer(tmp_path, clock, salt=b"s" * 16, t0=99.5, hold_s=5.0, kind=kind)
    assert w.writer_path == ("compiled" if decode == "batch" else "python")
    w.open(fresh=True)
    reqs = [(f"r{i}", 1 + 7 * i, len(block_hashes(list(range(i, i + 7 * i)), 16)) % 3, 50 + i) for i in range(60)]
    headers = []
    for rid, n, cut, mnt in reqs:
        bh = block_hashes(list(range(n, 2 * n)), 16)
        h = {"v": 1, "t": "req", "rid": rid, "n": n, "reply": "ipc:///x", "bh": bh[: len(bh) - cut] if bh else []}
        if mnt % 4:  # some senders give no budget: 0
            h["mnt"] = mnt
        headers.append(msgpack.packb(h))
    ends = [(rid, i) for i, (rid, *_) in enumerate(reqs) if i % 3]
    times = [clock.t + i / 7 for i in range(len(reqs))]
    if decode.startswith("batch"):
        if decode == "batch-msgpack":
            monkeypatch.setattr(recordframes, "_BATCH", None)
        else:
            assert recordframes._BATCH is not None, "msgspec is part of the test environment (dpcore[record])"
        records, got_ends = recordframes.decode_batch(recordframes.batch_body(array("d", times), headers, ends))
        w.take(records, got_ends)
    else:
        raw = decode == "raw"
        decoded = [msgpack.unpackb(h, use_list=False, raw=raw) for h in headers]
        w.add(times, decoded, msgpack.unpackb(msgpack.packb(ends), raw=raw), raw=raw)
    w.close()
    ref = Salted(16, b"s" * 16, w.salted.kind)
    want = []
    for i, (t, h) in enumerate(zip(times, [msgpack.unpackb(h) for h in headers])):
        ids = ref.ids(h["bh"], h["n"])
        out, src = (i, "generated") if i % 3 else (h.get("mnt", 0), "budget")
        want.append(tracefile.line((t - 99.5) * 1000, h["n"], out, tracefile.ids_text(ids), 16, src))
    assert (tmp_path / "rec.jsonl").read_text() == "".join(want)


def test_a_batch_msgspec_cannot_type_is_read_by_msgpack_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    """A header whose fields are not of the types the writer's msgspec schema names (one the
    controller would not let through, such as ``mnt: nil``) still gives the same records, and
    completions keep matching their requests by a text id either way."""
    import msgpack

    from dpcore.runtime import recordframes

    assert recordframes._BATCH is not None
    monkeypatch.setattr(recordframes, "speedups", None)  # the Python path's decoders
    good = [msgpack.packb({"rid": f"r{i}", "n": 10 + i, "mnt": 7, "bh": [i, i + 1]}) for i in range(3)]
    odd = msgpack.packb({"rid": "r3", "n": 13, "mnt": None, "bh": [3]})
    body = recordframes.batch_body(array("d", [1.0, 2.0, 3.0, 4.0]), [*good, odd], [("r0", 5), ("r3", -1)])
    records, ends = recordframes.decode_batch(body)
    p = recordframes.packed
    assert records == [[1.0, 10, 7, p([0, 1]), None, "r0"], [2.0, 11, 7, p([1, 2]), None, "r1"],
                       [3.0, 12, 7, p([2, 3]), None, "r2"], [4.0, 13, 0, p([3]), None, "r3"]]  # fmt: skip
    assert [tuple(e) for e in ends] == [("r0", 5), ("r3", -1)]
    records, _ = recordframes.decode_batch(recordframes.batch_body(array("d", [1.0, 2.0, 3.0]), good, []))
    assert [type(r[5]) for r in records] == [str, str, str] and records[1][3] == p([1, 2])


@pytest.mark.parametrize("n", [0, 1, 15, 16, 300])
def test_a_batchs_hashes_are_read_as_words_at_once(n: int) -> None:
    """Block hashes as msgpack writes them (64-bit integers: ``0xcf``, or ``0xd3`` when
    negative) become each record's words in one pass over the batch, also across the short
    and long array headers; anything else is left to the typed decoding (``None``)."""
    import msgpack

    from dpcore.runtime import recordframes

    rng = random.Random(n)
    lists = [[rng.getrandbits(63) | 1 << 40 for _ in range(m)] for m in (n, 0, n + 1, 3)]
    lists[2][:1] = [-(1 << 40)] if lists[2] else []
    raws = [msgpack.packb(x) for x in lists]
    assert recordframes._words_of(raws) == [recordframes.packed(x) for x in lists]
    assert recordframes._words_of([*raws, msgpack.packb([5])]) is None  # a small integer: 1 byte
    assert recordframes._words_of([*raws, msgpack.packb(None)]) is None
    assert recordframes._words_of([]) == []


