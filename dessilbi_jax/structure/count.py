"""Parameters and multiply-accumulates of the network a unit map and keep-masks describe.

Counted from the map alone, without rebuilding anything: a params leaf keeps,
along each axis a group cuts, that group's kept channels (times ``repeat``
after a flatten); the biases and norms of a layer whose inputs are all gone
go with it. MACs are, per kernel, its output positions (recorded by the
trace) times its kept entries: what ``models.count_flops`` counts on the
removed network.

Example::

  >>> import jax, jax.numpy as jnp, numpy as np
  >>> from dessilbi_jax import models, structure
  >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
  >>> x = jnp.ones((1, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> unit_map = structure.trace(model, variables, x)
  >>> structure.count(unit_map, variables, {'Dense_0': np.array([True, False, True])})
  (40, 28)
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from dessilbi_jax.structure import surgery
from dessilbi_jax.structure.unit_map import UnitMap


def count(unit_map: UnitMap, variables, keep: Optional[surgery.Keep] = None, *, cut_streams: bool = True,
          round_to: int = 1) -> tuple[int, int]:
  """``(params, MACs)`` of one example through the network :func:`surgery.remove` would give."""
  resolved = surgery.resolve_keep(unit_map, keep or {}, cut_streams=cut_streams, round_to=round_to)
  dead = surgery._dead_layers(unit_map, resolved)  # pylint: disable=protected-access
  plan = surgery._leaf_plan(unit_map, surgery._sources_of(unit_map, resolved))  # pylint: disable=protected-access
  sizes = {}
  for path, leaf in surgery._paths(variables.get('params', {})).items():  # pylint: disable=protected-access
    shape = list(np.shape(leaf))
    for axis, (index, s) in plan.get(('params', path), {}).items():
      shape[axis] = 0 if (s.role in ('bias', 'norm') and s.layer in dead) else len(index)
    sizes[path] = math.prod(shape)
  macs = sum(positions * sizes[tuple(path) + ('kernel',)] if tuple(path)[-1:] != ('kernel',) else
             positions * sizes[tuple(path)] for path, positions in unit_map.positions)
  return int(sum(sizes.values())), int(macs)
