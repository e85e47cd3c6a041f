"""The HTTP front end to end: real uvicorn on a random 127.0.0.1 port, a real controller
(``dpcore serve``) and real mock ranks (``dpcore mock-worker``), driven with a plain HTTP
client. Every request field, every endpoint routers poll, and every error status."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from dpcore.http.launch import DPCORE, Stack, launch, wait_for

pytestmark = pytest.mark.e2e

BODY_LIMIT = 65536
#: Status answers are cached this long by the front; wait it out before reading counters.
STATUS_CACHE_S = 0.06
#: How long a load test waits for the ranks' reports to show its requests.
LOAD_WAIT_S = 30.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("http")
    with launch(2, log_dir=log_dir, front_args=("--max-body-bytes", str(BODY_LIMIT), "--log-requests")) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30.0) as c:
        yield c


def sse_events(resp: httpx.Response) -> list[object]:
    """The ``data:`` payloads of a server-sent-events body; ``[DONE]`` kept as a string."""
    out: list[object] = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return out


def error_of(resp: httpx.Response, status: int, code: str) -> str:
    """The error message, after checking status, code and the body's shape for its path:
    OpenAI's on ``/v1/...``, SGLang's elsewhere."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    if resp.request.url.path.startswith("/v1/"):
        err = body["error"]
        assert set(err) == {"message", "type", "param", "code"}, body
        assert err["code"] == code, body
        assert err["type"] == ("invalid_request_error" if status in (400, 413) else err["type"])
        return str(err["message"])
    assert body["error"] == code, body
    return str(body["detail"])


# --------------------------------------------------------------------------- /generate


def test_generate_text(client: httpx.Client) -> None:
    r = client.post("/generate", json={"text": "héllo dpcore", "rid": "t-text", "sampling_params": {"max_new_tokens": 6}})
    assert r.status_code == 200, r.text
    body = r.json()
    meta = body["meta_info"]
    assert body["text"].strip() and len(body["text"].split()) == 6  # the mock emits one word per token
    assert meta["id"] == "t-text"
    assert meta["prompt_tokens"] == len("héllo dpcore".encode())  # byte tokenizer
    assert meta["completion_tokens"] == 6
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["dp_rank"] in (0, 1)
    assert meta["routed_dp_rank"] is None
    assert r.headers["x-dpcore-dp-rank"] == str(meta["dp_rank"])
    assert r.headers["x-request-id"] == "t-text"


def test_generate_input_ids_and_default_length(client: httpx.Client) -> None:
    r = client.post("/generate", json={"input_ids": list(range(100))})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert meta["prompt_tokens"] == 100
    assert meta["completion_tokens"] == 128  # SGLang's default max_new_tokens


def test_generate_stream_matches_non_stream(client: httpx.Client) -> None:
    body = {"text": "stream me", "rid": "t-stream", "sampling_params": {"max_new_tokens": 40}}
    whole = client.post("/generate", json=body).json()
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) >= 2, "the mock streams after prefill and after each decode macro step"
    texts = [c["text"] for c in chunks]  # type: ignore[index]
    for a, b in itertools.pairwise(texts):
        assert b.startswith(a), "SGLang /generate streams the whole text so far"
    # The mock's text depends only on the request's wire id and length; the front gives each
    # request a fresh wire id, so two requests of one client rid get texts of the same length.
    assert len(texts[-1].split()) == len(whole["text"].split()) == 40
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 40}  # type: ignore[index]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])  # type: ignore[index]


@pytest.mark.parametrize("field", ["routed_dp_rank", "data_parallel_rank"])
def test_body_rank_is_followed(client: httpx.Client, field: str) -> None:
    for rank in (1, 0, 1, 1):
        r = client.post("/generate", json={"text": "x", field: rank, "sampling_params": {"max_new_tokens": 1}})
        assert r.status_code == 200, r.text
        assert r.json()["meta_info"]["dp_rank"] == rank


