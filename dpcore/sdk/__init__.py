"""SDKs for the processes around the controller.

* :class:`Client` / :class:`AsyncClient`: a tokenizer or HTTP front end sends requests and
  receives outputs, rejections and failures.
* :class:`Worker`: an engine rank receives dispatches and sends load reports.

Importing this package imports pyzmq; the core (``import dpcore``) does not.
"""

from __future__ import annotations

from dpcore.sdk.asyncclient import AsyncClient, ReplyStream
from dpcore.sdk.client import Client, ControllerUnavailableError, RequestFields
from dpcore.sdk.worker import Work, Worker
from dpcore.wire import Control, Reply

__all__ = [
    "AsyncClient",
    "Client",
    "Control",
    "ControllerUnavailableError",
    "Reply",
    "ReplyStream",
    "RequestFields",
    "Work",
    "Worker",
]
