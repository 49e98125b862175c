r"""Steering λ so that Γ's support lands on a chosen density (docs/CONTROLLED_SPARSITY.md).

DessiLBI's support is a deterministic function of Z and λ: group g is in it
when ``‖Z_g‖ > λ``. ``dl.dessilbi(..., target_density=ε)`` steers the λ of
each structured leaf towards a support of density ε (of the structured
weights, or of their groups), in one of two ways:

* **budget cap** (``method='budget'``): the support grows along
  the inverse scale space as usual until it holds the budget ``B = ε·N``
  (N weights, or groups); from then on a group enters only by beating the
  weakest member::

      λ_eff = max(λ, t_B),   t_B = the least t with Σ_{g: ‖Z_g‖ > t} |g| ≤ B

  no dual learning rate; the path is DessiLBI's until the budget binds.
* **dual ascent** (``method='dual'``, the default): ``λ_eff = λ + t`` with
  ``t ← max(λ_min − λ, t + η·(density − ε))``, the density of the support at
  the last step's λ. With ``λ_min = 0`` (the default) λ also falls, so that
  the support reaches a density that DessiLBI's own λ would not reach in the
  steps given (the path then grows faster than DessiLBI's at first); with
  ``lam_min=None`` λ only rises, so the path is DessiLBI's until the support
  passes ε.

Measured on digits and mnist1d (``benchmarks/controlled_sparsity.py``): the
budget cap cannot reach a target above the density DessiLBI ends on by itself
(digits' 28 % for a 50 % target), dual ascent lands on every target; hence the
default.

``t`` is found on the norms of ``Z_{k+1}`` and applies from the next step on
(Γ lags the budget by one step); ``every`` recomputes it only every that many
steps (the search is 31 counting passes over the norms: on a million
single-weight groups that is not free).

Example::

  >>> import jax.numpy as jnp
  >>> from dessilbi_jax.core import target_density
  >>> norms = jnp.array([0.5, 3.0, 2.0, 1.0])     # four groups of 10 weights
  >>> t = target_density.budget_threshold([norms], [10], budget=25)
  >>> t, norms > jnp.maximum(0.1, t)              # two groups (20 weights) fit in 25
  (Array(1., dtype=float32), Array([False,  True,  True, False], dtype=bool))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

SCOPES = ('model', 'layer')
COUNTS = ('weights', 'groups')
METHODS = ('budget', 'dual')


class Target(NamedTuple):
  """Where DessiLBI's support should end.

  Attributes:
    density: ε in (0, 1], the fraction of the structured weights (or groups) kept.
    scope: ``'model'`` (one budget over every structured leaf) or ``'layer'``
      (ε of each leaf).
    count: ``'weights'`` (a filter counts its kernel entries) or ``'groups'``.
    method: ``'budget'`` (a cap on the support) or ``'dual'`` (dual ascent on λ).
    rate: η of ``'dual'``: how fast λ moves per step and unit of density gap.
    every: recompute the threshold every that many steps.
    lam_min: ``'dual'``'s floor of λ (``None``: λ itself, so λ only rises);
      the budget cap only ever raises λ and ignores it.
  """
  density: Any
  scope: str = 'model'
  count: str = 'weights'
  method: str = 'dual'
  rate: float = 0.01
  every: int = 1
  lam_min: Any = 0.0


def as_target(target: Union[None, float, Target]):
  """``target`` as a checked :class:`Target` (a number: ``Target(density=number)``); ``None`` stays ``None``."""
  if target is None:
    return None
  if not isinstance(target, Target):
    target = Target(density=target)
  if isinstance(target.density, (bool, np.bool_, str)) or not (
      isinstance(target.density, (float, int, np.generic, np.ndarray, jax.Array)) and np.ndim(target.density) == 0):
    raise TypeError(f'`target_density` must be None, a number in (0, 1] or a Target, got '
                    f'{type(target.density).__name__} {target.density!r}.')
  try:
    density = float(target.density)
  except jax.errors.ConcretizationTypeError:
    density = None   # injected by optax.inject_hyperparams: checked by the caller's range, not here
  if density is not None and not (0 < density <= 1):
    raise ValueError(f'`target_density` must be in (0, 1], got {target.density}: the fraction of the '
                     'structured weights that stay in the support (0.3 keeps 30 %).')
  for name, value, allowed in (('scope', target.scope, SCOPES), ('count', target.count, COUNTS),
                               ('method', target.method, METHODS)):
    if value not in allowed:
      raise ValueError(f'Target {name} {value!r} is not one of {allowed}.')
  if not (isinstance(target.every, (int, np.integer)) and target.every >= 1):
    raise ValueError(f'Target every must be an integer >= 1, got {target.every!r}.')
  if not float(target.rate) > 0:
    raise ValueError(f'Target rate must be > 0, got {target.rate!r}.')
  if target.lam_min is not None and not float(target.lam_min) >= 0:
    raise ValueError(f'Target lam_min must be >= 0 (or None: λ only rises), got {target.lam_min!r}.')
  return target


def effective_lambda(lam, t, method: str):
  """λ of the proximal map under the target: ``max(λ, t)`` (budget) or ``λ + t`` (dual)."""
  return jnp.maximum(lam, t) if method == 'budget' else lam + t


def _count_above(norms, sizes, x):
  return sum(jnp.sum((n > x).astype(jnp.float32)) * s for n, s in zip(norms, sizes))


def budget_threshold(norms: Sequence[jax.Array], group_sizes: Sequence[int], budget) -> jax.Array:
  """The least threshold ``t`` whose support ``{g: ‖Z_g‖ > t}`` holds at most ``budget`` weights.

  Args:
    norms: per leaf, the (possibly normalized) norms of its groups, any shape, ``≥ 0``.
    group_sizes: per leaf, the number of weights in one of its groups
      (1 everywhere to count groups instead of weights).
    budget: the most weights (or groups) the support may hold.

  Returns:
    ``t``, float32: 0 when everything fits, else the norm of the group at the
    budget's rank (groups tied with it stay out too, so the budget is never
    exceeded; ``inf`` when even the infinite norms exceed it). NaN norms are
    never counted. Found exactly by bisection on the bit patterns of
    non-negative float32 numbers (which sort like the numbers): 31 counting
    passes over the norms, no sort.
  """
  if len(norms) != len(group_sizes):
    raise ValueError(f'budget_threshold: {len(norms)} leaves of norms but {len(group_sizes)} group sizes.')
  if not norms:
    return jnp.zeros([], jnp.float32)
  norms = [jnp.asarray(n, jnp.float32) for n in norms]
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)
  fits = lambda bits: _count_above(norms, group_sizes, as_float(bits)) <= budget

  def halve(_, bounds):   # invariant: fits(hi); lo < 0 or not fits(lo)
    lo, hi = bounds
    mid = lo + (hi - lo + 1) // 2   # in (lo, hi]: never the "below +0" sentinel
    ok = fits(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  bounds = (jnp.int32(-1), jnp.int32(0x7F800000))   # (below +0, +inf)
  _, hi = jax.lax.fori_loop(0, 31, halve, bounds)
  return as_float(hi)


def next_thresholds(target: Target, norms: Sequence[jax.Array], group_sizes: Sequence[int],
                    lams: Sequence[Any], thresholds: Sequence[jax.Array], count) -> list[jax.Array]:
  """Each structured leaf's ``t`` for the next step, from the norms of ``Z_{k+1}``.

  Args:
    target: the :class:`Target`.
    norms: per structured leaf, the norms of ``Z_{k+1}``'s groups.
    group_sizes: per leaf, the weights in one group (the count is ``target.count``'s).
    lams: per leaf, λ of its kind.
    thresholds: per leaf, the ``t`` this step applied.
    count: the step count ``k + 1``; ``t`` is recomputed when it is a multiple of ``target.every``.
  """
  sizes = [1 if target.count == 'groups' else s for s in group_sizes]
  totals = [float(jnp.size(n) * s) for n, s in zip(norms, sizes)]
  eps = jnp.asarray(target.density, jnp.float32)

  def budget(norms):
    if target.scope == 'model':
      t = budget_threshold(norms, sizes, eps * sum(totals))
      return [t] * len(norms)
    return [budget_threshold([n], [s], eps * total) for n, s, total in zip(norms, sizes, totals)]

  def dual(norms):
    kept = [_count_above([n], [s], effective_lambda(lam, t, 'dual'))
            for n, s, lam, t in zip(norms, sizes, lams, thresholds)]
    floors = [0.0 if target.lam_min is None else target.lam_min - lam for lam in lams]   # λ + t ≥ λ_min
    if target.scope == 'model':
      gaps = [sum(kept) / sum(totals) - eps] * len(kept)
    else:
      gaps = [k / total - eps for k, total in zip(kept, totals)]
    return [jnp.maximum(floor, t + target.rate * gap) for t, floor, gap in zip(thresholds, floors, gaps)]

  if not norms:
    return []
  search = budget if target.method == 'budget' else dual
  fresh = lambda operands: [t.astype(jnp.float32) for t in search(operands[0])]
  if target.every == 1:
    return fresh((norms, thresholds))
  return jax.lax.cond(count % target.every == 0, fresh, lambda operands: list(operands[1]),
                      (list(norms), [jnp.asarray(t, jnp.float32) for t in thresholds]))
