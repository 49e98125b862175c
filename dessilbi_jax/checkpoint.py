"""Checkpoints of a training run, with orbax.

A run keeps one checkpoint per epoch under ``DIR/checkpoints/<epoch>/`` (the
last few; older ones are deleted). Each holds the whole training state as one
pytree (params, batch statistics, the optimizer state, the step, which is the
data position, and the RNG key) plus a small JSON record. Orbax writes a
checkpoint into a temporary directory and renames it once complete, so a run
killed while saving leaves the previous checkpoint as the latest usable one.

Example::

  >>> import numpy as np, tempfile
  >>> from dessilbi_jax import checkpoint
  >>> directory = tempfile.mkdtemp()
  >>> manager = checkpoint.open_manager(directory)
  >>> checkpoint.save(manager, 1, {'w': np.ones(3)}, {'epoch': 1})
  >>> manager.wait_until_finished()
  >>> checkpoint.restore(directory, {'w': np.zeros(3)})
  ({'w': array([1., 1., 1.])}, {'epoch': 1})
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


def open_manager(directory, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A manager that saves asynchronously and keeps the last ``max_to_keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state, record: dict[str, Any]) -> None:
  """Starts saving ``state`` (a pytree of arrays) and a JSON ``record`` as ``epoch``.

  The write continues in the background; ``manager.wait_until_finished()``
  blocks until it is committed.
  """
  manager.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(jax.device_get(state)),
      record=ocp.args.JsonSave(record)))


def saved_epochs(directory) -> list[int]:
  """Epochs with a complete checkpoint under ``directory`` (oldest first)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(ocp.CheckpointManager(directory.absolute()).all_steps())


def restore(directory, target, *, epoch: Optional[int] = None) -> tuple[Any, dict[str, Any]]:
  """The state (shaped like ``target``) and record of ``epoch`` (default: latest).

  Raises:
    FileNotFoundError: no complete checkpoint in ``directory``, or not ``epoch``.
    ValueError: the checkpoint cannot be read or does not match ``target``.
  """
  directory = pathlib.Path(directory)
  epochs = saved_epochs(directory)
  if not epochs:
    raise FileNotFoundError(
        f'No complete checkpoint in {directory}. Start the run without --resume '
        '(into a new or empty directory).')
  epoch = epochs[-1] if epoch is None else epoch
  if epoch not in epochs:
    raise FileNotFoundError(f'No checkpoint of epoch {epoch} in {directory}; it has epochs {epochs}.')
  manager = ocp.CheckpointManager(directory.absolute())
  try:
    restored = manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.device_get(target)),
        record=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises many types for damaged files; name the checkpoint instead.
    older = [s for s in epochs if s < epoch]
    hint = (f'Delete {directory / str(epoch)} to resume from epoch {older[-1]}.' if older
            else 'Start the run again in a new directory.')
    raise ValueError(
        f'The checkpoint of epoch {epoch} in {directory} is unreadable or does not match this '
        f'run ({type(e).__name__}: {str(e)[:300]}). {hint}') from e
  finally:
    manager.close()
  _check_matches(restored['state'], target, f'The checkpoint of epoch {epoch} in {directory}')
  return restored['state'], dict(restored['record'])


def save_tree(path, tree) -> None:
  """Saves a pytree of arrays to ``path`` (a directory), blocking until written."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(pathlib.Path(path).absolute(), jax.device_get(tree))
  checkpointer.wait_until_finished()
  checkpointer.close()


def load_tree(path, target):
  """The pytree saved by :func:`save_tree`, shaped like ``target``."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'No saved arrays at {path}.')
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(path.absolute(), jax.device_get(target))
  except Exception as e:  # see restore()
    raise ValueError(f'The arrays saved at {path} are unreadable or do not match ({type(e).__name__}: {e}).') from e
  finally:
    checkpointer.close()
  _check_matches(tree, target, f'The arrays saved at {path}')
  return tree


def _check_matches(tree, target, what: str) -> None:
  """Orbax restores a saved array whatever shape the target asks for: compare."""
  shapes = lambda t: jax.tree.map(lambda x: (np.shape(x), str(np.asarray(x).dtype)), jax.device_get(t))
  if shapes(tree) != shapes(target):
    raise ValueError(
        f'{what} does not match this run: saved {shapes(tree)}, expected {shapes(target)}. '
        'Was it written by another model or optimizer configuration?')
