"""Background threads that never die silently.

A controller process runs a few threads besides its loop: the status server, the metrics
HTTP server, the watcher of the HTTP front's process. If one of them raised and ended, the
process would go on serving requests while ``/health`` or ``/metrics`` stayed dark, and a
router in front would eject it. :class:`Supervised` runs such a body in a daemon thread;
when the body raises, the traceback is logged, :attr:`Supervised.restarts` goes up, and the
body runs again after a backoff (doubling from 50 ms up to 5 s, reset after a minute of
good health). A body that returns ends the thread: that is how it says it was stopped.

The counts are exported as ``dpcore_thread_restarts{thread}`` and in the status snapshot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 5.0
#: A body that ran this long before failing starts over at the first backoff.
_HEALTHY_S = 60.0
_log = structlog.get_logger("dpcore.supervise")


class Supervised:
    """Runs ``body()`` in a daemon thread named *name*, restarting it when it raises.

    :param name: The thread's name (and its ``thread`` label in metrics).
    :param body: The work; it returns when *stop* is set, and may raise.
    :param stop: Set to stop: no restart happens after it is set, and backoffs end at once.
    """

    def __init__(self, name: str, body: Callable[[], None], stop: threading.Event) -> None:
        self.name = name
        self.body = body
        self.stop = stop
        #: Times the body raised and was started again.
        self.restarts = 0
        #: The last exception, as text ("" if none).
        self.last_error = ""
        self._thread: threading.Thread | None = None

    def start(self) -> Supervised:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = _FIRST_BACKOFF_S
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                self.body()
            except BaseException as exc:  # anything: the point is that the thread survives it
                if time.monotonic() - started >= _HEALTHY_S:
                    backoff = _FIRST_BACKOFF_S
                self.restarts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                _log.exception("thread_failed", thread=self.name, restarts=self.restarts, restart_in_s=backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
                continue
            return

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)


def report(threads: list[Supervised]) -> dict[str, dict[str, object]]:
    """``{name: {"alive", "restarts", "last_error"}}`` for a status snapshot."""
    return {t.name: {"alive": t.is_alive(), "restarts": t.restarts, "last_error": t.last_error} for t in threads}
