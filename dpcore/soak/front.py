"""The soak's traffic through the HTTP front: streams left after their first chunk and asked
again, and ``/health`` polls, each on a thread of its own until the run stops."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

from dpcore.soak.config import HttpBooks

#: The HTTP client: pause between two requests, answers awaited per request, request timeout.
HTTP_EVERY_S = 0.3
HTTP_ATTEMPTS = 10
#: Pause before asking again: the front frees a request id once it has seen the client that
#: held it leave (until then the id is ``400 duplicate_rid``, answered by the front alone).
HTTP_RETRY_AFTER_S = 0.1
HTTP_TIMEOUT_S = 30.0
#: /health polls: how often, and how long one may take to be answered.
HEALTH_EVERY_S = 0.25
HEALTH_TIMEOUT_S = 10.0
#: Error codes of the HTTP front that the controller counts as rejected, and as failed.
REJ_CODES = frozenset({"no_active_rank", "rank_inactive", "rank_busy", "shutting_down"})
FAIL_CODES = frozenset({"rank_died", "rank_stuck", "controller_shutdown"})


def http_client(url: str, stop: threading.Event, h: HttpBooks) -> None:
    """Streams left after their first chunk, each asked again under the same id until
    answered: the answer must be the new request's own (4 tokens, not the 100,000 of the
    request that was left)."""
    import httpx

    with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as c:
        for i in itertools.count():
            if stop.wait(HTTP_EVERY_S):
                return
            rid = f"h{i}"
            h.requests += 1
            leave = {"text": "soak", "rid": rid, "stream": True, "sampling_params": {"max_new_tokens": 100_000}}
            try:
                with c.stream("POST", "/generate", json=leave) as r:
                    if r.status_code == 200:
                        next(r.iter_lines())
                        h.left += 1
                    else:
                        r.read()
                        _outcome(h, r.status_code, r.json())
            except (httpx.HTTPError, StopIteration, ValueError) as exc:
                h.other[type(exc).__name__] = h.other.get(type(exc).__name__, 0) + 1
            for _ in range(HTTP_ATTEMPTS):
                ask = {"text": "soak again", "rid": rid, "sampling_params": {"max_new_tokens": 4}}
                try:
                    r = c.post("/generate", json=ask)
                    body = r.json()
                except (httpx.HTTPError, ValueError) as exc:
                    h.other[type(exc).__name__] = h.other.get(type(exc).__name__, 0) + 1
                    continue
                if r.status_code == 200:
                    h.ok += 1
                    meta = body.get("meta_info", {}) if isinstance(body, dict) else {}
                    if meta.get("id", rid) != rid or meta.get("completion_tokens") != 4:
                        h.wrong_output += 1
                    break
                _outcome(h, r.status_code, body)
                time.sleep(HTTP_RETRY_AFTER_S)
            else:
                h.gave_up += 1


def _outcome(h: HttpBooks, status: int, body: Any) -> None:
    code = body.get("error") if isinstance(body, dict) else None
    if status == 400 and code == "duplicate_rid":
        h.rid_in_use += 1
    elif status == 503 and code in REJ_CODES:
        h.rejected += 1
    elif status == 503 and code in FAIL_CODES:
        h.failed += 1
    else:
        key = f"{status} {code}"
        h.other[key] = h.other.get(key, 0) + 1


def poll_health(url: str, stop: threading.Event, health: list[tuple[float, float, int]]) -> None:
    """``/health`` every :data:`HEALTH_EVERY_S`: (sent, answered, status; 0: no answer)."""
    import httpx

    with httpx.Client(base_url=url, timeout=HEALTH_TIMEOUT_S) as c:
        while not stop.wait(HEALTH_EVERY_S):
            sent = time.monotonic()
            try:
                status = c.get("/health").status_code
            except httpx.HTTPError:
                status = 0
            health.append((sent, time.monotonic(), status))
