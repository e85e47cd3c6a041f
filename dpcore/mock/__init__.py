"""The mock engine rank behind ``dpcore mock-worker`` and ``dpcore demo``.

:mod:`dpcore.mock.engine` models one rank's scheduler (KV capacity, prefix cache, prefill
and decode timing) on an explicit clock; :mod:`dpcore.mock.worker` runs it as a process
that talks to the controller only through the worker SDK.
"""
