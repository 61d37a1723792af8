"""The deterministic simulator: the whole cluster, in one process, from one seed.

``walstore simulate`` and ``make simulate`` run it (docs/simulation.md). The nodes are the
product's own ``Node`` code; only the seams of ``walstore.runtime`` are simulated.
"""
