"""Growth inside the training loop: an extension of :func:`dessilbi_jax.train.fit`.

At every check (epochs ``k·grow_every`` while growth is on) the extension
reads each growable layer's support rate off Γ (the fraction of its units
with a weight in Γ's support), applies the rule (:func:`next_widths`) and,
where a layer passes, widens the network in place with the unit map's
:func:`~dessilbi_jax.structure.widen`: new filters fresh, their fan-out zero
(the function is unchanged), the new units' optimizer state zero (entry step
−1), everything else kept to the bit. The loop then rebuilds the model from
the new widths and compiles the step once more; the widths go into every
checkpoint, so resuming across a growth round is exact.

Growth runs during the first ``epochs − finetune_epochs`` epochs of the run
and stops for good at the first check where no layer passes; the last
``finetune_epochs`` epochs fine-tune the final widths (the run's learning-rate
decay falls there). ``reset_state=True`` is the official code's behaviour, for
comparison: after every growth the optimizer state restarts from zero, the
new units' fan-out into the next layer is random and the batch statistics
restart, so growth changes the function.

With a budget (``GrowthSettings.target_macs``) the rule counts the network of
the widths it proposes (:func:`dessilbi_jax.models.count_flops` of the widened
model, traced with ``jax.eval_shape``: nothing is allocated) and stops before
a round past the budget.

Every epoch's row of ``metrics.jsonl`` gains ``widths`` (per growable layer),
``support_rate`` (at checks), ``grown`` (the layers widened at this epoch,
with their new widths), ``growth`` (``'growing'``, ``'stopped'`` or
``'finetune'``), ``over_budget`` (at the check whose round the budget
refused: that round's MACs), ``macs`` (forward MACs of one example at the
epoch's widths) and ``train_macs``, the training compute so far
(:func:`training_macs`, summed over the epochs). The wall time of an epoch is
the row's ``seconds``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import data
from dessilbi_jax import models
from dessilbi_jax import structure
from dessilbi_jax.structure import masks
from dessilbi_jax.growth.rule import GrowthSettings, Layer, next_widths
from dessilbi_jax.train import extensions as ext
from dessilbi_jax.train import steps

NAME = 'growth'

# Forward and backward of one training example: the backward pass costs two forward passes (the gradients
# of the activations and of the weights), the standard count (Kaplan et al. 2020, Hoffmann et al. 2022).
MACS_PER_FORWARD = 3


def training_macs(forward_macs: int, examples: int) -> int:
  """Multiply-accumulates of training on ``examples`` examples: ``3 · forward_macs · examples``.

  Forward and backward, with the standard count backward ≈ 2 × forward;
  optimizer updates, normalization and activations are left out.

  Example::

    >>> from dessilbi_jax.growth import training_macs
    >>> training_macs(10_360, 1_000)   # LeNet-5 at widths 2 6 40 28 on 1,000 digits
    31080000
  """
  return MACS_PER_FORWARD * int(forward_macs) * int(examples)


def growable_layers(unit_map: structure.UnitMap, params) -> dict[str, str]:
  """``{group name: kind}`` of the groups growth may widen, ``kind`` as :data:`~dessilbi_jax.growth.rule.KINDS`.

  A residual block's internal width is ``'block'``; a plain layer's units are
  ``'conv'`` or ``'dense'`` by the rank of its kernel. Residual streams
  (channels tied by additions), the network's inputs and its logits are not grown.
  """
  ranks = {tuple(str(getattr(k, 'key', k)) for k in kp): np.ndim(w)
           for kp, w in jax.tree_util.tree_flatten_with_path(params)[0]}
  layers = {}
  for group in unit_map.groups:
    if not group.prunable or group.is_stream or not group.producers:
      continue
    if group.block is not None:
      layers[group.name] = 'block'
    else:
      layers[group.name] = 'dense' if ranks[group.producers[0].path] == 2 else 'conv'
  return layers


def support_rates(unit_map: structure.UnitMap, opt_state, names) -> dict[str, float]:
  """Per named group, the fraction of its units with a producer weight in Γ's support."""
  keep = masks.keep_from_support(unit_map, opt_state, producers_only=True)
  for name in names:
    if not any(unit_map[name].producers):
      raise ValueError(f'growth: layer {name!r} has no producer kernel, so its support rate is unknown.')
  return {name: float(np.mean(keep[name])) if unit_map[name].size else 0.0 for name in names}


