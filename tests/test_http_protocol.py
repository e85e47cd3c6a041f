"""Request parsing of the HTTP front, without a server: every field and every refusal."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")

from starlette.datastructures import Headers

from dpcore.http.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    HttpError,
    chat_prompt,
    header_rank,
    parse_chat,
    parse_completion,
    parse_generate,
)
from dpcore.http.responses import decode_payload
from dpcore.http.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NO_HEADERS = Headers({})


def gen(body, headers=NO_HEADERS):
    return parse_generate(body, headers, TOK)


def refused(fn, body, headers=NO_HEADERS) -> HttpError:
    with pytest.raises(HttpError) as info:
        fn(body, headers, TOK)
    return info.value


def test_generate_text_is_tokenized_by_utf8_bytes():
    inp = gen({"text": "héllo", "sampling_params": {"max_new_tokens": 7, "temperature": 0.5}})
    assert inp.token_ids == tuple("héllo".encode())
    assert len(inp.token_ids) == 6  # é is two bytes
    assert inp.max_new_tokens == 7
    assert inp.sampling_params == {"max_new_tokens": 7, "temperature": 0.5}
    assert inp.kind == "generate" and not inp.stream
    assert TOK.decode(inp.token_ids) == "héllo"


def test_generate_every_routing_and_pd_field():
    body = {
        "input_ids": [5, 6, 7],
        "rid": "r-1",
        "stream": True,
        "routed_dp_rank": 2,
        "data_parallel_rank": 1,
        "disagg_prefill_dp_rank": 3,
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": 2**63 - 1,
    }
    inp = gen(body)
    assert inp.token_ids == (5, 6, 7) and inp.text is None
    assert inp.rid == "r-1" and inp.stream
    assert (inp.routed_dp_rank, inp.data_parallel_rank, inp.disagg_prefill_dp_rank) == (2, 1, 3)
    assert (inp.bootstrap_host, inp.bootstrap_port, inp.bootstrap_room) == ("127.0.0.1", 8998, 2**63 - 1)
    payload = inp.engine_payload()
    assert payload["stream"] is True and payload["input_ids"] == [5, 6, 7]
    assert payload["bootstrap_room"] == 2**63 - 1
    assert inp.max_new_tokens == DEFAULT_MAX_NEW_TOKENS["generate"]


@pytest.mark.parametrize("name", ["X-Data-Parallel-Rank", "x-data-parallel-rank", "X-DATA-PARALLEL-RANK"])
def test_header_overrides_body_in_any_case(name):
    inp = gen({"text": "a", "routed_dp_rank": 1, "data_parallel_rank": 0}, Headers({name: " 3 "}))
    assert inp.routed_dp_rank == 3
    assert inp.data_parallel_rank == 0  # kept; routed_dp_rank wins in the controller


@pytest.mark.parametrize("raw", ["a", "1.5", "", "0x1", "1 2"])
def test_non_integer_header_is_400(raw):
    with pytest.raises(HttpError) as info:
        header_rank(Headers({"X-Data-Parallel-Rank": raw}))
    assert info.value.status == 400 and info.value.code == "invalid_rank"
    assert "must be an integer" in str(info.value)


@pytest.mark.parametrize("field", ["routed_dp_rank", "data_parallel_rank", "disagg_prefill_dp_rank"])
@pytest.mark.parametrize("value", ["1", 1.0, True, [1]])
def test_non_integer_body_rank_is_400(field, value):
    err = refused(parse_generate, {"text": "a", field: value})
    assert (err.status, err.code) == (400, "invalid_rank")
    assert field in str(err)


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({}, "invalid_field", "exactly one of text or input_ids"),
        ({"text": "a", "input_ids": [1]}, "invalid_field", "exactly one"),
        ({"text": ["a", "b"]}, "batch_not_supported", "one request per prompt"),
        ({"input_ids": [[1], [2]]}, "batch_not_supported", "batch"),
        ({"input_ids": [1, -2]}, "invalid_field", "input_ids[1]"),
        ({"input_ids": "12"}, "invalid_field", "list of token ids"),
        ({"text": 5}, "invalid_field", "text must be a string"),
        ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "invalid_field", "max_new_tokens"),
        ({"text": "a", "sampling_params": [1]}, "invalid_field", "sampling_params"),
        ({"text": "a", "stream": "yes"}, "invalid_field", "stream"),
        ({"text": "a", "rid": ""}, "invalid_field", "rid"),
        ({"text": "a", "bootstrap_room": -1}, "invalid_field", "bootstrap_room"),
        ({"text": "a", "bootstrap_room": 2**64}, "invalid_field", "bootstrap_room"),
        ({"text": "a", "bootstrap_port": 70000}, "invalid_field", "bootstrap_port"),
        ({"text": "a", "bootstrap_host": 1}, "invalid_field", "bootstrap_host"),
    ],
)
def test_generate_refusals(body, code, words):
    err = refused(parse_generate, body)
    assert (err.status, err.code) == (400, code)
    assert words in str(err)


def test_body_must_be_an_object():
    assert refused(parse_generate, [1, 2]).code == "invalid_body"


def test_completion_prompt_forms():
    assert parse_completion({"prompt": "ab"}, NO_HEADERS, TOK).token_ids == (97, 98)
    assert parse_completion({"prompt": [1, 2]}, NO_HEADERS, TOK).token_ids == (1, 2)
    assert parse_completion({"prompt": ["ab"]}, NO_HEADERS, TOK).token_ids == (97, 98)
    inp = parse_completion(
        {"prompt": "x", "max_tokens": 3, "temperature": 0, "model": "m", "stream": True,
         "stream_options": {"include_usage": True}},
        Headers({"x-data-parallel-rank": "1"}),
        TOK,
    )  # fmt: skip
    assert (inp.max_new_tokens, inp.model, inp.stream, inp.include_usage) == (3, "m", True, True)
    assert inp.sampling_params == {"temperature": 0}
    assert inp.routed_dp_rank == 1
    assert parse_completion({"prompt": "x"}, NO_HEADERS, TOK).max_new_tokens == DEFAULT_MAX_NEW_TOKENS["completion"]
    assert refused(parse_completion, {"prompt": ["a", "b"]}).code == "batch_not_supported"
    assert refused(parse_completion, {"prompt": 3}).code == "invalid_field"
    assert refused(parse_completion, {"prompt": "a", "n": 2}).code == "n_not_supported"


def test_chat_prompt_template_and_limits():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert chat_prompt(msgs) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    inp = parse_chat({"messages": msgs, "max_completion_tokens": 9, "max_tokens": 4}, NO_HEADERS, TOK)
    assert inp.max_new_tokens == 9  # the newer OpenAI name wins
    assert inp.token_ids == tuple(chat_prompt(msgs).encode())
    assert refused(parse_chat, {"messages": []}).code == "invalid_field"
    assert refused(parse_chat, {"messages": [{"content": "x"}]}).code == "invalid_field"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    assert "only text parts" in str(refused(parse_chat, {"messages": image}))


def test_output_payload_forms():
    import msgpack

    assert decode_payload(b" the of", TOK) == (" the of", None)
    assert decode_payload(b"a", TOK) == ("a", None)  # one ASCII byte is a msgpack int; still text
    assert decode_payload(msgpack.packb({"output_ids": [104, 105]}), TOK) == ("hi", [104, 105])
    assert decode_payload(msgpack.packb({"text": "x", "output_ids": [1]}), TOK) == ("x", [1])
    assert decode_payload(b"", TOK) == ("", None)
    assert TOK.decode([104, 300]) == "h\ufffd"
