"""dessilbi-jax: train deep networks and discover their sparse structure at once.

DessiLBI (Fu et al., ICML 2020) as an Optax gradient transformation::

  import dessilbi_jax as dl
  tx = dl.dessilbi(0.1, kappa=1.0, mu=100.0)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  dl.support(state)            # which filters / weights are in Γ's support

The package is in layers; each imports only the layers above it in this list:

===============  ==============================================================
``core``         the transformation: grouping, prox, the update, target density,
                 the CPU schedule, reading the path (``dl.dessilbi``, ``dl.support``)
``models``       the Flax model zoo, rebuilt from widths
``data``         datasets through tensorflow-datasets, offline by default
``baselines``    GMP and proximal group lasso, as optax transformations
``structure``    the unit map of a network: remove, zero, widen, gate, count
``l0``           hard-concrete gates and Lagrangian constraints
``train``        the training loop, its run files and its features
``growth``       growing networks along the path
``cli``          the ``dessilbi`` command
===============  ==============================================================
"""

from dessilbi_jax import _moved
from dessilbi_jax import l0
from dessilbi_jax.core import grouping
from dessilbi_jax.core import prox
from dessilbi_jax.core.optimizer import DessiLBIState
from dessilbi_jax.core.optimizer import dessilbi
from dessilbi_jax.core.optimizer import state_spec
from dessilbi_jax.core.path import entry_step
from dessilbi_jax.core.path import find_states
from dessilbi_jax.core.path import gamma
from dessilbi_jax.core.path import nonzero_summary
from dessilbi_jax.core.path import prune_by_order
from dessilbi_jax.core.path import sparse_params
from dessilbi_jax.core.path import sparsity_summary
from dessilbi_jax.core.path import support
from dessilbi_jax.core.path import z
from dessilbi_jax.l0 import constraints

_moved.install()

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
    'state_spec',
    'support',
    'z',
)


def __getattr__(name: str):
  """``dl.optimizer`` and the other moved modules, by their old names (see ``_moved.py``)."""
  if f'dessilbi_jax.{name}' in _moved.MOVED:
    import importlib  # pylint: disable=g-import-not-at-top
    return importlib.import_module(f'dessilbi_jax.{name}')
  raise AttributeError(f"module 'dessilbi_jax' has no attribute {name!r}")
