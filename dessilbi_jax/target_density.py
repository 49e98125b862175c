r"""Steering λ so that Γ's support lands on a chosen density (CONTROLLED_SPARSITY.md).

DessiLBI's support is a deterministic function of Z and λ: group g is in it
when ``‖Z_g‖ > λ``. Two ways to steer λ towards a target density ε:

* **budget cap**: the support grows along the inverse scale space as usual
  until it holds the budget ``B = ε·N`` (N weights, or groups), after which a
  group enters only by beating the weakest member:

      λ_eff = max(λ, t_B),   t_B = the norm of the first group (by norm, descending)
                                   that would take the support past B

  so that ``Σ_{g: ‖Z_g‖ > λ_eff} |g| ≤ B`` at every step, with no dual learning rate.
* **dual ascent**: ``λ ← max(λ_min, λ + η·(density − ε))``, density measured on
  the current support.

Example::

  >>> import jax.numpy as jnp
  >>> from dessilbi_jax import target_density
  >>> norms = jnp.array([0.5, 3.0, 2.0, 1.0])     # four groups of 10 weights
  >>> t = target_density.budget_threshold([norms], [10], budget=25)
  >>> t, norms > jnp.maximum(0.1, t)              # two groups (20 weights) fit in 25
  (Array(1., dtype=float32), Array([False,  True,  True, False], dtype=bool))
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def budget_threshold(norms: Sequence[jax.Array], group_sizes: Sequence[int], budget) -> jax.Array:
  """The least threshold ``t`` whose support ``{g: ‖Z_g‖ > t}`` holds at most ``budget`` weights.

  Args:
    norms: per leaf, the (possibly normalized) norms of its groups, any shape.
    group_sizes: per leaf, the number of weights in one of its groups
      (1 everywhere to count groups instead of weights).
    budget: the most weights (or groups) the support may hold.

  Returns:
    ``t``: the norm of the first group, in descending order of norm, at which
    the cumulative size exceeds ``budget`` (0 when everything fits). Groups
    tied with that norm stay out too, so the budget is never exceeded.
  """
  if len(norms) != len(group_sizes):
    raise ValueError(f'budget_threshold: {len(norms)} leaves of norms but {len(group_sizes)} group sizes.')
  if not norms:
    return jnp.zeros([], jnp.float32)
  flat = jnp.concatenate([jnp.ravel(n).astype(jnp.float32) for n in norms])
  sizes = jnp.concatenate([jnp.full(jnp.size(n), s, jnp.float32) for n, s in zip(norms, group_sizes)])
  order = jnp.argsort(-flat, stable=True)
  sorted_norms, cumulative = flat[order], jnp.cumsum(sizes[order])
  over = cumulative > budget
  first_over = jnp.argmax(over)
  return jnp.where(jnp.any(over), sorted_norms[first_over], 0.0)


def dual_ascent(lam, density, target, rate, lam_min=0.0):
  """One step of ``λ ← max(λ_min, λ + η·(density − ε))``."""
  return jnp.maximum(lam_min, lam + rate * (density - target))