@pytest.mark.parametrize("name", ["X-Data-Parallel-Rank", "x-data-parallel-rank", "X-DATA-parallel-RANK"])
@pytest.mark.parametrize("path", ["/generate", "/v1/completions", "/v1/chat/completions"])
def test_header_overrides_body(client: httpx.Client, name: str, path: str) -> None:
    body = {
        "/generate": {"text": "x", "routed_dp_rank": 0, "data_parallel_rank": 0, "sampling_params": {"max_new_tokens": 1}},
        "/v1/completions": {"prompt": "x", "routed_dp_rank": 0, "max_tokens": 1},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "data_parallel_rank": 0, "max_tokens": 1},
    }[path]
    r = client.post(path, json=body, headers={name: "1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-dpcore-dp-rank"] == "1"


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        ({"routed_dp_rank": 2}, {}, "out of range [0, 2)"),
        ({"routed_dp_rank": -1}, {}, "out of range"),
        ({"data_parallel_rank": 7}, {}, "out of range"),
        ({"routed_dp_rank": "1"}, {}, "must be an integer"),
        ({"routed_dp_rank": 1.5}, {}, "must be an integer"),
        ({}, {"X-Data-Parallel-Rank": "one"}, "Invalid X-Data-Parallel-Rank header"),
        ({}, {"X-Data-Parallel-Rank": "5"}, "out of range"),
        ({"routed_dp_rank": 0}, {"x-data-parallel-rank": "9"}, "out of range"),  # the header wins
    ],
)
def test_bad_rank_is_400_json(client: httpx.Client, body: dict, headers: dict, words: str) -> None:
    r = client.post("/generate", json={"text": "x", **body}, headers=headers)
    assert words in error_of(r, 400, "invalid_rank")


def test_bootstrap_fields_pass_through(client: httpx.Client) -> None:
    body = {"text": "x", "bootstrap_host": "127.0.0.1", "bootstrap_port": 8998, "bootstrap_room": 2**63 - 5,
            "sampling_params": {"max_new_tokens": 1}}  # fmt: skip
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["bootstrap_room"] == 2**63 - 5
    assert "bootstrap_room" in error_of(client.post("/generate", json={**body, "bootstrap_room": -3}), 400, "invalid_field")


def test_duplicate_rid_in_flight_is_400_and_a_reused_rid_gets_only_its_own_output(client: httpx.Client) -> None:
    long = {"text": "x", "rid": "t-dup", "stream": True, "sampling_params": {"max_new_tokens": 3000}}
    with client.stream("POST", "/generate", json=long) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep a reference: a dropped iterator closes the connection
        next(lines)  # the request is running now
        dup = client.post("/generate", json={"text": "y", "rid": "t-dup"})
        assert "already pending" in error_of(dup, 400, "duplicate_rid")
    # Once the server noticed the first request's client went away, the rid is free again,
    # and the new request gets its own output only: never the first one's (still running,
    # or stopped by the abort the front sent) text or token counts.
    again = {"text": "yy", "rid": "t-dup", "sampling_params": {"max_new_tokens": 2}}
    deadline = time.monotonic() + 5
    while (r := client.post("/generate", json=again)).status_code == 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["meta_info"]["id"] == "t-dup"
    assert body["meta_info"]["prompt_tokens"] == 2 and body["meta_info"]["completion_tokens"] == 2, body
    assert len(body["text"].split()) == 2, body


@pytest.mark.parametrize("path", ["/generate", "/v1/completions"])
def test_request_larger_than_kv_capacity_is_400(client: httpx.Client, path: str) -> None:
    # 10^6 output tokens cannot fit the mock rank's 500k-token KV cache: no rank could serve it.
    body = {"text": "x", "sampling_params": {"max_new_tokens": 10**6}} if path == "/generate" else \
        {"prompt": "x", "max_tokens": 10**6}  # fmt: skip
    r = client.post(path, json=body)
    assert "KV cache" in error_of(r, 400, "context_length_exceeded")


# --------------------------------------------------------------------------- OpenAI


