"""Who may talk to dpcore: loopback by default, ZMQ CURVE for TCP, loud warnings otherwise.

**Listeners.** Every socket dpcore binds defaults to 127.0.0.1 (or an ``ipc://`` path in a
private ``0700`` run directory). Binding another address without authentication is
allowed, but :func:`warn_exposed` says so loudly on stderr.

**CURVE.** One cluster key set, made by ``dpcore keys --dir DIR``, with a key pair per role:

===============================  ===========================================================
``server.key(_secret)``          the identity of every side that *binds* a TCP socket: the
                                 controller (ingress, reports, rank sockets, status) and each
                                 sender's reply socket; the controller also connects with it
``rank.key(_secret)``            the identity of the ranks (engine workers)
``sender.key(_secret)``          the identity of the senders (client SDK, HTTP front)
``authorized/ranks/*.key``       rank keys allowed on the controller's rank sockets
``authorized/senders/*.key``     sender keys allowed on the controller's ingress and status
===============================  ===========================================================

Each bound socket declares the role it serves (a ZAP domain), and the handler admits only
that role's keys: the ingress and the status socket take senders, the rank sockets and the
report socket take ranks, a sender's reply socket takes ranks and the controller. So a sender
cannot connect to a rank's socket and take its requests, nor forge load reports; a rank
cannot inject requests. A process learns its role from the component using the keys
(``Worker``: rank; ``Client``, the HTTP front: sender; ``dpcore serve``: controller) and
reads its own key pair from the directory.

A directory from an older ``dpcore keys`` (one ``client.key`` for everyone, ``authorized/*.key``)
still works, without the role check; ``dpcore keys --force`` makes a role key set.

A process finds the keys in ``$DPCORE_CURVE_DIR`` (that layout), or in Z85 strings:
``DPCORE_CURVE_SERVER_KEY``/``_SERVER_SECRET``, ``DPCORE_CURVE_CLIENT_KEY``/``_CLIENT_SECRET``
(this process's own pair) and ``DPCORE_CURVE_AUTHORIZED`` (comma-separated public keys,
admitted on every socket: no role check). The controller, the SDKs and the HTTP front read
them when no keys are passed explicitly, so an engine on the worker SDK gets CURVE from its
environment without a code change. Only ``tcp://`` endpoints use CURVE.

Every binding side runs a ZAP handler (pyzmq's :class:`~zmq.auth.thread.ThreadAuthenticator`)
that admits only authorized client keys: a peer without keys, or with keys of its own, never
completes the handshake, so it can neither send frames nor receive a rank's requests.

What CURVE does not cover: every sender and the controller hold ``server.key_secret`` (a
sender's reply socket must present the cluster's server identity to the ranks that connect
to it), so a sender that can also redirect a rank's TCP connection (DNS, routing, taking over
the controller's address) could pose as the controller to that rank. Senders are trusted to
name their own reply endpoint, and a request's payload is opaque to dpcore.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shutil
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

from attrs import field, frozen

from dpcore.errors import ConfigError

ENV_DIR = "DPCORE_CURVE_DIR"
ENV_SERVER_KEY = "DPCORE_CURVE_SERVER_KEY"
ENV_SERVER_SECRET = "DPCORE_CURVE_SERVER_SECRET"
ENV_CLIENT_KEY = "DPCORE_CURVE_CLIENT_KEY"
ENV_CLIENT_SECRET = "DPCORE_CURVE_CLIENT_SECRET"
ENV_AUTHORIZED = "DPCORE_CURVE_AUTHORIZED"

_Z85_KEY_LEN = 40

#: Who a process is, for picking its key pair: ``dpcore serve``, an engine rank, a sender.
CONTROLLER = "controller"
RANK = "rank"
SENDER = "sender"
ROLES = (CONTROLLER, RANK, SENDER)
#: ZAP domains: the role a bound socket serves.
DOMAIN_RANKS = "dpcore-ranks"
DOMAIN_SENDERS = "dpcore-senders"
DOMAIN_REPLIES = "dpcore-replies"
DOMAINS = (DOMAIN_RANKS, DOMAIN_SENDERS, DOMAIN_REPLIES)


def _key(value: str | bytes, what: str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    raw = raw.strip()
    if len(raw) != _Z85_KEY_LEN:
        msg = f"CURVE key {what}: expected {_Z85_KEY_LEN} Z85 characters, got {len(raw)}"
        raise ConfigError(msg)
    return raw


@frozen
class CurveKeys:
    """A process's CURVE keys (Z85 bytes).

    :ivar server_public: The cluster's server key: what connecting sides expect.
    :ivar client_public: This process's key when it connects.
    :ivar client_secret: Its secret.
    :ivar server_secret: Needed only by processes that bind TCP sockets.
    :ivar authorized: Client keys allowed on every bound socket (a key set without roles).
    :ivar ranks: Rank keys (a role key set): allowed on rank sockets and reply sockets.
    :ivar senders: Sender keys (a role key set): allowed on the ingress and status sockets.
    """

    server_public: bytes
    client_public: bytes
    client_secret: bytes
    server_secret: bytes | None = None
    authorized: frozenset[bytes] = field(default=frozenset())
    ranks: frozenset[bytes] = field(default=frozenset())
    senders: frozenset[bytes] = field(default=frozenset())

    @property
    def has_roles(self) -> bool:
        return bool(self.ranks or self.senders)

    def allowed(self, domain: str = "*") -> frozenset[bytes]:
        """Client keys admitted on a socket of ZAP *domain* (``"*"``: one that named none)."""
        if not self.has_roles:
            return self.authorized or frozenset({self.client_public})
        if domain == DOMAIN_RANKS:
            return self.ranks
        if domain == DOMAIN_SENDERS:
            return self.senders
        if domain == DOMAIN_REPLIES:
            return self.ranks | {self.server_public}
        return self.ranks | self.senders | {self.server_public} | self.authorized

    def as_server(self, sock: Any) -> None:
        if self.server_secret is None:
            msg = "this process binds a TCP socket under CURVE and needs the server secret key (server.key_secret)"
            raise ConfigError(msg)
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def as_client(self, sock: Any) -> None:
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.client_public
        sock.curve_secretkey = self.client_secret


#: What components accept: keys, ``None`` (read the environment) or ``False`` (no CURVE).
CurveArg = Union[CurveKeys, bool, None]


# --------------------------------------------------------------------------- loading


def _read_cert(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    if not path.is_file():
        msg = f"CURVE key file {path} not found (make a key set with: dpcore keys --dir {path.parent})"
        raise ConfigError(msg)
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        msg = f"CURVE key file {path}: {exc}"
        raise ConfigError(msg) from None
    if secret and sec is None:
        msg = f"CURVE key file {path} has no secret key"
        raise ConfigError(msg)
    return public, sec


def _public_keys(d: Path) -> frozenset[bytes]:
    return frozenset(_read_cert(p, False)[0] for p in sorted(d.glob("*.key")))  # type: ignore[misc]


def load_dir(directory: str | os.PathLike[str], role: str = SENDER) -> CurveKeys:
    """The keys of a process in *role* from a directory written by :func:`generate`
    (``server.key_secret`` optional: only processes that bind TCP need it)."""
    d = Path(directory)
    if not d.is_dir():
        msg = f"CURVE key directory {d} does not exist (make one with: dpcore keys --dir {d})"
        raise ConfigError(msg)
    if role not in ROLES:
        msg = f"unknown CURVE role {role!r}; one of {', '.join(ROLES)}"
        raise ConfigError(msg)
    secret_file = d / "server.key_secret"
    if secret_file.is_file():
        server_public, server_secret = _read_cert(secret_file, True)
    else:
        server_public, server_secret = _read_cert(d / "server.key", False)[0], None
    if not (d / "rank.key").is_file():  # a key set without roles: one client key for all
        client_public, client_secret = _read_cert(d / "client.key_secret", True)
        return CurveKeys(server_public, client_public, client_secret, server_secret,  # type: ignore[arg-type]
                         _public_keys(d / "authorized"))  # fmt: skip
    if role == CONTROLLER:
        if server_secret is None:
            msg = f"the controller needs {secret_file}"
            raise ConfigError(msg)
        client_public, client_secret = server_public, server_secret
    else:
        client_public, client_secret = _read_cert(d / f"{role}.key_secret", True)
    return CurveKeys(
        server_public, client_public, client_secret, server_secret,  # type: ignore[arg-type]
        ranks=_public_keys(d / "authorized" / "ranks"), senders=_public_keys(d / "authorized" / "senders"),
    )  # fmt: skip


def from_env(env: Mapping[str, str] | None = None, role: str = SENDER) -> CurveKeys | None:
    """The keys of a process in *role* named by the environment, or ``None`` when it names none."""
    env = os.environ if env is None else env
    if env.get(ENV_DIR):
        return load_dir(env[ENV_DIR], role)
    if not env.get(ENV_SERVER_KEY):
        return None
    missing = [k for k in (ENV_CLIENT_KEY, ENV_CLIENT_SECRET) if not env.get(k)]
    if missing:
        msg = f"{ENV_SERVER_KEY} is set, so CURVE is on, but {', '.join(missing)} is not"
        raise ConfigError(msg)
    secret = env.get(ENV_SERVER_SECRET)
    authorized = [a for a in env.get(ENV_AUTHORIZED, "").split(",") if a.strip()]
    return CurveKeys(
        _key(env[ENV_SERVER_KEY], ENV_SERVER_KEY),
        _key(env[ENV_CLIENT_KEY], ENV_CLIENT_KEY),
        _key(env[ENV_CLIENT_SECRET], ENV_CLIENT_SECRET),
        _key(secret, ENV_SERVER_SECRET) if secret else None,
        frozenset(_key(a, ENV_AUTHORIZED) for a in authorized),
    )


def resolve(curve: CurveArg, role: str = SENDER) -> CurveKeys | None:
    """``None`` → the environment's keys for *role* (if any); ``False``/``True`` → none/required."""
    if isinstance(curve, CurveKeys):
        return curve
    if curve is False:
        return None
    keys = from_env(role=role)
    if curve is True and keys is None:
        msg = f"CURVE is required but no keys are configured (set {ENV_DIR}; make keys with: dpcore keys)"
        raise ConfigError(msg)
    return keys


