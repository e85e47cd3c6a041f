"""``dpcore simulate``: replay a real trace through a model of ``dp_size`` engine ranks.

Modules: :mod:`~dpcore.sim.traces` (trace readers), :mod:`~dpcore.sim.config` (the pinned
engine defaults), :mod:`~dpcore.sim.lockstep` and :mod:`~dpcore.sim.engine` (the two engine
models: DP attention in lockstep, independent replicas), :mod:`~dpcore.sim.replay` (what the
engines share), :mod:`~dpcore.sim.result` (what a run gives), :mod:`~dpcore.sim.routing` (the
router interface the engines drive), :mod:`~dpcore.sim.baselines` (peer policies
re-implemented), :mod:`~dpcore.sim.oracle` (prefix-hit references), :mod:`~dpcore.sim.report`
(tables, JSON, plots) and :mod:`~dpcore.sim.cli` (the subcommand). Nothing here is imported
by ``import dpcore``.
"""
