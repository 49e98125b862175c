r"""L0 gates on the weights of a Flax model, one gate per group of the grouping rule.

A gate ``z_g`` multiplies every weight of its group (:mod:`dessilbi_jax.core.grouping`):
``'input'`` gates one input neuron of a dense layer (a kernel row, the seed
paper's choice for dense layers), ``'neuron'`` one output unit, ``'filter'`` one
output filter of a conv *without* normalization after it, ``'lasso'`` one weight.
The gates are ``{leaf path: log_α}``, a flat dict of arrays of each leaf's
per-group shape, so that :mod:`dessilbi_jax.l0` measures their densities and
:func:`dessilbi_jax.l0.density_constraint` names them by path.

Gates on units (channels, neurons) through the unit map are
:mod:`dessilbi_jax.l0.unit_gates`: use those for a conv followed by BatchNorm
(whose scale and bias must carry the gate). These weight gates cover what the
unit map does not: the network's own input features (``'input'`` on the first
dense layer) and single weights (unstructured L0).

Example: the input neurons of an MLP's two dense layers::

  >>> import jax, jax.numpy as jnp
  >>> from dessilbi_jax import models
  >>> from dessilbi_jax.l0 import weight_gates
  >>> model = models.MLP(widths=(8,), num_classes=3)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 5)))['params']
  >>> kinds = weight_gates.resolve_gated(params, {'kernel': 'input'})
  >>> params, log_alphas = weight_gates.init_gates(jax.random.key(1), params, kinds, droprate_init=0.5)
  >>> {k: v.shape for k, v in log_alphas.items()}
  {'Dense_0/kernel': (5, 1), 'Dense_1/kernel': (8, 1)}
  >>> weight_gates.group_sizes(params, kinds)          # one row of 8, one row of 3
  {'Dense_0/kernel': 8, 'Dense_1/kernel': 3}
  >>> z = {k: jnp.zeros_like(v) for k, v in log_alphas.items()}
  >>> logits = model.apply({'params': weight_gates.gate_weights(params, z, kinds)}, jnp.ones((1, 5)))
  >>> bool(jnp.all(logits == params['Dense_1']['bias']))    # every gate shut
  True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dessilbi_jax.core import grouping
from dessilbi_jax import l0


def resolve_gated(params: Any, groups: grouping.GroupsRule) -> dict[str, str]:
  """``{leaf path: kind}`` of the gated leaves, ``groups`` as in :mod:`dessilbi_jax.core.grouping`.

  Unlike DessiLBI's default, nothing is gated unless ``groups`` says so:
  leaves it leaves to the default rule are not gated.
  """
  if groups is None:
    raise ValueError("Say which leaves carry gates, e.g. groups={'kernel': 'input'} for the "
                     'input neurons of every dense layer.')
  if isinstance(groups, dict) and all(isinstance(p, str) for p in groups):
    groups = {**groups, '.*': None}
  kinds = grouping.resolve_kinds(params, groups)
  paths = jax.tree_util.tree_flatten_with_path(kinds, is_leaf=lambda x: x is None)[0]
  gated = {grouping.path_str(p): k for p, k in paths if k is not None}
  if not gated:
    raise ValueError(f'`groups` gates no leaf of these params; their paths are '
                     f'{[grouping.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]}.')
  return gated


def _leaves(params: Any) -> dict[str, Any]:
  return {grouping.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def group_sizes(params: Any, kinds: dict[str, str]) -> dict[str, int]:
  """``|g|`` of every gated leaf: the weights one of its gates switches off."""
  leaves = _leaves(params)
  return {path: grouping.group_size(kind, jnp.shape(leaves[path])) for path, kind in kinds.items()}


def init_gates(key: jax.Array, params: Any, kinds: dict[str, str], droprate_init: float
               ) -> tuple[Any, dict[str, jax.Array]]:
  """The paper's init: ``log_α`` from ``droprate_init``, the gated weights divided by ``1 − p₀``.

  Returns ``(rescaled params, {leaf path: log_α})``.
  """
  leaves = _leaves(params)
  keys = dict(zip(kinds, jax.random.split(key, len(kinds))))
  log_alphas = {path: l0.init_log_alpha(keys[path], grouping.group_shape(kind, jnp.shape(leaves[path])),
                                        droprate_init)
                for path, kind in kinds.items()}
  scale = l0.init_weight_scale(droprate_init)
  rescaled = _map_gated(lambda path, x: x * jnp.asarray(scale, x.dtype), params, kinds)
  return rescaled, log_alphas


def gate_weights(params: Any, z: dict[str, jax.Array], kinds: dict[str, str]) -> Any:
  """Every gated leaf times its gates, broadcast over each group; other leaves unchanged."""
  if set(z) != set(kinds):
    raise ValueError(f'The gates name {sorted(z)} but the gated leaves are {sorted(kinds)}.')
  return _map_gated(lambda path, x: x * z[path].astype(x.dtype), params, kinds)


def _map_gated(fn, params, kinds):
  def visit(path, x):
    name = grouping.path_str(path)
    return fn(name, x) if name in kinds else x
  return jax.tree_util.tree_map_with_path(visit, params)
