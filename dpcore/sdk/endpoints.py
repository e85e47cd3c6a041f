"""ZMQ endpoint helpers shared by the controller and the SDKs.

Endpoints are loopback by default: ``ipc://`` paths under a private run directory, or
``tcp://127.0.0.1:PORT``. A TCP endpoint ending in ``:0`` or ``:*`` binds a random free port;
:func:`bind` returns the address actually bound, which is what peers must connect to.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import uuid
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import zmq

from dpcore import security
from dpcore.errors import ConfigError

SCHEMES = ("ipc://", "tcp://", "inproc://")
#: Unix socket paths are limited to 107 bytes; ipc:// paths must stay under it.
_IPC_MAX = 100


def check(endpoint: str, what: str = "endpoint") -> str:
    """Validate an endpoint string; raise :class:`ConfigError` with a hint otherwise."""
    if not isinstance(endpoint, str) or not endpoint.startswith(SCHEMES):
        msg = f"{what} {endpoint!r}: expected ipc:///path, tcp://HOST:PORT or inproc://NAME"
        raise ConfigError(msg)
    if endpoint.startswith("ipc://") and len(endpoint) - 6 > _IPC_MAX:
        msg = f"{what} {endpoint!r}: ipc path longer than {_IPC_MAX} bytes; use a shorter --run-dir"
        raise ConfigError(msg)
    return endpoint


def make_run_dir(prefix: str = "dpcore-") -> str:
    """A fresh private directory for ipc sockets (short, under the system temp dir)."""
    return tempfile.mkdtemp(prefix=prefix, dir="/tmp" if os.path.isdir("/tmp") else None)


def remove_run_dir(path: str | None) -> None:
    if path:
        shutil.rmtree(path, ignore_errors=True)


#: The file a ``dpcore serve`` holds locked (and names itself in) while it uses a run dir.
LOCK_NAME = "serve.lock"


class RunDir:
    """A run directory one controller owns until :meth:`release`.

    It is created 0700 when missing (sockets in it accept whoever can reach them), and a
    lock file in it stops a second controller from taking over its sockets: binding an ipc
    path that exists silently replaces the first owner's socket.

    :param path: The directory; ``None``: a fresh private one under ``/tmp``.
    :raises ConfigError: Another process holds the lock, or the directory cannot be made.
    """

    def __init__(self, path: str | None) -> None:
        self.created = path is None or not os.path.exists(path)
        try:
            if path is None:
                path = make_run_dir()
            elif self.created:
                os.makedirs(path, mode=0o700)
        except OSError as exc:
            msg = f"cannot create run directory {path}: {exc.strerror or exc}"
            raise ConfigError(msg) from None
        self.path = path
        self.sockets: list[str] = []
        lock = os.path.join(path, LOCK_NAME)
        try:
            self._fd: int | None = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            msg = f"cannot use run directory {path}: {exc.strerror or exc}"
            raise ConfigError(msg) from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            self._fd = None
            msg = (
                f"run directory {path} is in use by another dpcore serve (pid {owner}); "
                "stop it, or give this one its own --run-dir"
            )
            raise ConfigError(msg) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def own(self, endpoints: Iterable[str]) -> None:
        """Remember the ipc sockets bound in it, to remove them at :meth:`release`."""
        self.sockets.extend(e[6:] for e in endpoints if e.startswith("ipc://"))

    def release(self) -> None:
        """Remove the sockets (and the directory, if it was made here) and unlock."""
        if self._fd is None:
            return
        for path in self.sockets:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.path, LOCK_NAME))
        os.close(self._fd)
        self._fd = None
        if self.created:
            remove_run_dir(self.path)


def ipc(run_dir: str | os.PathLike[str], name: str) -> str:
    return check(f"ipc://{Path(run_dir) / name}")


def bind(sock: zmq.Socket, endpoint: str) -> str:  # type: ignore[type-arg]
    """Bind *sock*; returns the concrete endpoint (random TCP ports resolved)."""
    check(endpoint)
    if endpoint.startswith("ipc://"):
        Path(endpoint[6:]).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        if endpoint.startswith("tcp://") and endpoint.endswith((":0", ":*")):
            host = endpoint[: endpoint.rfind(":")]
            return f"{host}:{sock.bind_to_random_port(host)}"
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        msg = f"cannot bind {endpoint}: {exc}"
        raise ConfigError(msg) from exc
    return endpoint


def reply_endpoint_like(peer: str) -> tuple[str, str | None]:
    """A fresh endpoint of the same kind as *peer* for a reply socket to bind.

    Returns ``(endpoint, run_dir)``; *run_dir* is a directory the caller owns and removes
    (``None`` when nothing was created).
    """
    if peer.startswith("ipc://"):
        d = make_run_dir("dpcore-reply-")
        return f"ipc://{d}/reply", d
    if peer.startswith("inproc://"):
        return f"inproc://dpcore-reply-{uuid.uuid4().hex}", None
    # TCP: loopback unless the caller passes an address peers on other hosts can reach.
    return "tcp://127.0.0.1:*", None


class PushCache:
    """PUSH sockets to senders' reply endpoints: one per endpoint, the least recently used
    closed past *size*.

    :param linger_ms: How long a closed socket may still deliver what it holds (close never
        waits for it; only terminating the context does, at most this long).
    :param sndhwm: Messages queued per endpoint before sends are refused (default: ZMQ's).
    :param curve: CURVE keys for TCP reply endpoints (:mod:`dpcore.security`).
    """

    def __init__(
        self, ctx: zmq.Context, *, size: int, linger_ms: int, sndhwm: int | None = None, curve: Any = None  # type: ignore[type-arg]
    ) -> None:
        self._ctx = ctx
        self._size = size
        self._linger_ms = linger_ms
        self._sndhwm = sndhwm
        self._curve = curve
        self._socks: OrderedDict[str, zmq.Socket] = OrderedDict()  # type: ignore[type-arg]

    def get(self, endpoint: str) -> zmq.Socket:  # type: ignore[type-arg]
        sock = self._socks.get(endpoint)
        if sock is not None:
            self._socks.move_to_end(endpoint)
            return sock
        sock = self._ctx.socket(zmq.PUSH)
        sock.linger = self._linger_ms
        if self._sndhwm is not None:
            sock.sndhwm = self._sndhwm
        security.client(sock, endpoint, self._curve)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(linger=0)  # not cached: a bad endpoint must not leak a socket per message
            raise
        self._socks[endpoint] = sock
        if len(self._socks) > self._size:
            self._socks.popitem(last=False)[1].close()
        return sock

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
