"""The recording's writer process: joins completions, salts, formats, writes and rotates.

``dpcore serve --record`` starts it (``python -m dpcore.runtime.tracewriter``) so that the
CPU spent on salting block hashes and formatting JSON never holds the controller's GIL. The
controller sends it length-prefixed msgpack frames on its stdin: first the settings (with
the recording's salt and time origin, so a restarted writer continues the same recording),
then batches ``[arrival times, request headers, completions]``:

* arrival times: native float64s, one per header;
* request headers: the wire headers as the controller received them (only ``rid``, ``n``,
  ``bh`` and ``mnt`` are read; the request id only to join a completion, never written);
* completions: ``[rid, output tokens]`` pairs (``-1``: the rank did not say), for requests
  that ended.

A request is held until its completion arrives, so its line carries the number of tokens the
rank generated (``"output_from": "generated"``). With dpcore-speedups the records wait in its
compiled hold (``dpcore_speedups.Hold``: a batch is read, joined with its completions and
formatted with no Python object per record); the Python hold below writes the same bytes.
Lines are written in arrival order (what ``dpcore simulate`` reads), so a request also leaves
when it has waited ``hold_s`` or when more than ``max_held`` are waiting; it is then written
with its ``max_new_tokens`` (``"output_from": "budget"``), as is one whose rank did not count
its output. When it is ready, and after each batch, the process prints ``recorded rotations
generated python_batches held`` on stdout. It ends when its stdin closes (also when the
controller dies), writing what it holds; it ignores Ctrl-C, so the controller's last batch
still gets written, and runs at a lower CPU priority than the controller (the settings'
``nice``, ``--record-nice``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

from dpcore import tracefile
from dpcore.runtime import recordframes
from dpcore.runtime.recordframes import FrameReader, decode_batch, decode_batch_python, load_numpy, records_from_maps

GENERATED, BUDGET = "generated", "budget"
#: How the writer decodes, salts and formats a batch (:attr:`TraceWriter.writer_path`): in one
#: compiled pass (dpcore-speedups), or in Python (with numpy and msgspec when installed).
COMPILED, PYTHON = "compiled", "python"


def rotated_path(path: str | Path, n: int) -> Path:
    """The *n*-th older file of a recording at *path*: ``traffic.jsonl`` -> ``traffic.2.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{n}{p.suffix}") if p.suffix else p.with_name(f"{p.name}.{n}")


