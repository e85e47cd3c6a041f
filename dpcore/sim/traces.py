"""Trace readers: Mooncake jsonl and Azure LLM inference csv, as arrival-ordered requests.

Two public formats are understood:

* **Mooncake** (FAST'25 release): one JSON object a line, ``{"timestamp": ms,
  "input_length": tokens, "output_length": tokens, "hash_ids": [...]}``; ``hash_ids`` are
  chained hashes of 512-token prompt blocks (the same id always means the same whole prefix).
  Optional ``"block_size"`` (the same on every line) gives another block size, as
  ``dpcore serve --record`` writes; an empty ``hash_ids`` means no prefix information for
  that request (it shares nothing in the simulator).
* **Azure 2023** (Splitwise): csv with ``TIMESTAMP``, ``ContextTokens``,
  ``GeneratedTokens``; no prefix information, so every prompt token is uncached.

Quantized timestamps. The Mooncake conversation trace stamps arrivals in ticks of about 3 s,
so ~10 requests share each timestamp. Replayed as-is that is a burst every 3 s, which no
real front end produces and which punishes every policy alike. By default (``ticks="spread"``)
the requests of one tick are spread evenly over the tick, in file order, with one seeded
random phase per tick: request ``i`` of ``n`` at ``t + (i + u) * L / n``, where ``L`` is the
tick (the median gap between distinct timestamps, cut short by the next timestamp) and
``u ~ U[0, 1)``. ``ticks="burst"`` keeps the original timestamps. A trace counts as quantized
when it has fewer distinct timestamps than half its rows; others (Azure) are never changed.

``time_scale`` divides every inter-arrival time (``2`` doubles the request rate); arrivals
are in seconds from the trace's first timestamp.
"""

from __future__ import annotations

import csv
import json
import math
import random
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from attrs import frozen

from dpcore.errors import DpcoreError

#: Prompt tokens per ``hash_ids`` entry in Mooncake traces.
MOONCAKE_BLOCK_SIZE = 512
FORMATS = ("mooncake", "azure")
TICK_MODES = ("spread", "burst")
AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


class TraceError(DpcoreError, ValueError):
    """A trace file cannot be read; the message names the file and, when known, the line."""

    def __init__(self, msg: str, *, path: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {msg}")
        self.path = path
        self.line = line


@frozen
class TraceRequest:
    """One request of a trace.

    :ivar index: Position in arrival order, from 0.
    :ivar arrival: Seconds after the trace's first timestamp (after spreading and scaling).
    :ivar input_length: Prompt tokens.
    :ivar output_length: Generated tokens.
    :ivar hash_ids: Chained prompt-block hashes (empty: no prefix information).
    :ivar line: Line of the file it came from, for error messages.
    """

    index: int
    arrival: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    line: int = 0


@frozen
class Trace:
    """A trace, ready to replay.

    :ivar path: Where it was read from.
    :ivar format: ``"mooncake"`` or ``"azure"``.
    :ivar block_size: Tokens per ``hash_ids`` entry; ``0`` when the trace has no prefixes.
    :ivar requests: In arrival order.
    :ivar tick_s: The timestamp quantum that was spread (seconds), or ``0.0``.
    :ivar time_scale: The factor inter-arrival times were divided by.
    """

    path: str
    format: str
    block_size: int
    requests: tuple[TraceRequest, ...]
    tick_s: float = 0.0
    time_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival - self.requests[0].arrival if self.requests else 0.0

    def describe(self) -> str:
        n = len(self.requests)
        rate = n / self.duration_s if self.duration_s > 0 else float("inf")
        spread = f", {self.tick_s:g} s ticks spread" if self.tick_s else ""
        return (
            f"{Path(self.path).name}: {self.format}, {n} requests over {self.duration_s:,.0f} s "
            f"({rate:.2f} req/s, time-scale {self.time_scale:g}{spread})"
        )


# --------------------------------------------------------------------------- raw rows

# (line, timestamp_s, input_length, output_length, hash_ids)
_Row = tuple[int, float, int, int, tuple[int, ...]]


def json_object(text: str, path: str, line: int) -> dict:
    """One line of a JSON-lines file as an object, or a :class:`TraceError` naming the line."""
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise TraceError(f"not valid JSON ({exc})", path=path, line=line) from None
    if not isinstance(obj, dict):
        raise TraceError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=line)
    return obj


