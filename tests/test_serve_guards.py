"""`dpcore serve` as a process: its run directory, its listeners and its background threads.

Each case starts real `dpcore serve` processes on loopback and checks what an operator sees:
a second server on a run directory in use is refused, a listener that cannot bind is one
line and exit status 2, the run directory is private and left clean, and a background
thread that fails is restarted and counted instead of leaving `/health` dark.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dpcore.runtime import supervise
from dpcore.runtime.local import fetch_status, wait_for

pytestmark = pytest.mark.e2e


def _serve(dpcore_exe: list[str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([*dpcore_exe, "serve", "--dp-size", "2", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def test_run_dir_is_private_locked_and_left_clean(tmp_path: Path, dpcore_exe: list[str]) -> None:
    run_dir = tmp_path / "run"
    eps_file = tmp_path / "eps.json"
    first = _serve(dpcore_exe, "--run-dir", str(run_dir), "--endpoints-file", str(eps_file))
    try:
        eps = wait_for(lambda: eps_file.exists() and json.loads(eps_file.read_text()), 20, "endpoints")
        assert os.stat(run_dir).st_mode & 0o777 == 0o700
        second = _serve(dpcore_exe, "--run-dir", str(run_dir))
        out, err = second.communicate(timeout=20)
        assert second.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "in use by another dpcore serve" in lines[0] and str(first.pid) in lines[0], err
        # The first one still owns its sockets and answers.
        assert fetch_status(eps["status"])["dp_size"] == 2
    finally:
        _, err = _stop(first)
    assert first.returncode == 0, err
    assert not run_dir.exists(), sorted(os.listdir(run_dir))


def test_given_run_dir_keeps_only_what_was_there(tmp_path: Path, dpcore_exe: list[str]) -> None:
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("the operator's")
    eps_file = tmp_path / "eps.json"
    proc = _serve(dpcore_exe, "--run-dir", str(run_dir), "--endpoints-file", str(eps_file))
    try:
        wait_for(lambda: eps_file.exists(), 20, "endpoints")
        assert (run_dir / "ingress").exists()
    finally:
        _, err = _stop(proc)
    assert proc.returncode == 0, err
    assert sorted(os.listdir(run_dir)) == ["notes.txt"]


@pytest.mark.parametrize("flag", ["--metrics-port", "--http-port"])
def test_a_taken_port_is_one_line_and_exit_2(flag: str, tmp_path: Path, dpcore_exe: list[str]) -> None:
    if flag == "--http-port":
        pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve(dpcore_exe, flag, str(port), "--run-dir", str(tmp_path / "run"))
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_metrics_host_and_thread_counters(tmp_path: Path, dpcore_exe: list[str]) -> None:
    import httpx

    eps_file = tmp_path / "eps.json"
    proc = _serve(dpcore_exe, "--metrics-port", "0", "--metrics-host", "127.0.0.1", "--endpoints-file", str(eps_file))
    try:
        eps = wait_for(lambda: eps_file.exists() and json.loads(eps_file.read_text()), 20, "endpoints")
        assert eps["metrics"].startswith("http://127.0.0.1:")
        text = httpx.get(eps["metrics"], timeout=10).text
        assert 'dpcore_thread_restarts_total{thread="dpcore-status"} 0.0' in text
        assert 'dpcore_thread_alive{thread="dpcore-metrics"} 1.0' in text
        threads = fetch_status(eps["status"])["threads"]
        assert threads["dpcore-status"]["alive"] and threads["dpcore-status"]["restarts"] == 0
    finally:
        _, err = _stop(proc)
    assert proc.returncode == 0, err


# --------------------------------------------------------------------------- supervision


def test_a_failing_thread_is_restarted_counted_and_stops_on_request() -> None:
    stop = threading.Event()
    runs: list[float] = []

    def body() -> None:
        runs.append(time.monotonic())
        if len(runs) <= 3:
            raise OverflowError("int too big to pack")
        stop.wait()

    t = supervise.Supervised("test-thread", body, stop).start()
    wait_for(lambda: len(runs) == 4, 5, "the fourth run")
    assert t.restarts == 3 and t.is_alive()
    assert "OverflowError" in t.last_error
    # The backoff doubles: 50, 100, 200 ms.
    gaps = [b - a for a, b in zip(runs, runs[1:])]
    assert gaps[0] >= 0.04 and gaps[2] >= 0.15, gaps
    assert supervise.report([t]) == {"test-thread": {"alive": True, "restarts": 3,
                                                     "last_error": "OverflowError: int too big to pack"}}  # fmt: skip
    stop.set()
    t.join(2)
    assert not t.is_alive()


def test_status_server_answers_after_a_snapshot_that_cannot_be_packed() -> None:
    import asyncio

    import zmq.asyncio

    from dpcore.runtime.status import AsyncStatusClient, StatusServer, StatusUnavailableError

    calls = []

    def source() -> dict:
        calls.append(1)
        # The first snapshot holds a number msgpack cannot carry (what a poison num_tokens did).
        return {"n": 1 << 70} if len(calls) == 1 else {"n": len(calls)}

    with StatusServer("tcp://127.0.0.1:0", source) as server:
        async def ask() -> tuple[str, dict]:
            ctx = zmq.asyncio.Context()
            client = AsyncStatusClient(server.endpoint, ctx=ctx, max_age_s=0)
            try:
                try:
                    await client.get(0.5)
                    first = "answered"
                except StatusUnavailableError:
                    first = "unavailable"
                return first, await client.get(5)
            finally:
                client.close()
                ctx.term()

        first, second = asyncio.run(ask())
        assert first == "unavailable"
        assert second == {"n": 2}
        assert server.failed == 1 and server.thread.is_alive() and server.thread.restarts == 0
