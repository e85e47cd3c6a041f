"""dpcore behind the real vllm-router (from PyPI) with ``--intra-node-data-parallel-size``.

The router expands the dpcore HTTP front into one DP-aware worker per rank and sends its
choice as ``X-data-parallel-rank``. dpcore runs ``total_requests``, which would place
requests differently on its own; the router runs ``random``. Checks, over 240 requests of
every endpoint kind (some streaming):

* every request was served by exactly the rank the router sent (front request log);
* per rank, the router's own count (its Prometheus counter), the ranks the front saw in the
  header, the ranks the responses report, and the controller's dispatch counters agree.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from dpcore.http.launch import Group, Stack, free_port, launch, wait_for
from dpcore.http.routers import executable, router_env, vllm_dp_command, worker_counts

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

DP = 4
N = 240
METRIC = "vllm_router_processed_requests_total"


@pytest.fixture(scope="module")
def vllm_router_exe() -> str:
    return executable("vllm-router")  # builds the cached router venv on first use


@pytest.fixture(scope="module")
def setup(vllm_router_exe: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str, str]]:
    log_dir = tmp_path_factory.mktemp("vllm")
    with launch(DP, log_dir=log_dir, method="total_requests", front_args=("--log-requests",)) as stack, \
            Group(log_dir) as group:  # fmt: skip
        port, mport = free_port(), free_port()
        cmd = vllm_dp_command(vllm_router_exe, port=port, metrics_port=mport, worker_url=stack.url, dp_size=DP)
        router = group.start("vllm-router", cmd, env=router_env())
        url, metrics = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics"

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200 and bool(
                    worker_counts(httpx.get(metrics, timeout=2).text, "vllm_router_worker_health")
                )
            except httpx.HTTPError:
                return False

        wait_for("vllm-router", ready, [router], 60)
        yield stack, url, metrics


def one_request(client: httpx.Client, i: int) -> int | None:
    """Send request *i* (kind and streaming vary with i); return the served rank when the
    response body says it (SGLang /generate), else ``None``."""
    kind = i % 4
    stream = i % 5 == 0
    prompt = f"request {i} " + "x" * random.Random(i).randrange(1, 300)
    if kind in (0, 1):
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 1 + i % 7}, "stream": stream}
        path = "/generate"
    elif kind == 2:
        body = {"model": "dpcore-mock", "prompt": prompt, "max_tokens": 3, "stream": stream}
        path = "/v1/completions"
    else:
        body = {"model": "dpcore-mock", "messages": [{"role": "user", "content": prompt}], "max_tokens": 3, "stream": stream}
        path = "/v1/chat/completions"
    if not stream:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        meta = r.json().get("meta_info")
        if meta is None:
            return None
        assert meta["dp_rank"] == meta["routed_dp_rank"], meta
        return int(meta["dp_rank"])
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in events[:-1])
    return None


def test_every_request_lands_on_the_rank_the_router_chose(setup: tuple[Stack, str, str]) -> None:
    stack, url, metrics = setup
    before_router = worker_counts(httpx.get(metrics).text, METRIC)
    time.sleep(0.06)  # past the front's status cache
    before_ctl = [r["dispatched"] for r in httpx.get(f"{stack.url}/server_info").json()["counters"]["per_rank"]]
    seen_before = len(stack.request_log())

    with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda i: one_request(client, i), range(N)))

    # The router's own record of what it chose, per DP-aware worker "<front url>@<rank>".
    after_router = worker_counts(httpx.get(metrics).text, METRIC)
    router = [after_router.get(f"{stack.url}@{r}", 0) - before_router.get(f"{stack.url}@{r}", 0) for r in range(DP)]
    assert sum(router) == N, (router, after_router)
    assert sum(1 for c in router if c > 0) >= 3, f"the router's random choices should spread: {router}"

    # The front: what the router asked for (header) and what served it, request by request.
    def logged() -> list[dict] | None:
        lines = stack.request_log()[seen_before:]
        return lines if len(lines) >= N else None

    log = wait_for("all request log lines", logged, [stack.serve], 10)
    assert len(log) == N
    assert all(x["status"] == 200 for x in log)
    mismatched = [x for x in log if x["routed_dp_rank"] is None or x["dp_rank"] != x["routed_dp_rank"]]
    assert not mismatched, mismatched[:3]
    asked = Counter(x["routed_dp_rank"] for x in log)
    assert [asked[r] for r in range(DP)] == router

    # Responses that carry the rank (/generate, not streamed) agree with the log.
    body_ranks = Counter(r for r in served if r is not None)
    assert sum(body_ranks.values()) >= N // 3

    # The controller's dispatch counters moved by exactly the router's choices.
    time.sleep(0.06)
    after_ctl = [r["dispatched"] for r in httpx.get(f"{stack.url}/server_info").json()["counters"]["per_rank"]]
    assert [a - b for a, b in zip(after_ctl, before_ctl)] == router


def test_router_sees_the_fronts_health_and_load(setup: tuple[Stack, str, str]) -> None:
    """What the router polls answers in the shapes it parses."""
    stack, url, metrics = setup
    health = worker_counts(httpx.get(metrics).text, "vllm_router_worker_health")
    assert health == {f"{stack.url}@{r}": 1.0 for r in range(DP)}
    loads = httpx.get(f"{stack.url}/get_load").json()
    assert [x["dp_rank"] for x in loads] == list(range(DP))
    assert all(isinstance(x["num_tokens"], int) for x in loads)
    # The router also forwards model listing to the worker.
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "dpcore-mock"
