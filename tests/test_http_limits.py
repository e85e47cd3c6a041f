"""The HTTP front under hostile or unlucky clients: real `dpcore serve` with its front and
mock ranks, a plain HTTP client and raw sockets.

* a client that goes away: its request is stopped on the rank (books close at once);
* a client that sends its body slowly: 408 after ``--body-timeout``;
* big prompts: parsed and tokenized off the event loop, so other requests keep their pace;
* two different ``X-Data-Parallel-Rank`` headers: refused;
* errors on the OpenAI paths: OpenAI's shape.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from dpcore.http.launch import Stack, launch

pytestmark = pytest.mark.e2e

#: Long enough for four 16 MB bodies on a busy 2-core machine; the slow-body case is
#: tested on the reading function itself, with a short timeout.
BODY_TIMEOUT_S = 60.0
BIG_BODY_BYTES = 16 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("http-limits")
    front = ("--body-timeout", str(BODY_TIMEOUT_S), "--max-body-bytes", str(BIG_BODY_BYTES + 4096))
    with launch(2, log_dir=log_dir, front_args=front) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=30.0) as c:
        yield c


def _counters(client: httpx.Client) -> dict:
    return client.get("/server_info").json()["counters"]


def _settled(client: httpx.Client, timeout_s: float, before: dict) -> dict:
    """The controller's counters once nothing is in flight and they count a dispatch made
    after *before* (the front caches status answers briefly, so the first answer can be the
    one from before the request)."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = _counters(client)
        if (st["in_flight"] == 0 and st["dispatched"] > before["dispatched"]) or time.monotonic() > deadline:
            return st
        time.sleep(0.05)


def test_a_client_that_leaves_has_its_request_stopped_on_the_rank(client: httpx.Client) -> None:
    before = _counters(client)
    # At the mock's pace, 200,000 output tokens take minutes: only an abort ends it quickly.
    body = {"text": "long", "rid": "leaver", "stream": True, "sampling_params": {"max_new_tokens": 200_000}}
    with client.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines)
    st = _settled(client, 10, before)
    assert st["in_flight"] == 0, st
    assert st["completed"] == before["completed"] + 1  # acknowledged and done by the rank
    assert st["failed"] == before["failed"]
    assert st["balanced"] == {"received": True, "dispatched": True}
    # One abort, sent by the front because its client went away, reached the rank.
    grew = {k: st["aborts"][k].get(v, 0) - before["aborts"][k].get(v, 0)
            for k, v in (("by_reason", "client_gone"), ("by_outcome", "forwarded"))}  # fmt: skip
    assert grew == {"by_reason": 1, "by_outcome": 1} and st["aborts"]["total"] == before["aborts"]["total"] + 1, st


def test_a_slow_body_gets_408() -> None:
    """A client that sent its headers and part of its body, then nothing: 408 once the body
    timeout passes, whatever it does next."""
    import asyncio

    from starlette.requests import Request

    from dpcore.http.app import read_body
    from dpcore.http.protocol import HttpError

    async def receive() -> dict:
        if not sent:
            sent.append(1)
            return {"type": "http.request", "body": b'{"text": ', "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent: list[int] = []
    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": [(b"content-length", b"100")]}

    async def go() -> HttpError:
        t0 = time.monotonic()
        try:
            await read_body(Request(scope, receive), 1 << 20, 0.3)
        except HttpError as exc:
            assert 0.25 <= time.monotonic() - t0 < 3
            return exc
        raise AssertionError("no timeout")

    err = asyncio.run(go())
    assert (err.status, err.code) == (408, "body_timeout") and "9 bytes came" in str(err)


def test_big_prompts_do_not_stall_other_requests(stack: Stack) -> None:
    """Four 16 MB prompts at once; meanwhile /health must keep answering. The bound: no
    /health answer waits longer than 3 s (parsing and tokenizing four such prompts on the
    event loop takes several seconds on this machine, so a front that did would miss it).
    The prompts themselves are larger than the ranks' KV cache: 400, after being parsed."""
    big = b'{"text": "' + b"a" * BIG_BODY_BYTES + b'", "sampling_params": {"max_new_tokens": 1}}'
    done = threading.Event()
    results: list[tuple[int, str]] = []

    def send_big() -> None:
        with httpx.Client(base_url=stack.url, timeout=120) as c:
            r = c.post("/generate", content=big, headers={"content-type": "application/json"})
            results.append((r.status_code, r.json()["error"]))

    senders = [threading.Thread(target=send_big) for _ in range(4)]
    for t in senders:
        t.start()
    worst = 0.0
    polls = 0
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        while any(t.is_alive() for t in senders):
            t0 = time.monotonic()
            assert c.get("/health").status_code == 200
            worst = max(worst, time.monotonic() - t0)
            polls += 1
            time.sleep(0.05)
    for t in senders:
        t.join()
    done.set()
    assert results == [(400, "context_length_exceeded")] * 4, results
    assert polls >= 3
    assert worst < 3.0, f"/health waited {worst:.2f}s while big prompts were parsed"


def test_two_different_rank_headers_are_refused(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as s:
        body = b'{"text": "x"}'
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"X-Data-Parallel-Rank: 0\r\nX-Data-Parallel-Rank: 1\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)  # fmt: skip
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"invalid_rank" in answer and b"different values" in answer


def test_openai_paths_answer_errors_in_openai_shape(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "routed_dp_rank": 9})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "invalid_rank" and err["type"] == "invalid_request_error"
    assert err["param"] == "routed_dp_rank" and "out of range" in err["message"]
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    # SGLang's own paths keep SGLang's shape.
    native = client.post("/generate", json={"text": "x", "routed_dp_rank": 9}).json()
    assert native["error"] == "invalid_rank" and "out of range" in native["detail"]
