"""PD disaggregation through the real sglang-router (from PyPI), ``--pd-disaggregation``.

A dpcore prefill front (dp 3, the bootstrap registry on the port the router is given) and
a dpcore decode front (dp 2, asking that registry) sit behind the router. For each request
the router draws a random ``bootstrap_room`` and sends the same body to both. From both
fronts' request logs, joined on the room, every decode request must have resolved exactly
the prefill rank the prefill side used:

* prefill ``follow_bootstrap_room``: decode computes ``room % 3`` without asking;
* prefill ``total_tokens``: the rank does not follow from the room, so decode asks the
  registry (``POST /query_dp_ranks``), racing the prefill side's registration (the router
  sends both legs at once).

The router runs only against 127.0.0.1, with Hugging Face offline and proxies dead-ended
(see :func:`dpcore.http.routers.router_env`); ``--dp-aware`` is never used.
"""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from dpcore.http.launch import Group, free_port, launch, wait_for
from dpcore.http.routers import executable, router_env, sglang_pd_command

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PREFILL_DP = 3
DECODE_DP = 2
N = 210


@pytest.fixture(scope="module")
def sglang_router_exe() -> str:
    return executable("sglang-router")  # builds the cached router venv on first use


def one_request(client: httpx.Client, i: int) -> None:
    stream = i % 4 == 0
    prompt = f"pd request {i} " + "y" * random.Random(i).randrange(1, 400)
    if i % 3 == 2:
        path = "/v1/chat/completions"
        body = {"model": "dpcore-mock", "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "stream": stream}
    else:
        path = "/generate"
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 2 + i % 5}, "stream": stream}
    if not stream:
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        meta = r.json().get("meta_info")
        if meta is not None:  # /generate answers come from decode and carry its view
            assert meta["prefill_dp_rank"] is not None and meta["bootstrap_room"] is not None
        return
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in events[:-1])


@pytest.mark.parametrize("prefill_method", ["follow_bootstrap_room", "total_tokens"])
def test_decode_resolves_the_prefill_rank_prefill_used(
    prefill_method: str, sglang_router_exe: str, tmp_path: Path
) -> None:
    bootstrap = free_port()
    logs = {"front_args": ("--log-requests",)}
    with launch(PREFILL_DP, log_dir=tmp_path, name="prefill", method=prefill_method, mode="prefill",
                serve_args=("--bootstrap-port", str(bootstrap)), **logs) as prefill, \
            launch(DECODE_DP, log_dir=tmp_path, name="decode", method="round_robin", mode="decode",
                   serve_args=("--bootstrap-url", f"http://127.0.0.1:{bootstrap}"), **logs) as decode, \
            Group(tmp_path) as group:  # fmt: skip
        port, mport = free_port(), free_port()
        cmd = sglang_pd_command(sglang_router_exe, port=port, metrics_port=mport, prefill_url=prefill.url,
                                bootstrap_port=bootstrap, decode_url=decode.url)  # fmt: skip
        router = group.start("sglang-router", cmd, env=router_env())
        url = f"http://127.0.0.1:{port}"
        probe = {"text": "warm up", "sampling_params": {"max_new_tokens": 1}}

        def ready() -> bool:
            try:
                return httpx.post(f"{url}/generate", json=probe, timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("sglang-router with both workers", ready, [router, prefill.serve, decode.serve], 60)
        with httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: one_request(client, i), range(N)))

        def both_logged() -> tuple[list[dict], list[dict]] | None:
            p, d = prefill.request_log(), decode.request_log()
            return (p, d) if len(p) >= N + 1 and len(d) >= N + 1 else None

        p_log, d_log = wait_for("both request logs", both_logged, [prefill.serve, decode.serve], 10)
        registry = httpx.get(f"http://127.0.0.1:{bootstrap}/info").json()

    assert all(x["status"] == 200 for x in p_log + d_log)
    # The router sent each room to both sides (the warm-up probe included; a probe sent
    # before the router was ready may have reached prefill only), as random 63-bit draws.
    p_by_room = {x["bootstrap_room"]: x for x in p_log}
    d_by_room = {x["bootstrap_room"]: x for x in d_log}
    assert len(p_by_room) == len(p_log) and len(d_by_room) == len(d_log) >= N + 1
    assert d_by_room.keys() <= p_by_room.keys()
    assert max(p_by_room) > 2**40
    # The heart of it: decode resolved the rank prefill actually used, for every request.
    wrong = [(room, p_by_room[room]["dp_rank"], d["prefill_dp_rank"]) for room, d in d_by_room.items()
             if d["prefill_dp_rank"] != p_by_room[room]["dp_rank"]]  # fmt: skip
    assert not wrong, wrong[:5]
    assert {x["dp_rank"] for x in p_log} == set(range(PREFILL_DP))
    assert {x["dp_rank"] for x in d_log} == set(range(DECODE_DP))
    by_room = sum(x["dp_rank"] == x["bootstrap_room"] % PREFILL_DP for x in p_log)
    if prefill_method == "follow_bootstrap_room":
        assert by_room == len(p_log)
        assert registry["follow_bootstrap_room"] is True
        assert registry["stats"]["registered"] == 0  # decode computes the rank, nothing to look up
    else:
        # total_tokens ignores the room, so the room alone would have been wrong for many
        # requests: decode really had to ask, and the registry answered every one.
        assert by_room < 0.6 * len(p_log)
        assert registry["follow_bootstrap_room"] is False
        assert registry["stats"]["registered"] == len(p_log)
        assert registry["stats"]["found"] >= len(d_log)
