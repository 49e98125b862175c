"""The compact network's metrics every epoch: the trainer extension of every optimizer with a keep-mask.

:func:`compact_extension` adds ``compact_test_acc``, ``compact_params`` and
``compact_macs`` to each epoch's row: the network
:func:`~dessilbi_jax.structure.remove` would give now. The accuracy is that of
the whole-unit-masked network (:func:`~dessilbi_jax.structure.zero`), which
computes what the removed one computes, so the step compiled for the full
network serves and nothing is rebuilt per epoch. The keep-mask is
:func:`compact_keep`'s: Γ's support for DessiLBI, the non-zero weights
otherwise (GMP, the group lasso, a ticket). ``dessilbi compact`` writes that
network (:mod:`dessilbi_jax.train.compact`).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import data
from dessilbi_jax.core import path as dl_path
from dessilbi_jax.structure import masks
from dessilbi_jax.structure import surgery
from dessilbi_jax.structure.count import count
from dessilbi_jax.structure.trace import UntraceableError
from dessilbi_jax.structure.trace import trace
from dessilbi_jax.structure.unit_map import UnitMap
from dessilbi_jax.train.extensions import Extension

NAME = 'compact'


def compact_keep(unit_map: UnitMap, params, opt_state) -> dict[str, np.ndarray]:
  """Γ's support if ``opt_state`` holds a DessiLBI state, else the non-zero weights of ``params``."""
  if opt_state is not None and dl_path.find_states(opt_state):
    return masks.keep_from_support(unit_map, opt_state)
  return masks.keep_from_weights(unit_map, jax.tree.map(lambda w: np.asarray(w) != 0, jax.device_get(params)))


def compact_extension(cfg=None) -> Extension:
  """The trainer extension that adds ``compact_test_acc``, ``compact_params``, ``compact_macs`` to every epoch.

  ``None`` entries where the model's unit map cannot be traced (a user's model
  with an op :func:`~dessilbi_jax.structure.trace` cannot follow). ``cfg`` is
  not needed (the registry's factories take the run's config).
  """
  del cfg
  maps: dict[Any, Optional[UnitMap]] = {}

  def metrics(epoch) -> dict[str, Any]:
    state = epoch.state
    variables = {'params': state.params, **({'batch_stats': state.batch_stats} if state.batch_stats else {})}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), variables)
    key = (id(epoch.model), str(jax.tree.structure(shapes)), tuple(np.shape(a) for a in jax.tree.leaves(shapes)))
    if key not in maps:
      x = jax.ShapeDtypeStruct((1, *data.dataset_info(epoch.cfg.dataset).input_shape), jnp.float32)
      try:
        maps[key] = trace(epoch.model, shapes, x)
      except (UntraceableError, ValueError):
        maps[key] = None
    unit_map = maps[key]
    if unit_map is None:
      return dict(compact_test_acc=None, compact_params=None, compact_macs=None)
    keep = compact_keep(unit_map, state.params, state.opt_state)
    with warnings.catch_warnings():   # early in a run most layers would lose every unit (each keeps one): no warning per epoch
      warnings.simplefilter('ignore', UserWarning)
      params, macs = count(unit_map, variables, keep)
      masked = surgery.zero(variables, unit_map, keep)
    return dict(compact_test_acc=epoch.evaluate(epoch.model, masked), compact_params=params, compact_macs=macs)

  def summary(row) -> Optional[str]:
    if row.get('compact_test_acc') is None:
      return None
    return (f'compact {100 * row["compact_test_acc"]:.1f}% ({row["compact_params"]:,} params, '
            f'{row["compact_macs"]:,} MACs)')

  return Extension(NAME, metrics=metrics, summary=summary)
