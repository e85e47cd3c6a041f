"""``dpcore simulate``: replay a real trace through a model of ``dp_size`` engine ranks.

Modules: :mod:`~dpcore.sim.traces` (trace readers), :mod:`~dpcore.sim.config` (the pinned
engine defaults), :mod:`~dpcore.sim.engine` (the discrete-event model),
:mod:`~dpcore.sim.baselines` (peer policies re-implemented), :mod:`~dpcore.sim.oracle`
(prefix-hit references), :mod:`~dpcore.sim.report` (tables, JSON, plots) and
:mod:`~dpcore.sim.cli` (the subcommand). Nothing here is imported by ``import dpcore``.
"""
