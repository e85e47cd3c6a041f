"""Live traffic as a trace ``dpcore simulate`` replays (``dpcore serve --record PATH``).

Each request the controller receives becomes one Mooncake-style JSON line::

    {"timestamp": 1234.567, "input_length": 700, "output_length": 128,
     "hash_ids": [..11 ids..], "block_size": 64}

* ``timestamp``: milliseconds since the recording started (arrival at the controller).
* ``input_length``: the prompt's tokens; ``output_length``: the request's ``max_new_tokens``
  (the controller never sees outputs, so this is the requested budget, ``0`` when the
  sender gave none; the simulator then decodes one token).
* ``hash_ids``: the sender's block hashes, salted (:class:`dpcore.tracefile.Salted`, one salt
  per recording, kept across rotations): equal prefixes keep equal ids, but the ids cannot be
  matched against hashes of known prompts. A request sent without block hashes is written
  with ``[]``: the simulator treats it as sharing no prefix.
* ``block_size``: tokens per id, the senders' block size (``--record-block-size``).

No prompt text or token id is ever written.

The controller's loop only appends a small tuple (arrival time, the request's header frame
as received) to a bounded deque (:meth:`Recorder.offer`); a full deque drops the record and
counts it, never blocking. Batches are packed on the loop's thread and written by a
supervised thread (:mod:`dpcore.runtime.supervise`) to a writer process
(:mod:`dpcore.runtime.tracewriter`), which decodes, salts, formats, writes and rotates: that
work never holds the controller's interpreter lock. A writer process that dies is started
again (same salt and time origin); what it had not written is counted as lost.
A file that has reached ``max_bytes`` or is ``rotate_s`` old is rotated before the
next write (an empty one never is), keeping ``keep`` old files (``PATH`` stays the newest;
``name.1.jsonl`` is the one before it). Sampling (``sample < 1``) keeps a request when a hash
of its id falls under the rate, so a retried id is kept or dropped alike.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from attrs import field, frozen

import msgpack

from dpcore.errors import ConfigError
from dpcore.hashing import DEFAULT_BLOCK_SIZE
from dpcore.model import Request
from dpcore.runtime import tracewriter
from dpcore.runtime.supervise import Supervised

#: Longest a queued request waits before it is handed to the writer process (seconds).
FLUSH_S = 0.05
#: Requests packed into one frame for the writer process.
PACK_EVERY = 256
_SAMPLE_SPACE = 1 << 32


def _in_range(name: str, lo: float, hi: float, *, integer: bool = False, lo_open: bool = False) -> Any:
    """An attrs validator: *name* is a number in [lo, hi] (``(lo, hi]`` when *lo_open*)."""

    def check(_inst: object, _attr: object, value: Any) -> None:
        kind_ok = type(value) is int if integer else type(value) in (int, float) and math.isfinite(value)
        low_ok = value > lo if lo_open else value >= lo
        if not kind_ok or not low_ok or value > hi:
            left = "(" if lo_open else "["
            what = "an integer" if integer else "a number"
            raise ConfigError(f"{name} must be {what} in {left}{lo:g}, {hi:g}], got {value!r}")

    return check


@frozen
class RecordConfig:
    """Where and how much to record; every field is checked when built.

    :ivar path: The newest file; rotated ones sit next to it.
    :ivar block_size: Tokens per block hash the senders use (1..2**20; the client SDK and
        the HTTP front default to 64).
    :ivar sample: Fraction of requests recorded, in (0, 1].
    :ivar max_bytes: Rotate when the file reaches this size (4096..2**50).
    :ivar rotate_s: Rotate when the file is this old, in seconds (0: never; else 1..2**31).
    :ivar keep: Rotated files kept (0..10,000); older ones are deleted.
    :ivar queue: Records waiting for the writer before new ones are dropped (1..2**24).
    """

    path: str
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, validator=_in_range("--record-block-size", 1, 1 << 20, integer=True))
    sample: float = field(default=1.0, validator=_in_range("--record-sample", 0, 1, lo_open=True))
    max_bytes: int = field(default=1 << 30, validator=_in_range("--record-max-bytes", 4096, 1 << 50, integer=True))
    rotate_s: float = field(default=0.0, validator=_in_range("--record-rotate-s", 0, 1 << 31))
    keep: int = field(default=10, validator=_in_range("--record-keep", 0, 10_000, integer=True))
    queue: int = field(default=1 << 16, validator=_in_range("--record-queue", 1, 1 << 24, integer=True))

    def __attrs_post_init__(self) -> None:
        if 0 < self.rotate_s < 1:
            raise ConfigError(f"--record-rotate-s must be 0 (off) or at least 1, got {self.rotate_s!r}")
        parent = Path(self.path).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--record {self.path}: directory {parent} does not exist")
        if Path(self.path).is_dir():
            raise ConfigError(f"--record {self.path}: is a directory; give a file path")


class Recorder:
    """Records requests offered on the controller's loop, through a writer process.

    The loop appends to a deque; every :data:`PACK_EVERY` requests (and, when the loop is
    idle, once every :data:`FLUSH_S` through :meth:`attach`'s ``call_soon``) the queued
    requests are packed into one msgpack frame on the loop's own thread. A supervised thread
    only moves those frames into the writer process's pipe (a blocking write, which releases
    the interpreter lock) and starts the writer again if it died. So no second thread competes
    with the loop for the interpreter lock.

    Counters (read by metrics and the final report): ``sampled_out``, ``dropped`` (the queue
    was full), ``recorded`` and ``rotations`` (as the writer reports them), ``lost`` (handed to
    a writer that died before writing them).
    """

    def __init__(self, config: RecordConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._queue: deque[tuple[float, Any]] = deque()
        self._cap = config.queue
        self._threshold = min(int(config.sample * _SAMPLE_SPACE), _SAMPLE_SPACE)
        self._salt = os.urandom(16)
        self._t0 = clock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._pack_lock = threading.Lock()
        self._frames: deque[tuple[bytes, int]] = deque()
        self._call_soon: Callable[[Callable[[], None]], None] | None = None
        self._packed = 0  # records packed into frames (the packing thread's count)
        self._written = 0  # records whose frame went to a writer process (the writer thread's)
        self._pack_asked = False
        self._child: subprocess.Popen[bytes] | None = None
        self._spawns = 0
        self._handed = 0  # records the current writer process was given
        self._status = b""
        self.thread: Supervised | None = None
        self.log = structlog.get_logger("dpcore.recorder")
        # Written by the loop thread only.
        self.sampled_out = 0
        self.dropped = 0
        # Written by the writer thread only: totals of earlier writer processes + the current one's.
        self._done = [0, 0]  # recorded, rotations
        self._current = [0, 0]
        self.lost = 0

    @property
    def recorded(self) -> int:
        return self._done[0] + self._current[0]

    @property
    def rotations(self) -> int:
        return self._done[1] + self._current[1]

    # ------------------------------------------------------------------ the loop's side

    def attach(self, call_soon: Callable[[Callable[[], None]], None]) -> None:
        """Pack on the controller's loop: *call_soon* runs a function there (``Controller.call_soon``)."""
        self._call_soon = call_soon

    def offer(self, request: Any, header: Any = None) -> None:
        """Queue *request* (a :class:`dpcore.Request`) for the writer; never blocks.

        *header*: the request's wire header frame as received (bytes or a zmq frame), when
        there is one: it is queued as it is and decoded by the writer process, so the loop
        copies and converts nothing.
        """
        if self._threshold < _SAMPLE_SPACE and zlib.crc32(request.rid.encode()) >= self._threshold:
            self.sampled_out += 1
            return
        q = self._queue
        if len(q) + self._packed - self._written >= self._cap:
            self.dropped += 1
            return
        q.append((self.clock(), request if header is None else header))
        if len(q) >= PACK_EVERY:
            self.pack()

    def pack(self) -> None:
        """Pack what is queued into one frame for the writer thread (on the loop's thread)."""
        self._pack_asked = False
        with self._pack_lock:
            q = self._queue
            n = len(q)
            if not n:
                return
            popleft = q.popleft
            data = tracewriter.frame([(t, _header(x)) for t, x in (popleft() for _ in range(n))])
            self._frames.append((data, n))
            self._packed += n
        self._ready.set()

    # ------------------------------------------------------------------ the writer thread

    def start(self) -> Supervised:
        """Start the writer process and the supervised thread (``dpcore-recorder``) feeding it."""
        self.thread = Supervised("dpcore-recorder", self._run, self._stop).start()
        return self.thread

    def close(self, timeout_s: float = 10.0) -> None:
        """Hand over what is queued, let the writer finish, and stop it (after the loop ended)."""
        self._call_soon = None
        self.pack()
        self._stop.set()
        self._ready.set()
        if self.thread is not None:
            self.thread.join(timeout_s)
        if self.thread is None or not self.thread.is_alive():
            try:
                self._send()  # what was packed after the thread's last turn (or with no thread)
            except (OSError, ValueError):
                self.log.exception("record_write_failed", lost=self.lost)
            self._end_child(timeout_s)

    def _run(self) -> None:
        while True:
            self._ready.wait(FLUSH_S)
            self._ready.clear()
            stopping = self._stop.is_set()
            if self._queue and not self._frames and not stopping:
                # Quiet traffic: fewer than PACK_EVERY requests since the last frame.
                call_soon = self._call_soon
                if call_soon is None:
                    self.pack()
                elif not self._pack_asked:
                    self._pack_asked = True
                    call_soon(self.pack)
            self._send()
            if stopping:
                return

    def _send(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            self._spawn()
        frames = self._frames
        while frames:
            data, n = frames[0]
            try:
                self._child.stdin.write(data)  # type: ignore[union-attr]
                self._child.stdin.flush()  # type: ignore[union-attr]
            except BaseException:
                frames.popleft()
                self._written += n
                self.lost += n
                self._end_child(1.0)
                raise  # the supervisor logs it, counts it and runs us again (with a new writer)
            frames.popleft()
            self._written += n
            self._handed += n
        self._read_status()

    def _read_status(self) -> None:
        try:
            data = os.read(self._child.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]
        except (BlockingIOError, OSError, ValueError):
            return
        self._parse_status(data)

    def _parse_status(self, data: bytes) -> None:
        text = self._status + data
        lines = text.split(b"\n")
        self._status = lines[-1]
        for line in reversed(lines[:-1]):
            parts = line.split()
            if len(parts) == 2:
                self._current = [int(parts[0]), int(parts[1])]
                return

    def _spawn(self) -> None:
        if self._child is not None:
            self._end_child(1.0)
        cfg = self.config
        self._child = subprocess.Popen(  # noqa: S603 - our own module, no shell
            [sys.executable, "-m", "dpcore.runtime.tracewriter"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        os.set_blocking(self._child.stdout.fileno(), False)  # type: ignore[union-attr]
        settings = {"path": str(Path(cfg.path).resolve()), "block_size": cfg.block_size, "max_bytes": cfg.max_bytes,
                    "rotate_s": cfg.rotate_s, "keep": cfg.keep, "salt": self._salt, "t0": self._t0,
                    "fresh": self._spawns == 0}  # fmt: skip
        self._spawns += 1
        self._child.stdin.write(tracewriter.frame(settings))  # type: ignore[union-attr]
        self._child.stdin.flush()  # type: ignore[union-attr]

    def _end_child(self, timeout_s: float) -> None:
        """Close the writer's input, wait for it to write everything, and settle the counts."""
        child, self._child = self._child, None
        if child is None:
            return
        try:
            child.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        os.set_blocking(child.stdout.fileno(), True)  # type: ignore[union-attr]
        self._parse_status(child.stdout.read())  # type: ignore[union-attr]
        child.stdout.close()  # type: ignore[union-attr]
        if child.returncode:
            self.log.error("record_writer_exited", status=child.returncode, pid=child.pid)
        self.lost += max(self._handed - self._current[0], 0)
        self._done = [self._done[0] + self._current[0], self._done[1] + self._current[1]]
        self._current = [0, 0]
        self._handed = 0
        self._status = b""

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.config.path,
            "offered": self.sampled_out + self.dropped + len(self._queue) + self._packed,
            "recorded": self.recorded,
            "sampled_out": self.sampled_out,
            "dropped": self.dropped,
            "lost": self.lost,
            "queued": len(self._queue) + self._packed - self._written,
            "rotations": self.rotations,
        }

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"path": cfg.path, "block_size": cfg.block_size, "sample": cfg.sample, "max_bytes": cfg.max_bytes,
                "rotate_s": cfg.rotate_s, "keep": cfg.keep}  # fmt: skip

    def summary(self) -> str:
        """One line for the end of ``dpcore serve``."""
        s = self.stats()
        return (
            f"recorded {s['recorded']} of {s['offered']} requests to {s['path']} ({s['rotations']} rotations); "
            f"sampled out {s['sampled_out']}, dropped (queue full) {s['dropped']}, lost (write failed) {s['lost']}"
        )

    def collector(self) -> Any:
        """A Prometheus collector of the counters (``dpcore_record_*``)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        from prometheus_client.registry import Collector

        rec = self

        class RecorderCollector(Collector):
            def collect(self) -> Iterator[Any]:
                s = rec.stats()
                yield CounterMetricFamily("dpcore_record_written", "Requests written to the recording", value=s["recorded"])
                yield CounterMetricFamily(
                    "dpcore_record_sampled_out", "Requests not recorded by --record-sample", value=s["sampled_out"]
                )
                yield CounterMetricFamily(
                    "dpcore_record_dropped", "Requests not recorded because the writer's queue was full", value=s["dropped"]
                )
                yield CounterMetricFamily("dpcore_record_lost", "Queued records lost to a failed write", value=s["lost"])
                yield CounterMetricFamily("dpcore_record_rotations", "Recording files rotated", value=s["rotations"])
                yield GaugeMetricFamily("dpcore_record_queued", "Records waiting for the writer", value=s["queued"])

        return RecorderCollector()


def _header(x: Any) -> Any:
    """What the writer process gets for a queued item: the wire header's bytes, as received
    or (for a :class:`~dpcore.model.Request` offered without one) encoded here."""
    if type(x) is Request:
        return msgpack.packb({"n": x.num_tokens, "bh": x.block_hashes, "mnt": x.max_new_tokens})
    return memoryview(x)


def from_args(args: Any) -> Recorder | None:
    """The recorder of ``dpcore serve``'s ``--record*`` flags, or ``None`` without ``--record``."""
    if not getattr(args, "record", None):
        return None
    return Recorder(config_from_args(args))


def config_from_args(args: Any) -> RecordConfig:
    return RecordConfig(
        path=args.record,
        block_size=args.record_block_size,
        sample=args.record_sample,
        max_bytes=args.record_max_bytes,
        rotate_s=args.record_rotate_s,
        keep=args.record_keep,
        queue=args.record_queue,
    )


def add_arguments(p: Any) -> None:
    """``dpcore serve``'s recording flags."""
    g = p.add_argument_group("recording (a trace dpcore simulate replays; no prompt text is written)")
    g.add_argument("--record", default=None, metavar="PATH",
                   help="record every request's arrival, lengths and salted block hashes to PATH (JSONL)")  # fmt: skip
    g.add_argument("--record-block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                   help="tokens per block hash the senders use, 1..2**20 (default %(default)d, the SDK's and "
                        "the HTTP front's)")  # fmt: skip
    g.add_argument("--record-sample", type=float, default=1.0, metavar="X",
                   help="fraction of requests recorded, in (0, 1], chosen by request id (default 1)")  # fmt: skip
    g.add_argument("--record-max-bytes", type=int, default=1 << 30, metavar="N",
                   help="rotate the file at N bytes, 4096..2**50 (default 1 GiB)")  # fmt: skip
    g.add_argument("--record-rotate-s", type=float, default=0.0, metavar="S",
                   help="also rotate the file every S seconds, 0 (off) or >= 1 (default 0)")  # fmt: skip
    g.add_argument("--record-keep", type=int, default=10, metavar="N",
                   help="rotated files kept next to PATH (name.1.jsonl is the newest), 0..10000 (default 10)")  # fmt: skip
    g.add_argument("--record-queue", type=int, default=1 << 16, metavar="N",
                   help="records waiting for the writer before new ones are dropped and counted, 1..2**24 "
                        "(default 65536)")  # fmt: skip
