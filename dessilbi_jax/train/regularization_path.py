"""The regularization path of a run: per epoch, which groups are in Γ's support, and their entry steps.

``path.npz`` holds ``epoch`` and ``step`` (one entry per recorded epoch),
``steps_per_epoch`` and, per structured leaf ``P``: ``support/P`` (bool, per
group, one row per epoch), ``entry_step/P`` (int, per group, ``-1``: never
entered) and ``kind/P``. When an extension changes a leaf's shape mid-run
(growth), earlier rows are padded with ``False`` (the groups did not exist).
"""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any

import jax
import numpy as np

import dessilbi_jax as dl
from dessilbi_jax.core import grouping


class DamagedFileError(ValueError):
  """A run file that cannot be read; the message names it and what to do."""


class RegularizationPath:
  """The per-epoch support of every structured leaf's groups, and entry steps."""

  def __init__(self):
    self.epochs: list[int] = []
    self.steps: list[int] = []
    self.support: dict[str, list[np.ndarray]] = {}
    self.entry_steps: dict[str, np.ndarray] = {}
    self.kinds: dict[str, str] = {}

  def append(self, epoch: int, step: int, params, opt_state) -> None:
    """Records the support of ``opt_state`` (a state holding DessiLBI's) after ``epoch``."""
    self.epochs.append(epoch)
    self.steps.append(step)
    flat = lambda tree: jax.tree.structure(params).flatten_up_to(tree)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (keypath, w), s, e in zip(leaves, flat(dl.support(opt_state)), flat(dl.entry_step(opt_state))):
      if s is None:
        continue
      name = grouping.path_str(keypath)
      kind = grouping.kind_of(np.shape(w), np.shape(e))
      per_group = np.any(np.asarray(s), axis=grouping.reduce_axes(kind, np.ndim(w)), keepdims=True)
      self.support.setdefault(name, []).append(per_group)
      self.entry_steps[name] = np.asarray(e)
      self.kinds[name] = kind

  def arrays(self, steps_per_epoch: int) -> dict[str, np.ndarray]:
    """The contents of ``path.npz``."""
    arrays = {'epoch': np.asarray(self.epochs, np.int64), 'step': np.asarray(self.steps, np.int64),
              'steps_per_epoch': np.asarray(steps_per_epoch)}
    for name, rows in self.support.items():
      arrays[f'support/{name}'] = _stack_padded(rows, len(self.epochs))
      arrays[f'entry_step/{name}'] = self.entry_steps[name]
      arrays[f'kind/{name}'] = np.asarray(self.kinds[name])
    return arrays

  def save(self, file: pathlib.Path, steps_per_epoch: int) -> None:
    if not self.epochs:
      return
    tmp = file.with_name(file.name + '.tmp.npz')
    try:
      np.savez_compressed(tmp, **self.arrays(steps_per_epoch))
      os.replace(tmp, file)  # a reader never sees half a file
    except BaseException:   # a full disk, an interrupt: the old file stays, the half-written one goes
      tmp.unlink(missing_ok=True)
      raise

  @classmethod
  def from_arrays(cls, arrays, last_epoch: int) -> 'RegularizationPath':
    """The path of ``arrays`` (as :meth:`arrays`) up to ``last_epoch``."""
    path = cls()
    epochs = np.asarray(arrays['epoch'])
    keep = epochs <= last_epoch
    path.epochs = [int(e) for e in epochs[keep]]
    path.steps = [int(s) for s in np.asarray(arrays['step'])[keep]]
    for key in arrays:
      if key.startswith('support/'):
        name = key[len('support/'):]
        path.support[name] = list(np.asarray(arrays[key])[keep])
        path.entry_steps[name] = np.asarray(arrays[f'entry_step/{name}'])
        path.kinds[name] = str(arrays[f'kind/{name}'])
    # The entry steps saved are those of the file's last epoch; forget entries after last_epoch.
    last_step = path.steps[-1] if path.steps else -1
    path.entry_steps = {name: np.where(e <= last_step, e, -1) for name, e in path.entry_steps.items()}
    return path


def read_npz(file: pathlib.Path, what: str = 'the regularization path') -> dict[str, np.ndarray]:
  """The arrays of ``file``; :class:`DamagedFileError` naming it if it cannot be read whole."""
  try:
    with np.load(file, allow_pickle=False) as arrays:
      return {key: arrays[key] for key in arrays.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise DamagedFileError(f'{file} ({what}) is damaged and cannot be read ({type(e).__name__}: {e}).') from e


def _stack_padded(rows: list[np.ndarray], count: int) -> np.ndarray:
  """Rows of per-group support, padded with False to the largest shape (groups added mid-run)."""
  shape = tuple(np.max([r.shape for r in rows], axis=0))
  out = np.zeros((count, *shape), bool)
  first = count - len(rows)   # a leaf that appeared mid-run has no rows before
  for i, row in enumerate(rows):
    out[(first + i, *(slice(0, n) for n in row.shape))] = row
  return out


def path_item(arrays: dict[str, Any]) -> dict[str, Any]:
  """The numeric arrays of the path (what a checkpoint stores beside the state; kinds go in its record)."""
  return {key: value for key, value in arrays.items() if not key.startswith('kind/')}
