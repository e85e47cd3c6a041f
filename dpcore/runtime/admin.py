"""Admin commands on the controller's status socket, and the credential they need.

Reading status needs only what a sender has (the status socket takes the senders' CURVE
keys on TCP, and whoever can reach the ``0700`` run directory on ipc). Changing the running
policy chain needs more: the **admin token**, a random 256-bit secret ``dpcore serve`` writes
at start-up to ``RUN_DIR/admin.token`` (``--admin-token-file`` to put it elsewhere; created
``0600``, replaced at every start). A command carries the token; the controller compares it
with :func:`hmac.compare_digest` and refuses (``unauthorized``) otherwise. Whoever can read
the file is an admin; nobody else is, whatever network access they have. On TCP without
CURVE the token crosses the network in clear: use CURVE there.

Frames (msgpack, one frame, on the status socket's ROUTER): request
``{v, t="admin?", id, token, op, args}``; answer ``{v, t="admin", id, ok, data}`` or
``{..., ok=false, error={code, message}}``. Ops: ``swap`` (``args={method, options}``) and
``show``.
"""

from __future__ import annotations

import hmac
import itertools
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import structlog

from dpcore import security, wire
from dpcore.errors import ConfigError, DpcoreError
from dpcore.runtime.status import exchange, unpack
from dpcore.wire import show

if TYPE_CHECKING:
    import zmq.asyncio

    from dpcore.runtime.swap import Swapper

ASK = "admin?"
ANSWER = "admin"
#: The token file's name in a run directory.
TOKEN_NAME = "admin.token"
#: Bytes of randomness in a token (256 bits).
TOKEN_BYTES = 32
#: Error codes of a refused command (a refused swap uses its own reason, see dpcore.runtime.swap).
UNAUTHORIZED = "unauthorized"
BAD_COMMAND = "bad_command"
DISABLED = "admin_disabled"
#: Longest policy string a swap may name.
MAX_METHOD_CHARS = 1024
_log = structlog.get_logger("dpcore.admin")


class AdminError(DpcoreError):
    """An admin command the controller refused, or could not be asked.

    :ivar code: ``unauthorized``, ``bad_command``, ``admin_disabled``, a swap refusal reason
        (:data:`dpcore.runtime.swap.REASONS`), or ``unavailable`` (no answer).
    """

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


# --------------------------------------------------------------------------- the token


def create_token(path: str | os.PathLike[str]) -> str:
    """Write a fresh token to *path* (``0600``, replacing any old file) and return it."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.replace(tmp, p)
    except OSError as exc:
        msg = f"cannot write the admin token file {p}: {exc.strerror or exc}"
        raise ConfigError(msg) from None
    return token


def read_token(path: str | os.PathLike[str]) -> str:
    """The token in *path*; refused when the file is readable by others than its owner."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        token = p.read_text().strip()
    except OSError as exc:
        msg = (f"cannot read the admin token file {p}: {exc.strerror or exc} (dpcore serve writes it at start-up; "
               "give --run-dir of the running controller, or --admin-token-file)")  # fmt: skip
        raise ConfigError(msg) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        msg = f"admin token file {p} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); chmod 600 it"
        raise ConfigError(msg)
    if not token:
        raise ConfigError(f"admin token file {p} is empty")
    return token


# --------------------------------------------------------------------------- controller side


