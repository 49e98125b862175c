"""Winning tickets: the support of Γ at an epoch of a run, retrained with its weights masked."""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any, Optional

import jax
import numpy as np

from dessilbi_jax import checkpoint
from dessilbi_jax import grouping
from dessilbi_jax import models
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


def retrain_ticket(run_dir, epoch: int, *, init: str = 'rewind', epochs: Optional[int] = None,
                   lr: Optional[float] = None, out_dir=None, resume: bool = False,
                   quiet: bool = False) -> dict[str, Any]:
  """Retrains the support of Γ after ``epoch`` of a run with SGD-momentum (a winning ticket).

  The weights outside the support are zero and stay exactly zero. ``init``:
  ``'rewind'`` starts from the run's own initialization, ``'reinit'`` from a
  fresh one (seed + 1). ``epochs`` and ``lr`` default to the run's. Writes
  ``metrics.jsonl``, ``ticket.json`` and plots into ``out_dir`` (default
  ``run_dir/ticket-epoch<E>-<init>``).

  Returns:
    A dict with ``test_acc``, ``params_kept``, ``params``, ``flops`` and
    ``dense_flops`` (multiply-accumulates of one forward pass), and more.
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
  result = fit(cfg, out_dir, resume=resume, masks=masks, init_params=init_params, quiet=quiet)

  pruned = sum(int(np.size(m) - np.count_nonzero(m)) for m in jax.tree.leaves(masks))
  total = models.count_params(result.params)
  report = dict(
      run=str(run_dir), out=str(out_dir), epoch=epoch, init=init, epochs=cfg.epochs,
      test_acc=result.history[-1]['dense_test_acc'],
      run_dense_test_acc=run_rows[-1].get('dense_test_acc') if run_rows else None,
      run_sparse_test_acc=run_rows[-1].get('sparse_test_acc') if run_rows else None,
      params=total, params_kept=total - pruned,
      flops=models.count_flops(model, info.input_shape, params=result.params),
      dense_flops=models.count_flops(model, info.input_shape))
  if jax.process_index() == 0:
    (out_dir / 'ticket.json').write_text(json.dumps(report, indent=2) + '\n')
  return report