def generate(directory: str | os.PathLike[str], *, force: bool = False) -> CurveKeys:
    """Write a fresh cluster key set to *directory* (see the module docstring)."""
    import zmq.auth

    d = Path(directory)
    if (d / "server.key").exists() and not force:
        msg = f"{d} already holds dpcore keys; pass --force to replace them"
        raise ConfigError(msg)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    # A --force over a key set without roles: its client key must not stay authorized.
    for old in ("client.key", "client.key_secret"):
        (d / old).unlink(missing_ok=True)
    if (d / "authorized").is_dir():
        for old_key in (d / "authorized").glob("*.key"):
            old_key.unlink()
    for name in ("server", RANK, SENDER):
        # pyzmq's writer (keys from zmq.curve_keypair); secrets readable by the owner only.
        _, secret = zmq.auth.create_certificates(d, name)
        os.chmod(secret, 0o600)
    for role, folder in ((RANK, "ranks"), (SENDER, "senders")):
        (d / "authorized" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(d / f"{role}.key", d / "authorized" / folder / f"{role}.key")
    return load_dir(d, CONTROLLER)


# --------------------------------------------------------------------------- applying


def is_tcp(endpoint: str) -> bool:
    return endpoint.startswith("tcp://")


def server(sock: Any, endpoint: str, keys: CurveKeys | None, domain: str | None = None) -> None:
    """Make *sock* (about to bind *endpoint*) a CURVE server when keys are set and it is TCP;
    *domain* (:data:`DOMAIN_RANKS`...) names the role it serves, checked on every connection."""
    if keys is not None and is_tcp(endpoint):
        keys.as_server(sock)
        if domain is not None:
            sock.zap_domain = domain.encode()


def client(sock: Any, endpoint: str, keys: CurveKeys | None) -> None:
    """Make *sock* (about to connect to *endpoint*) a CURVE client when keys are set and it is TCP."""
    if keys is not None and is_tcp(endpoint):
        keys.as_client(sock)


class _Allow:
    """The ZAP credentials callback: admit the keys authorized for the socket's domain,
    count the others."""

    def __init__(self) -> None:
        self.keys: dict[str, set[bytes]] = {d: set() for d in ("*", *DOMAINS)}
        self.denied = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys.get(domain, ()):
            return True
        self.denied += 1
        return False


class ZapGuard:
    """One ZAP handler per ZMQ context, shared by everything binding in that context.

    :meth:`acquire` starts it (or adds to the running one's allowed keys); every acquire
    needs a :meth:`release` before the context is terminated (a running handler holds
    sockets, and ``ctx.term()`` would wait for them forever).
    """

    _lock = threading.Lock()
    _by_ctx: dict[int, ZapGuard] = {}

    def __init__(self, key: int, auth: Any, allow: _Allow) -> None:
        self._key = key
        self._auth = auth
        self._allow = allow
        self._refs = 0

    @property
    def denied(self) -> int:
        """Connection attempts refused (unknown client key) since the handler started."""
        return self._allow.denied

    @classmethod
    def acquire(cls, ctx: Any, keys: CurveKeys) -> ZapGuard:
        import zmq
        import zmq.auth.thread

        key = int(ctx.underlying)
        with cls._lock:
            guard = cls._by_ctx.get(key)
            if guard is None:
                # A plain shadow of the context: the handler thread is synchronous even when
                # the owner uses zmq.asyncio, and shares its inproc ZAP endpoint.
                auth = zmq.auth.thread.ThreadAuthenticator(zmq.Context.shadow(key))
                auth.start()
                allow = _Allow()
                for domain in allow.keys:
                    auth.configure_curve_callback(domain, credentials_provider=allow)
                guard = cls._by_ctx[key] = cls(key, auth, allow)
            for domain, allowed in guard._allow.keys.items():
                allowed.update(keys.allowed(domain))
            guard._refs += 1
            return guard

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            if self._refs > 0:
                return
            self._by_ctx.pop(self._key, None)
        self._auth.stop()


def guard_for(ctx: Any, keys: CurveKeys | None, endpoints: Iterable[str]) -> ZapGuard | None:
    """A :class:`ZapGuard` for *ctx* when keys are set and any of *endpoints* is TCP."""
    if keys is None or not any(is_tcp(e) for e in endpoints):
        return None
    return ZapGuard.acquire(ctx, keys)


# --------------------------------------------------------------------------- exposure


def is_loopback(host: str) -> bool:
    """Whether *host* (an address, ``localhost``, or a ``tcp://host:port`` endpoint) is loopback."""
    if host.startswith(("ipc://", "inproc://")):
        return True  # not reachable from another host at all
    if host.startswith("tcp://"):
        host = host[6:].rsplit(":", 1)[0]
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or '*': assume other hosts can reach it


def warn_exposed(what: str, address: str, risk: str, fix: str, log: Any = None) -> bool:
    """Warn loudly (a red box on stderr and a log line) that *what* listens on a
    non-loopback *address* without authentication. Returns whether it warned."""
    if is_loopback(address):
        return False
    from rich.console import Console
    from rich.panel import Panel

    text = f"{what} listens on {address} WITHOUT AUTHENTICATION.\n{risk}\nTo fix: {fix}"
    Console(file=sys.stderr, stderr=True).print(Panel(text, title="dpcore: SECURITY WARNING", style="bold red"))
    if log is not None:
        log.warning("unauthenticated_listener", what=what, address=address, fix=fix)
    return True


ZMQ_RISK = (
    "Anyone who can reach it can send requests, connect to a rank's socket and take that "
    "rank's requests, and forge load reports."
)
ZMQ_FIX = f"bind 127.0.0.1, or make keys with `dpcore keys --dir DIR` and set {ENV_DIR}=DIR for every process"


# --------------------------------------------------------------------------- dpcore keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="dpcore-keys", help="directory to write the key set to (default ./dpcore-keys)")
    p.add_argument("--force", action="store_true", help="replace an existing key set")


def run(args: argparse.Namespace) -> int:
    keys = generate(args.dir, force=args.force)
    d = Path(args.dir).resolve()
    print(f"wrote a CURVE key set to {d}")
    print("  server.key / server.key_secret  the controller, and senders' reply sockets")
    print("  rank.key / rank.key_secret      ranks (admitted on rank and report sockets only)")
    print("  sender.key / sender.key_secret  senders and the HTTP front (admitted on ingress and status only)")
    print(f"  authorized/ranks/, senders/     public keys allowed per role ({len(keys.ranks)}, {len(keys.senders)})")
    print(f"use it with:  export {ENV_DIR}={d}")
    return 0
