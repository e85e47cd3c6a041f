"""The running controller and what surrounds it.

* :mod:`dpcore.runtime.controller`: the ZMQ controller loop (ingress, per-rank dispatch,
  load reports, liveness, in-flight accounting).
* :mod:`dpcore.runtime.serve`: ``dpcore serve``, the controller as a process.
* :mod:`dpcore.runtime.metrics`: the Prometheus ``/metrics`` endpoint.
* :mod:`dpcore.runtime.pd`, :mod:`dpcore.runtime.pd_setup`, :mod:`dpcore.runtime.bootstrap` and
  :mod:`dpcore.runtime.bootstrap_server`: PD disaggregation.

Nothing is imported here, so ``import dpcore.runtime.bootstrap`` does not pull in ZMQ.
"""
