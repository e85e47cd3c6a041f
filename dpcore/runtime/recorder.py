"""Live traffic as a trace ``dpcore simulate`` replays (``dpcore serve --record PATH``).

Each request the controller receives becomes one Mooncake-style JSON line::

    {"timestamp": 1234.567, "input_length": 700, "output_length": 93,
     "hash_ids": [..11 ids..], "block_size": 64, "output_from": "generated"}

* ``timestamp``: milliseconds since the recording started (arrival at the controller).
* ``input_length``: the prompt's tokens.
* ``output_length``: the tokens the rank generated, when its load report said so
  (``output_from: "generated"``); else the request's ``max_new_tokens`` (``"budget"``, ``0``
  when the sender gave none; the simulator then decodes one token).
* ``hash_ids``: the sender's block hashes, salted (:class:`dpcore.tracefile.Salted`, one key
  per recording, kept across rotations): equal prefixes keep equal ids, but the ids cannot be
  matched against hashes of known prompts. A request sent without block hashes is written
  with ``[]``: the simulator treats it as sharing no prefix.
* ``block_size``: tokens per id, the senders' block size (``--record-block-size``).

No prompt text or token id is ever written.

On the controller's loop, :meth:`Recorder.offer` appends the arrival time and the request's
header frame as received (a reference, nothing is encoded) to a bounded batch; a full queue
drops the record and counts it, never blocking. :meth:`Recorder.ended` appends a request id
and its output tokens when a rank reports it done (or the controller fails or rejects it).
Every :data:`PACK_EVERY` requests, or once the oldest has waited :data:`FLUSH_S`, the batch
becomes one frame by joining those bytes; a supervised thread (:mod:`dpcore.runtime.supervise`)
writes it to a writer process (:mod:`dpcore.runtime.tracewriter`), which decodes, joins,
salts, formats, writes and rotates: that work never holds the controller's interpreter lock.
A writer process that dies is started again (same salt and time origin); what it had not
written is counted as lost. Sampling (``sample < 1``) keeps a request when a hash of its id
falls under the rate, so a retried id is kept or dropped alike.
"""

from __future__ import annotations

import os
import select
import threading
import time
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog

from dpcore import tracefile, wire
from dpcore.model import Request
from dpcore.runtime import recordframes
from dpcore.runtime.recordconfig import RecordConfig, add_arguments, config_from_args
from dpcore.runtime.recordprocess import WriterProcess
from dpcore.runtime.supervise import Supervised

__all__ = ["FLUSH_S", "PACK_EVERY", "RecordConfig", "Recorder", "add_arguments", "config_from_args", "from_args"]

#: Longest a received request waits on the controller before it is handed to the writer (seconds).
FLUSH_S = 0.1
#: Requests packed into one frame for the writer process (fewer wakeups than one per request).
PACK_EVERY = 1024
_SAMPLE_SPACE = 1 << 32