def test_completions(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 5, "rid": "c1"})
    assert r.status_code == 200, r.text
    b = r.json()
    assert (b["object"], b["model"], b["id"]) == ("text_completion", "m", "cmpl-c1")
    choice = b["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 5
    assert b["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10,
                          "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
    default = client.post("/v1/completions", json={"prompt": [1, 2, 3]}).json()
    assert default["usage"]["completion_tokens"] == 16 and default["usage"]["prompt_tokens"] == 3


def test_completions_stream_deltas(client: httpx.Client) -> None:
    body = {"prompt": "hello", "max_tokens": 30, "rid": "c-s"}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:  # fmt: skip
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 30  # type: ignore[index]
    chunks = events[:-2]
    # Deltas add up to a whole text as long as the non-streamed one (each request has its
    # own wire id, and the mock's words depend on it).
    streamed = "".join(c["choices"][0]["text"] for c in chunks)  # type: ignore[index]
    assert len(streamed.split()) == len(whole.split()) == 30
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"  # type: ignore[index]


def test_chat(client: httpx.Client) -> None:
    msgs = [{"role": "system", "content": "brief"}, {"role": "user", "content": "hi"}]
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": msgs, "max_completion_tokens": 4})
    assert r.status_code == 200, r.text
    b = r.json()
    assert b["object"] == "chat.completion"
    assert b["choices"][0]["message"]["role"] == "assistant"
    assert len(b["choices"][0]["message"]["content"].split()) == 4
    prompt = "<|system|>\nbrief\n<|user|>\nhi\n<|assistant|>\n"
    assert b["usage"]["prompt_tokens"] == len(prompt)
    with client.stream("POST", "/v1/chat/completions", json={"messages": msgs, "max_tokens": 12, "stream": True}) as s:
        events = sse_events(s)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]  # type: ignore[index]
    assert deltas[0]["role"] == "assistant"
    assert len("".join(d["content"] for d in deltas).split()) == 12


# --------------------------------------------------------------------------- bodies and paths


def test_body_limit_is_413(client: httpx.Client) -> None:
    r = client.post("/generate", json={"text": "a" * (BODY_LIMIT + 10)})
    assert str(BODY_LIMIT) in error_of(r, 413, "body_too_large")
    # Without a Content-Length (chunked), the limit holds while reading.
    chunks = (b'{"text": "' + b"a" * 8192 for _ in range(BODY_LIMIT // 8192 + 2))
    r = client.post("/generate", content=chunks)
    error_of(r, 413, "body_too_large")


def test_bad_json_and_paths(client: httpx.Client) -> None:
    error_of(client.post("/generate", content=b"{not json"), 400, "invalid_json")
    error_of(client.post("/generate", json=[1, 2]), 400, "invalid_body")
    error_of(client.post("/v1/completions", json={"prompt": ["a", "b"]}), 400, "batch_not_supported")
    error_of(client.get("/nope"), 404, "not_found")
    error_of(client.get("/generate"), 405, "method_not_allowed")


# --------------------------------------------------------------------------- polled endpoints


def test_info_endpoints(client: httpx.Client) -> None:
    for path in ("/server_info", "/get_server_info"):
        info = client.get(path).json()
        assert info["dp_size"] == 2
        assert info["load_balance_method"] == "round_robin"
        assert info["disaggregation_mode"] == "null"
        assert len(info["internal_states"]) == 2
        assert set(info["counters"]) >= {"received", "dispatched", "per_rank"}
    for path in ("/model_info", "/get_model_info"):
        assert client.get(path).json()["model_path"] == "dpcore-mock"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "dpcore-mock"
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["active_ranks"] == [0, 1]
    hg = client.get("/health_generate")
    assert hg.status_code == 200 and hg.json()["dp_rank"] in (0, 1)


def test_get_load_follows_the_ledger(client: httpx.Client) -> None:
    """Requests pinned to rank 1 show up on rank 1 in /get_load and /v1/loads, not on 0."""
    streams = []
    lines = []  # keep references: a dropped iterator closes its connection
    try:
        for i in range(4):
            cm = client.stream("POST", "/generate", json={
                "input_ids": list(range(200 + i)), "routed_dp_rank": 1, "stream": True,
                "sampling_params": {"max_new_tokens": 2000},
            })  # fmt: skip
            r = cm.__enter__()
            streams.append(cm)
            lines.append(r.iter_lines())
            next(lines[-1])
        # Rank 1's report after it admitted all four, once the front's cached answer is
        # newer than that report; earlier tests' requests leave rank 0 meanwhile. Had the
        # pin been ignored, two of the four would hold rank 0 until the end of the test.
        deadline = time.monotonic() + LOAD_WAIT_S
        while True:
            loads = client.get("/get_load").json()
            if loads[1]["num_reqs"] >= 4 and loads[1]["num_tokens"] >= 4 * 200 and loads[0]["num_reqs"] == 0:
                break
            assert time.monotonic() < deadline, f"/get_load never showed the four on rank 1 alone: {loads}"
            time.sleep(STATUS_CACHE_S)
        assert [sorted(x) for x in loads] == [["dp_rank", "num_reqs", "num_tokens", "num_waiting_reqs"]] * 2
        v1 = client.get("/v1/loads").json()
        assert v1["dp_rank_count"] == 2
        assert v1["loads"][1]["num_total_reqs"] == v1["loads"][1]["num_running_reqs"] + v1["loads"][1]["num_waiting_reqs"]
        assert v1["aggregate"]["total_reqs"] >= 4
        assert v1["aggregate"]["total_tokens"] == sum(x["num_used_tokens"] for x in v1["loads"])
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)


def test_counters_match_responses(client: httpx.Client) -> None:
    """The controller's per-rank dispatch counters grow exactly by what the responses say."""
    time.sleep(STATUS_CACHE_S)
    before = [r["dispatched"] for r in client.get("/server_info").json()["counters"]["per_rank"]]
    served = [0, 0]
    for i in range(30):
        body = {"text": f"req {i}", "sampling_params": {"max_new_tokens": 1}}
        if i % 3 == 0:
            body["routed_dp_rank"] = 1
        served[client.post("/generate", json=body).json()["meta_info"]["dp_rank"]] += 1
    time.sleep(STATUS_CACHE_S)
    after = [r["dispatched"] for r in client.get("/server_info").json()["counters"]["per_rank"]]
    assert [a - b for a, b in zip(after, before)] == served


def test_request_log_lines(stack: Stack, client: httpx.Client) -> None:
    client.post("/generate", json={"text": "logged", "rid": "t-log", "routed_dp_rank": 1,
                                   "sampling_params": {"max_new_tokens": 1}})  # fmt: skip

    def line() -> dict | None:
        return next((x for x in stack.request_log() if x.get("rid") == "t-log"), None)

    rec = wait_for("the request log line", line, [stack.serve], 5.0)
    assert rec["event"] == "request" and rec["status"] == 200
    assert (rec["dp_rank"], rec["routed_dp_rank"], rec["kind"]) == (1, 1, "generate")


# --------------------------------------------------------------------------- a second front: auth, timeout


def test_second_front_api_key_and_timeout(stack: Stack, tmp_path: Path) -> None:
    """Two fronts can share one controller; the second needs an API key and times out fast."""
    from dpcore.http.launch import Group

    port_file = tmp_path / "port"
    with Group(tmp_path) as g:
        env = {**__import__("os").environ, "DPCORE_API_KEY": "sk-test"}
        front = g.start("front2", [
            *DPCORE, "http-front", "--ingress", stack.endpoints["ingress"], "--status", stack.endpoints["status"],
            "--http-port", "0", "--port-file", str(port_file), "--request-timeout", "0.3",
        ], env=env)  # fmt: skip
        port = wait_for("the second front", lambda: port_file.exists() and port_file.read_text().strip(), [front], 20)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert c.get("/health").status_code == 200  # open, like SGLang's
            error_of(c.get("/get_load"), 401, "unauthorized")
            error_of(c.post("/generate", json={"text": "x"}), 401, "unauthorized")
            wrong = {"Authorization": "Bearer nope"}
            error_of(c.post("/generate", json={"text": "x"}, headers=wrong), 401, "unauthorized")
            ok = {"Authorization": "Bearer sk-test"}
            r = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 2}}, headers=ok)
            assert r.status_code == 200, r.text
            assert c.get("/get_load", headers=ok).status_code == 200
            before = c.get("/server_info", headers=ok).json()["counters"]["aborts"]["by_reason"].get("timeout", 0)
            slow = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 5000}}, headers=ok)
            assert "0.3s" in error_of(slow, 504, "timeout")

            def timed_out() -> int:
                return c.get("/server_info", headers=ok).json()["counters"]["aborts"]["by_reason"].get("timeout", 0)

            wait_for("the front's timeout abort", lambda: timed_out() == before + 1, [front], 10)


