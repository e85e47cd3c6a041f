"""The recording's writer process: salts, formats, writes and rotates trace files.

``dpcore serve --record`` starts it (``python -m dpcore.runtime.tracewriter``) so that the
CPU spent on salting block hashes and formatting JSON never holds the controller's GIL. The
controller sends it length-prefixed msgpack frames on its stdin: first the settings (with
the recording's salt and time origin, so a restarted writer continues the same recording),
then batches of ``[arrival, request header]`` (the wire header as the controller received
it: only ``n``, ``bh`` and ``mnt`` are read, never the request id or reply endpoint, and
nothing but lengths and salted ids is written). After each batch it
prints ``recorded rotations`` on stdout. It ends when its stdin closes (also when the
controller dies), ignores Ctrl-C, so the controller's last batch still gets written, and runs
at a lower CPU priority (:data:`NICE`) than the controller.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO

import msgpack

from dpcore import tracefile

#: Bytes of a frame's length prefix (little-endian).
PREFIX = 4
#: How much lower than the controller's this process's CPU priority is.
NICE = 10
#: Largest frame the writer reads (a batch of the default 65,536 queued records fits).
MAX_FRAME = 1 << 30


def rotated_path(path: str | Path, n: int) -> Path:
    """The *n*-th older file of a recording at *path*: ``traffic.jsonl`` -> ``traffic.2.jsonl``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.{n}{p.suffix}") if p.suffix else p.with_name(f"{p.name}.{n}")


class TraceWriter:
    """Writes batches of records to *path*, rotating it by size and age, keeping *keep* old files.

    A file that has reached *max_bytes*, or is *rotate_s* old (0: never), is rotated before
    the next write, so *path* always holds the newest requests and an empty file never rotates.
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
        t0: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.block_size = block_size
        self.max_bytes = max_bytes
        self.rotate_s = rotate_s
        self.keep = keep
        self.t0 = t0
        self.clock = clock
        self.salted = tracefile.Salted(block_size, salt)
        self.recorded = 0
        self.rotations = 0
        self._file: IO[str] | None = None
        self._bytes = 0
        self._opened = 0.0

    def open(self, *, fresh: bool) -> None:
        """Open *path* for appending; when *fresh*, an earlier recording there (another salt
        and time origin) is rotated aside first."""
        path = Path(self.path)
        if fresh and path.exists() and path.stat().st_size:
            self._shift()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._bytes = self._file.tell()
        self._opened = self.clock()

    def write(self, batch: Sequence[Sequence[Any]]) -> None:
        """Write *batch*: ``(arrival, header)`` pairs, the header a request's msgpack wire
        header (bytes) or its decoded mapping."""
        if not batch:
            return
        bs, t0, ids, line = self.block_size, self.t0, self.salted.ids, tracefile.line
        out = []
        for t, raw in batch:
            h = raw if isinstance(raw, Mapping) else msgpack.unpackb(raw)
            n = h.get("n") or 0
            out.append(line((t - t0) * 1000, n, h.get("mnt") or 0, ids(h.get("bh") or (), n), bs))
        text = "".join(out)
        if self._file is None:
            self.open(fresh=False)
        if self._bytes and (
            self._bytes >= self.max_bytes or (self.rotate_s and self.clock() - self._opened >= self.rotate_s)
        ):
            self._rotate()
        self._file.write(text)  # type: ignore[union-attr]
        self._file.flush()  # type: ignore[union-attr]
        self.recorded += len(batch)
        self._bytes += len(text)

    def close(self) -> None:
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
        self.close()
        self._shift()
        self.rotations += 1
        self.open(fresh=False)


def frame(obj: Any) -> bytes:
    """*obj* as one length-prefixed msgpack frame."""
    data = msgpack.packb(obj)
    return len(data).to_bytes(PREFIX, "little") + data


def read_frame(stream: BinaryIO) -> Any:
    """The next frame's object, or ``None`` at the end of *stream*."""
    head = stream.read(PREFIX)
    if len(head) < PREFIX:
        return None
    size = int.from_bytes(head, "little")
    if size > MAX_FRAME:
        msg = f"frame of {size} bytes, more than {MAX_FRAME}"
        raise ValueError(msg)
    data = stream.read(size)
    if len(data) < size:
        return None
    return msgpack.unpackb(data, use_list=False)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the controller stops us by closing stdin
    # Recording yields the CPU to serving: on a host with no idle core this process falls
    # behind, the controller's queue fills, and records are dropped (and counted) instead.
    with contextlib.suppress(OSError):
        os.nice(NICE)
    stdin = sys.stdin.buffer
    cfg = read_frame(stdin)
    if cfg is None:
        return 0
    w = TraceWriter(cfg["path"], block_size=cfg["block_size"], max_bytes=cfg["max_bytes"], rotate_s=cfg["rotate_s"],
                    keep=cfg["keep"], salt=cfg["salt"], t0=cfg["t0"])  # fmt: skip
    w.open(fresh=cfg["fresh"])
    try:
        reporting = True
        while (batch := read_frame(stdin)) is not None:
            w.write(batch)
            if reporting:
                try:
                    sys.stdout.write(f"{w.recorded} {w.rotations}\n")
                    sys.stdout.flush()
                except OSError:  # the controller is gone; what it sent is still written
                    reporting = False
    finally:
        w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
