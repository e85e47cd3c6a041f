"""SGLang's real data-parallel controller on a CPU box, for the tests and the benchmark.

Importing this module installs the GPU-module stand-ins (:mod:`.gpu_stubs`) and imports
SGLang; the adapter never imports it.

:class:`ControllerHarness` runs SGLang's unmodified ``run_data_parallel_controller_process``
in a child process: SGLang's own ``ServerArgs``/``PortArgs``, its ``__init__`` (sockets,
per-rank ports, its plugin loading, and so the adapter when ``DPCORE_SGLANG_CONFIG`` is
set), its event loop. The one thing it does not run is the model: SGLang's
``run_scheduler_process_func`` parameter, which launches each rank's scheduler, is given
:func:`draining_scheduler`, a process that connects where a scheduler connects, publishes
load snapshots through SGLang's own writer, and reports what it received. The test plays
the tokenizer: it binds the socket the controller pulls from and the one schedulers (and
the adapter's aborts) answer on.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import urllib.request
from array import array
from collections.abc import Sequence
from typing import Any

from dpcore_sglang.testing.gpu_stubs import install as _install_gpu_stubs

_install_gpu_stubs()

import msgpack  # noqa: E402
import psutil  # noqa: E402
import zmq  # noqa: E402
from attrs import frozen  # noqa: E402
from sglang.srt.managers import data_parallel_controller as dpc  # noqa: E402
from sglang.srt.managers.io_struct import (  # noqa: E402
    ActiveRanksOutput,
    TokenizedGenerateReqInput,
    sock_recv,
    sock_send,
)
from sglang.srt.managers.load_snapshot import (  # noqa: E402
    LoadSnapshot,
    ShmLoadSnapshotWriter,
    create_load_snapshot_writer,
    shm_path_for,
)
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402
from sglang.srt.server_args import PortArgs, ServerArgs  # noqa: E402
from sglang.srt.utils.network import get_zmq_socket  # noqa: E402

from dpcore_sglang.config import ENV_VAR, AdapterConfig  # noqa: E402

RESULTS_ENV = "DPCORE_SGLANG_HARNESS_RESULTS"
MODE_ENV = "DPCORE_SGLANG_HARNESS_MODE"
#: Bench mode: a receiver reports its count every this many messages (and when idle).
COUNT_EVERY = 256


def make_request(rid: str, num_tokens: int = 1000, *, first_token: int = 0, **fields: Any) -> TokenizedGenerateReqInput:
    """A real tokenized generate request, as TokenizerManager builds it."""
    return TokenizedGenerateReqInput(
        rid=rid,
        input_text=None,
        input_ids=array("q", range(first_token, first_token + num_tokens)),
        input_embeds=None,
        mm_inputs=None,
        token_type_ids=None,
        sampling_params=SamplingParams(max_new_tokens=16),
        return_logprob=False,
        logprob_start_len=-1,
        top_logprobs_num=0,
        token_ids_logprob=None,
        stream=False,
        **fields,
    )


@frozen
class Delivery:
    """One message a draining scheduler received."""

    rank: int
    rid: str | None
    #: The message's type name; in echo mode, the bytes the scheduler received.
    kind: str | bytes


def draining_scheduler(
    server_args: Any, port_args: Any, gpu_id: int, tp_rank: int, pp_rank: int, dp_rank: int, pipe_writer: Any, *display: Any
) -> None:
    """Stands in for SGLang's ``run_scheduler_process`` (same arguments), without a model."""
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.utils.common import kill_itself_when_parent_died

    kill_itself_when_parent_died()
    ctx = zmq.Context()
    inbox = get_zmq_socket(ctx, zmq.PULL, port_args.scheduler_input_ipc_name, False)
    out = ctx.socket(zmq.PUSH)
    out.connect(os.environ[RESULTS_ENV])
    # As a real scheduler does: its writer publishes a placeholder snapshot at once.
    writer = create_load_snapshot_writer(port_args, get_parallel().num_dp_ranks, dp_rank)
    pipe_writer.send({"status": "ready", "max_total_num_tokens": 100_000, "max_req_input_len": 8192, "startup_time": None})
    mode = os.environ.get(MODE_ENV)
    if mode == "count":
        _count(inbox, out, writer, dp_rank)
    out.send(msgpack.packb((dp_rank, str(os.getpid()), "ready")))
    while True:
        if mode == "echo":  # the bytes as they arrived, for the test to decode and compare
            raw = inbox.recv()
            out.send(msgpack.packb((dp_rank, None, raw)))
            continue
        msg = sock_recv(inbox)
        out.send(msgpack.packb((dp_rank, getattr(msg, "rid", None), type(msg).__name__)))