def growth_extension(settings: GrowthSettings, *, reset_state: bool = False, echo: bool = True,
                     settings_file=None) -> ext.Extension:
  """The :class:`~dessilbi_jax.train.Extension` that grows the network (module docstring).

  Args:
    settings: the rule's settings.
    reset_state: the official code's behaviour (module docstring), for comparison.
    echo: print a line per growth round (the widths that changed, params and MACs).
    settings_file: where process 0 writes the settings after the first epoch
      (``growth.json`` of the run directory), so that a resumed run grows the same way.
  """

  def decide(epoch: ext.Epoch) -> dict[str, Any]:
    cfg = epoch.cfg
    unit_map = _unit_map(epoch.model, epoch.state, cfg)
    kinds = growable_layers(unit_map, epoch.state.params)
    widths = {name: unit_map[name].size for name in kinds}
    input_shape = unit_map.input_shape
    forward = models.count_flops(epoch.model, input_shape)
    before = epoch.history[-1].get('train_macs', 0) if epoch.history else 0
    row: dict[str, Any] = {'widths': widths, 'grown': {}, 'macs': forward,
                           'train_macs': before + training_macs(forward, epoch.steps_per_epoch * cfg.batch_size)}
    stopped = any(r.get('growth') == 'stopped' for r in epoch.history)
    growing_until = cfg.epochs - settings.finetune_epochs
    if epoch.epoch > growing_until:
      row['growth'] = 'finetune'
      return row
    if stopped:
      row['growth'] = 'stopped'
      return row
    row['growth'] = 'growing'
    if not settings.is_check(epoch.epoch):
      return row
    rates = support_rates(unit_map, epoch.state.opt_state, kinds)
    layers = {n: Layer(widths[n], rates[n], kinds[n]) for n in kinds}
    macs = lambda new: _widened_macs(epoch.model, epoch.state, unit_map, widths, new)
    new = next_widths(layers, settings, macs)
    if settings.target_macs is not None:
      proposed = next_widths(layers, dataclasses.replace(settings, target_macs=None))
      if proposed != new:
        row['over_budget'] = macs(proposed)
    row['support_rate'] = rates
    row['grown'] = {n: w for n, w in new.items() if w != widths[n]}
    if not row['grown']:
      row['growth'] = 'stopped'
    return row

  def epoch_end(epoch: ext.Epoch) -> Optional[ext.Reshaped]:
    if settings_file is not None and jax.process_index() == 0 and not settings_file.exists():
      tmp = settings_file.with_name(settings_file.name + '.tmp')
      tmp.write_text(json.dumps({'settings': dataclasses.asdict(settings), 'reset_state': reset_state},
                                indent=2) + '\n')
      os.replace(tmp, settings_file)
    grown = epoch.row.get('grown') or {}
    if not grown:
      return None
    state = epoch.state
    unit_map = _unit_map(epoch.model, state, epoch.cfg)
    variables = steps.variables(state.params, state.batch_stats)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, 0x67726f77), epoch.epoch)   # 'grow'
    new_units = {name: width - unit_map[name].size for name, width in grown.items()}
    model, new_vars, opt_state = structure.widen(epoch.model, variables, unit_map, new_units, key,
                                                 None if reset_state else state.opt_state,
                                                 **({'fan_out': 'fresh'} if reset_state else {}))
    if reset_state:
      fresh = model.init(key, jnp.zeros((1, *unit_map.input_shape)), train=False)
      new_vars = dict(new_vars)
      if 'batch_stats' in fresh:
        new_vars['batch_stats'] = fresh['batch_stats']
      opt_state = epoch.tx.init(new_vars['params'])
    new_state = state._replace(params=new_vars['params'], batch_stats=new_vars.get('batch_stats', {}),
                               opt_state=opt_state)
    if echo:
      params, macs = structure.count(unit_map, variables)
      new_map = _unit_map(model, new_state, epoch.cfg)
      new_params, new_macs = structure.count(new_map, new_vars)
      changed = ', '.join(f'{name} {unit_map[name].size}→{width}' for name, width in grown.items())
      print(f'growth after epoch {epoch.epoch}: {changed}; params {params:,} → {new_params:,}, '
            f'MACs {macs:,} → {new_macs:,}', flush=True)
    return ext.Reshaped(state=jax.device_get(new_state), **steps.model_fields(model))

  return ext.Extension(NAME, metrics=decide, epoch_end=epoch_end)


def _widened_macs(model, state, unit_map, widths, new) -> int:
  """Forward MACs of ``model`` widened from ``widths`` to ``new`` (shapes only: ``jax.eval_shape``)."""
  built = {}

  def widened(variables, key):
    built['model'], wide, _ = structure.widen(model, variables, unit_map,
                                              {n: new[n] - widths[n] for n in new if new[n] != widths[n]}, key)
    return wide

  jax.eval_shape(widened, steps.variables(state.params, state.batch_stats), jax.random.key(0))
  return models.count_flops(built['model'], unit_map.input_shape)


_MAPS: dict = {}


def _unit_map(model, state, cfg) -> structure.UnitMap:
  """The model's unit map, traced once per model (its variables' shapes follow from its widths)."""
  key = (model, cfg.dataset)
  if key not in _MAPS:
    info = data.dataset_info(cfg.dataset)
    variables = steps.variables(state.params, state.batch_stats)
    _MAPS[key] = structure.trace(model, variables, jax.ShapeDtypeStruct((1, *info.input_shape), jnp.float32))
  return _MAPS[key]