class TraceWriter:
    """Writes records to *path* in arrival order, rotating it by size and age, keeping *keep* old files.

    A file that has reached *max_bytes*, or is *rotate_s* old (0: never), is rotated before
    the next write, so *path* always holds the newest requests and an empty file never rotates.
    Records wait for their completion up to *hold_s* seconds (0: not at all), at most
    *max_held* of them.
    """

    def __init__(
        self,
        path: str,
        *,
        block_size: int,
        max_bytes: int,
        rotate_s: float,
        keep: int,
        salt: bytes | None = None,
        kind: str | None = None,
        t0: float = 0.0,
        hold_s: float = 0.0,
        max_held: int = 1 << 18,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.rotate_s = rotate_s
        self.keep = keep
        self.t0 = t0
        self.hold_s = hold_s
        self.max_held = max_held
        self.clock = clock
        self.salted = tracefile.Salted(block_size, salt, kind)
        self._np = load_numpy() if self.salted.kind == tracefile.SIPHASH else None
        self._fast = recordframes.speedups if self._np is not None else None
        #: :data:`COMPILED` or :data:`PYTHON`; ``python_batches`` counts the batches the
        #: compiled pass handed to Python, to decode (a header field of a type it does not
        #: read exactly) or to format (a record it does not format exactly).
        self.writer_path = PYTHON if self._fast is None else COMPILED
        self.python_batches = 0
        # tracefile.line's constant end, as bytes (a test holds them equal).
        self._ends = tuple(
            f'], "block_size": {block_size}, "output_from": "{src}"}}\n'.encode() for src in (GENERATED, BUDGET)
        )
        self.recorded = 0
        self.rotations = 0
        self.generated = 0
        # With the compiled pass, records are held in C (no Python object per record), until a
        # record only the Python path writes exactly arrives: the rest are held below from then on.
        self._hold = (
            self._fast.Hold(block_size, t0, *self.salted.siphash_key, *self._ends, hold_s > 0, max_held)
            if self._fast is not None
            else None
        )
        # Held records, oldest first: [arrival, n, mnt, block hashes as big-endian 64-bit words
        # (:func:`dpcore.runtime.recordframes.packed`), output tokens or None, rid]; by rid
        # too (a deque of them for an id sent again before it ended).
        self._held: deque[list[Any]] = deque()
        self._by_rid: dict[str, Any] = {}
        self._file: IO[bytes] | None = None
        self._bytes = 0
        self._opened = 0.0

    def open(self, *, fresh: bool) -> None:
        """Open *path* for appending; when *fresh*, an earlier recording there (another salt
        and time origin) is rotated aside first."""
        path = Path(self.path)
        if fresh and path.exists() and path.stat().st_size:
            self._shift()
        self._file = open(path, "ab")  # noqa: SIM115 - closed by close()
        self._bytes = self._file.tell()
        self._opened = self.clock()

    def add(
        self, times: Sequence[float], headers: Iterable[Any], ends: Iterable[Sequence[Any]] = (), *, raw: bool = False
    ) -> None:
        """Take a batch: arrival *times* and decoded request *headers* (maps), then completions
        ``(rid, output tokens or -1)``; write what is ready. *raw*: the headers were decoded
        with msgpack's ``raw=True`` (keys and strings as bytes, which skips UTF-8 decoding)."""
        self.take(records_from_maps(times, headers, raw), ends)

    def take_batch(self, body: Any) -> None:
        """Take a batch frame as the controller packed it (:func:`dpcore.runtime.recordframes.batch_body`)."""
        hold = self._hold
        if hold is not None:
            if hold.take(body):
                self.flush(everything=self.hold_s <= 0)
                return
            self._handed_back()
            self.take(*decode_batch_python(body))
            return
        self.take(*decode_batch(body, self._handed_back if self._fast is not None else None))

    def _handed_back(self) -> None:
        """The compiled pass handed a batch to the Python path."""
        self.python_batches += 1

    def take(self, records: list[list[Any]], ends: Iterable[Sequence[Any]] = ()) -> None:
        """Take a batch of records ``[arrival, n, mnt, packed hashes, None, rid]`` (:func:`dpcore.runtime.recordframes.decode_batch`)
        and completions ``(rid, output tokens or -1)``; write what is ready."""
        hold = self.hold_s > 0
        if self._hold is not None:
            if self._hold.take_records(records, ends):
                self.flush(everything=not hold)
                return
            self._to_python()
        held, by_rid = self._held, self._by_rid
        held.extend(records)
        if hold:
            self._index(records)
        for rid, out in ends:
            rec = by_rid.pop(rid, None)
            if type(rec) is deque:
                first = rec.popleft()
                if len(rec) == 1:
                    by_rid[rid] = rec[0]
                elif rec:
                    by_rid[rid] = rec
                rec = first
            if rec is not None:
                rec[4] = out if type(out) is int and out >= 0 else -1
        self.flush(everything=not hold)

    def _index(self, records: Iterable[list[Any]]) -> None:
        """Find *records* by request id when their completion comes."""
        by_rid = self._by_rid
        setdefault = by_rid.setdefault
        for rec in records:
            rid = rec[5]
            prev = setdefault(rid, rec)
            if prev is rec:
                continue
            if type(prev) is deque:
                prev.append(rec)
            else:
                by_rid[rid] = deque((prev, rec))  # a retried id: completions in order

    def _to_python(self) -> None:
        """Hold records in Python from now on (a record the compiled hold does not take
        exactly came): the records it held move here, in order, with their completions."""
        records = self._hold.drain()  # type: ignore[union-attr]
        self._hold = None
        self._held.extend(records)
        if self.hold_s > 0:
            self._index([rec for rec in records if rec[4] is None])

    def flush(self, *, everything: bool = False) -> float | None:
        """Write the held records that are ready (all when *everything*); returns when the
        oldest still held must go (a monotonic time), or ``None``."""
        hold = self._hold
        if hold is not None:
            salted = self.salted
            text, n, generated, tail = hold.flush(self.clock() - self.hold_s, everything, salted.tails_given)
            salted.gave_tails(tail)
            if n:
                self._write_text(text, n, generated)
            oldest = hold.oldest()
            return None if oldest is None else oldest + self.hold_s
        held = self._held
        ready = []
        deadline = self.clock() - self.hold_s
        while held and (everything or held[0][4] is not None or held[0][0] <= deadline or len(held) > self.max_held):
            rec = held.popleft()
            if rec[4] is None and not everything:
                self._forget(rec)
            ready.append(rec)
        if ready:
            self._write(ready)
        if not held:
            self._by_rid.clear()
            return None
        return held[0][0] + self.hold_s

    def _forget(self, rec: list[Any]) -> None:
        """*rec* leaves before its completion: a late completion must not match another record."""
        rid = rec[5]
        entry = self._by_rid.get(rid)
        if entry is rec:
            del self._by_rid[rid]
        elif type(entry) is deque:
            with contextlib.suppress(ValueError):
                entry.remove(rec)
            if len(entry) == 1:
                self._by_rid[rid] = entry[0]

    def _write(self, records: list[list[Any]]) -> None:
        text, generated = self._text(records)
        self._write_text(text, len(records), generated)

    def _write_text(self, text: bytes | bytearray, lines: int, generated: int) -> None:
        """Append *text* (*lines* lines, *generated* of them with the generated output length)."""
        if self._file is None:
            self.open(fresh=False)
        if self._bytes and (
            self._bytes >= self.max_bytes or (self.rotate_s and self.clock() - self._opened >= self.rotate_s)
        ):
            self._rotate()
        self._file.write(text)  # type: ignore[union-attr]
        self._file.flush()  # type: ignore[union-attr]
        self.recorded += lines
        self.generated += generated
        self._bytes += len(text)

    def _text(self, records: list[list[Any]]) -> tuple[bytes | bytearray, int]:
        """The lines of *records* and how many carry a generated output length."""
        salted = self.salted
        if self._fast is not None:
            got = self._fast.lines(
                records, self.block_size, self.t0, *salted.siphash_key, salted.tails_given, *self._ends
            )
            if got is not None:
                text, generated, tail = got
                salted.gave_tails(tail)
                return text, generated
            self._handed_back()
        return self._python_text(records)

    def _python_text(self, records: list[list[Any]]) -> tuple[bytearray, int]:
        bs, t0, salted = self.block_size, self.t0, self.salted
        # Salted.wanted of each record, inline: ceil(n / bs) ids when the sender's hashes fit.
        wants = [k if (h := len(r[3]) >> 3) and h <= (k := -(-r[1] // bs)) else 0 for r in records]
        # Every id of the batch as fixed-width text in one call (block ids, then ids of blocks
        # the sender did not hash), then cut per line.
        words = b"".join([r[3] for r, w in zip(records, wants) if w])
        count = len(words) >> 3
        n_tails = int(sum(wants)) - count  # an int also when a length came as a float (tails_given stays one)
        hashes = self._np.frombuffer(words, ">u8") if self._np is not None else struct.unpack(f">{count}Q", words)
        ids = salted.salt_text(hashes, n_tails)
        cut = memoryview(ids)  # a line's ids are appended from here without a copy of their own
        w = tracefile.ID_TEXT
        gen_end, budget_end = self._ends
        head = b'{"timestamp": %.3f, "input_length": %d, "output_length": %d, "hash_ids": ['
        text, at, at_tail, generated = bytearray(), 0, count * w, 0
        for (t, n, mnt, bh, done, _rid), want in zip(records, wants):
            if done is not None and done >= 0:
                generated += 1
                text += head % ((t - t0) * 1000, n, done)
                end_line = gen_end
            else:
                text += head % ((t - t0) * 1000, n, mnt)
                end_line = budget_end
            if want:
                k = len(bh) >> 3
                end = at + k * w
                if want > k:
                    end_tail = at_tail + (want - k) * w
                    text += cut[at:end]
                    text += cut[at_tail : end_tail - 2]
                    at_tail = end_tail
                else:
                    text += cut[at : end - 2]
                at = end
            text += end_line
        return text, generated

    @property
    def held(self) -> int:
        return len(self._held) if self._hold is None else len(self._hold)

    def close(self) -> None:
        """Write everything held (with what is known) and close the file."""
        self.flush(everything=True)
        f, self._file = self._file, None
        if f is not None:
            f.close()

    def _shift(self) -> None:
        path, keep = self.path, self.keep
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
        f, self._file = self._file, None
        if f is not None:
            f.close()
        self._shift()
        self.rotations += 1
        self.open(fresh=False)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us by closing stdin
    # What this process allocates (decoded frames, held records, text) holds no reference
    # cycles, so reference counting frees all of it; the cyclic collector would only re-scan
    # the held records and a batch's thousands of fresh containers, over and over.
    gc.disable()
    frames = FrameReader(sys.stdin.fileno())
    cfg = frames.next(None)
    if cfg is None:
        return 0
    # Recording yields the CPU to serving: on a host with no idle core this process falls
    # behind, the controller's queue fills, and records are dropped (and counted) instead.
    with contextlib.suppress(OSError):
        os.nice(cfg["nice"])
    w = TraceWriter(cfg["path"], block_size=cfg["block_size"], max_bytes=cfg["max_bytes"], rotate_s=cfg["rotate_s"],
                    keep=cfg["keep"], salt=cfg["salt"], kind=cfg["kind"], t0=cfg["t0"], hold_s=cfg["hold_s"],
                    max_held=cfg["max_held"])  # fmt: skip
    w.open(fresh=cfg["fresh"])
    try:
        reporting = True
        sys.stdout.write(f"path {w.writer_path}\n0 0 0 0 0\n")  # ready
        sys.stdout.flush()
        due = None
        while True:
            body = frames.body(None if due is None else due - time.monotonic())
            if body is not None:
                w.take_batch(body)
            elif frames.eof:
                break
            due = w.flush()
            if reporting:
                try:
                    sys.stdout.write(f"{w.recorded} {w.rotations} {w.generated} {w.python_batches} {w.held}\n")
                    sys.stdout.flush()
                except OSError:  # the controller is gone; what it sent is still written
                    reporting = False
    finally:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