# --------------------------------------------------------------------------- ranks down, PD decode fields


def test_inactive_and_down_ranks(tmp_path: Path) -> None:
    """dp 2 with only rank 0 running: pinning rank 1 is 503; with no rank at all, 503 too."""
    serve = ("--heartbeat-timeout", "0.5", "--startup-timeout", "0.5")  # a rank never started
    with launch(2, log_dir=tmp_path, name="half", ranks=[0], serve_args=serve) as s, \
            httpx.Client(base_url=s.url, timeout=10) as c:  # fmt: skip
        wait_for("rank 1 to time out", lambda: c.get("/health").json()["active_ranks"] == [0], [s.serve], 10)
        detail = error_of(c.post("/generate", json={"text": "x", "routed_dp_rank": 1}), 503, "rank_inactive")
        assert "inactive" in detail
        r = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
        assert r.json()["meta_info"]["dp_rank"] == 0
    with launch(2, log_dir=tmp_path, name="none", ranks=[], serve_args=serve) as s, \
            httpx.Client(base_url=s.url, timeout=10) as c:  # fmt: skip
        wait_for("every rank to time out", lambda: c.get("/health").status_code == 503, [s.serve], 10)
        error_of(c.get("/health"), 503, "no_active_rank")
        error_of(c.post("/generate", json={"text": "x"}), 503, "no_active_rank")
        error_of(c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}), 503, "no_active_rank")
        hg = c.get("/health_generate")
        assert hg.status_code == 503


