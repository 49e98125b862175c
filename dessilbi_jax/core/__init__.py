"""The optax transformation: the grouping rule, the proximal maps, the update, reading the path.

==========================  ======================================================
``grouping.py``             which weights form a group (filter, neuron, head, weight)
``prox.py``                 the proximal maps of the group penalties
``optimizer.py``            :func:`dessilbi`, the update rule (docs/ALGORITHM.md)
``cpu_schedule.py``         the order of the update's writes on XLA's CPU backend
``target_density.py``       λ steered to a density of Γ's support
``path.py``                 reading the path off the state (support, Γ, Z, tickets)
==========================  ======================================================

The lowest layer of the package: it imports nothing else of ``dessilbi_jax``.
"""