class Recorder:
    """Records requests offered on the controller's loop, through a writer process.

    Batches are packed on the loop's own thread (when :meth:`offer` fills one or finds it
    old, or through :meth:`attach`'s ``call_soon`` when traffic stops). A supervised thread
    only moves the packed frames into the writer process's pipe (a blocking write, which
    releases the interpreter lock) and starts the writer again if it died, so it wakes once a
    batch, not once a request.

    Counters (read by metrics and the final report): ``sampled_out``, ``dropped`` (the queue
    was full), ``recorded``, ``rotations``, ``generated`` (lines with the real output length)
    ``held`` (waiting for their request to end) and ``python_batches`` (batches the writer's
    compiled pass handed to its slower Python path: a sender whose headers always do so costs
    the writer several times the CPU), as the writer reports them, and ``lost`` (handed to a
    writer that died before writing them).
    """

    def __init__(self, config: RecordConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._hdrs: list[Any] = []
        self._times = array("d")
        self._ends: list[tuple[str, int]] = []
        self._cap = config.queue
        self._room = self._cap  # requests the batch may hold before the queue is full (at least)
        self._threshold = min(int(config.sample * _SAMPLE_SPACE), _SAMPLE_SPACE)
        self._kind = tracefile.default_kind()
        self._stop = threading.Event()
        self._ready = threading.Event()
        # Taken by both threads only when there is no call_soon (packing may then run on
        # the writer thread); uncontended, it costs a fraction of a microsecond.
        self._lock = threading.Lock()
        self._frames: deque[tuple[bytes, int]] = deque()
        self._call_soon: Callable[[Callable[[], None]], None] | None = None
        self._packed = 0  # records packed into frames (the packing thread's count)
        self._written = 0  # records whose frame went to a writer process (the writer thread's)
        self._pack_asked = False
        cfg = config
        # One salt and time origin for every writer process: a replacement continues the recording.
        self._proc = WriterProcess(
            {"path": str(Path(cfg.path).resolve()), "block_size": cfg.block_size, "max_bytes": cfg.max_bytes,
             "rotate_s": cfg.rotate_s, "keep": cfg.keep, "salt": os.urandom(16), "kind": self._kind,
             "t0": clock(), "hold_s": cfg.hold_s, "max_held": cfg.queue, "nice": cfg.nice}
        )  # fmt: skip
        self.thread: Supervised | None = None
        self.log = structlog.get_logger("dpcore.recorder")
        # Written by the loop thread only.
        self.sampled_out = 0
        self.dropped = 0

    @property
    def writer_path(self) -> str | None:
        """How the writer process decodes, salts and formats (:data:`dpcore.runtime.tracewriter.COMPILED`
        or ``PYTHON``), as it said when it started; ``None`` before that."""
        return self._proc.writer_path

    @property
    def recorded(self) -> int:
        return self._proc.total(0)

    @property
    def rotations(self) -> int:
        return self._proc.total(1)

    @property
    def generated(self) -> int:
        return self._proc.total(2)

    @property
    def python_batches(self) -> int:
        """Batches the writer's compiled pass handed to its Python path (to decode or to format)."""
        return self._proc.total(3)

    @property
    def lost(self) -> int:
        """Records handed to a writer process that ended before writing them."""
        return self._proc.lost

    # ------------------------------------------------------------------ the loop's side

    def attach(self, call_soon: Callable[[Callable[[], None]], None]) -> None:
        """Pack on the controller's loop: *call_soon* runs a function there (``Controller.call_soon``)."""
        self._call_soon = call_soon

    def install(self, controller: Any) -> None:
        """Record what *controller* (a :class:`~dpcore.runtime.controller.Controller`) receives,
        and when each request ends."""
        self.attach(controller.call_soon)
        # On the loop's thread, with nothing sampled out, straight to the queue: no checks
        # that cannot change per request.
        every = self._threshold >= _SAMPLE_SPACE
        controller.placer.record = self._offer if every else self.offer
        if self.config.hold_s > 0:
            controller.placer.record_end = controller.inflight.ended = self._ended

    def offer(self, request: Any, header: Any = None) -> None:
        """Queue *request* (a :class:`dpcore.Request`) for the writer; never blocks.

        *header*: the request's wire header frame as received (bytes or a zmq frame), when
        there is one: the frame is kept as it is and its bytes joined into the batch, so the
        loop copies and converts nothing per request.
        """
        if self._threshold < _SAMPLE_SPACE and zlib.crc32(request.rid.encode()) >= self._threshold:
            self.sampled_out += 1
            return
        if self._call_soon is None:
            with self._lock:
                self._offer(request, header)
        else:
            self._offer(request, header)

    def _offer(self, request: Any, header: Any) -> None:
        hdrs = self._hdrs
        if len(hdrs) >= self._room and not self._has_room():
            self.dropped += 1
            return
        t = self.clock()
        times = self._times
        times.append(t)
        hdrs.append(_header(request) if header is None else header)
        if len(hdrs) >= PACK_EVERY or t - times[0] >= FLUSH_S:
            self._pack()

    def _has_room(self) -> bool:
        """Whether the queue takes one more (the writer thread may have written frames since
        the room was last counted: it only ever grows between counts)."""
        self._room = self._cap - (self._packed - self._written)
        return len(self._hdrs) < self._room

    def ended(self, rid: str, output_tokens: int = -1) -> None:
        """Request *rid* ended with *output_tokens* generated (``-1``: not known); on the loop."""
        if self._call_soon is None:
            with self._lock:
                self._ends.append((rid, output_tokens))
        else:
            self._ends.append((rid, output_tokens))

    def _ended(self, rid: str, output_tokens: int) -> None:
        self._ends.append((rid, output_tokens))

    def pack(self) -> None:
        """Pack what is queued into one frame for the writer thread."""
        self._pack_asked = False
        with self._lock:
            self._pack()

    def _pack(self) -> None:
        hdrs, ends = self._hdrs, self._ends
        if not hdrs and not ends:
            return
        times = self._times
        self._hdrs, self._times, self._ends = [], array("d"), []
        self._frames.append((recordframes.batch_body(times, hdrs, ends), len(hdrs)))
        self._packed += len(hdrs)
        self._room = self._cap - (self._packed - self._written)
        self._ready.set()

    # ------------------------------------------------------------------ the writer thread

    def start(self, ready_timeout_s: float = 30.0) -> Supervised:
        """Start the writer process, wait until it has opened the file (so its start-up is
        not paid while requests flow), and start the supervised thread (``dpcore-recorder``)."""
        missing = [name for name, there in (("dpcore-speedups", recordframes.speedups is not None),
                                            ("msgspec", recordframes.msgspec is not None),
                                            ("numpy", self._kind == tracefile.SIPHASH)) if not there]  # fmt: skip
        if missing:  # the same recording, at several times the writer's CPU a request
            self.log.warning("record_writer_without_fast_parts", missing=missing, fix="pip install 'dpcore[record]'")
        proc = self._proc
        proc.spawn()
        if select.select([proc.child.stdout], [], [], ready_timeout_s)[0]:  # type: ignore[union-attr]
            proc.read_status()
        else:
            self.log.warning("record_writer_slow_to_start", waited_s=ready_timeout_s)
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
            self._proc.end(timeout_s)

    def _run(self) -> None:
        while True:
            self._ready.wait(FLUSH_S)
            self._ready.clear()
            stopping = self._stop.is_set()
            if (self._hdrs or self._ends) and not self._frames and not stopping:
                # Quiet traffic: nothing arrived to pack the last requests (or completions).
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
        proc = self._proc
        proc.ensure()
        frames = self._frames
        while frames:
            data, n = frames[0]
            try:
                proc.send(data, n)  # on failure: counted lost; the supervisor logs it and runs us again
            finally:
                frames.popleft()
                self._written += n
        proc.read_status()

    # ------------------------------------------------------------------ reporting

    def stats(self) -> dict[str, Any]:
        return {
            "path": self.config.path,
            "offered": self.sampled_out + self.dropped + len(self._hdrs) + self._packed,
            "recorded": self.recorded,
            "generated": self.generated,
            "held": self._proc.held,
            "sampled_out": self.sampled_out,
            "dropped": self.dropped,
            "lost": self.lost,
            "queued": len(self._hdrs) + self._packed - self._written,
            "rotations": self.rotations,
            "writer_path": self.writer_path,
            "python_batches": self.python_batches,
        }

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {"path": cfg.path, "block_size": cfg.block_size, "sample": cfg.sample, "max_bytes": cfg.max_bytes,
                "rotate_s": cfg.rotate_s, "keep": cfg.keep, "hold_s": cfg.hold_s, "nice": cfg.nice}  # fmt: skip

    def summary(self) -> str:
        """One line for the end of ``dpcore serve``."""
        s = self.stats()
        return (
            f"recorded {s['recorded']} of {s['offered']} requests to {s['path']} ({s['rotations']} rotations, "
            f"{s['generated']} with the output length generated); "
            f"sampled out {s['sampled_out']}, dropped (queue full) {s['dropped']}, lost (write failed) {s['lost']}; "
            f"lines formatted by the writer's {s['writer_path'] or 'unstarted'} path"
            + (f" ({s['python_batches']} batches handed to its Python path)" if s["python_batches"] else "")
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
                yield CounterMetricFamily(
                    "dpcore_record_generated", "Requests written with the output tokens their rank generated",
                    value=s["generated"],
                )
                yield GaugeMetricFamily("dpcore_record_held", "Records waiting for their request to end", value=s["held"])
                yield CounterMetricFamily("dpcore_record_rotations", "Recording files rotated", value=s["rotations"])
                yield GaugeMetricFamily("dpcore_record_queued", "Records waiting for the writer", value=s["queued"])
                yield CounterMetricFamily(
                    "dpcore_record_python_batches",
                    "Batches the writer's compiled pass handed to its slower Python path (to decode or to format)",
                    value=s["python_batches"],
                )

        return RecorderCollector()


def _header(request: Request) -> bytes:
    """The header frame of a request offered without one (the SGLang adapter): the writer reads
    every request through the wire's own header fields."""
    return wire.encode_request(request.rid, num_tokens=request.num_tokens, reply="",
                               block_hashes=request.block_hashes or (), max_new_tokens=request.max_new_tokens)  # fmt: skip


def from_args(args: Any) -> Recorder | None:
    """The recorder of ``dpcore serve``'s ``--record*`` flags, or ``None`` without ``--record``."""
    if not getattr(args, "record", None):
        return None
    return Recorder(config_from_args(args))
