"""Checkpoints of a training run, with orbax, verified by a checksum of every array.

A run keeps one checkpoint per epoch under ``DIR/checkpoints/<epoch>/`` (the
last few; older ones are deleted). Each holds the whole training state as one
pytree (params, batch statistics, the optimizer state, the step, which is the
data position, and the RNG key), optionally more arrays (the run's
regularization path) and a small JSON record with the SHA-256 of every array.
Orbax writes a checkpoint into a temporary directory and renames it once
complete, so a run killed while saving leaves the previous checkpoint as the
latest usable one (:func:`remove_temporaries` clears what such a save left;
a save that fails, e.g. on a full disk, raises :class:`CheckpointSaveError`
after clearing its own); orbax checks only the index of its files (a CRC-32C of the
shard index, not of the data), so :func:`restore` recomputes each array's
checksum and raises :class:`CheckpointError` naming the checkpoint and the
array on a mismatch (a flipped bit, a patched file).

Example::

  >>> import numpy as np, tempfile
  >>> from dessilbi_jax.train import checkpoint
  >>> directory = tempfile.mkdtemp()
  >>> manager = checkpoint.open_manager(directory)
  >>> checkpoint.save(manager, 1, {'w': np.ones(3)}, {'epoch': 1})
  >>> state, record = checkpoint.restore(directory, {'w': np.zeros(3)})
  >>> state, record['epoch']
  ({'w': array([1., 1., 1.])}, 1)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

_CHECKSUMS = 'sha256.json'   # beside the arrays that save_tree writes


class CheckpointError(ValueError):
  """A checkpoint that cannot be read, does not match the run, or fails its checksums."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount); its temporary files are removed."""


