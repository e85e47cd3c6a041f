"""The baseline of ``dpcore bench``: a forwarding loop in the style of SGLang's DPC.

This is the ONLY module in dpcore that uses pickle, and only to measure what dpcore
replaces: the tokenizer ``send_pyobj``s a request object, the controller ``recv_pyobj``s
it, picks a rank round robin and ``send_pyobj``s it again. Never import it outside the
benchmark, and never point it at a socket anyone else can reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import zmq


@dataclass
class TokenizedRequest:
    """Shaped like SGLang's ``TokenizedGenerateReqInput``: token ids plus routing fields."""

    rid: str
    input_text: str
    input_ids: list[int]
    sampling_params: dict[str, Any] = field(default_factory=dict)
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    stream: bool = False
    bootstrap_room: int | None = None
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None
    disagg_prefill_dp_rank: int | None = None


def make_request(i: int, token_ids: list[int]) -> TokenizedRequest:
    return TokenizedRequest(
        rid=f"r{i}",
        input_text="",
        input_ids=token_ids,
        sampling_params={"max_new_tokens": 128, "temperature": 0.0, "top_p": 1.0},
    )


def send_requests(sock: zmq.Socket, count: int, token_ids: list[int]) -> None:  # type: ignore[type-arg]
    """The tokenizer side: one pickled object per request."""
    for i in range(count):
        sock.send_pyobj(make_request(i, token_ids))


def pickle_loop(ingress: zmq.Socket, workers: list[zmq.Socket]) -> None:  # type: ignore[type-arg]
    """The controller side: recv_pyobj -> round robin -> send_pyobj, until the process ends."""
    n = len(workers)
    turn = 0
    poller = zmq.Poller()
    poller.register(ingress, zmq.POLLIN)
    while True:
        poller.poll()
        while True:
            try:
                req = ingress.recv_pyobj(zmq.NOBLOCK)
            except zmq.Again:
                break
            workers[turn].send_pyobj(req)
            turn = (turn + 1) % n