def test_decode_side_prefill_rank_fields(tmp_path: Path) -> None:
    """A PD decode controller: the prefill rank comes from disagg_prefill_dp_rank, or from
    bootstrap_room % prefill dp size when prefill follows the room."""
    serve = ("--prefill-dp-size", "3", "--prefill-load-balance-method", "follow_bootstrap_room")
    with launch(2, log_dir=tmp_path, mode="decode", serve_args=serve) as s, \
            httpx.Client(base_url=s.url, timeout=10) as c:  # fmt: skip
        assert c.get("/server_info").json()["disaggregation_mode"] == "decode"
        one = {"sampling_params": {"max_new_tokens": 1}}
        for room in (7, 2**63 - 1, 3):
            meta = c.post("/generate", json={"text": "x", "bootstrap_room": room, **one}).json()["meta_info"]
            assert meta["prefill_dp_rank"] == room % 3
        meta = c.post("/generate", json={"text": "x", "bootstrap_room": 7, "disagg_prefill_dp_rank": 2, **one}).json()
        assert meta["meta_info"]["prefill_dp_rank"] == 2
        bad = c.post("/generate", json={"text": "x", "bootstrap_room": 7, "disagg_prefill_dp_rank": 3})
        assert "disagg_prefill_dp_rank=3" in error_of(bad, 400, "invalid_rank")


