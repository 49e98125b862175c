"""Keep-masks of unit groups from anything that marks weights: Γ's support, a ticket, GMP, gates.

A unit is kept while

* some producer kernel of its group keeps a weight of it (a filter in Γ's
  support; a dense neuron with any of its fan-in in the lasso support) - for a
  residual stream, the union over every tensor summed into it; and
* every consumer kernel that carries a mask does not drop all its weights
  (a unit whose outputs nobody reads is gone too).

Kernels without a mask (``None``: no structure variable) say nothing. Masks
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

  A unit is kept when a producer weight of it is marked and every consumer
  reads it through a marked weight; ``producers_only`` asks the first alone
  (growth's support rate: the filters with Γ_f ≠ 0).
  """
  masks = surgery._paths(weight_masks)  # pylint: disable=protected-access
  keep = {}
  for group in unit_map.prunable():
    produced, read = None, np.ones(group.size, bool)
    for s in group.slices:
      mask = masks.get(s.path)
      if s.collection != 'params' or mask is None or s.role not in ('producer', 'consumer'):
        continue
      if producers_only and s.role != 'producer':
        continue
      marked = np.zeros(group.size, bool)
      marked[s.offset:s.offset + s.size] = _units_marked(mask, s)
      if s.role == 'producer':
        produced = marked if produced is None else produced | marked
      else:
        # A consumer that reads only part of the group (option-A stages) says nothing of the rest.
        outside = np.ones(group.size, bool)
        outside[s.offset:s.offset + s.size] = False
        read &= marked | outside
    keep[group.name] = (np.ones(group.size, bool) if produced is None else produced) & read
  return keep


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