def _count(inbox: zmq.Socket, out: zmq.Socket, writer: Any, rank: int) -> None:
    # The benchmark's receiver: drain raw frames, publish a zero-load snapshot every
    # COUNT_EVERY messages (a scheduler publishes once per batch), report counts.
    n = reported = 0
    while True:
        try:
            inbox.recv(zmq.NOBLOCK)
        except zmq.Again:
            if n != reported:
                out.send(msgpack.packb((rank, n)))
                reported = n
            inbox.poll(50)
            continue
        n += 1
        if n % COUNT_EVERY == 0:
            writer.write(LoadSnapshot(dp_rank=rank, timestamp=time.time()))
            out.send(msgpack.packb((rank, n)))
            reported = n


class ControllerHarness:
    """SGLang's controller in a child process, with draining schedulers; see the module docstring.

    :param dp_size: Ranks.
    :param sglang_method: ``--load-balance-method`` as SGLang sees it.
    :param adapter: dpcore's settings; ``None`` runs SGLang's own dispatch.
    :param mode: ``"report"`` (every delivery is reported), ``"echo"`` (every delivery's
        bytes are reported, in :attr:`Delivery.kind`) or ``"count"`` (benchmark).
    """

    def __init__(
        self,
        *,
        dp_size: int = 4,
        sglang_method: str = "round_robin",
        adapter: AdapterConfig | None = None,
        mode: str = "report",
        server_args: dict[str, Any] | None = None,
    ) -> None:
        self.dp_size = dp_size
        self.sglang_method = sglang_method
        self.adapter = adapter
        self.mode = mode
        self.extra_args = dict(server_args or {})
        self.quit_signals = 0
        self.proc: Any = None
        self._ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._writers: dict[int, ShmLoadSnapshotWriter] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ControllerHarness:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        import multiprocessing as mp
        import tempfile

        if self.adapter is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = self.adapter.to_json()
        self._tmp = tempfile.mkdtemp(prefix="dpsg")
        results = f"ipc://{self._tmp}/results"
        os.environ[RESULTS_ENV] = results
        os.environ[MODE_ENV] = self.mode
        # On an exception SGLang's controller sends SIGQUIT to its parent (the server
        # launcher, which then kills everything); here the parent is this process.
        signal.signal(signal.SIGQUIT, self._on_quit)
        self.server_args = ServerArgs(
            model_path="dummy", dp_size=self.dp_size, load_balance_method=self.sglang_method, **self.extra_args
        )
        self.port_args = PortArgs.init_new(self.server_args)
        self.results = self._bind(zmq.PULL, results)
        # The tokenizer's two sockets: requests out, scheduler (and adapter) answers in.
        self.tokenizer_out = get_zmq_socket(self._ctx, zmq.PUSH, self.port_args.scheduler_input_ipc_name, True)
        self.tokenizer_in = get_zmq_socket(self._ctx, zmq.PULL, self.port_args.tokenizer_ipc_name, True)
        self._sockets += [self.tokenizer_out, self.tokenizer_in]
        ctx = mp.get_context("fork")
        reader, writer = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=dpc.run_data_parallel_controller_process,
            args=(self.server_args, self.port_args, writer, draining_scheduler),
            daemon=False,
        )
        self.proc.start()
        writer.close()
        deadline = time.monotonic() + timeout
        while not reader.poll(0.05):
            # SGLang's launcher kills the server when its controller signals; so do we.
            if self.quit_signals or not self.proc.is_alive():
                self.stop()
                msg = "SGLang's controller failed during start-up (it signals its parent on any exception)"
                raise RuntimeError(msg)
            if time.monotonic() > deadline:
                self.stop()
                msg = f"SGLang's controller did not report ready within {timeout} s"
                raise TimeoutError(msg)
        self.init_info = reader.recv()
        #: rank -> pid of its draining scheduler (report mode)
        self.scheduler_pids: dict[int, int] = {}
        if self.mode in ("report", "echo"):
            for d in self.deliveries(self.dp_size, timeout=timeout):
                self.scheduler_pids[d.rank] = int(d.rid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.pid is not None:
            try:
                tree = psutil.Process(self.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                tree = []
            for p in [*tree]:
                p.kill()
            self.proc.kill()
            self.proc.join(10)
            psutil.wait_procs(tree, timeout=10)
            self.proc = None
        for w in self._writers.values():
            w.close()
        self._writers.clear()
        for s in self._sockets:
            s.close(linger=0)
        self._sockets.clear()
        if hasattr(self, "port_args"):
            try:
                os.unlink(shm_path_for(self.port_args.instance_id))
            except FileNotFoundError:
                pass
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _on_quit(self, *_a: object) -> None:
        self.quit_signals += 1

    def _bind(self, kind: int, endpoint: str) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.bind(endpoint)
        self._sockets.append(s)
        return s

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    # ------------------------------------------------------------------ traffic

    def send(self, obj: Any) -> None:
        """What TokenizerManager does: ``sock_send`` to the controller."""
        sock_send(self.tokenizer_out, obj)

    def send_raw(self, frame: bytes) -> None:
        self.tokenizer_out.send(frame)

    def deliveries(self, n: int, timeout: float = 10.0) -> list[Delivery]:
        """The next *n* messages the schedulers received (fewer if *timeout* passes)."""
        out: list[Delivery] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.results.poll(int(left * 1000)):
                break
            rank, rid, kind = msgpack.unpackb(self.results.recv())
            out.append(Delivery(rank, rid, kind))
        return out

    def counts(self, total: int, timeout: float) -> list[int]:
        """Bench mode: wait until the receivers together report *total* messages."""
        seen = [0] * self.dp_size
        deadline = time.monotonic() + timeout
        while sum(seen) < total and time.monotonic() < deadline:
            if self.results.poll(100):
                rank, n = msgpack.unpackb(self.results.recv())
                seen[rank] = max(seen[rank], n)
        return seen

    def answers(self, n: int, timeout: float = 10.0) -> list[Any]:
        """The next *n* messages the tokenizer received (aborts, here)."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self.tokenizer_in.poll(int(left * 1000)):
                break
            out.append(sock_recv(self.tokenizer_in))
        return out

    def write_snapshot(self, rank: int, **fields: Any) -> None:
        """Publish *rank*'s load through SGLang's own shared-memory snapshot writer."""
        if rank not in self._writers:
            self._writers[rank] = ShmLoadSnapshotWriter(
                shm_path_for(self.port_args.instance_id), self.dp_size, rank
            )
        fields.setdefault("timestamp", time.time())
        self._writers[rank].write(LoadSnapshot(dp_rank=rank, **fields))

    def set_status(self, status: Sequence[bool]) -> None:
        """What SGLang's fault tolerance sends when ranks die or come back."""
        self.send(ActiveRanksOutput(status=list(status)))

    def cpu_seconds(self) -> float:
        """CPU time the controller process (not its schedulers) has used."""
        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system


def tokenizer_manager_class() -> Any:
    """SGLang's TokenizerManager class. The CPU test venv has no uvloop, which
    ``tokenizer_manager`` only uses to install its event loop policy at import: asyncio's own
    policy stands in (a module with a spec, so later ``find_spec`` calls still work)."""
    import asyncio
    import importlib.machinery
    import importlib.util
    import sys
    import types

    if "uvloop" not in sys.modules and importlib.util.find_spec("uvloop") is None:
        stub = types.ModuleType("uvloop")
        stub.__spec__ = importlib.machinery.ModuleSpec("uvloop", None)
        stub.EventLoopPolicy = asyncio.DefaultEventLoopPolicy  # type: ignore[attr-defined]
        sys.modules["uvloop"] = stub
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    return TokenizerManager


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The adapter's Prometheus samples on *port*: ``(name, sorted labels) -> value``."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