class Admin:
    """Answers admin commands: checks the token, then runs the op.

    Called on the status thread (:class:`~dpcore.runtime.status.StatusServer`); a swap blocks
    it while the new chain is built (status questions wait meanwhile), never the loop.

    :param token: The admin token; ``None``: every command is refused (``admin_disabled``).
    """

    def __init__(self, swapper: Swapper, token: str | None) -> None:
        self.swapper = swapper
        self._token = token.encode() if token is not None else None
        self.unauthorized = 0

    def answer(self, ask: Mapping[str, Any]) -> dict[str, Any]:
        """The answer fields (``ok`` and ``data`` or ``error``) for one request map."""
        try:
            return {"ok": True, "data": self._run(ask)}
        except AdminError as exc:
            return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}
        except DpcoreError as exc:  # a refused swap (SwapRefused carries its reason)
            return {"ok": False, "error": {"code": getattr(exc, "reason", BAD_COMMAND), "message": str(exc)}}

    def _run(self, ask: Mapping[str, Any]) -> dict[str, Any]:
        if self._token is None:
            raise AdminError(DISABLED, "admin commands are disabled on this controller (no admin token file)")
        given = ask.get("token")
        if type(given) is not str or not hmac.compare_digest(given.encode(), self._token):
            self.unauthorized += 1
            _log.warning("admin_unauthorized", op=show(ask.get("op")), count=self.unauthorized)
            raise AdminError(UNAUTHORIZED, "missing or wrong admin token")
        op = ask.get("op")
        args = ask.get("args") or {}
        if type(args) is not dict:
            raise AdminError(BAD_COMMAND, f"args must be a map, got {show(args)}")
        if op == "show":
            return self.swapper.info()
        if op == "swap":
            method = args.get("method")
            options = args.get("options") or {}
            if type(method) is not str or not 0 < len(method) <= MAX_METHOD_CHARS:
                raise AdminError(BAD_COMMAND, f"swap needs method: a policy or chain string, got {show(method)}")
            if type(options) is not dict or not all(type(k) is str and type(v) is dict for k, v in options.items()):
                raise AdminError(BAD_COMMAND, f"options must map policy names to option maps, got {show(options)}")
            result = self.swapper.swap(method, options)
            return {**result, "status": self.swapper.info()}
        raise AdminError(BAD_COMMAND, f"unknown admin op {show(op)}; ops: show, swap")


def _ask(qid: int, token: str, op: str, args: Mapping[str, Any] | None) -> bytes:
    return msgpack.packb({"v": wire.VERSION, "t": ASK, "id": qid, "token": token, "op": op, "args": dict(args or {})})  # type: ignore[no-any-return]


def _result(ans: Mapping[str, Any]) -> dict[str, Any]:
    if ans.get("ok") is True and type(ans.get("data")) is dict:
        return ans["data"]  # type: ignore[no-any-return]
    err = ans.get("error")
    if type(err) is dict:
        raise AdminError(str(err.get("code")), str(err.get("message")))
    raise AdminError(BAD_COMMAND, f"malformed admin answer {show(ans)}")


# --------------------------------------------------------------------------- asking


#: How long an admin command waits for its answer (a swap builds a chain first).
TIMEOUT_S = 30.0


def call(endpoint: str, token: str, op: str, args: Mapping[str, Any] | None = None, *,
         timeout_s: float = TIMEOUT_S, curve: security.CurveArg = None) -> dict[str, Any]:  # fmt: skip
    """Send one admin command to the status *endpoint* and return its ``data``.

    Raises :class:`AdminError` when refused or when no answer comes within *timeout_s*.
    """
    import zmq

    from dpcore.sdk import endpoints

    endpoints.check(endpoint, "status endpoint")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    try:
        security.client(sock, endpoint, security.resolve(curve))
        sock.connect(endpoint)
        sock.send(_ask(0, token, op, args))
        if not sock.poll(int(timeout_s * 1000)):
            raise AdminError("unavailable", f"the controller at {endpoint} did not answer within {timeout_s:g}s")
        return _result(unpack(sock.recv(), ANSWER))
    finally:
        sock.close(linger=0)
        ctx.term()


class AsyncAdminClient:
    """The HTTP front's side: one admin command at a time over its own DEALER socket."""

    def __init__(self, endpoint: str, *, ctx: zmq.asyncio.Context, curve: security.CurveArg = None) -> None:
        import asyncio

        import zmq

        self._sock = ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        security.client(self._sock, endpoint, security.resolve(curve))
        self._sock.connect(endpoint)
        self.endpoint = endpoint
        self._ids = itertools.count()
        self._lock = asyncio.Lock()

    async def call(self, token: str, op: str, args: Mapping[str, Any] | None = None,
                   timeout_s: float = TIMEOUT_S) -> dict[str, Any]:  # fmt: skip
        async with self._lock:
            qid = next(self._ids)
            ans = await exchange(self._sock, _ask(qid, token, op, args), qid, ANSWER, timeout_s)
        if ans is None:
            raise AdminError("unavailable", f"the controller at {self.endpoint} did not answer within {timeout_s:g}s")
        return _result(ans)

    def close(self) -> None:
        self._sock.close(linger=0)
