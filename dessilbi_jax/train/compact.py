"""The compact network of a training run: its metrics each epoch, and ``dessilbi compact``.

* :func:`compact_keep` is the keep-mask a run's state implies: Γ's support for
  DessiLBI, the non-zero weights otherwise (GMP, the group lasso, a ticket)
  (:mod:`~dessilbi_jax.train.compact_report`);
* :func:`compact` is :func:`~dessilbi_jax.structure.remove` with that keep-mask;
* :func:`~dessilbi_jax.train.compact_report.compact_extension` reports
  ``compact_test_acc``, ``compact_params`` and ``compact_macs`` every epoch of :func:`dessilbi_jax.train.fit` (a default extension of
  the optimizers with a keep-mask);
* :func:`compact_run` reads a run directory's checkpoint and writes the
  compact model (``dessilbi compact --run DIR [--epoch E] --out DIR2``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import data
from dessilbi_jax import models
from dessilbi_jax.structure import export
from dessilbi_jax.structure import surgery
from dessilbi_jax.structure.trace import trace
from dessilbi_jax.structure.unit_map import UnitMap
from dessilbi_jax.train import checkpoint
from dessilbi_jax.train import steps
from dessilbi_jax.train.compact_report import compact_keep
from dessilbi_jax.train.optimizers import make_optimizer
from dessilbi_jax.train.run_dir import load_config


def compact(model, variables, opt_state, input_shape, *, unit_map: Optional[UnitMap] = None):
  """``(model, variables, unit_map)`` of the compact network of this state.

  :func:`~dessilbi_jax.structure.remove` with the keep-mask of :func:`compact_keep`:
  removing dead units has that one verb; this only says which units a run's state calls dead.
  """
  variables = dict(variables)
  if not variables.get('batch_stats'):
    variables.pop('batch_stats', None)
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  unit_map = unit_map or trace(model, jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype),
                                                   variables), x)
  keep = compact_keep(unit_map, variables['params'], opt_state)
  small, small_vars, _ = surgery.remove(model, variables, unit_map, keep)
  return small, small_vars, unit_map


def compact_run(run_dir, epoch: Optional[int], out_dir, *, evaluate: bool = True) -> dict[str, Any]:
  """Writes the compact network of ``run_dir``'s checkpoint of ``epoch`` (default: latest) to ``out_dir``.

  Returns (and writes to ``out_dir/compact.json``) the run, epoch, the compact
  network's params, MACs and test accuracy, and the dense network's params and MACs.
  """
  run_dir = pathlib.Path(run_dir)
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f'--out {out_dir} exists and is not empty; pass a new directory (nothing is overwritten).')
  cfg = load_config(run_dir)
  saved = checkpoint.saved_epochs(run_dir / 'checkpoints')
  if not saved:
    raise FileNotFoundError(f'--run {run_dir} holds no checkpoint ({run_dir / "checkpoints"} is missing or empty): '
                            'the run stopped before its first epoch ended, or its checkpoints were removed.')
  if epoch is not None and epoch not in saved:
    raise ValueError(f'--epoch {epoch}: {run_dir} keeps the checkpoints of epochs {saved} only.')
  record = checkpoint.read_record(run_dir / 'checkpoints', saved[-1] if epoch is None else epoch)
  model, info = steps.build_model(steps.recorded_config(cfg, record))
  steps_per_epoch = data.steps_per_epoch(cfg.dataset, cfg.batch_size)
  tx = make_optimizer(cfg, steps_per_epoch)
  variables = steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))
  target = steps.TrainState(step=jnp.zeros([], jnp.int32), params=variables['params'],
                            batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(variables['params']),
                            rng=jax.random.PRNGKey(0))
  state, record = checkpoint.restore(run_dir / 'checkpoints', target, epoch=epoch)
  dense = {'params': state.params, **({'batch_stats': state.batch_stats} if state.batch_stats else {})}
  small, small_vars, _ = compact(model, dense, state.opt_state, info.input_shape)
  description = export.save_compact(out_dir, small, small_vars, input_shape=info.input_shape)
  report = dict(run=str(run_dir), epoch=int(record.get('epoch', -1)), out=str(out_dir), model=cfg.model,
                compact_params=description['params'], compact_macs=description['macs'],
                dense_params=models.count_params(state.params),
                dense_macs=models.count_flops(model, tuple(info.input_shape)),
                widths=description['kwargs'])
  if evaluate:
    report['compact_test_acc'] = steps.evaluate(small, small_vars, cfg.dataset, data_dir=cfg.data_dir)
  (out_dir / 'compact.json').write_text(json.dumps(report, indent=2) + '\n')
  return report
