r"""L0 gates on the units of any Flax model, through its unit map.

One hard-concrete gate (:mod:`dessilbi_jax.l0`) per unit of a gated group of the
unit map (:mod:`dessilbi_jax.structure`): an output channel of a conv, a hidden
neuron of a dense layer. The unit map's ``gate`` applies it without rewriting
the model: a conv followed by BatchNorm has the BN's scale and bias scaled by
``z`` (exactly ``z·BN(x)``, so a shut channel emits 0), a layer without one its
kernel and bias. The gates are ``{group name: log_α of shape (units,)}``.

* :func:`gated_groups`: which groups carry gates (by default every prunable
  group outside the residual streams: not the inputs, not the classifier's
  logits, not the shortcut-tied stream channels);
* :func:`group_sizes`: ``|g|``, the producer kernel entries one unit owns, for
  the expected density;
* :func:`init_unit_gates`: ``log_α`` from ``droprate_init`` and the paper's
  weight rescaling by ``1/(1 − p₀)``;
* :func:`apply_gates`: the network with sampled (training) or median (test) gates;
* :func:`purge`: the plain, smaller network: median gates folded into the
  weights, shut units removed;
* :func:`summary`: expected density, purged params and purged MACs, reported
  separately (they differ).

Example::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax import l0, models, structure
  >>> from dessilbi_jax.l0 import unit_gates
  >>> model = models.get_model('mlp', 10, (4,), widths=(3,))
  >>> x = jnp.ones((2, 4))
  >>> variables = model.init(jax.random.key(0), x)
  >>> unit_map = structure.trace(model, variables, x)
  >>> names = unit_gates.gated_groups(unit_map)
  >>> names, unit_gates.group_sizes(variables, unit_map, names)
  (('Dense_0',), {'Dense_0': 4})
  >>> variables, log_alphas = unit_gates.init_unit_gates(jax.random.key(1), variables, unit_map, names, 0.5)
  >>> log_alphas = {'Dense_0': jnp.array([5.0, -5.0, 5.0])}     # the middle neuron shut
  >>> small_model, small_vars = unit_gates.purge(model, variables, unit_map, log_alphas)
  >>> small_model.widths
  (2,)
  >>> gated = model.apply(unit_gates.apply_gates(variables, unit_map, log_alphas), x)
  >>> bool(jnp.allclose(small_model.apply(small_vars, x), gated, rtol=1e-5))
  True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import l0
from dessilbi_jax import structure


def gated_groups(unit_map: structure.UnitMap, *, exclude: Sequence[str] = (),
                 streams: bool = False) -> tuple[str, ...]:
  """The names of the groups that carry gates.

  Args:
    unit_map: the model's map.
    exclude: group names not to gate (e.g. a ResNet's first conv, as the seed
      paper does); each must be a gateable group.
    streams: also gate residual streams (channels tied across blocks and
      shortcuts); the seed paper does not.
  """
  candidates = [g for g in unit_map.prunable() if streams or not g.is_stream]
  names = tuple(g.name for g in candidates)
  unknown = sorted(set(exclude) - set(names))
  if unknown:
    raise ValueError(f'`exclude` names {unknown}, which are not gateable groups; those are {list(names)}.')
  chosen = tuple(n for n in names if n not in exclude)
  if not chosen:
    raise ValueError(f'This model has no unit group to gate (its groups: {list(unit_map.names)}; '
                     'inputs, logits and, unless streams=True, residual streams are never gated).')
  return chosen


def group_sizes(variables: Any, unit_map: structure.UnitMap, names: Sequence[str]) -> dict[str, Any]:
  """``|g|`` per unit of each gated group: the producer kernel entries it owns.

  An int where every unit of the group owns as many (one producer), else an
  array of the group's size (a stream's units, summed over the producers that
  write them).
  """
  leaves = {tuple(str(getattr(k, 'key', k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(variables['params'])[0]}
  sizes = {}
  for name in names:
    group = unit_map[name]
    per_unit = np.zeros(group.size, np.int64)
    for s in group.producers:
      shape = np.shape(leaves[s.path])
      per_unit[s.offset:s.offset + s.size] += math.prod(shape) // shape[s.axis]
    sizes[name] = int(per_unit[0]) if np.all(per_unit == per_unit[0]) else per_unit
  return sizes


def init_unit_gates(key: jax.Array, variables: Any, unit_map: structure.UnitMap, names: Sequence[str],
                    droprate_init: float) -> tuple[Any, dict[str, jax.Array]]:
  """``(variables, log_alphas)``: the gated groups' outputs scaled by ``1/(1 − p₀)``, ``log_α`` from ``p₀``.

  The rescaling is the paper's (weights divided by ``1 − p₀``); after a
  BatchNorm, which would undo a kernel scaling, it goes to the BN's scale and
  bias, the same place as the gates.
  """
  keys = jax.random.split(key, len(names))
  log_alphas = {name: l0.init_log_alpha(k, (unit_map[name].size,), droprate_init) for name, k in zip(names, keys)}
  scale = l0.init_weight_scale(droprate_init)
  rescaled = structure.gate(variables, unit_map, {n: jnp.full((unit_map[n].size,), scale) for n in names})
  return rescaled, log_alphas


def apply_gates(variables: Any, unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array],
                key: Optional[jax.Array] = None) -> Any:
  """``variables`` with every gated group's output times its gates.

  With ``key``: one hard-concrete sample per unit (training, one per step);
  without: the median gates ``ẑ`` (test time).
  """
  z = (l0.sample_gates_tree(key, dict(log_alphas)) if key is not None
       else jax.tree.map(l0.median_gates, dict(log_alphas)))
  return structure.gate(variables, unit_map, z)


def _keep(unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
  """The units whose median gate is open (``ẑ > 0``)."""
  return structure.keep_from_gates(unit_map, {n: l0.median_gates(a) for n, a in log_alphas.items()})


def purge(model, variables: Any, unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array]):
  """The trained gated network as a plain smaller one: ``(model, variables)``.

  The median gates are folded into the weights (:func:`apply_gates`, exact for
  fractional ``ẑ``), then the units with ``ẑ = 0`` are removed by the unit
  map's surgery, which also drops the next layer's input slices. Its logits
  equal the gated network's at test time.
  """
  folded = apply_gates(variables, unit_map, log_alphas)
  new_model, new_variables, _ = structure.remove(model, folded, unit_map, _keep(unit_map, log_alphas))
  return new_model, new_variables


def summary(variables: Any, unit_map: structure.UnitMap, log_alphas: Mapping[str, jax.Array]) -> dict[str, float]:
  """The three sizes of a gated network, each a fraction of the ungated one's.

  * ``expected_density``: the model-wise expected L0 density of the gated
    groups (:func:`dessilbi_jax.l0.model_density`, producer kernels only);
  * ``purged_params`` and ``purged_macs``: params and multiply-accumulates of
    the network :func:`purge` gives (all layers), by the unit map's count.

  They differ: a removed unit also takes the next layer's input slices with it,
  and ungated layers count in the totals.
  """
  names = tuple(log_alphas)
  density = l0.model_density(dict(log_alphas), group_sizes(variables, unit_map, names))
  params, macs = structure.count(unit_map, variables, _keep(unit_map, log_alphas))
  full_params, full_macs = structure.count(unit_map, variables)
  return {'expected_density': float(density), 'purged_params': params / full_params,
          'purged_macs': macs / full_macs}