def test_concurrent_requests_each_get_their_own_reply(client: httpx.Client) -> None:
    """Many requests in flight on one front: every reply reaches its own request."""
    results: dict[str, object] = {}

    def one(i: int) -> None:
        try:
            r = client.post("/generate", json={"text": f"c{i}", "rid": f"conc-{i}", "sampling_params": {"max_new_tokens": 3}})
            results[f"conc-{i}"] = r.json()["meta_info"]["id"] if r.status_code == 200 else (r.status_code, r.text)
        except Exception as exc:  # shown in the assertion, not lost in the thread
            results[f"conc-{i}"] = repr(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {f"conc-{i}": f"conc-{i}" for i in range(40)}


# --------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (("--http-port", "70000"), "--http-port must be in 0..65535"),
        (("--http-port", "0", "--max-body-bytes", "0"), "--max-body-bytes must be positive"),
        (("--http-port", "0", "--request-timeout", "-1"), "--request-timeout must be positive"),
    ],
)
def test_serve_refuses_bad_http_flags(dpcore_exe: list[str], flags: tuple[str, ...], words: str) -> None:
    import subprocess

    p = subprocess.run([*dpcore_exe, "serve", "--dp-size", "1", *flags], capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert words in p.stderr and "Traceback" not in p.stderr


def test_serve_refuses_a_taken_http_port(dpcore_exe: list[str]) -> None:
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run([*dpcore_exe, "serve", "--dp-size", "1", "--http-port", str(port)],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 2, p.stderr
    assert f"cannot bind 127.0.0.1:{port}" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- a client that stops reading

UNREAD_BOUND = 64


def test_a_client_that_stops_reading_ends_its_request_at_the_bound(tmp_path: Path) -> None:
    """A streaming client that keeps its connection open and reads nothing makes the front hold
    at most ``--max-unread-replies`` replies of its request; the request then ends
    ``client_too_slow``: aborted on its rank, counted, and said in the stream once the client
    reads again. Another client meanwhile streams its answer."""
    import socket

    with launch(1, log_dir=tmp_path, front_args=("--max-unread-replies", str(UNREAD_BOUND))) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:  # fmt: skip
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        body = json.dumps({"text": "slow", "stream": True, "sampling_params": {"max_new_tokens": 100_000}}).encode()
        slow = socket.socket()
        # A small receive window, so the front's writes to this client block early.
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect((host, int(port)))
        try:
            slow.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip

            def ended() -> dict | None:
                front = c.get("/server_info").json()["front"]
                return front if front["client_too_slow"] or front["unread_replies_peak"] > UNREAD_BOUND else None

            front = wait_for("the unread stream to end", ended, [s.serve], 60)
            assert front["unread_replies_peak"] <= UNREAD_BOUND, front
            assert front["client_too_slow"] == 1 and front["max_unread_replies"] == UNREAD_BOUND, front
            metrics = c.get("/metrics").text
            assert "dpcore_http_client_too_slow_total 1.0" in metrics, metrics

            # Another client, meanwhile, reads its stream to the end.
            with c.stream("POST", "/generate", json={"text": "reader", "stream": True,
                                                      "sampling_params": {"max_new_tokens": 100}}) as r:  # fmt: skip
                events = sse_events(r)
            assert events[-1] == "[DONE]" and events[-2]["meta_info"]["completion_tokens"] == 100, events[-2:]

            # The rank stopped the slow request (100,000 tokens would take far longer): nothing
            # is in flight although the slow client still holds its connection.
            def settled() -> dict | None:
                counters = c.get("/server_info").json()["counters"]
                return counters if counters["in_flight"] == 0 else None

            counters = wait_for("the aborted request to leave its rank", settled, [s.serve], 20)
            assert counters["failed"] == 0 and counters["internal_errors"] == 0, counters
            # One abort, said to be the reader's slowness, sent once (not again when the
            # front's handler ended) to the rank holding the request.
            assert counters["aborts"] == {"total": 1, "by_reason": {"too_slow": 1}, "by_outcome": {"forwarded": 1}}

            # Once the client reads again, its stream ends with the reason.
            slow.settimeout(30)
            got = bytearray()
            while b"data: [DONE]" not in got[-64:]:
                chunk = slow.recv(1 << 20)
                assert chunk, f"connection closed without the end of the stream: {bytes(got[-300:])!r}"
                got += chunk
            tail = bytes(got[-2000:])
            assert b'"code":"client_too_slow"' in tail, tail
        finally:
            slow.close()