def checksums(tree) -> dict[str, str]:
  """SHA-256 of every array of ``tree`` (its dtype, shape and bytes), keyed by its path."""
  def digest(x):
    x = np.asarray(x)
    h = hashlib.sha256(f'{x.dtype.str}{x.shape}'.encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()
  return {jax.tree_util.keystr(path): digest(x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def open_manager(directory, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A manager that saves asynchronously and keeps the last ``max_to_keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, epoch: int, state, record: dict[str, Any],
         arrays: Optional[dict[str, np.ndarray]] = None) -> None:
  """Saves ``state`` (a pytree of arrays), ``arrays`` and a JSON ``record`` as ``epoch``, blocking until committed.

  The record gets the checksums of both. Blocking makes a failed write (a
  full disk) stop the run at the epoch it happened instead of one later.

  Raises:
    CheckpointSaveError: the write failed; one line naming the checkpoint and
      the OS error; the temporary directory it left is removed.
  """
  state = jax.device_get(state)
  record = {**record, 'sha256': checksums(state)}
  items = {'state': ocp.args.StandardSave(state)}
  if arrays:
    record['arrays_sha256'] = checksums(arrays)
    items['arrays'] = ocp.args.StandardSave(arrays)
  directory = pathlib.Path(manager.directory)
  with _orbax_errors_captured():
    try:
      manager.save(epoch, args=ocp.args.Composite(record=ocp.args.JsonSave(record), **items))
      manager.wait_until_finished()
    except Exception as e:  # orbax and tensorstore wrap the OS error in several types
      # The writes still in flight fail a moment later, each printing a traceback from its thread: let them.
      time.sleep(0.5)
      remove_temporaries(directory)
      raise CheckpointSaveError(f'Writing the checkpoint of epoch {epoch} to {directory / str(epoch)} failed: '
                                f'{os_reason(e)}.') from e


def remove_temporaries(directory) -> list[pathlib.Path]:
  """Removes (and returns) the temporary directories unfinished saves left in ``directory`` (``E.orbax-checkpoint-tmp*``).

  Call it only when no save is in progress (after ``wait_until_finished``).
  """
  directory = pathlib.Path(directory)
  left = sorted(directory.glob('*.orbax-checkpoint-tmp*')) if directory.is_dir() else []
  for path in left:
    shutil.rmtree(path, ignore_errors=True)
  return left


def os_reason(error: BaseException) -> str:
  """The OS error behind ``error`` in words (``No space left on device``), else its first line.

  Example::

    >>> from dessilbi_jax.train import checkpoint
    >>> checkpoint.os_reason(ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']"))
    'No space left on device'
  """
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return os.strerror(seen.errno)
    code = re.search(r"os_error_code='?(\d+)", str(seen))   # tensorstore's wording of an OS error
    if code:
      return os.strerror(int(code.group(1)))
    seen = seen.__cause__ or seen.__context__
  return _first_line(error)


@contextlib.contextmanager
def _orbax_errors_captured():
  """Orbax logs a failed save from each of its threads (hundreds of lines): hold them back, and let them through
  only if the save succeeds (a warning worth reading)."""
  absl = logging.getLogger('absl')
  level, stderr, held = absl.level, sys.stderr, io.StringIO()
  absl.setLevel(logging.CRITICAL)
  sys.stderr = held
  try:
    yield
  finally:
    sys.stderr = stderr
    absl.setLevel(level)
  if held.getvalue():
    stderr.write(held.getvalue())


def saved_epochs(directory) -> list[int]:
  """Epochs with a complete checkpoint under ``directory`` (oldest first)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  manager = ocp.CheckpointManager(directory.absolute())
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def read_record(directory, epoch: int) -> dict[str, Any]:
  """The JSON record of the checkpoint of ``epoch`` (read before building the state it describes)."""
  file = pathlib.Path(directory) / str(epoch) / 'record' / 'metadata'
  try:
    return json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(f'The checkpoint of epoch {epoch} in {directory} has no readable record '
                          f'({type(e).__name__}: {e}).') from e


def restore(directory, target, *, epoch: Optional[int] = None,
            with_arrays: bool = False) -> tuple[Any, dict[str, Any]]:
  """The state (shaped like ``target``) and record of ``epoch`` (default: latest), checksums verified.

  With ``with_arrays``, the record's ``'arrays'`` holds the arrays saved beside
  the state (``None`` if there are none).

  Raises:
    FileNotFoundError: no complete checkpoint in ``directory``, or not ``epoch``.
    CheckpointError: the checkpoint cannot be read, does not match ``target``
      or fails its checksums.
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
  name = f'The checkpoint of epoch {epoch} in {directory}'
  record = read_record(directory, epoch)
  items = {'state': ocp.args.StandardRestore(jax.device_get(target)), 'record': ocp.args.JsonRestore()}
  if with_arrays and 'arrays_sha256' in record:
    items['arrays'] = ocp.args.StandardRestore()
  manager = ocp.CheckpointManager(directory.absolute())
  try:
    restored = manager.restore(epoch, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax raises many types for damaged files; name the checkpoint instead.
    _quiet_late_reads()
    raise CheckpointError(f'{name} is unreadable or does not match this run ({_first_line(e)}).') from e
  finally:
    manager.close()
  _check_matches(restored['state'], target, name)
  _verify(restored['state'], record.get('sha256'), name)
  record = dict(restored['record'])
  if with_arrays:
    record['arrays'] = restored.get('arrays')
    if record['arrays'] is not None:
      _verify(record['arrays'], record.get('arrays_sha256'), name)
  return restored['state'], record


def _quiet_late_reads() -> None:
  """Silences the reads a failed restore leaves in flight.

  Orbax runs a restore's reads on a private event loop and closes it when the
  first read fails; the tensorstore reads still running then complete into the
  closed loop, each an unraisable ``RuntimeError('Event loop is closed')``
  printed as a traceback after the error (now and then, at exit). Those alone
  are dropped; every other unraisable exception reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_late_reads', False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'):
      previous(unraisable)

  hook.drops_late_reads = True
  sys.unraisablehook = hook


def save_tree(path, tree) -> None:
  """Saves a pytree of arrays to ``path`` (a directory) with its checksums, blocking until written."""
  path = pathlib.Path(path).absolute()
  tree = jax.device_get(tree)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if jax.process_index() == 0:
    (path / _CHECKSUMS).write_text(json.dumps(checksums(tree)))


def load_tree(path, target):
  """The pytree saved by :func:`save_tree`, shaped like ``target``, checksums verified."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f'No saved arrays at {path}.')
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = checkpointer.restore(path.absolute(), jax.device_get(target))
  except Exception as e:  # see restore()
    _quiet_late_reads()
    raise CheckpointError(f'The arrays saved at {path} are unreadable or do not match ({_first_line(e)}).') from e
  finally:
    checkpointer.close()
  _check_matches(tree, target, f'The arrays saved at {path}')
  sums = path / _CHECKSUMS
  _verify(tree, json.loads(sums.read_text()) if sums.is_file() else None, f'The arrays saved at {path}')
  return tree


def _first_line(error: BaseException) -> str:
  """``Type: first line`` of an error, cut short: orbax's messages can hold whole trees of arrays."""
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ''
  return f'{type(error).__name__}: {text[:160]}{"..." if len(text) > 160 else ""}'


def _verify(tree, expected: Optional[dict[str, str]], name: str) -> None:
  if expected is None:
    raise CheckpointError(f'{name} has no checksums to verify its arrays against.')
  actual = checksums(tree)
  bad = [key for key in expected if actual.get(key) != expected[key]] + sorted(set(actual) - set(expected))
  if bad:
    raise CheckpointError(f'{name} is damaged: the checksum of {len(bad)} array(s) does not match what was '
                          f'saved ({", ".join(bad[:3])}{", ..." if len(bad) > 3 else ""}).')


def _check_matches(tree, target, what: str) -> None:
  """Orbax restores a saved array whatever shape the target asks for: compare, and name the first difference."""
  def described(t):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(t))[0]
    return {jax.tree_util.keystr(path): f'{np.shape(x)} {np.asarray(x).dtype}' for path, x in leaves}
  saved, wanted = described(tree), described(target)
  if saved == wanted:
    return
  differ = [key for key in wanted if key in saved and saved[key] != wanted[key]]
  missing, extra = [key for key in wanted if key not in saved], [key for key in saved if key not in wanted]
  first = (f'{differ[0]} is {saved[differ[0]]} there, {wanted[differ[0]]} here' if differ else
           f'it lacks {missing[0]}' if missing else f'it has {extra[0]}, which this run does not')
  raise CheckpointError(f'{what} does not match this run: {len(differ) + len(missing) + len(extra)} array(s) '
                        f'differ ({first}). Was it written by another model or optimizer configuration?')
