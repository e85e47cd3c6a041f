"""Start a whole HTTP-fronted deployment as processes: controller, mock ranks, HTTP front.

Used by the HTTP and interop tests, and handy for trying a router by hand::

    with launch(dp_size=4, log_dir=Path("/tmp/x")) as stack:
        print(stack.url)          # http://127.0.0.1:PORT, SGLang/OpenAI compatible

Every process is started by this module and stopped by its pid (SIGTERM, then SIGKILL),
binds 127.0.0.1 only, and writes its log to ``log_dir``.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from attrs import define, field

from dpcore.auto import AUTO

DPCORE = (sys.executable, "-m", "dpcore")


class LaunchError(RuntimeError):
    """A process did not come up; the message ends with the tail of its log."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for programs that cannot take port 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@define
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    _fh: IO[bytes]

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, wait, then SIGKILL: by this process's own pid only."""
        p = self.popen
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self._fh.close()
        return p.returncode


@define
class Group:
    """Processes started together and stopped in reverse order."""

    log_dir: Path
    procs: list[Proc] = field(factory=list)

    def start(self, name: str, cmd: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log = self.log_dir / f"{name}.log"
        fh = open(log, "wb")  # noqa: SIM115 - closed by Proc.stop
        popen = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        proc = Proc(name, popen, log, fh)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def __enter__(self) -> Group:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(what: str, check: Any, procs: Sequence[Proc], timeout_s: float) -> Any:
    """Poll *check* until it returns a truthy value; fail early if a process died."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        for p in procs:
            if not p.alive():
                msg = f"{p.name} exited with {p.popen.returncode} while waiting for {what}:\n{tail(p.log)}"
                raise LaunchError(msg)
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{tail(p.log, 10)}" for p in procs)
            msg = f"timed out after {timeout_s:g}s waiting for {what}\n{logs}"
            raise LaunchError(msg)
        time.sleep(0.05)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except (OSError, ValueError):
        return None


@define
class Stack:
    """A running deployment. :attr:`url` is the HTTP front; ``dpcore serve`` runs it as a
    child, whose log lines (``--log-requests`` ones too) join :attr:`serve`'s log."""

    group: Group
    url: str
    endpoints: dict[str, Any]
    serve: Proc

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def request_log(self) -> list[dict[str, Any]]:
        """The front's ``--log-requests`` records so far (needs ``--log-json``, as launched)."""
        out = []
        for line in self.serve.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"event": "request"' in line:
                rec = json.loads(line)
                if rec.get("event") == "request":
                    out.append(rec)
        return out

    def close(self) -> None:
        # The controller first, while its ranks still run, so its drain ends at once.
        self.serve.stop()
        self.group.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def launch(
    dp_size: int,
    *,
    log_dir: Path,
    name: str = "dpcore",
    method: str = AUTO,
    mode: str = "null",
    serve_args: Sequence[str] = (),
    front_args: Sequence[str] = (),
    worker_args: Sequence[str] = ("--speedup", "50"),
    ranks: Sequence[int] | None = None,
    timeout_s: float = 30.0,
) -> Stack:
    """Start ``dpcore serve --http-port 0`` and one ``dpcore mock-worker`` per rank in
    *ranks* (default all); return once every started rank reported and the front answers.
    *front_args* are HTTP front flags of ``dpcore serve`` (``--log-requests``...)."""
    import httpx

    log_dir.mkdir(parents=True, exist_ok=True)
    eps_file = log_dir / f"{name}-endpoints.json"
    eps_file.unlink(missing_ok=True)
    group = Group(log_dir)
    try:
        ctl = group.start(f"{name}-serve", [
            *DPCORE, "--log-json", "serve", "--dp-size", str(dp_size), "--load-balance-method", method,
            "--disaggregation-mode", mode, "--endpoints-file", str(eps_file), "--http-port", "0",
            "--drain-timeout", "1", *serve_args, *front_args,
        ])  # fmt: skip
        eps = wait_for("the controller's endpoints file", lambda: _read_json(eps_file), [ctl], timeout_s)
        for r in range(dp_size) if ranks is None else ranks:
            group.start(f"{name}-rank{r}", [
                *DPCORE, "--log-json", "mock-worker", "--rank", str(r), "--dispatch", eps["dispatch"][r],
                "--report", eps["report"], "--exit-with-parent", *worker_args,
            ])  # fmt: skip
        url = eps["http"]
        started = set(range(dp_size) if ranks is None else ranks)

        def ready() -> bool:
            try:
                r = httpx.get(f"{url}/server_info", timeout=2.0)
            except httpx.HTTPError:
                return False
            if r.status_code != 200:
                return False
            # Every started rank has reported (a rank is "active" before it ever speaks).
            return all(x["reported"] and x["active"] for x in r.json()["internal_states"] if x["dp_rank"] in started)

        wait_for("every rank to report", ready, group.procs, timeout_s)
        return Stack(group, url, eps, ctl)
    except BaseException:
        group.close()
        raise

