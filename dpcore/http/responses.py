"""Response bodies of the HTTP front: SGLang ``/generate`` and OpenAI shapes, JSON or SSE.

A request's replies arrive as :class:`~dpcore.wire.Reply` objects (``out`` chunks, then a
final one). :class:`Output` accumulates them; the ``*_body`` and ``*_chunk`` functions turn
that state into the JSON each dialect expects. Streaming follows SGLang: one
``data: {json}`` event per chunk, then ``data: [DONE]``. SGLang's ``/generate`` stream carries
the whole text so far in every event; OpenAI streams carry only the new text (``delta``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import msgpack
from attrs import define, field

from dpcore.http.protocol import GenerateInput
from dpcore.http.tokenizer import Tokenizer
from dpcore.wire import Reply

DONE = b"data: [DONE]\n\n"


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def decode_payload(payload: bytes, tokenizer: Tokenizer) -> tuple[str, list[int] | None]:
    """The text (and token ids, when the rank sent them) in an output payload.

    A rank answers with a msgpack map holding ``text`` and/or ``output_ids``, or with raw
    UTF-8 text. Anything else is shown as text with replacement characters rather than
    failing a request that the rank did serve.
    """
    if not payload:
        return "", None
    try:
        obj = msgpack.unpackb(payload, raw=False)
    except Exception:  # not msgpack: raw text
        return payload.decode("utf-8", errors="replace"), None
    if isinstance(obj, Mapping):
        ids = obj.get("output_ids")
        ids = list(ids) if isinstance(ids, list) and all(type(i) is int for i in ids) else None
        text = obj.get("text")
        if not isinstance(text, str):
            text = tokenizer.decode(ids) if ids is not None else ""
        return text, ids
    if isinstance(obj, str):
        return obj, None
    return payload.decode("utf-8", errors="replace"), None


@define
class Output:
    """What the replies of one request added up to so far."""

    inp: GenerateInput
    tokenizer: Tokenizer
    #: ``time.monotonic()`` when the request arrived.
    started: float
    rank: int | None = None
    text: str = ""
    output_ids: list[int] | None = None
    meta: dict[str, Any] = field(factory=dict)
    final: bool = False
    created: int = field(factory=lambda: int(time.time()))
    #: Length of :attr:`text` already sent (OpenAI streams send only what is new).
    sent: int = 0

    def add(self, reply: Reply) -> None:
        """Fold one ``out`` reply in. A chunk carries the new text since the last one."""
        self.rank = reply.rank
        text, ids = decode_payload(reply.payload, self.tokenizer)
        self.text += text
        if ids is not None:
            self.output_ids = (self.output_ids or []) + ids
        self.meta.update(reply.meta)
        self.final = reply.final

    def delta(self) -> str:
        new = self.text[self.sent :]
        self.sent = len(self.text)
        return new

    # ------------------------------------------------------------------ shared facts

    @property
    def prompt_tokens(self) -> int:
        n = self.meta.get("prompt_tokens")
        return n if type(n) is int else len(self.inp.token_ids)

    @property
    def completion_tokens(self) -> int:
        n = self.meta.get("completion_tokens")
        if type(n) is int:
            return n
        return len(self.output_ids) if self.output_ids is not None else 0

    @property
    def cached_tokens(self) -> int:
        n = self.meta.get("cached_tokens")
        return n if type(n) is int else 0

    def finish_reason(self) -> str | None:
        """OpenAI's finish reason: ``length`` when the output hit ``max_new_tokens``."""
        if not self.final:
            return None
        reason = self.meta.get("finish_reason")
        if isinstance(reason, Mapping):
            reason = reason.get("type")
        if isinstance(reason, str) and reason:
            return reason
        return "length" if self.completion_tokens >= self.inp.max_new_tokens else "stop"

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    # ------------------------------------------------------------------ SGLang /generate

    def meta_info(self) -> dict[str, Any]:
        reason = self.finish_reason()
        finish: dict[str, Any] | None = None
        if reason == "length":
            finish = {"type": "length", "length": self.completion_tokens}
        elif reason is not None:
            finish = {"type": reason}
        inp = self.inp
        return {
            **self.meta,
            "id": inp.rid,
            "finish_reason": finish,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "dp_rank": self.rank,
            # What the front was asked for, so a caller can check it was followed.
            "routed_dp_rank": inp.routed_dp_rank,
            "bootstrap_room": inp.bootstrap_room,
            "e2e_latency": round(time.monotonic() - self.started, 6),
        }

    def generate_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"text": self.text, "meta_info": self.meta_info()}
        if self.output_ids is not None:
            body["output_ids"] = self.output_ids
        return body

    # ------------------------------------------------------------------ OpenAI

    def _envelope(self, obj: str, prefix: str) -> dict[str, Any]:
        return {
            "id": f"{prefix}-{self.inp.rid}",
            "object": obj,
            "created": self.created,
            "model": self.inp.model or "",
        }

    def completion_body(self) -> dict[str, Any]:
        choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish_reason()}
        return {**self._envelope("text_completion", "cmpl"), "choices": [choice], "usage": self.usage()}

    def chat_body(self) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": self.text},
            "logprobs": None,
            "finish_reason": self.finish_reason(),
        }
        return {**self._envelope("chat.completion", "chatcmpl"), "choices": [choice], "usage": self.usage()}

    def body(self) -> dict[str, Any]:
        kind = self.inp.kind
        if kind == "completion":
            return self.completion_body()
        if kind == "chat":
            return self.chat_body()
        return self.generate_body()

    def chunk(self, first: bool) -> list[dict[str, Any]]:
        """The stream events for what arrived since the last call."""
        kind = self.inp.kind
        if kind == "generate":
            return [self.generate_body()]
        delta = self.delta()
        reason = self.finish_reason()
        if kind == "completion":
            choice: dict[str, Any] = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
            env = self._envelope("text_completion", "cmpl")
        else:
            d: dict[str, Any] = {"content": delta}
            if first:
                d["role"] = "assistant"
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            env = self._envelope("chat.completion.chunk", "chatcmpl")
        out = [{**env, "choices": [choice]}]
        if self.final and self.inp.include_usage:
            out.append({**env, "choices": [], "usage": self.usage()})
        return out