def _int_field(obj: dict, key: str, path: str, line: int, minimum: int) -> int:
    if key not in obj:
        raise TraceError(f"missing field {key!r}", path=path, line=line)
    value = obj[key]
    if type(value) is not int or value < minimum:
        raise TraceError(f"{key} must be an integer >= {minimum}, got {value!r}", path=path, line=line)
    return value


def _mooncake_rows(path: str, limit: int | None, block_size: int, found: list[int]) -> Iterator[_Row]:
    """The rows of a Mooncake file; *found* gets the file's ``block_size`` field, if any."""
    with open(path, encoding="utf-8") as f:
        count = 0
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            if limit is not None and count >= limit:
                return
            obj = json_object(text, path, line)
            ts = obj.get("timestamp")
            if type(ts) not in (int, float) or not math.isfinite(ts) or ts < 0:
                raise TraceError(f"timestamp must be a number of ms >= 0, got {ts!r}", path=path, line=line)
            n_in = _int_field(obj, "input_length", path, line, 1)
            n_out = _int_field(obj, "output_length", path, line, 0)
            hashes = obj.get("hash_ids")
            if not isinstance(hashes, list) or not all(type(h) is int for h in hashes):
                raise TraceError("hash_ids must be a list of integers", path=path, line=line)
            if "block_size" in obj:
                bs = obj["block_size"]
                if type(bs) is not int or not 1 <= bs <= 1 << 20:
                    raise TraceError(f"block_size must be an integer in 1..2**20, got {bs!r}", path=path, line=line)
                if not found:
                    if count:
                        raise TraceError("block_size field on this line but not on the ones before", path=path, line=line)
                    found.append(bs)
                    block_size = bs
                elif bs != block_size:
                    raise TraceError(f"block_size {bs} differs from the file's {block_size}", path=path, line=line)
            elif found:
                raise TraceError(f"no block_size field; earlier lines have {block_size}", path=path, line=line)
            want = -(-n_in // block_size)
            if hashes and len(hashes) != want:
                raise TraceError(
                    f"{len(hashes)} hash_ids for input_length {n_in}; {block_size}-token blocks need {want}",
                    path=path,
                    line=line,
                )
            count += 1
            yield line, ts / 1000.0, n_in, n_out, tuple(hashes)


def _azure_time(text: str) -> datetime:
    # The trace has 7 fractional digits; datetime takes at most 6.
    head, dot, frac = text.strip().partition(".")
    return datetime.fromisoformat(f"{head}.{frac[:6]}" if dot else head)


def _azure_rows(path: str, limit: int | None) -> Iterator[_Row]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError("empty file", path=path, line=1)
        header = [h.strip() for h in header]
        missing = [c for c in AZURE_COLUMNS if c not in header]
        if missing:
            raise TraceError(
                f"header {header} lacks {missing}; expected columns {list(AZURE_COLUMNS)}", path=path, line=1
            )
        i_ts, i_in, i_out = (header.index(c) for c in AZURE_COLUMNS)
        t0: datetime | None = None
        count = 0
        for row in reader:
            line = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if limit is not None and count >= limit:
                return
            if len(row) != len(header):
                raise TraceError(f"{len(row)} columns, header has {len(header)}", path=path, line=line)
            try:
                when = _azure_time(row[i_ts])
            except ValueError:
                raise TraceError(f"bad TIMESTAMP {row[i_ts]!r}", path=path, line=line) from None
            try:
                n_in, n_out = int(row[i_in]), int(row[i_out])
            except ValueError:
                raise TraceError(
                    f"ContextTokens/GeneratedTokens must be integers, got {row[i_in]!r}, {row[i_out]!r}",
                    path=path,
                    line=line,
                ) from None
            if n_in < 1 or n_out < 0:
                raise TraceError(
                    f"ContextTokens must be >= 1 and GeneratedTokens >= 0, got {n_in}, {n_out}",
                    path=path,
                    line=line,
                )
            if t0 is None:
                t0 = when
            count += 1
            yield line, (when - t0).total_seconds(), n_in, n_out, ()


# --------------------------------------------------------------------------- arrivals


def _tick(times: list[float]) -> float:
    """The timestamp quantum of a quantized trace, else ``0.0``."""
    distinct = sorted(set(times))
    if len(distinct) < 2 or len(distinct) * 2 > len(times):
        return 0.0
    return statistics.median(b - a for a, b in zip(distinct, distinct[1:]))


def _spread(times: list[float], tick: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    out: list[float] = []
    i = 0
    n_rows = len(times)
    while i < n_rows:
        t = times[i]
        j = i
        while j < n_rows and times[j] == t:
            j += 1
        window = min(tick, times[j] - t) if j < n_rows else tick
        u = rng.random()
        n = j - i
        out.extend(t + (k + u) * window / n for k in range(n))
        i = j
    return out


@contextmanager
def reading(path: str) -> Iterator[None]:
    """Turns the errors of reading the text file *path* into :class:`TraceError`."""
    try:
        yield
    except FileNotFoundError:
        raise TraceError("no such file", path=path) from None
    except UnicodeDecodeError as exc:
        raise TraceError(f"not a text file ({exc.reason})", path=path) from None
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror}", path=path) from None


def detect_format(path: str) -> str:
    """``"mooncake"`` for .jsonl/.json or a file starting with ``{``; ``"azure"`` otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
    except OSError as exc:
        raise TraceError(f"cannot read: {exc.strerror}", path=path) from None
    return "mooncake" if head.startswith("{") else "azure"


def read_trace(
    path: str | Path,
    *,
    fmt: str | None = None,
    time_scale: float = 1.0,
    limit: int | None = None,
    seed: int = 0,
    ticks: str = "spread",
    block_size: int = MOONCAKE_BLOCK_SIZE,
) -> Trace:
    """Read a trace file into arrival-ordered requests.

    :param fmt: ``"mooncake"`` or ``"azure"``; guessed from the file when ``None``.
    :param time_scale: Inter-arrival times are divided by this (``> 0``).
    :param limit: Keep only the first *limit* requests.
    :param seed: Seeds the phase of spread ticks.
    :param ticks: ``"spread"`` or ``"burst"`` for quantized timestamps (see the module doc).
    :param block_size: Tokens per ``hash_ids`` entry (Mooncake: 512).
    :raises TraceError: The file is missing, malformed (with the line) or empty.
    """
    path = str(path)
    if not time_scale > 0 or not math.isfinite(time_scale):
        raise TraceError(f"time scale must be a positive number, got {time_scale!r}", path=path)
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be at least 1, got {limit}", path=path)
    if ticks not in TICK_MODES:
        raise TraceError(f"ticks must be one of {TICK_MODES}, got {ticks!r}", path=path)
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise TraceError(f"unknown trace format {fmt!r}; expected one of {FORMATS}", path=path)
    found: list[int] = []
    with reading(path):
        rows = list(
            _mooncake_rows(path, limit, block_size, found) if fmt == "mooncake" else _azure_rows(path, limit)
        )
    if not rows:
        raise TraceError("no requests in the file", path=path)
    times = [r[1] for r in rows]
    for (line, t, *_), prev in zip(rows[1:], times):
        if t < prev:
            raise TraceError(
                f"timestamp goes backwards ({t:g} s after {prev:g} s); traces must be in arrival order",
                path=path,
                line=line,
            )
    tick = _tick(times) if ticks == "spread" else 0.0
    if tick:
        times = _spread(times, tick, seed)
    t0 = rows[0][1]
    requests = tuple(
        TraceRequest(
            index=i, arrival=(t - t0) / time_scale, input_length=n_in, output_length=n_out, hash_ids=h, line=line
        )
        for i, ((line, _, n_in, n_out, h), t) in enumerate(zip(rows, times))
    )
    return Trace(
        path=path,
        format=fmt,
        block_size=(found[0] if found else block_size) if fmt == "mooncake" else 0,
        requests=requests,
        tick_s=tick,
        time_scale=time_scale,
    )
