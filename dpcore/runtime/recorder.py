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

The controller's loop only appends a small tuple to a bounded deque (:meth:`Recorder.offer`);
a full deque drops the record and counts it, never blocking. A supervised writer thread
(:mod:`dpcore.runtime.supervise`) wakes every :data:`FLUSH_S`, formats what is queued and
writes it; a file that has reached ``max_bytes`` or is ``rotate_s`` old is rotated before the
next write (an empty one never is), keeping ``keep`` old files (``PATH`` stays the newest;
``name.1.jsonl`` is the one before it). Sampling (``sample < 1``) keeps a request when a hash
of its id falls under the rate, so a retried id is kept or dropped alike.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import structlog
from attrs import field, frozen

from dpcore import tracefile
from dpcore.errors import ConfigError
from dpcore.hashing import DEFAULT_BLOCK_SIZE
from dpcore.runtime.supervise import Supervised

#: How often the writer thread wakes to write what is queued (seconds).
FLUSH_S = 0.05
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


def rotated_path(path: str | Path, n: int) -> Path:
    """The *n*-th older file of a recording at *path*: ``traffic.jsonl`` -> ``traffic.2.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{n}{p.suffix}") if p.suffix else p.with_name(f"{p.name}.{n}")


class Recorder:
    """Records requests offered on the controller's loop to a rotating trace file.

    Counters (read by metrics and the final report): ``recorded`` (written), ``sampled_out``,
    ``dropped`` (the queue was full), ``lost`` (queued but the write failed), ``rotations``.
    """

    def __init__(self, config: RecordConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._queue: deque[tuple[float, int, tuple[int, ...], int | None]] = deque()
        self._threshold = min(int(config.sample * _SAMPLE_SPACE), _SAMPLE_SPACE)
        self._salted = tracefile.Salted(config.block_size)
        self._t0 = clock()
        self._file: IO[str] | None = None
        self._bytes = 0
        self._opened = 0.0
        self._stop = threading.Event()
        self.thread: Supervised | None = None
        self.log = structlog.get_logger("dpcore.recorder")
        # Written by the loop thread only.
        self.offered = 0
        self.sampled_out = 0
        self.dropped = 0
        # Written by the writer thread only.
        self.recorded = 0
        self.lost = 0
        self.rotations = 0

    # ------------------------------------------------------------------ the loop's side

    def offer(self, request: Any) -> None:
        """Queue *request* (a :class:`dpcore.Request`) for the writer; never blocks."""
        self.offered += 1
        if self._threshold < _SAMPLE_SPACE and zlib.crc32(request.rid.encode()) >= self._threshold:
            self.sampled_out += 1
            return
        q = self._queue
        if len(q) >= self.config.queue:
            self.dropped += 1
            return
        q.append((self.clock(), request.num_tokens, request.block_hashes, request.max_new_tokens))

    # ------------------------------------------------------------------ the writer

    def start(self) -> Supervised:
        """Start the supervised writer thread (``dpcore-recorder``)."""
        self.thread = Supervised("dpcore-recorder", self._run, self._stop).start()
        return self.thread

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, close the file and stop the writer."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout_s)
        if self.thread is None or not self.thread.is_alive():
            self._write()  # whatever arrived after the writer's last turn (or with no writer)
            self._close_file()

    def _run(self) -> None:
        if self._file is None:
            self._open(fresh=self.rotations == 0 and self.recorded == 0)
        while True:
            stopping = self._stop.wait(FLUSH_S)
            self._write()
            if stopping:
                return

    def _write(self) -> None:
        q = self._queue
        n = len(q)
        if not n:
            return
        batch = [q.popleft() for _ in range(n)]
        try:
            text = "".join(self._lines(batch))
            if self._file is None:
                self._open(fresh=False)
            cfg = self.config
            if self._bytes and (
                self._bytes >= cfg.max_bytes or (cfg.rotate_s and self.clock() - self._opened >= cfg.rotate_s)
            ):
                self._rotate()  # before writing, so PATH always holds the newest requests
            self._file.write(text)  # type: ignore[union-attr]
            self._file.flush()  # type: ignore[union-attr]
        except BaseException:
            self.lost += n
            self._close_file()
            raise  # the supervisor logs it, counts it and starts the writer again
        self.recorded += n
        self._bytes += len(text)

    def _lines(self, batch: list[tuple[float, int, tuple[int, ...], int | None]]) -> Iterator[str]:
        bs = self.config.block_size
        t0 = self._t0
        ids = self._salted.ids
        for t, n, hashes, mnt in batch:
            yield tracefile.line((t - t0) * 1000, n, mnt or 0, ids(hashes, n), bs)

    # ------------------------------------------------------------------ files

    def _open(self, *, fresh: bool) -> None:
        path = Path(self.config.path)
        if fresh and path.exists() and path.stat().st_size:
            # An earlier recording (another salt and time base) is moved aside, not appended to.
            self._shift()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by _close_file
        self._bytes = self._file.tell()
        self._opened = self.clock()

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                self.log.warning("record_close_failed", path=self.config.path)

    def _shift(self) -> None:
        path, keep = self.config.path, self.config.keep
        if keep == 0:
            Path(path).unlink(missing_ok=True)
            return
        rotated_path(path, keep).unlink(missing_ok=True)
        for i in range(keep - 1, 0, -1):
            older = rotated_path(path, i)
            if older.exists():
                older.replace(rotated_path(path, i + 1))
        Path(path).replace(rotated_path(path, 1))

    def _rotate(self) -> None:
        self._close_file()
        self._shift()
        self.rotations += 1
        self._open(fresh=False)
        self.log.info("record_rotated", path=self.config.path, rotations=self.rotations)

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.config.path,
            "offered": self.offered,
            "recorded": self.recorded,
            "sampled_out": self.sampled_out,
            "dropped": self.dropped,
            "lost": self.lost,
            "queued": len(self._queue),
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
