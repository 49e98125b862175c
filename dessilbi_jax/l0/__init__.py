"""L0 gates (Louizos et al. 2018) and Lagrangian constraints (Gallego-Posada et al. 2022).

==========================  ======================================================
``hard_concrete.py``        the gate distribution: sample, median, expected density
``constraints.py``          Lagrange multipliers: dual ascent as an optax optimizer
``weight_gates.py``         gates on weight groups of the grouping rule
``unit_gates.py``           gates on the units of the unit map; expected density and MACs
==========================  ======================================================

The hard-concrete functions are importable from the package itself
(``from dessilbi_jax import l0; l0.sample_gates(...)``); the other modules by
name (``from dessilbi_jax.l0 import unit_gates``).
"""

from dessilbi_jax.l0.hard_concrete import BETA
from dessilbi_jax.l0.hard_concrete import EPS
from dessilbi_jax.l0.hard_concrete import GAMMA
from dessilbi_jax.l0.hard_concrete import LOG_ALPHA_MAX
from dessilbi_jax.l0.hard_concrete import LOG_ALPHA_MIN
from dessilbi_jax.l0.hard_concrete import ZETA
from dessilbi_jax.l0.hard_concrete import clamp_log_alpha
from dessilbi_jax.l0.hard_concrete import clamped
from dessilbi_jax.l0.hard_concrete import density_constraint
from dessilbi_jax.l0.hard_concrete import expected_density
from dessilbi_jax.l0.hard_concrete import init_log_alpha
from dessilbi_jax.l0.hard_concrete import init_weight_scale
from dessilbi_jax.l0.hard_concrete import layer_densities
from dessilbi_jax.l0.hard_concrete import median_gates
from dessilbi_jax.l0.hard_concrete import model_density
from dessilbi_jax.l0.hard_concrete import prob_active
from dessilbi_jax.l0.hard_concrete import sample_gates
from dessilbi_jax.l0.hard_concrete import sample_gates_tree
from dessilbi_jax.l0.hard_concrete import stretched_sigmoid

__all__ = ('BETA', 'EPS', 'GAMMA', 'LOG_ALPHA_MAX', 'LOG_ALPHA_MIN', 'ZETA', 'clamp_log_alpha', 'clamped',
           'density_constraint',
           'expected_density', 'init_log_alpha', 'init_weight_scale', 'layer_densities', 'median_gates',
           'model_density', 'prob_active', 'sample_gates', 'sample_gates_tree', 'stretched_sigmoid')
