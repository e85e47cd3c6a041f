"""Block hashes computed by SGLang's TokenizerManager (hooked) and used by the adapter in its controller."""

from __future__ import annotations

import pickle
from types import SimpleNamespace
from typing import Any

import pytest
from sglang.srt.managers.io_struct import ActiveRanksOutput
from sglang.srt.runtime_context import publish
from sglang.srt.server_args import ServerArgs

from dpcore.hashing import block_key_bytes
from dpcore_sglang import tokenizer_hashes
from dpcore_sglang.config import AdapterConfig
from dpcore_sglang.tokenizer_hashes import carry
from dpcore_sglang.testing import free_port, make_request, scrape

pytestmark = pytest.mark.sglang

PREFIXES = [0, 100_000, 200_000, 300_000]


def start(controller: Any, **adapter: Any) -> tuple[Any, int]:
    port = free_port()
    h = controller(sglang_method="round_robin", adapter=AdapterConfig(method="cache_aware", metrics_port=port, **adapter))
    publish(h.server_args, role="tokenizer")  # as SGLang's launcher does before it builds the TokenizerManager
    return h, port


def sources(port: int) -> dict[str, float]:
    m = scrape(port)
    out = {dict(labels)["source"]: v for (name, labels), v in m.items() if name == "dpcore_block_hashes_total"}
    out.update({f"refused:{dict(labels)['reason']}": v for (name, labels), v in m.items() if name == "dpcore_block_hashes_refused_total"})
    return out


def homes(h: Any, send: Any) -> dict[int, int]:
    for p in PREFIXES:
        send(make_request(f"first{p}", num_tokens=1024, first_token=p))
    home = {int(d.rid.removeprefix("first")): d.rank for d in h.deliveries(4)}
    assert sorted(home.values()) == [0, 1, 2, 3]
    return home


def test_the_tokenizer_hashes_and_the_controller_places_by_its_keys(controller, hooked_tokenizer_manager):
    h, port = start(controller)
    tm = SimpleNamespace(send_to_scheduler=h.tokenizer_out, tokenizer_ipc_name=None)

    def send(req: Any) -> None:
        hooked_tokenizer_manager._dispatch_to_scheduler(tm, req)

    home = homes(h, send)
    for rep in range(2):
        for p in PREFIXES:
            send(make_request(f"again{p}-{rep}", num_tokens=1024, first_token=p))
    placed = {d.rid: d.rank for d in h.deliveries(8)}
    assert placed == {f"again{p}-{rep}": home[p] for p in PREFIXES for rep in range(2)}
    send(ActiveRanksOutput(status=[True] * 4))  # not a request: SGLang's own send, untouched
    send(make_request("after", num_tokens=1024, first_token=PREFIXES[0]))
    assert [d.rank for d in h.deliveries(1)] == [home[PREFIXES[0]]]
    assert sources(port) == {"tokenizer": 13, "controller": 0}


def test_the_keys_that_came_decide_not_a_second_hashing(controller):
    # Each prompt of prefix p arrives with the keys of prefix q: it goes where q is cached.
    # (Were the controller to hash again, it would go where p is.)
    h, port = start(controller)
    home = homes(h, h.send)
    for i, p in enumerate(PREFIXES):
        q = PREFIXES[(i + 1) % len(PREFIXES)]
        req = make_request(f"claims{p}", num_tokens=1024, first_token=p)
        keys = block_key_bytes(make_request("x", num_tokens=1024, first_token=q).input_ids, 64)
        h.send_raw(carry(pickle.dumps(req, protocol=pickle.HIGHEST_PROTOCOL), 64, [req.rid, keys]))
        assert [d.rank for d in h.deliveries(1)] == [home[q]]
    assert sources(port) == {"tokenizer": 4, "controller": 4}


def test_keys_that_do_not_fit_are_refused_and_the_request_is_hashed_here(controller):
    h, port = start(controller)
    home = homes(h, h.send)
    p = PREFIXES[1]
    req = make_request("other-size", num_tokens=1024, first_token=p)
    wrong = [
        carry(pickle.dumps(req), 32, [req.rid, block_key_bytes(req.input_ids, 32)]),  # another block size
        carry(pickle.dumps(req), 64, [req.rid, block_key_bytes(req.input_ids[:512], 64)]),  # half the blocks
        carry(pickle.dumps(req), 64, [req.rid, b"\xff" * 128]),  # not block hashes
    ]
    for frame in wrong:
        h.send_raw(frame)
    assert [d.rank for d in h.deliveries(3)] == [home[p]] * 3  # placed by the controller's own hashes
    assert sources(port) == {
        "tokenizer": 0,
        "controller": 7,
        "refused:block_size": 1,
        "refused:count": 1,
        "refused:value": 1,
    }


@pytest.mark.parametrize(
    ("args", "block_size"),
    [
        ({"dp_size": 4}, 64),
        ({"dp_size": 4, "page_size": 48}, 96),
        ({"dp_size": 1}, 0),  # no controller: the scheduler reads the tokenizer's messages
        ({"dp_size": 4, "tokenizer_worker_num": 2}, 0),  # a router between re-encodes messages
    ],
)
def test_the_tokenizer_hashes_only_for_a_dpcore_controller(args, block_size):
    config = AdapterConfig(method="cache_aware")
    publish(ServerArgs(model_path="dummy", **args), role="tokenizer")
    assert tokenizer_hashes.tokenizer_block_size(lambda page: config.hashed_block_size(True, page)) == block_size
