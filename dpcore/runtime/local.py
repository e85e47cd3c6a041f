"""A controller on a thread of this process with rank processes on its endpoints.

For end-to-end tests of policies and of failure handling: the controller's counters and
ledger are plain attributes to read, the ranks are real processes on real sockets (the echo
rank of :mod:`dpcore.sdk.echo`, or any command taking ``--rank --dispatch --report``), and
every rank can be killed, paused, resumed or restarted by its pid::

    with LocalCluster("total_requests", dp_size=4) as lc:
        lc.client.submit("r1", num_tokens=100)
        lc.pause(2)                      # SIGSTOP: silent past its heartbeat deadline
        lc.wait_inactive(2)
        ...
        assert lc.controller.consistent_stats()["balanced"]["dispatched"]

Every process is started here and stopped here (SIGTERM, then SIGKILL), by pid only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dpcore.auto import AUTO
from dpcore.manager import PolicyManager
from dpcore.runtime.controller import Controller
from dpcore.sdk.client import Client

ECHO = (sys.executable, "-m", "dpcore.sdk.echo")


class WaitTimeout(AssertionError):
    """A condition did not hold in time (an AssertionError, so tests report it plainly)."""


def wait_for(cond: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition", poll_s: float = 0.01) -> Any:
    """Poll *cond* until it returns something truthy; raise :class:`WaitTimeout` after *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            msg = f"timed out after {timeout_s:g}s waiting for {what}"
            raise WaitTimeout(msg)
        time.sleep(poll_s)


def start_rank_process(
    rank: int, dispatch: str, report: str, *args: str, heartbeat_s: float = 0.1,
    cmd: Sequence[str] = ECHO, env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a rank program (default: the echo rank) as *rank*: it gets ``--rank R --dispatch
    EP --report EP --heartbeat-s S`` and *args*; its output is discarded."""
    argv = [*cmd, "--rank", str(rank), "--dispatch", dispatch, "--report", report,
            "--heartbeat-s", str(heartbeat_s), *args]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)


class LocalCluster:
    """A :class:`Controller` thread, ``dp_size`` rank processes and a :class:`Client`.

    :param method: The load-balance method (or chain); default ``auto``.
    :param dp_size: Ranks.
    :param mode: Disaggregation mode.
    :param rank_cmd: The rank program; gets ``--rank R --dispatch EP --report EP
        --heartbeat-s S`` and the rank's extra arguments.
    :param rank_args: Extra arguments per rank.
    :param heartbeat_s: Rank heartbeat interval.
    :param env: Environment of the rank processes (default: this process's).
    :param start_ranks: Start every rank and wait until all reported.
    :param client: Make :attr:`client` (a :class:`Client` on the ingress).
    :param controller_kw: Passed to :class:`Controller` (``heartbeat_timeout_s`` defaults to 1).
    """

    def __init__(
        self,
        method: str = AUTO,
        dp_size: int = 4,
        *,
        mode: str | None = None,
        rank_cmd: Sequence[str] = ECHO,
        rank_args: Mapping[int, Sequence[str]] | None = None,
        heartbeat_s: float = 0.1,
        env: Mapping[str, str] | None = None,
        start_ranks: bool = True,
        client: bool = True,
        client_kw: Mapping[str, Any] | None = None,
        **controller_kw: Any,
    ) -> None:
        controller_kw.setdefault("heartbeat_timeout_s", 1.0)
        manager = PolicyManager.from_method(method, dp_size=dp_size, disaggregation_mode=mode)
        self.dp_size = dp_size
        self.rank_cmd = tuple(rank_cmd)
        self.rank_args = {r: tuple(a) for r, a in (rank_args or {}).items()}
        self.heartbeat_s = heartbeat_s
        self.env = dict(env) if env is not None else None
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.controller = Controller(manager, **controller_kw)
        self.client: Client | None = None
        try:
            self.controller.start()
            if start_ranks:
                for r in range(dp_size):
                    self.start_rank(r)
                self.wait_ready()
            if client:
                self.client = Client(self.controller.endpoints.ingress, **dict(client_kw or {}))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ ranks

    def start_rank(self, rank: int, *args: str) -> subprocess.Popen[bytes]:
        """Start (or restart) *rank*; extra *args* replace the rank's default ones."""
        eps = self.controller.endpoints
        p = start_rank_process(rank, eps.dispatch[rank], eps.report, *(args or self.rank_args.get(rank, ())),
                               heartbeat_s=self.heartbeat_s, cmd=self.rank_cmd, env=self.env)  # fmt: skip
        self.procs[rank] = p
        return p

    def wait_ready(self, ranks: Sequence[int] | None = None, timeout_s: float = 20.0) -> None:
        """Until each rank has reported in its current life and is active."""
        ledger = self.controller.ledger
        todo = list(self.procs) if ranks is None else list(ranks)
        wait_for(lambda: all(ledger.reported[r] and ledger.is_active(r) for r in todo), timeout_s, f"ranks {todo} to report")

    def wait_inactive(self, rank: int, timeout_s: float = 10.0) -> None:
        wait_for(lambda: not self.controller.ledger.is_active(rank), timeout_s, f"rank {rank} to go inactive")

    def signal(self, rank: int, sig: int) -> None:
        self.procs[rank].send_signal(sig)

    def kill(self, rank: int) -> None:
        """SIGKILL *rank* and reap it."""
        p = self.procs.pop(rank)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def pause(self, rank: int) -> None:
        self.signal(rank, signal.SIGSTOP)

    def resume(self, rank: int) -> None:
        self.signal(rank, signal.SIGCONT)

    def terminate(self, rank: int, timeout_s: float = 5.0) -> int | None:
        """SIGTERM *rank* (a controlled stop), SIGKILL if it does not exit in time."""
        p = self.procs.pop(rank)
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)  # a paused process cannot handle SIGTERM
            p.terminate()
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        return p.returncode

    def pids(self) -> dict[int, int]:
        return {r: p.pid for r, p in self.procs.items()}

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        c = self.controller
        if c._thread is not None and c._thread.is_alive():
            c.stop()
        else:
            c.close()
        for r in list(self.procs):
            self.terminate(r)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cpu_seconds(pid: int | None = None, tid: int | None = None) -> float:
    """User+system CPU seconds of a process (default: this one) or one of its threads (Linux)."""
    pid = os.getpid() if pid is None else pid
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of process *pid* (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def fetch_status(endpoint: str, timeout_s: float = 3.0) -> dict[str, Any]:
    """The status snapshot of a controller (``dpcore serve``'s status endpoint), from sync code."""
    import asyncio

    import zmq.asyncio

    from dpcore.runtime.status import AsyncStatusClient

    async def ask() -> dict[str, Any]:
        ctx = zmq.asyncio.Context()
        client = AsyncStatusClient(endpoint, ctx=ctx, max_age_s=0.0)
        try:
            return await client.get(timeout_s)
        finally:
            client.close()
            ctx.term()

    return asyncio.run(ask())
