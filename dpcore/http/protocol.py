"""Request bodies of the HTTP front, parsed into one typed :class:`GenerateInput`.

Three dialects share one path to the controller:

* SGLang native ``POST /generate``: ``text`` or ``input_ids``, ``sampling_params``,
  ``stream``, ``rid``, ``routed_dp_rank``, the deprecated ``data_parallel_rank``,
  ``bootstrap_host``/``bootstrap_port``/``bootstrap_room``, ``disagg_prefill_dp_rank``;
* OpenAI ``POST /v1/completions`` (``prompt``, ``max_tokens``) and
  ``POST /v1/chat/completions`` (``messages``, ``max_completion_tokens``/``max_tokens``),
  which accept the same SGLang extension fields.

Everything here is pure: parsing raises :class:`HttpError` with a status, a stable code and
a message naming the field; no I/O, so it is tested without a server.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from dpcore.errors import DpcoreError
from dpcore.http.tokenizer import Tokenizer
from dpcore.wire import int_problem

#: The header a router uses to pin a rank; it overrides the body (any letter case).
RANK_HEADER = "x-data-parallel-rank"

#: Defaults when the request gives no output length: SGLang's for /generate, OpenAI's for
#: /v1/completions.
DEFAULT_MAX_NEW_TOKENS = {"generate": 128, "completion": 16, "chat": 128}

_INT_RE = re.compile(r"[+-]?\d+")
_ROOM_LIMIT = 1 << 64
#: Integers the wire can carry (msgpack: int64 and uint64); JSON has no limit of its own.
_WIRE_INT = range(-(1 << 63), 1 << 64)
#: Token ids are hashed as int64.
_TOKEN_LIMIT = 1 << 63
_RID_MAX = 256


class HttpError(DpcoreError):
    """A request the front answers itself, with ``status`` and a JSON error body."""

    def __init__(self, status: int, code: str, msg: str, *, rid: str | None = None) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.rid = rid

    def body(self) -> dict[str, Any]:
        """SGLang-style: ``{"error": code, "detail": message, "rid"?}``."""
        out: dict[str, Any] = {"error": self.code, "detail": str(self)}
        if self.rid is not None:
            out["rid"] = self.rid
        return out

    @property
    def openai_type(self) -> str:
        """The OpenAI error ``type`` for this status."""
        return _OPENAI_TYPES.get(self.status) or ("invalid_request_error" if self.status < 500 else "server_error")

    def openai_body(self) -> dict[str, Any]:
        """OpenAI-style, what the OpenAI SDKs read:
        ``{"error": {"message", "type", "param", "code"}}`` (plus ``rid`` when known)."""
        out: dict[str, Any] = {
            "error": {"message": str(self), "type": self.openai_type, "param": self.param, "code": self.code}
        }
        if self.rid is not None:
            out["rid"] = self.rid
        return out

    @property
    def param(self) -> str | None:
        """The request field at fault, when the code names one (``invalid_rank`` ...)."""
        return _PARAMS.get(self.code)


_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error",
                 503: "service_unavailable_error", 504: "timeout_error"}  # fmt: skip
_PARAMS = {"invalid_rank": "routed_dp_rank", "duplicate_rid": "rid", "context_length_exceeded": "messages"}


def bad(code: str, msg: str) -> HttpError:
    return HttpError(400, code, msg)


@frozen
class GenerateInput:
    """One generation request, whatever dialect it came in.

    :ivar kind: ``"generate"``, ``"completion"`` or ``"chat"`` (decides the response shape).
    :ivar rid: Request id (the client's, or a fresh one).
    :ivar token_ids: The prompt as token ids (given, or tokenized from the text).
    :ivar text: The prompt text, when the request had text.
    :ivar max_new_tokens: Output length asked for.
    :ivar stream: Answer as server-sent events.
    :ivar sampling_params: Sampling parameters, passed to the engine untouched.
    :ivar routed_dp_rank: Rank pinned by the header or the body.
    :ivar data_parallel_rank: Deprecated body spelling of ``routed_dp_rank``.
    :ivar disagg_prefill_dp_rank: For PD decode: the prefill rank holding the KV.
    :ivar model: The ``model`` field echoed in OpenAI responses.
    :ivar include_usage: OpenAI ``stream_options.include_usage``.
    """

    kind: str
    rid: str
    token_ids: tuple[int, ...]
    text: str | None = None
    max_new_tokens: int = 128
    stream: bool = False
    sampling_params: Mapping[str, Any] = field(factory=dict)
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None
    disagg_prefill_dp_rank: int | None = None
    bootstrap_room: int | None = None
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    model: str | None = None
    include_usage: bool = False

    def engine_payload(self) -> dict[str, Any]:
        """What the engine rank gets as the opaque payload (before encoding)."""
        p: dict[str, Any] = {
            "rid": self.rid,
            "input_ids": list(self.token_ids),
            "max_new_tokens": self.max_new_tokens,
            "stream": self.stream,
            "sampling_params": dict(self.sampling_params),
        }
        if self.text is not None:
            p["text"] = self.text
        if self.bootstrap_room is not None:
            p["bootstrap_room"] = self.bootstrap_room
            p["bootstrap_host"] = self.bootstrap_host
            p["bootstrap_port"] = self.bootstrap_port
        return p


# --------------------------------------------------------------------------- field helpers


def _opt_int(body: Mapping[str, Any], key: str, *, code: str, minimum: int | None = 0,
             limit: int | None = None) -> int | None:  # fmt: skip
    value = body.get(key)
    if value is None:
        return None
    # The wire carries int64 and uint64: that range, narrowed by minimum and limit.
    low = _WIRE_INT.start if minimum is None else max(minimum, _WIRE_INT.start)
    high = _WIRE_INT.stop - 1 if limit is None else min(limit, _WIRE_INT.stop) - 1
    problem = int_problem(value, low, high)
    if problem is not None:
        raise bad(code, f"{key} {problem}")
    return value


def _opt_str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        msg = f"{key} must be a string, got {value!r:.60}"
        raise bad("invalid_field", msg)
    return value


def _bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if type(value) is not bool:
        msg = f"{key} must be true or false, got {value!r:.60}"
        raise bad("invalid_field", msg)
    return value


def _rank(body: Mapping[str, Any], key: str) -> int | None:
    # Range and liveness are the controller's to check (it knows which ranks are up), so
    # only the type is checked here; a negative rank is out of range there.
    return _opt_int(body, key, code="invalid_rank", minimum=None)


def header_rank(headers: Mapping[str, str]) -> int | None:
    """The rank in ``X-Data-Parallel-Rank`` (*headers* must match names case-insensitively).

    The header given twice with different values is refused: which one a proxy or a server
    keeps differs, so honouring either would be a guess.
    """
    raw = headers.get(RANK_HEADER)
    if raw is None:
        return None
    getlist = getattr(headers, "getlist", None)
    if getlist is not None:
        given = getlist(RANK_HEADER)
        if len({v.strip() for v in given}) > 1:
            shown = ", ".join(repr(v[:20]) for v in given[:4])
            msg = f"X-Data-Parallel-Rank given {len(given)} times with different values ({shown}); send it once"
            raise bad("invalid_rank", msg)
    value = raw.strip()
    if not _INT_RE.fullmatch(value):
        msg = f"Invalid X-Data-Parallel-Rank header: must be an integer, got {raw!r:.60}"
        raise bad("invalid_rank", msg)
    if len(value) > 20 or int(value) not in _WIRE_INT:
        msg = f"Invalid X-Data-Parallel-Rank header: {raw!r:.30} is out of range"
        raise bad("invalid_rank", msg)
    return int(value)


def _rid(body: Mapping[str, Any]) -> str:
    rid = body.get("rid")
    if rid is None:
        return uuid.uuid4().hex
    if not isinstance(rid, str) or not rid or len(rid) > _RID_MAX:
        msg = f"rid must be a non-empty string of at most {_RID_MAX} characters, got {rid!r:.60}"
        raise bad("invalid_field", msg)
    return rid


def _token_ids(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        msg = f"{key} must be a list of token ids, got {type(value).__name__}"
        raise bad("invalid_field", msg)
    if value and isinstance(value[0], list):
        raise _batch(key)
    for i, t in enumerate(value):
        if type(t) is not int or not 0 <= t < _TOKEN_LIMIT:
            msg = f"{key}[{i}] must be a non-negative 64-bit integer token id, got {t!r:.60}"
            raise bad("invalid_field", msg)
    return tuple(value)


def _batch(key: str) -> HttpError:
    msg = f"{key}: batch requests (a list of prompts) are not supported; send one request per prompt"
    return bad("batch_not_supported", msg)


def _common(body: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, Any]:
    """Fields every dialect accepts: routing, PD, streaming and the model name."""
    if not isinstance(body, Mapping):
        msg = f"expected a JSON object, got {type(body).__name__}"
        raise bad("invalid_body", msg)
    routed = _rank(body, "routed_dp_rank")
    deprecated = _rank(body, "data_parallel_rank")
    from_header = header_rank(headers)
    if from_header is not None:
        routed = from_header
    return {
        "rid": _rid(body),
        "stream": _bool(body, "stream"),
        "routed_dp_rank": routed,
        "data_parallel_rank": deprecated,
        "disagg_prefill_dp_rank": _rank(body, "disagg_prefill_dp_rank"),
        "bootstrap_room": _opt_int(body, "bootstrap_room", code="invalid_field", limit=_ROOM_LIMIT),
        "bootstrap_host": _opt_str(body, "bootstrap_host"),
        "bootstrap_port": _opt_int(body, "bootstrap_port", code="invalid_field", limit=1 << 16),
        "model": _opt_str(body, "model"),
    }


def _max_tokens(body: Mapping[str, Any], keys: tuple[str, ...], kind: str) -> int:
    for key in keys:
        n = _opt_int(body, key, code="invalid_field")
        if n is not None:
            return n
    return DEFAULT_MAX_NEW_TOKENS[kind]


# --------------------------------------------------------------------------- dialects


def parse_generate(body: Any, headers: Mapping[str, str], tokenizer: Tokenizer) -> GenerateInput:
    """SGLang ``POST /generate``."""
    common = _common(body, headers)
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise bad("invalid_field", "give exactly one of text or input_ids")
    if text is not None:
        if isinstance(text, list):
            raise _batch("text")
        if not isinstance(text, str):
            msg = f"text must be a string, got {type(text).__name__}"
            raise bad("invalid_field", msg)
        token_ids = tuple(tokenizer.encode(text))
    else:
        token_ids = _token_ids(ids, "input_ids")
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, Mapping):
        msg = f"sampling_params must be an object, got {type(sp).__name__}"
        raise bad("invalid_field", msg)
    return GenerateInput(
        kind="generate",
        token_ids=token_ids,
        text=text,
        max_new_tokens=_max_tokens(sp, ("max_new_tokens",), "generate"),
        sampling_params=dict(sp),
        **common,
    )


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("temperature", "top_p", "top_k", "stop", "seed", "ignore_eos", "min_tokens")
    return {k: body[k] for k in keys if body.get(k) is not None}


def _single(body: Mapping[str, Any]) -> None:
    n = _opt_int(body, "n", code="invalid_field", minimum=1)
    if n is not None and n > 1:
        raise bad("n_not_supported", f"n={n}: only one choice per request is supported")


def _stream_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, Mapping):
        raise bad("invalid_field", "stream_options must be an object")
    return _bool(opts, "include_usage")


def parse_completion(body: Any, headers: Mapping[str, str], tokenizer: Tokenizer) -> GenerateInput:
    """OpenAI ``POST /v1/completions``: ``prompt`` is a string or a list of token ids."""
    common = _common(body, headers)
    _single(body)
    prompt = body.get("prompt")
    text: str | None = None
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        text = prompt
        token_ids = tuple(tokenizer.encode(prompt))
    elif isinstance(prompt, list):
        if prompt and isinstance(prompt[0], (str, list)):
            raise _batch("prompt")
        token_ids = _token_ids(prompt, "prompt")
    else:
        msg = f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
        raise bad("invalid_field", msg)
    return GenerateInput(
        kind="completion",
        token_ids=token_ids,
        text=text,
        max_new_tokens=_max_tokens(body, ("max_tokens",), "completion"),
        sampling_params=_sampling(body),
        include_usage=_stream_usage(body),
        **common,
    )


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts; only text parts carry a prompt
        parts = []
        for part in value:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                msg = f"messages[{i}].content: only text parts are supported, got {part!r:.60}"
                raise bad("invalid_field", msg)
        return "".join(parts)
    if value is None:
        return ""
    msg = f"messages[{i}].content must be a string or a list of text parts"
    raise bad("invalid_field", msg)


def chat_prompt(messages: Any) -> str:
    """Render chat messages as one prompt with a fixed template (no model template is
    installed): ``<|role|>\\ncontent\\n`` per message, then ``<|assistant|>\\n``."""
    if not isinstance(messages, list) or not messages:
        raise bad("invalid_field", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            msg = f"messages[{i}] must be an object with a string role"
            raise bad("invalid_field", msg)
        out.append(f"<|{m['role']}|>\n{_content(m.get('content'), i)}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


def parse_chat(body: Any, headers: Mapping[str, str], tokenizer: Tokenizer) -> GenerateInput:
    """OpenAI ``POST /v1/chat/completions``."""
    common = _common(body, headers)
    _single(body)
    text = chat_prompt(body.get("messages"))
    return GenerateInput(
        kind="chat",
        token_ids=tuple(tokenizer.encode(text)),
        text=text,
        max_new_tokens=_max_tokens(body, ("max_completion_tokens", "max_tokens"), "chat"),
        sampling_params=_sampling(body),
        include_usage=_stream_usage(body),
        **common,
    )


PARSERS = {"generate": parse_generate, "completion": parse_completion, "chat": parse_chat}
