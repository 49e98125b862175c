"""Winning tickets: the support of Γ at an epoch of a run, retrained with its weights masked."""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax.train import checkpoint
from dessilbi_jax.core import grouping
from dessilbi_jax import models
from dessilbi_jax import structure
from dessilbi_jax.structure import masks as structure_masks
from dessilbi_jax.train import run_dir as files
from dessilbi_jax.train import steps
from dessilbi_jax.train.config import INITS
from dessilbi_jax.train.config import check_config
from dessilbi_jax.train.loop import fit


def ticket_masks(run_dir, epoch: int, params) -> Any:
  """Masks (bool pytree like ``params``) of Γ's support after ``epoch`` of the run.

  Leaves without structure get ``None`` (kept whole).
  """
  path = files.load_path(run_dir)
  epochs = [int(e) for e in path['epoch']]
  if epoch not in epochs:
    raise ValueError(f'The run in {run_dir} has no epoch {epoch}; it recorded epochs '
                     f'{epochs[0]}..{epochs[-1]}. Pick --epoch among them.' if epochs else
                     f'The run in {run_dir} recorded no epoch yet.')
  row = epochs.index(epoch)

  def mask(keypath, w):
    key = f'support/{grouping.path_str(keypath)}'
    return None if key not in path else np.broadcast_to(path[key][row], np.shape(w)).copy()

  return jax.tree_util.tree_map_with_path(mask, params)


def suggest_epoch(history, within: float = 0.01) -> Optional[int]:
  """The earliest epoch whose sparse accuracy is within ``within`` of the last epoch's (``None``: no Γ).

  Example::

    >>> from dessilbi_jax import train
    >>> rows = [{'epoch': 1, 'sparse_test_acc': 0.5}, {'epoch': 2, 'sparse_test_acc': 0.975},
    ...         {'epoch': 3, 'sparse_test_acc': 0.98}]
    >>> train.suggest_epoch(rows)
    2
  """
  final = history[-1].get('sparse_test_acc') if history else None
  if final is None:
    return None
  return next(h['epoch'] for h in history if h.get('sparse_test_acc') is not None
              and h['sparse_test_acc'] >= final - within)


def compact_ticket(model, variables, masks, init_params, input_shape):
  """The removed network of a ticket: ``(model, masks, init_params)`` with the dead units cut out.

  A unit is dead when the masks keep none of its producer weights or no
  consumer reads it; the ticket's remaining weight masks (single dense
  weights) are sliced along, so that the removed network trains exactly the
  weights the masked full-size one trains.
  """
  unit_map = structure.trace(model, variables, jnp.zeros((1, *input_shape)))
  keep = structure_masks.keep_from_weights(unit_map, masks)
  mask_vars = {'params': steps.full_masks(masks, variables['params']),
               **({'batch_stats': jax.tree.map(np.ones_like, variables['batch_stats'])}
                  if variables.get('batch_stats') else {})}
  small, small_masks, _ = structure.remove(model, jax.tree.map(lambda m: np.asarray(m, np.float32), mask_vars),
                                           unit_map, keep)
  small_init = None
  if init_params is not None:
    init_vars = dict(variables, params=init_params)
    small_init = structure.remove(model, init_vars, unit_map, keep)[1]['params']
  return small, jax.tree.map(lambda m: np.asarray(m) > 0, small_masks['params']), small_init


def retrain_ticket(run_dir, epoch: int, *, init: str = 'rewind', epochs: Optional[int] = None,
                   lr: Optional[float] = None, out_dir=None, resume: bool = False,
                   quiet: bool = False, compact: bool = True) -> dict[str, Any]:
  """Retrains the support of Γ after ``epoch`` of a run with SGD-momentum (a winning ticket).

  The weights outside the support are zero and stay exactly zero. With
  ``compact`` (the default) the units the support leaves dead are removed
  first (:func:`compact_ticket`), so a smaller, faster network trains the same
  weights (the ticket's config holds its widths and, for a ResNet, its
  per-layer widths); ``compact=False`` retrains the masked full-size
  network. ``init``: ``'rewind'`` starts from the run's own initialization,
  ``'reinit'`` from a fresh one (seed + 1). ``epochs`` and ``lr`` default to the run's. Writes
  ``metrics.jsonl``, ``ticket.json`` and plots into ``out_dir`` (default
  ``run_dir/ticket-epoch<E>-<init>``).

  Returns:
    A dict with ``test_acc``, ``params_kept`` (the weights trained),
    ``params`` and ``dense_flops`` (the run's network), ``trained_params``,
    ``trained_macs`` and ``flops`` (the network trained: its size, the
    multiply-accumulates of one forward pass through it and through its
    non-zero weights), its ``widths`` and ``model_kwargs``
    (:func:`dessilbi_jax.models.model_kwargs`) and more.
  """
  run_dir = files.local_path(run_dir, '--run')
  if init not in INITS:
    raise ValueError(f'Unknown --init {init!r}; choose one of {INITS}.')
  for flag, value in (('--epochs', epochs), ('--lr', lr)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                              or not np.isfinite(value) or value <= 0):
      raise ValueError(f'{flag} must be a positive number (or left out for the run\'s), got {value}.')
  if epochs is not None and int(epochs) != epochs:
    raise ValueError(f'--epochs must be a whole number of epochs, got {epochs}.')
  run_cfg = files.load_config(run_dir)
  cfg = dataclasses.replace(run_cfg, optimizer='sgd', epochs=run_cfg.epochs if epochs is None else int(epochs),
                            lr=run_cfg.lr if lr is None else lr, seed=run_cfg.seed + (init == 'reinit'))
  check_config(cfg)
  model, info = steps.build_model(cfg)
  template = steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))['params']
  masks = ticket_masks(run_dir, epoch, template)
  # Read (and check) what the report needs from the run before the retraining, not after.
  run_rows = [h for h in files.read_history(run_dir) if h['epoch'] == epoch]
  init_params = checkpoint.load_tree(run_dir / 'init_params', template) if init == 'rewind' else None
  out_dir = files.local_path(out_dir) if out_dir else run_dir / f'ticket-epoch{epoch}-{init}'
  dense_model, dense_params = model, template
  if compact:
    variables = steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))
    model, masks, init_params = compact_ticket(model, variables, masks, init_params, info.input_shape)
    cfg = dataclasses.replace(cfg, **steps.model_fields(model))
    check_config(cfg)
  result = fit(cfg, out_dir, resume=resume, masks=masks, init_params=init_params, quiet=quiet)

  full = steps.full_masks(masks, result.params)
  report = dict(
      run=str(run_dir), out=str(out_dir), epoch=epoch, init=init, epochs=cfg.epochs,
      test_acc=result.history[-1]['dense_test_acc'],
      run_dense_test_acc=run_rows[-1].get('dense_test_acc') if run_rows else None,
      run_sparse_test_acc=run_rows[-1].get('sparse_test_acc') if run_rows else None,
      params=models.count_params(dense_params), params_kept=int(sum(np.count_nonzero(m) for m in jax.tree.leaves(full))),
      trained_params=models.count_params(result.params), compact=compact,
      widths=list(model.widths), model_kwargs=models.model_kwargs(model),
      trained_macs=models.count_flops(model, info.input_shape),
      flops=models.count_flops(model, info.input_shape, params=result.params),
      dense_flops=models.count_flops(dense_model, info.input_shape))
  if jax.process_index() == 0:
    (out_dir / 'ticket.json').write_text(json.dumps(report, indent=2) + '\n')
    files.write_run_plots(out_dir, ticket=True)
  return report
