"""Baselines DessiLBI is measured against, as optax transformations (see ``gmp.py``)."""

from dessilbi_jax.baselines.gmp import BASELINES
from dessilbi_jax.baselines.gmp import GMPState
from dessilbi_jax.baselines.gmp import GroupLassoProxState
from dessilbi_jax.baselines.gmp import cubic_sparsity_schedule
from dessilbi_jax.baselines.gmp import gmp
from dessilbi_jax.baselines.gmp import group_lasso_prox
from dessilbi_jax.baselines.gmp import magnitude_masks
from dessilbi_jax.baselines.gmp import make_baseline
from dessilbi_jax.baselines.gmp import masks
from dessilbi_jax.baselines.gmp import prox_group_lasso
from dessilbi_jax.baselines.gmp import pruning_steps
from dessilbi_jax.baselines.gmp import unstructured

__all__ = ('BASELINES', 'GMPState', 'GroupLassoProxState', 'cubic_sparsity_schedule', 'gmp', 'group_lasso_prox',
           'magnitude_masks', 'make_baseline', 'masks', 'prox_group_lasso', 'pruning_steps', 'unstructured')
