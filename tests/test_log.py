import io
import sys

import structlog

from dpcore.log import configure


def test_logging_follows_stderr_after_the_stream_it_was_configured_with_is_closed(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure("info", json=True)
    structlog.get_logger().info("first_event")
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    try:
        structlog.get_logger().info("second_event")
    finally:
        structlog.reset_defaults()
    assert "second_event" in second.getvalue()
