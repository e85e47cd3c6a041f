"""The recording's writer process as the recorder sees it: started, fed frames, counted, replaced.

:class:`WriterProcess` starts ``python -m dpcore.runtime.tracewriter`` with the recording's
settings (the same salt and time origin for every process it starts, so a replacement
continues the same recording), writes batch frames to its stdin, and reads the counts it
prints after each batch. When a process dies or its pipe breaks, what it was handed and had
not written is counted as lost, and the next frame starts a new process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
from typing import Any

import structlog

from dpcore.runtime import recordframes

__all__ = ["WriterProcess"]

#: Fields of the writer's status line: recorded, rotations, generated, python_batches, held.
_STATUS_FIELDS = 5
#: Bytes the pipe into the writer holds (Linux's default 64 KiB takes a quarter of a batch of
#: 1,024 headers): a batch goes in with one write, and the writer takes it with one read.
PIPE_BYTES = 1 << 20


class WriterProcess:
    """One writer process at a time, and the totals of every one it started.

    *settings*: what each process is started with (:func:`dpcore.runtime.tracewriter.main`);
    ``fresh`` is added, true only for the first, which rotates an earlier recording aside.
    Used by the recorder's thread only (and by its ``close`` once that thread ended).
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.child: subprocess.Popen[bytes] | None = None
        #: How the writer decodes, salts and formats (:data:`dpcore.runtime.tracewriter.COMPILED`
        #: or ``PYTHON``), as it said when it started; ``None`` before that.
        self.writer_path: str | None = None
        #: Records handed to a process that ended before writing them.
        self.lost = 0
        self.log = structlog.get_logger("dpcore.recorder")
        self._spawns = 0
        self._handed = 0  # records the current process was given
        self._status = b""
        self._done = [0, 0, 0, 0]  # earlier processes': recorded, rotations, generated, python_batches
        self._current = [0] * _STATUS_FIELDS  # the current one's, and held

    def total(self, field: int) -> int:
        """Field *field* of the status line, summed over every process (0: recorded, 1:
        rotations, 2: generated, 3: python_batches)."""
        return self._done[field] + self._current[field]

    @property
    def held(self) -> int:
        """Records the current process holds, waiting for their request to end."""
        return self._current[4]

    def ensure(self) -> None:
        """Start a process unless one is running."""
        child = self.child
        if child is None or child.poll() is not None:
            self.spawn()

    def spawn(self) -> None:
        if self.child is not None:
            self.end(1.0)
        self.child = child = subprocess.Popen(  # noqa: S603 - our own module, no shell
            [sys.executable, "-m", "dpcore.runtime.tracewriter"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        os.set_blocking(child.stdout.fileno(), False)  # type: ignore[union-attr]
        set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux
        if set_size is not None:
            with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: the default stays
                fcntl.fcntl(child.stdin.fileno(), set_size, PIPE_BYTES)  # type: ignore[union-attr]
        child.stdin.write(recordframes.frame({**self.settings, "fresh": self._spawns == 0}))  # type: ignore[union-attr]
        child.stdin.flush()  # type: ignore[union-attr]
        self._spawns += 1

    def send(self, data: bytes, n: int) -> None:
        """Hand the process one batch frame of *n* records (a blocking write: it releases the
        interpreter lock). A failed write counts them lost, ends the process, and raises."""
        stdin = self.child.stdin  # type: ignore[union-attr]
        try:
            stdin.write(len(data).to_bytes(recordframes.PREFIX, "little"))  # type: ignore[union-attr]
            stdin.write(data)  # type: ignore[union-attr]
            stdin.flush()  # type: ignore[union-attr]
        except BaseException:
            self.lost += n
            self.end(1.0)
            raise
        self._handed += n

    def read_status(self) -> None:
        """Take the counts the process printed since the last read (never waits)."""
        if self.child is None:
            return
        try:
            data = os.read(self.child.stdout.fileno(), 1 << 16)  # type: ignore[union-attr]
        except (BlockingIOError, OSError, ValueError):
            return
        self._parse_status(data)

    def _parse_status(self, data: bytes) -> None:
        text = self._status + data
        lines = text.split(b"\n")
        self._status = lines[-1]
        for line in lines[:-1]:
            if line.startswith(b"path "):
                self.writer_path = line[5:].decode()
        for line in reversed(lines[:-1]):
            parts = line.split()
            if len(parts) == _STATUS_FIELDS:
                self._current = [int(x) for x in parts]
                return

    def end(self, timeout_s: float) -> None:
        """Close the process's input, wait for it to write everything, and settle the counts."""
        child, self.child = self.child, None
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
        self._done = [d + c for d, c in zip(self._done, self._current)]
        self._current = [0] * _STATUS_FIELDS
        self._handed = 0
        self._status = b""
