"""The soak's own threads (chaos, HTTP traffic, /health polls, memory) are part of its verdict:
one that raised makes the run fail, with the thread and the error named."""

from __future__ import annotations

import threading
from pathlib import Path

from dpcore.soak import Soak, SoakConfig, checks
from dpcore.soak.report import figures

CHECK = "the soak's own threads ran to the end"


def _verdicts(soak: Soak) -> dict[str, bool]:
    counters = {"in_flight": 0, "parked": 0, "received": 0, "completed": 0, "failed": 0, "rejected": 0,
                "dispatched": 0, "redispatched": 0, "balanced": {"received": True, "dispatched": True},
                "bad_frames": 0, "bad_reports": 0, "stale_reports": 0, "internal_errors": 0}  # fmt: skip
    f = figures(soak, counters, None, 0, 0.1, [], 0, 0)
    assert f["checks"] == checks(f)
    return f["checks"]


def test_a_soak_thread_that_raises_fails_the_run(tmp_path: Path) -> None:
    soak = Soak(SoakConfig(method="round_robin"), tmp_path)
    assert _verdicts(soak)[CHECK]

    def chaos() -> None:
        raise RuntimeError("rank 2 did not exit")

    t = threading.Thread(target=soak._guarded, args=(chaos,), name="soak-chaos")
    # The traceback still goes to threading's excepthook; keep it out of the test output.
    hook, threading.excepthook = threading.excepthook, lambda args: None
    try:
        t.start()
        t.join()
    finally:
        threading.excepthook = hook
    assert soak.thread_errors == ["soak-chaos: RuntimeError: rank 2 did not exit"]
    assert not _verdicts(soak)[CHECK]


def test_a_soak_thread_that_ends_normally_is_not_an_error(tmp_path: Path) -> None:
    soak = Soak(SoakConfig(method="round_robin"), tmp_path)
    t = threading.Thread(target=soak._guarded, args=(lambda x: None, 1), name="soak-memory")
    t.start()
    t.join()
    assert soak.thread_errors == []
