"""The controller's defaults, in one place for :class:`~dpcore.runtime.controller.Controller`
and the ``dpcore serve`` flags (importing this loads nothing)."""

#: A rank silent this long (seconds) becomes inactive.
HEARTBEAT_TIMEOUT_S = 3.0
#: Messages queued per rank socket before dispatches wait in the controller's backlog.
SNDHWM = 1000
#: Dispatches waiting per rank in the controller before new ones are rejected ``rank_busy``.
BACKLOG = 1024
#: On stop, how long (seconds) in-flight requests may still complete.
DRAIN_TIMEOUT_S = 10.0
#: A dispatch a reporting rank has not admitted after this long (seconds) fails ``rank_stuck``.
ADMISSION_TIMEOUT_S = 30.0
#: How long (seconds) each rank has for its first report after the loop starts.
STARTUP_TIMEOUT_S = 30.0
