"""``dpcore trace convert``: an SGLang request log or OpenAI-style prompts, as a trace.

The output is what ``dpcore serve --record`` writes (:mod:`dpcore.tracefile`): one JSON line
per request with its arrival, lengths and salted block ids, never text. Prompts are hashed
with :func:`dpcore.hashing.block_hashes` at ``--block-size`` after tokenizing them exactly as
the HTTP front does (:mod:`dpcore.http.protocol` parses each body, with the ``--tokenizer``
the front would use), so a converted trace and a recording of the same traffic through the
front agree.

**sglang-log**: what SGLang writes with ``--log-requests --log-requests-format json``
(``RequestLogger.log_received_request`` / ``log_finished_request`` in
``sglang/srt/utils/request_logger.py``, emitted by ``log_json`` in
``sglang/srt/utils/log_utils.py``: ``{"timestamp": ISO time, "event": "request.finished",
"rid", "obj": GenerateReqInput fields, "out": {"meta_info": {"prompt_tokens",
"completion_tokens", "e2e_latency", ...}}}``, after a ``[date time] `` prefix when written by
SGLang's log target). Lengths come from ``meta_info``; the arrival is the matching
``request.received`` line's time, else the finish time minus ``e2e_latency``. Block ids need
the prompt: ``obj.input_ids`` when logged whole, else ``obj.text`` tokenized with
``--tokenizer``. SGLang logs them whole only at ``--log-requests-level 3`` (level 2 cuts them
to 2048 items or characters, levels 0 and 1 leave them out); without them a request gets no
block ids (``[]``), and the simulator treats it as sharing no prefix. Other log lines are
skipped.

**openai-jsonl**: one request body per line, as sent to ``/v1/chat/completions``
(``messages``), ``/v1/completions`` (``prompt``) or SGLang's ``/generate`` (``text`` or
``input_ids``), or an OpenAI batch-input line with the body under ``"body"``. An optional
top-level ``"timestamp"`` (seconds) is the arrival; a line without one arrives ``1/--rate``
seconds after the line before. The output length is the body's ``max_tokens`` /
``max_completion_tokens`` / ``sampling_params.max_new_tokens``, else the front's default.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from attrs import frozen

from dpcore.errors import ConfigError
from dpcore.hashing import DEFAULT_BLOCK_SIZE, block_hashes
from dpcore.sim.traces import TraceError, json_object, reading

FORMATS = ("sglang-log", "openai-jsonl")
#: The marker SGLang's level-2 log puts in the middle of a cut list or string
#: (``_transform_data_for_logging``: first half, "...", last half).
_CUT = "..."


@frozen
class Row:
    """One converted request: arrival (seconds, any origin), lengths, its token ids (or None)."""

    line: int
    arrival: float
    input_length: int
    output_length: int
    token_ids: tuple[int, ...] | None


def _json_lines(path: str) -> Iterator[tuple[int, str]]:
    with reading(path), open(path, encoding="utf-8") as f:
        for n, text in enumerate(f, 1):
            if text.strip():
                yield n, text


def _int(value: Any, what: str, path: str, line: int, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise TraceError(f"{what} must be an integer >= {minimum}, got {value!r}", path=path, line=line)
    return value


# --------------------------------------------------------------------------- SGLang's log


def _whole_ids(value: Any) -> tuple[int, ...] | None:
    """``input_ids`` as logged, if whole (a level-2 cut has a "..." item)."""
    if isinstance(value, list) and value and all(type(t) is int for t in value):
        return tuple(value)
    return None


def _whole_text(value: Any) -> str | None:
    """``text`` as logged, if whole: level 2 cuts a longer string to 1024 + "..." + 1024."""
    if not isinstance(value, str) or not value:
        return None
    if len(value) == 2048 + len(_CUT) and value[1024 : 1024 + len(_CUT)] == _CUT:
        return None
    return value


def _sglang_time(value: Any, path: str, line: int) -> float:
    try:
        return datetime.fromisoformat(value).timestamp()
    except (TypeError, ValueError):
        raise TraceError(f"timestamp must be an ISO date and time, got {value!r}", path=path, line=line) from None


def sglang_rows(path: str, tokenizer: Any) -> Iterator[Row]:
    """The finished requests of an SGLang JSON request log."""
    received: dict[str, float] = {}
    for n, text in _json_lines(path):
        if '"event": "request.' not in text:
            if "Finish: obj=" in text or "Receive: obj=" in text:
                raise TraceError(
                    "SGLang's text request log; start SGLang with --log-requests-format json "
                    "(and --log-requests-level 3 for block ids)",
                    path=path,
                    line=n,
                )
            continue  # another log line
        brace = text.find("{")
        try:
            obj = json.loads(text[brace:])
        except ValueError as exc:
            raise TraceError(f"not valid JSON ({exc})", path=path, line=n) from None
        if not isinstance(obj, dict):
            raise TraceError("expected a JSON object", path=path, line=n)
        event = obj.get("event")
        if event == "request.received":
            if isinstance(obj.get("rid"), str):
                received[obj["rid"]] = _sglang_time(obj.get("timestamp"), path, n)
            continue
        if event != "request.finished":
            continue
        rid = obj.get("rid")
        if not isinstance(rid, str):
            raise TraceError(f"rid must be a string (one request a line), got {rid!r}", path=path, line=n)
        meta = (obj.get("out") or {}).get("meta_info") if isinstance(obj.get("out"), dict) else None
        if not isinstance(meta, dict):
            raise TraceError("no out.meta_info in a request.finished line", path=path, line=n)
        n_in = _int(meta.get("prompt_tokens"), "out.meta_info.prompt_tokens", path, n, 1)
        n_out = _int(meta.get("completion_tokens"), "out.meta_info.completion_tokens", path, n)
        arrival = received.pop(rid, None)
        if arrival is None:
            latency = meta.get("e2e_latency", 0.0)
            if type(latency) not in (int, float) or not math.isfinite(latency) or latency < 0:
                raise TraceError(f"out.meta_info.e2e_latency must be seconds >= 0, got {latency!r}", path=path, line=n)
            arrival = _sglang_time(obj.get("timestamp"), path, n) - latency
        req = obj.get("obj") if isinstance(obj.get("obj"), dict) else {}
        ids = _whole_ids(req.get("input_ids"))
        if ids is None and tokenizer is not None:
            prompt = _whole_text(req.get("text"))
            ids = tuple(tokenizer.encode(prompt)) if prompt is not None else None
        yield Row(n, arrival, n_in, n_out, ids)


# --------------------------------------------------------------------------- OpenAI-style


def openai_rows(path: str, tokenizer: Any, rate: float) -> Iterator[Row]:
    """Requests of a JSONL of request bodies, parsed as the HTTP front parses them."""
    from dpcore.http.protocol import PARSERS, HttpError

    t = 0.0
    first = True
    for n, text in _json_lines(path):
        obj = json_object(text, path, n)
        body = obj.get("body") if isinstance(obj.get("body"), dict) else obj
        if "messages" in body:
            kind = "chat"
        elif "prompt" in body:
            kind = "completion"
        elif "text" in body or "input_ids" in body:
            kind = "generate"
        else:
            raise TraceError("no prompt: expected messages, prompt, text or input_ids", path=path, line=n)
        ts = obj.get("timestamp")
        if ts is not None:
            if type(ts) not in (int, float) or not math.isfinite(ts) or ts < 0:
                raise TraceError(f"timestamp must be a number of seconds >= 0, got {ts!r}", path=path, line=n)
            t = float(ts)
        elif not first:
            t += 1.0 / rate
        first = False
        try:
            parsed = PARSERS[kind]({k: v for k, v in body.items() if k != "stream"}, {}, tokenizer)
        except HttpError as exc:
            raise TraceError(f"{kind} request: {exc}", path=path, line=n) from None
        if not parsed.token_ids:
            raise TraceError("empty prompt", path=path, line=n)
        yield Row(n, t, len(parsed.token_ids), parsed.max_new_tokens, tuple(parsed.token_ids))


# --------------------------------------------------------------------------- writing


def convert(
    src: str, out: str, fmt: str, *, block_size: int = DEFAULT_BLOCK_SIZE, tokenizer: Any = None, rate: float = 1.0
) -> dict[str, Any]:
    """Convert *src* (format *fmt*) into a trace at *out*; returns counts for the summary."""
    from dpcore import tracefile

    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not 1 <= block_size <= 1 << 20:
        raise ConfigError(f"--block-size must be an integer in 1..2**20, got {block_size}")
    if not 0 < rate < math.inf:
        raise ConfigError(f"--rate must be a positive number, got {rate!r}")
    if fmt == "openai-jsonl" and tokenizer is None:
        from dpcore.http.tokenizer import ByteTokenizer

        tokenizer = ByteTokenizer()  # the front's default
    rows = list(sglang_rows(src, tokenizer) if fmt == "sglang-log" else openai_rows(src, tokenizer, rate))
    if not rows:
        raise TraceError("no requests found" + (" (no request.finished lines)" if fmt == "sglang-log" else ""), path=src)
    rows.sort(key=lambda r: r.arrival)  # a log is in finish order
    salted = tracefile.Salted(block_size)
    # SGLang's log has the completion tokens; a prompt file only the requested budget.
    output_from = "generated" if fmt == "sglang-log" else "budget"
    t0 = rows[0].arrival
    hashed = 0
    tmp = Path(f"{out}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            ids = salted.ids(block_hashes(r.token_ids, block_size), r.input_length, known=True) if r.token_ids else []
            text = tracefile.ids_text(ids)
            hashed += bool(ids)
            f.write(tracefile.line((r.arrival - t0) * 1000, r.input_length, r.output_length, text, block_size, output_from))
    tmp.replace(out)
    return {"requests": len(rows), "with_block_ids": hashed, "duration_s": rows[-1].arrival - t0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trace_command", metavar="COMMAND", required=True)
    c = sub.add_parser(
        "convert",
        help="an SGLang request log or a JSONL of OpenAI-style requests, as a trace for dpcore simulate",
        description="Convert an SGLang request log (--log-requests --log-requests-format json) or a JSONL of "
        "OpenAI-style request bodies into a trace dpcore simulate replays. No text is written: prompts become "
        "salted block ids.",
    )
    c.add_argument("input", metavar="IN", help="the log or JSONL file")
    c.add_argument("-o", "--output", required=True, metavar="OUT", help="the trace to write (.jsonl)")
    c.add_argument("--format", required=True, choices=FORMATS, help="what IN is")
    c.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="N",
                   help="tokens per block id, 1..2**20 (default %(default)d, the HTTP front's)")  # fmt: skip
    c.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="the model's tokenizer.json (or its directory), as given to the HTTP front; default: one "
                        "token per UTF-8 byte (openai-jsonl), none (sglang-log: only logged input_ids are hashed)")  # fmt: skip
    c.add_argument("--rate", type=float, default=1.0, metavar="R",
                   help="openai-jsonl: requests per second for lines without a timestamp (default 1)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from dpcore.http.tokenizer import FileTokenizer

    tokenizer = FileTokenizer(args.tokenizer) if args.tokenizer else None
    s = convert(args.input, args.output, args.format, block_size=args.block_size, tokenizer=tokenizer, rate=args.rate)
    print(
        f"wrote {args.output}: {s['requests']} requests over {s['duration_s']:,.1f} s, {s['with_block_ids']} with "
        f"block ids ({args.block_size} tokens each); replay it with: dpcore simulate --trace {args.output}"
    )
    return 0
