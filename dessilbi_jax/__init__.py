"""dessilbi-jax: train deep networks and discover their sparse structure at once.

DessiLBI (Fu et al., ICML 2020) as an Optax gradient transformation::

  import dessilbi_jax as dl
  tx = dl.dessilbi(0.1, kappa=1.0, mu=100.0)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  dl.support(state)            # which filters / weights are in Γ's support

Submodules: ``grouping`` (the grouping rule), ``prox`` (proximal maps),
``optimizer`` (the update rule), ``cpu_schedule`` (the order of its writes
on the CPU), ``path`` (reading the path off the state), ``models``, ``data``,
``train``, ``baselines``, ``structure`` (the unit map: remove, zero, widen,
gate, count), ``growth`` (growing networks); for controlled sparsity ``l0``
(hard-concrete gates), ``constraints`` (Lagrange multipliers), ``weight_gates``
and ``unit_gates`` (gates on a model), ``l0_training`` (one constrained step)
and ``target_density`` (steering λ) (import them by name).
"""

from dessilbi_jax import constraints
from dessilbi_jax import grouping
from dessilbi_jax import l0
from dessilbi_jax import prox
from dessilbi_jax.optimizer import DessiLBIState
from dessilbi_jax.optimizer import dessilbi
from dessilbi_jax.path import entry_step
from dessilbi_jax.path import find_states
from dessilbi_jax.path import gamma
from dessilbi_jax.path import nonzero_summary
from dessilbi_jax.path import prune_by_order
from dessilbi_jax.path import sparse_params
from dessilbi_jax.path import sparsity_summary
from dessilbi_jax.path import support
from dessilbi_jax.path import z

__version__ = '0.1.0'

__all__ = (
    'DessiLBIState',
    'constraints',
    'dessilbi',
    'entry_step',
    'find_states',
    'gamma',
    'grouping',
    'l0',
    'nonzero_summary',
    'prox',
    'prune_by_order',
    'sparse_params',
    'sparsity_summary',
    'support',
    'z',
)
