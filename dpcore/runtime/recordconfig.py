"""What ``dpcore serve --record`` records and how much: :class:`RecordConfig` and its flags."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from attrs import field, frozen

from dpcore.errors import ConfigError
from dpcore.hashing import DEFAULT_BLOCK_SIZE

#: The writer process's default niceness above the controller's: the lowest CPU priority.
DEFAULT_NICE = 19
#: The largest niceness increment Linux gives a process (nice 19).
MAX_NICE = 19


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
    :ivar queue: Records waiting for the writer before new ones are dropped (1..2**24); also
        how many the writer holds waiting for their completion.
    :ivar hold_s: Longest a record waits for its request to end, so that it carries the
        number of tokens generated (0..86,400 seconds; 0: never wait, write the budget).
    :ivar nice: How much lower the writer process's CPU priority is than the controller's
        (0..19, added to the controller's niceness): the writer is background work, so on
        busy cores it runs in the time serving leaves idle, and under sustained saturation it
        falls behind (lines wait in the queue, then are dropped and counted).
    """

    path: str
    block_size: int = field(default=DEFAULT_BLOCK_SIZE, validator=_in_range("--record-block-size", 1, 1 << 20, integer=True))
    sample: float = field(default=1.0, validator=_in_range("--record-sample", 0, 1, lo_open=True))
    max_bytes: int = field(default=1 << 30, validator=_in_range("--record-max-bytes", 4096, 1 << 50, integer=True))
    rotate_s: float = field(default=0.0, validator=_in_range("--record-rotate-s", 0, 1 << 31))
    keep: int = field(default=10, validator=_in_range("--record-keep", 0, 10_000, integer=True))
    queue: int = field(default=1 << 16, validator=_in_range("--record-queue", 1, 1 << 24, integer=True))
    hold_s: float = field(default=300.0, validator=_in_range("--record-hold-s", 0, 86_400))
    nice: int = field(default=DEFAULT_NICE, validator=_in_range("--record-nice", 0, MAX_NICE, integer=True))

    def __attrs_post_init__(self) -> None:
        if 0 < self.rotate_s < 1:
            raise ConfigError(f"--record-rotate-s must be 0 (off) or at least 1, got {self.rotate_s!r}")
        parent = Path(self.path).resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"--record {self.path}: directory {parent} does not exist")
        if Path(self.path).is_dir():
            raise ConfigError(f"--record {self.path}: is a directory; give a file path")


def config_from_args(args: Any) -> RecordConfig:
    return RecordConfig(
        path=args.record,
        block_size=args.record_block_size,
        sample=args.record_sample,
        max_bytes=args.record_max_bytes,
        rotate_s=args.record_rotate_s,
        keep=args.record_keep,
        queue=args.record_queue,
        hold_s=args.record_hold_s,
        nice=args.record_nice,
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
                   help="records waiting for the writer before new ones are dropped and counted, and records "
                        "waiting for their request to end, 1..2**24 (default 65536)")  # fmt: skip
    g.add_argument("--record-hold-s", type=float, default=300.0, metavar="S",
                   help="wait up to S seconds for a request to end, so its line has the tokens its rank "
                        "generated; after that (or with 0) its max_new_tokens, 0..86400 (default 300)")  # fmt: skip
    g.add_argument("--record-nice", type=int, default=DEFAULT_NICE, metavar="N",
                   help="run the writer process N steps of CPU priority below the controller, 0..19 (default "
                        "%(default)d: it uses the time serving leaves idle; on cores busy for long it falls "
                        "behind, and past --record-queue lines are dropped and counted)")  # fmt: skip
