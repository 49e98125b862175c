"""Keep-masks of unit groups from anything that marks weights: Γ's support, a ticket, GMP, gates.

A unit is kept while

* some live producer kernel of its group keeps a weight of it (a filter in
  Γ's support; a dense neuron with any of its fan-in in the lasso support) -
  for a residual stream, the union over every tensor summed into it; and
* some live consumer kernel reads it through a kept weight (a unit is dead
  only when *no* layer reads it; one head reading nothing of a layer another
  head reads keeps the layer).

A layer is live while some unit of its inputs (producers) or of its outputs
(consumers) is: the rule is solved as a fixed point. Kernels without a mask
(``None``: no structure variable) mark every weight. Masks
are weight-shaped (booleans or 0/1) or per-group shaped to broadcast against
the weight, like ``dl.support`` or a ticket's masks.

Example::

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> import dessilbi_jax as dl
  >>> from dessilbi_jax import models, structure
  >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
  >>> x = jnp.ones((1, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> unit_map = structure.trace(model, variables, x)
  >>> support = {'Dense_0': {'kernel': np.array([[1, 0, 0]] * 4, bool), 'bias': None},
  ...            'Dense_1': {'kernel': None, 'bias': None}}
  >>> structure.keep_from_weights(unit_map, support)['Dense_0']
  array([ True, False, False])
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dessilbi_jax.structure import surgery
from dessilbi_jax.structure.unit_map import UnitMap


def _units_marked(mask, s) -> np.ndarray:
  """Per channel of slice ``s``: whether ``mask`` keeps any weight of it along ``s.axis``."""
  mask = np.asarray(mask) != 0
  axes = tuple(a for a in range(mask.ndim) if a != s.axis)
  along = mask.any(axis=axes) if axes else mask
  if along.shape[0] == 1:  # a per-group mask broadcast along this axis
    along = np.repeat(along, s.size * s.repeat)
  return along.reshape(s.repeat, s.size).any(axis=0)


def keep_from_weights(unit_map: UnitMap, weight_masks, *, producers_only: bool = False) -> dict[str, np.ndarray]:
  """Keep-masks of every prunable group from params-shaped weight masks (``None`` leaves: no mask).

  A unit is dead only when no live layer produces it or no live layer reads it:

      alive(u) = [∃ producer p: p marks a weight of u  and  some input unit of p is alive]
               ∧ [∃ consumer c: c marks a weight of u  and  some output unit of c is alive]

  solved as a fixed point from "all alive" (a layer whose inputs all died
  emits only constants; one whose outputs all died reads nothing). A kernel
  without a mask marks every weight; a group without producers or consumers,
  or a unit outside every consumer's range, is not cut by that side.
  ``producers_only`` asks the first condition alone (growth's support rate:
  the filters with Γ_f ≠ 0).
  """
  masks = surgery._paths(weight_masks)  # pylint: disable=protected-access
  by_kernel: dict[tuple, dict[str, list]] = {}
  marks: dict[tuple[str, int], np.ndarray] = {}
  for group in unit_map.groups:
    for i, s in enumerate(group.slices):
      if s.collection != 'params' or s.role not in ('producer', 'consumer'):
        continue
      by_kernel.setdefault(s.path, {'producer': [], 'consumer': []})[s.role].append((group.name, s))
      marked = np.zeros(group.size, bool)
      mask = masks.get(s.path)
      marked[s.offset:s.offset + s.size] = True if mask is None else _units_marked(mask, s)
      marks[(group.name, i)] = marked
  alive = {g.name: np.ones(g.size, bool) for g in unit_map.groups}

  def any_alive(path, role) -> bool:
    ends = by_kernel[path]['consumer' if role == 'producer' else 'producer']  # a producer's inputs, a consumer's outputs
    return not ends or any(alive[name][s.offset:s.offset + s.size].any() for name, s in ends)

  for _ in range(len(unit_map.groups) + 1):
    changed = False
    for group in unit_map.prunable():
      produced = np.zeros(group.size, bool)
      read = np.zeros(group.size, bool)
      has_producer = covered = None
      for i, s in enumerate(group.slices):
        if (group.name, i) not in marks or (producers_only and s.role == 'consumer'):
          continue
        live = marks[(group.name, i)] & any_alive(s.path, s.role)
        if s.role == 'producer':
          has_producer = True
          produced |= live
        else:
          covered = np.zeros(group.size, bool) if covered is None else covered
          covered[s.offset:s.offset + s.size] = True
          read |= live
      keep = (produced if has_producer else np.ones(group.size, bool))
      keep = keep & (read | ~covered if covered is not None else True)
      if not np.array_equal(keep, alive[group.name]):
        alive[group.name], changed = keep, True
    if not changed:
      break
  return {g.name: alive[g.name] for g in unit_map.prunable()}


def keep_from_support(unit_map: UnitMap, opt_state, *, producers_only: bool = False) -> dict[str, np.ndarray]:
  """Keep-masks from Γ's support in a DessiLBI state (any optax state holding one); see :func:`keep_from_weights`."""
  from dessilbi_jax.core import path  # pylint: disable=g-import-not-at-top
  return keep_from_weights(unit_map, jax.device_get(path.support(opt_state)), producers_only=producers_only)


def keep_from_gmp(unit_map: UnitMap, opt_state) -> dict[str, np.ndarray]:
  """Keep-masks from the masks of gradual magnitude pruning (:func:`dessilbi_jax.baselines.gmp`)."""
  from dessilbi_jax import baselines  # pylint: disable=g-import-not-at-top
  return keep_from_weights(unit_map, jax.device_get(baselines.masks(opt_state)))


def keep_from_gates(unit_map: UnitMap, gates: dict[str, Any], threshold: float = 0.0) -> dict[str, np.ndarray]:
  """Keep-masks from per-group gates ``z`` (e.g. L0 gates): a unit stays while ``z > threshold``."""
  return {name: np.asarray(z) > threshold for name, z in gates.items()}
