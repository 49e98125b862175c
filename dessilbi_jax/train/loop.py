"""The loop over epochs: :func:`fit`."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from tqdm.auto import tqdm

import dessilbi_jax as dl
from dessilbi_jax.train import checkpoint
from dessilbi_jax import data
from dessilbi_jax.train import extensions as ext
from dessilbi_jax.train import run_dir as files
from dessilbi_jax.train import steps
from dessilbi_jax.train.config import TrainConfig
from dessilbi_jax.train.config import check_config
from dessilbi_jax.train.optimizers import default_extensions
from dessilbi_jax.train.optimizers import learning_rate_schedule
from dessilbi_jax.train.optimizers import make_optimizer
from dessilbi_jax.train.regularization_path import DamagedFileError
from dessilbi_jax.train.regularization_path import RegularizationPath
from dessilbi_jax.train.regularization_path import path_item
from dessilbi_jax.train.regularization_path import read_npz
from dessilbi_jax.train.steps import TrainState

_LOG_EVERY = 10      # steps between progress-bar updates (and NaN checks)


class TrainResult(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any
  init_params: Any
  history: list[dict[str, Any]]
  state: Optional[TrainState] = None          # the whole final state (extensions' state included)
  widths: Optional[tuple[int, ...]] = None    # the final model's widths (changed by growth)
  resumed_from: Optional[int] = None          # the epoch of the checkpoint a resumed run started from
  layer_widths: Optional[tuple] = None        # and its per-layer widths (TrainConfig.layer_widths)
  extensions: tuple[ext.Extension, ...] = ()  # those the run trained with (its registry entry's, then the caller's)


def fit(cfg: TrainConfig, out_dir=None, *, resume: bool = False,
        tx: Optional[optax.GradientTransformation] = None, masks=None, init_params=None,
        quiet: bool = False, extensions: Sequence[ext.Extension] = (), fall_back: bool = False) -> TrainResult:
  """Trains ``cfg`` data-parallel over all local devices; see the package docstring.

  Args:
    cfg: the run.
    out_dir: where to write metrics, path and checkpoints (``None``:
      nothing is written and ``resume`` is unavailable). An existing non-empty
      directory is an error unless ``resume``; a run that fails before its
      first checkpoint leaves the directory as it found it.
    resume: continue the run in ``out_dir`` from its last checkpoint up to
      ``cfg.epochs``; ``cfg`` must equal the saved one (and the checkpoint's
      record) except for ``epochs``. A run with no checkpoint starts again
      from epoch 1 if it recorded no epoch yet (killed in its first), and
      says so; one that recorded epochs is refused, nothing changed.
      A run removes only files it created itself, by name.
    tx: an optimizer to use instead of :func:`make_optimizer`.
    masks: bool pytree like the params (``None`` leaves: unmasked); masked
      weights are zero from the start and stay exactly zero.
    init_params: params to start from instead of a fresh initialization.
    quiet: no progress bar, no per-epoch lines.
    extensions: :class:`dessilbi_jax.train.Extension` s (package docstring),
      after those of ``cfg.optimizer``'s registry entry (one of the same name
      replaces the entry's).
    fall_back: with ``resume``, a checkpoint that fails its checksums is
      skipped for the previous good one (without it: an error).

  Returns:
    A :class:`TrainResult` (params etc. of one replica, as numpy arrays);
    :func:`dessilbi_jax.train.write_run_plots` draws the run's plots.

  Raises:
    ValueError: bad config, directory, checkpoint or inputs (before training).
    FloatingPointError: the loss became NaN or infinite; nothing is saved
      after the last good epoch.
    OSError: ``out_dir`` cannot be written, or a write failed (a full disk):
      the run stops at that epoch; the message names the path, the error,
      the last good checkpoint and the command that continues.
    dessilbi_jax.train.run_dir.Interrupted: Ctrl-C or SIGTERM (a
      ``KeyboardInterrupt``): a save in flight is finished first; the message
      says the epoch and the last checkpoint.
  """
  check_config(cfg)
  ext.check_names(extensions)
  extensions = default_extensions(cfg, extensions)
  trainables = ext.trainables(extensions)
  run_dir = None if out_dir is None else files.local_path(out_dir)
  if resume and run_dir is None:
    raise ValueError('resume needs the directory of the run to continue (--out DIR).')
  writer = run_dir is not None and jax.process_index() == 0
  steps_per_epoch = data.steps_per_epoch(cfg.dataset, cfg.batch_size)
  tx = tx if tx is not None else make_optimizer(cfg, steps_per_epoch)
  # Opening the test split now fails fast (and before anything is written) if it is not prepared.
  data.eval_batches(cfg.dataset, 'test', jax.local_device_count() * jax.process_count(),
                    num_devices=jax.local_device_count(), data_dir=cfg.data_dir)
  say = (lambda s: None) if quiet or jax.process_index() != 0 else tqdm.write
  notice = (lambda s: None) if jax.process_index() != 0 else tqdm.write   # said under quiet too
  progress = {'epoch': None}   # the epoch being trained, for the message of an interrupt
  with contextlib.ExitStack() as stack:
    stack.enter_context(files.sigterm_interrupts())
    before = None if run_dir is None else files.names_in(run_dir)
    restart = _open_run_dir(run_dir, cfg, resume, writer, stack)
    if restart:
      notice(f'{run_dir} holds a run that stopped before its first checkpoint: training it from epoch 1 '
             '(its files are kept).')
    try:
      return _fit(cfg, run_dir, resume and not restart, tx, masks, init_params, quiet, extensions, trainables,
                  fall_back, writer, steps_per_epoch, say, progress, restart)
    except BaseException as e:
      undone = writer and (restart or not resume) and not checkpoint.saved_epochs(run_dir / 'checkpoints')
      if undone:
        files.remove_created(run_dir, before)
      if isinstance(e, KeyboardInterrupt):
        raise _interrupted(e, run_dir, progress['epoch'], undone) from None
      raise


def _open_run_dir(run_dir, cfg, resume: bool, writer: bool, stack) -> bool:
  """Checks, creates and locks the run directory; returns whether a resume must start again from epoch 1."""
  if run_dir is None:
    return False
  try:
    # Process 0 alone decides whether the directory can take the run; the others wait for its answer.
    with _decided_by_process_0(True):
      if writer:
        if resume and not (run_dir / 'config.json').is_file():
          raise FileNotFoundError(f'Nothing to resume in {run_dir}: it holds no run (no config.json). '
                                  'Start it without --resume.')
        if not resume:
          files.check_new(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        stack.enter_context(files.locked(run_dir))
        if not resume:
          files.check_new(run_dir)   # again, now that the lock keeps other runs out
  except OSError as e:
    if e.strerror is None:   # this package's own errors (not empty, locked) say it all
      raise
    raise OSError(f'Cannot write the run into --out {run_dir}: {files.os_error_line(e)}. Choose a directory you '
                  'can write to.') from e
  if not resume:
    return False
  files.check_resumable(run_dir, cfg)
  if checkpoint.saved_epochs(run_dir / 'checkpoints'):
    return False
  files.check_restartable(run_dir)
  return True


def _interrupted(error: KeyboardInterrupt, run_dir, epoch, undone: bool) -> files.Interrupted:
  """What an interrupt kept and how to continue, in one or two lines."""
  signum = getattr(error, 'signum', signal.SIGINT)
  where = f' in epoch {epoch}' if epoch is not None else ' before training started'
  if run_dir is None:
    kept = 'nothing was saved (no out_dir).'
  elif undone:
    kept = f'no checkpoint was written yet, so nothing was kept (the files this run created in {run_dir} are removed).'
  else:
    saved = checkpoint.saved_epochs(run_dir / 'checkpoints')
    kept = (f'the last checkpoint is that of epoch {saved[-1]} in {run_dir / "checkpoints"}.\n'
            f'`dessilbi train --resume --out {run_dir}` continues from it.' if saved else
            f'{run_dir} holds no checkpoint.')
  return files.Interrupted(f'Interrupted ({signal.Signals(signum).name}){where}; {kept}', signum)


def _fit(cfg, run_dir, resume, tx, masks, init_params, quiet, extensions, trainables, fall_back, writer,
         steps_per_epoch, say, progress, restart) -> TrainResult:
  init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
  arch = cfg   # the config of the model trained now: its widths and layer_widths change with growth

  def initial_state(arch):
    model, info = steps.build_model(arch)
    variables = steps.init_variables(model, info.input_shape, init_key)
    params = variables['params']
    for _, t in trainables:
      if t.prepare is not None:
        params = t.prepare(params)
    extra = {name: t.init(params, jax.random.fold_in(init_key, i)) for i, (name, t) in enumerate(trainables)}
    extra_opt = {name: t.tx.init(extra[name]) for name, t in trainables}
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=variables.get('batch_stats', {}),
                      opt_state=_jit(tx.init)(params), rng=rng, extra=jax.device_get(extra),
                      extra_opt_state=jax.device_get(extra_opt))

  path = RegularizationPath()
  history: list[dict[str, Any]] = []
  resumed_from = None
  if resume:
    state, record, arch = _restore(run_dir, cfg, initial_state, fall_back, say)
    resumed_from = record['epoch']
    if cfg.epochs < record['epoch']:
      raise ValueError(f'--epochs {cfg.epochs} is below the {record["epoch"]} epochs the run in {run_dir} has '
                       f'already trained; give the new total (at least {record["epoch"]}).')
    template = initial_state(cfg)
    init_params = checkpoint.load_tree(run_dir / 'init_params', template.params)
    history = files.read_history(run_dir, up_to=record['epoch'])
    if record.get('arrays') is not None:
      arrays = dict(record['arrays'], **{f'kind/{k}': v for k, v in record.get('path_kinds', {}).items()})
      path = RegularizationPath.from_arrays(arrays, record['epoch'])
      try:
        if (run_dir / 'path.npz').is_file():
          read_npz(run_dir / 'path.npz')
      except DamagedFileError:
        say(f'{run_dir / "path.npz"} was damaged: rebuilt from the checkpoint of epoch {record["epoch"]}.')
  else:
    state = initial_state(arch)
    if init_params is not None:
      steps.check_same_shapes(init_params, state.params, 'init_params')
      state = state._replace(params=init_params)
  if masks is not None:
    masks = steps.full_masks(masks, state.params)
    state = state._replace(params=jax.device_get(steps.apply_masks(state.params, masks)))
  if not resume:
    init_params = jax.device_get(state.params)
  has_gamma = bool(dl.find_states(state.opt_state))
  batches = data.train_batches(cfg.dataset, cfg.batch_size, seed=cfg.seed, start_step=int(state.step),
                               num_devices=jax.local_device_count(), augment=cfg.augment, data_dir=cfg.data_dir)
  if writer:
    files.write_config(run_dir, cfg)  # a resumed run: the new total of epochs
    if resume or restart:
      files.write_history(run_dir, history)  # what followed the checkpoint is forgotten
      path.save(run_dir / 'path.npz', steps_per_epoch)
  if run_dir is not None and not resume:
    _save_init_params(run_dir, init_params, restart)

  start_epoch = int(state.step) // steps_per_epoch
  if resume:
    say(f'Resuming {run_dir} from the checkpoint of epoch {start_epoch} (step {int(state.step)}) '
        f'up to epoch {cfg.epochs}.')
  model = steps.training_model(steps.build_model(arch)[0])
  replicated = steps.replicate(state)
  replicated_masks = None if masks is None else steps.replicate(masks)
  train_step = steps.make_train_step(model, tx, trainables)
  manager = None if run_dir is None else checkpoint.open_manager(
      run_dir / 'checkpoints', max_to_keep=cfg.keep_checkpoints)
  schedule = learning_rate_schedule(cfg, steps_per_epoch)
  evaluate = lambda model, variables: steps.evaluate(model, variables, cfg.dataset, data_dir=cfg.data_dir,
                                                     batch_size=max(steps.EVAL_BATCH, cfg.batch_size))
  try:
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
      progress['epoch'] = epoch
      start = time.perf_counter()
      replicated, loss, acc = _train_epoch(train_step, replicated, replicated_masks, batches, epoch, cfg,
                                           steps_per_epoch, run_dir, quiet)
      state = jax.device_get(jax_utils.unreplicate(replicated))
      row = _epoch_metrics(model, state, has_gamma, trainables, evaluate)
      row.update(epoch=epoch, step=int(state.step), lr=float(schedule(int(state.step) - 1)),
                 train_loss=loss, train_acc=acc)
      context = ext.Epoch(epoch, cfg, model, arch.widths, state, tx, steps_per_epoch, row, evaluate, tuple(history))
      added = _extension_metrics(extensions, context)
      row.update({key: value for values in added.values() for key, value in values.items()},
                 seconds=round(time.perf_counter() - start, 3))
      history.append(row)
      if has_gamma:
        path.append(epoch, int(state.step), state.params, state.opt_state)
      reshaped = _epoch_end(extensions, context._replace(row=row))
      if reshaped is not None:
        if masks is not None:
          raise ValueError('An extension changed the shapes of a masked run (a ticket); masks cannot follow.')
        arch, state = _check_reshaped(reshaped, cfg, tx, trainables)
        model = steps.training_model(steps.build_model(arch)[0])
        replicated = steps.replicate(state)
        train_step = steps.make_train_step(model, tx, trainables)   # compiled once for the new shapes
      if run_dir is not None:
        _save_epoch(run_dir, manager, writer, epoch, state, row, path, has_gamma, cfg, arch, steps_per_epoch)
      say(_summary_line(row, cfg.epochs, extensions, added))
  finally:
    if manager is not None:
      _close_manager(manager)
  return TrainResult(state.params, state.batch_stats, state.opt_state, init_params, history, state,
                     arch.widths, resumed_from, arch.layer_widths, extensions)


@contextlib.contextmanager
def _decided_by_process_0(needed: bool):
  """Runs the block on every process, then tells all whether process 0's run of it succeeded."""
  if not needed or jax.process_count() == 1:
    yield
    return
  from jax.experimental import multihost_utils
  try:
    yield
  except BaseException:
    if jax.process_index() == 0:
      multihost_utils.broadcast_one_to_all(np.int32(1))
    raise
  if int(multihost_utils.broadcast_one_to_all(np.int32(0))):
    raise ValueError('Process 0 could not start the run in its directory; its error says why.')


def _restore(run_dir, cfg, initial_state, fall_back: bool, say):
  """(state, record, config of its model) of the newest good checkpoint; older ones only with ``fall_back``."""
  directory = run_dir / 'checkpoints'
  epochs = checkpoint.saved_epochs(directory)
  errors = []
  for epoch in reversed(epochs):
    try:
      record = checkpoint.read_record(directory, epoch)
      files.check_record(record, cfg, f'The checkpoint of epoch {epoch} in {directory}', run_dir)
      arch = steps.recorded_config(cfg, record)
      state, record = checkpoint.restore(directory, initial_state(arch), epoch=epoch, with_arrays=True)
    except checkpoint.CheckpointError as e:
      older = [s for s in epochs if s < epoch]
      if not fall_back:
        hint = (f'Delete {directory / str(epoch)} to resume from epoch {older[-1]}, or pass --fall-back to '
                'resume from the newest checkpoint that passes its checks (the damaged ones stay).' if older else
                'No older checkpoint is kept: start the run again in a new directory.')
        raise checkpoint.CheckpointError(f'{e} {hint}') from e
      errors.append(f'epoch {epoch}: {e}')
      # Kept for inspection, out of the way of the checkpoint this epoch will get again.
      aside = run_dir / 'damaged' / f'checkpoint-{epoch}-{time.strftime("%Y%m%d-%H%M%S")}'
      if jax.process_index() == 0:
        aside.parent.mkdir(exist_ok=True)
        (directory / str(epoch)).rename(aside)
      say(f'Skipping the checkpoint of epoch {epoch}: {e} Moved it to {aside}.')
      continue
    if errors:
      say(f'Using the checkpoint of epoch {epoch}, the newest that passed its checksums.')
    return state, record, arch
  raise checkpoint.CheckpointError(f'No checkpoint in {directory} can be used: ' + ' '.join(errors))


def _save_epoch(run_dir, manager, writer, epoch, state, row, path, has_gamma, cfg, arch, steps_per_epoch) -> None:
  """The epoch's metrics row, path and checkpoint; a failed write (a full disk) stops the run here."""
  try:
    if writer:
      files.append_history(run_dir, row)
      path.save(run_dir / 'path.npz', steps_per_epoch)
    arrays = path.arrays(steps_per_epoch) if has_gamma else {}
    checkpoint.save(manager, epoch, state,
                    {'epoch': epoch, 'step': int(state.step), **steps.model_record(arch),
                     'config': files.record_config(cfg), 'path_kinds': dict(path.kinds)},
                    arrays=path_item(arrays))
  except OSError as e:
    saved = checkpoint.saved_epochs(run_dir / 'checkpoints')
    what = str(e) if isinstance(e, checkpoint.CheckpointSaveError) else (
        f'Writing the files of epoch {epoch} in {run_dir} failed: {files.os_error_line(e)}.')
    kept = (f'Training stopped; the last good checkpoint is that of epoch {saved[-1]} '
            f'({run_dir / "checkpoints" / str(saved[-1])}). Free some space (or fix the disk), then '
            f'`dessilbi train --resume --out {run_dir}` continues from it.' if saved else
            'Training stopped before its first checkpoint: nothing was kept.')
    raise type(e)(f'{what}\n{kept}') from e


def _close_manager(manager) -> None:
  """Lets a save in flight finish (an interrupt may have come during it), then clears what an unfinished one left."""
  try:
    manager.wait_until_finished()
  finally:
    manager.close()
    checkpoint.remove_temporaries(manager.directory)


def _save_init_params(run_dir, init_params, restart: bool) -> None:
  """The params at step 0; a run started again (``restart``) keeps those it saved if they are the same."""
  where = run_dir / 'init_params'
  if restart and where.exists():
    try:
      saved = checkpoint.load_tree(where, init_params)
    except (checkpoint.CheckpointError, FileNotFoundError) as e:
      raise DamagedFileError(f'{e} Delete {where}: the run writes it again from its seed.') from e
    if not all(jax.tree.leaves(jax.tree.map(np.array_equal, saved, init_params))):
      raise DamagedFileError(f'{where} is not the initialization of this run\'s seed; delete it, the run writes '
                             'it again.')
    return
  checkpoint.save_tree(where, init_params)


def _check_reshaped(reshaped: ext.Reshaped, cfg, tx, trainables):
  """The model config and state an extension returned, checked against the model those widths build."""
  widths, state = tuple(reshaped.widths), jax.device_get(reshaped.state)
  arch = dataclasses.replace(cfg, widths=widths, layer_widths=steps.layer_widths_field(reshaped.layer_widths))
  model, info = steps.build_model(arch)
  expected = jax.eval_shape(lambda key: model.init(key, jnp.zeros((1, *info.input_shape)), train=False),
                            jax.random.PRNGKey(0))
  what = f'The state an extension returned for widths {widths}'
  steps.check_same_shapes(state.params, expected['params'], f'{what}: params')
  steps.check_same_shapes(state.batch_stats, expected.get('batch_stats', {}), f'{what}: batch_stats')
  steps.check_same_shapes(state.opt_state, jax.eval_shape(tx.init, expected['params']), f'{what}: opt_state')
  return arch, state


def _extension_metrics(extensions, context) -> dict[str, dict[str, Any]]:
  """Each extension's metrics of the epoch, by its name."""
  added, seen = {}, set(context.row)
  for extension in extensions:
    if extension.metrics is None:
      continue
    values = dict(extension.metrics(context))
    clash = sorted(set(values) & seen)
    if clash:
      raise ValueError(f'Extension {extension.name!r} returned metrics {clash} that the epoch row already has.')
    added[extension.name] = {key: _plain(value) for key, value in values.items()}
    seen |= set(values)
  return added


def _epoch_end(extensions, context) -> Optional[ext.Reshaped]:
  reshaped = None
  for extension in extensions:
    if extension.epoch_end is None:
      continue
    result = extension.epoch_end(context)
    if result is not None:
      reshaped = result
      context = context._replace(state=result.state, widths=tuple(result.widths))
  return reshaped


def _plain(value):
  """A JSON value of a metric (numpy and JAX scalars become Python numbers)."""
  if isinstance(value, (np.ndarray, jax.Array, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def _train_epoch(train_step, replicated, masks, batches, epoch, cfg, steps_per_epoch, run_dir, quiet):
  """One epoch of steps with a progress bar (on a terminal only); stops on a non-finite loss."""
  bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch}/{cfg.epochs}', leave=False,
             disable=True if quiet or jax.process_index() != 0 else None, dynamic_ncols=True)
  first_step = int(jax_utils.unreplicate(replicated.step))
  losses, accuracies, pending = [], [], []
  start = time.perf_counter()
  for i in range(steps_per_epoch):
    replicated, metrics = train_step(replicated, next(batches), masks)
    pending.append(metrics)
    if len(pending) == _LOG_EVERY or i == steps_per_epoch - 1:
      fetched = jax.device_get(jax_utils.unreplicate(pending))
      for m in fetched:
        loss = float(m['loss'])
        if not math.isfinite(loss):
          bar.close()
          step = first_step + len(losses) + 1
          kept = (f'The last good checkpoint is that of epoch {epoch - 1} in {run_dir / "checkpoints"}. '
                  if run_dir is not None and epoch > 1 else '')
          raise FloatingPointError(
              f'The training loss is {loss} at step {step} (epoch {epoch}); training stopped and '
              f'nothing of this epoch was saved. {kept}Try a lower learning rate (--lr, now {cfg.lr}).')
        losses.append(loss)
        accuracies.append(float(m['accuracy']))
      bar.update(len(pending))
      pending = []
      bar.set_postfix(loss=f'{np.mean(losses[-_LOG_EVERY:]):.3f}', acc=f'{np.mean(accuracies[-_LOG_EVERY:]):.3f}',
                      steps_per_s=f'{len(losses) / (time.perf_counter() - start):.1f}')
  bar.close()
  return replicated, float(np.mean(losses)), float(np.mean(accuracies))


def _epoch_metrics(model, state: TrainState, has_gamma: bool, trainables, evaluate) -> dict[str, Any]:
  params = steps.eval_params(state, trainables)
  row = {'dense_test_acc': evaluate(model, steps.variables(params, state.batch_stats))}
  if has_gamma:
    row['sparse_test_acc'] = evaluate(model, steps.variables(_sparse_params(params, state.opt_state),
                                                             state.batch_stats))
    per_leaf = dl.sparsity_summary(state.params, state.opt_state)
  else:
    row['sparse_test_acc'] = None
    per_leaf = dl.nonzero_summary(state.params)
  structured = [r for r in per_leaf.values() if r['kind'] is not None]
  row['weights_kept'] = _fraction(sum(r['weights_kept'] for r in structured), sum(r['weights'] for r in structured))
  row['groups_kept'] = _fraction(sum(r['groups_in_support'] for r in structured), sum(r['groups'] for r in structured))
  row['per_leaf'] = per_leaf
  return row


_sparse_params = jax.jit(dl.sparse_params)
_jit = functools.lru_cache(maxsize=16)(jax.jit)  # one compilation per optimizer, not per fit


def _fraction(part: int, whole: int) -> Optional[float]:
  return part / whole if whole else None


def _summary_line(row: Mapping[str, Any], epochs: int, extensions: Sequence[ext.Extension] = (),
                  added: Mapping[str, Mapping[str, Any]] = {}) -> str:
  percent = lambda v: '  –  ' if v is None else f'{100 * v:5.1f}%'
  # Filters (neurons, heads) are few and telling: count them apart from the single weights.
  per_kind = {}
  for leaf in row['per_leaf'].values():
    if leaf['kind'] not in (None, 'lasso'):
      kept, total = per_kind.get(leaf['kind'], (0, 0))
      per_kind[leaf['kind']] = (kept + leaf['groups_in_support'], total + leaf['groups'])
  kinds = ''.join(f' {kind}s {kept}/{total}' for kind, (kept, total) in per_kind.items())
  # An extension speaks for its own metrics; one without words shows its scalars (tables go to metrics.jsonl only).
  extra = ''.join(f'  {text}' for text in ext.summaries(extensions, row))
  for extension in extensions:
    if extension.summary is None and extension.metrics is not None:
      extra += ''.join(f'  {key} {value:.4g}' if isinstance(value, float) else f'  {key} {value}'
                       for key, value in added.get(extension.name, {}).items()
                       if isinstance(value, (int, float, str)))
  if row['sparse_test_acc'] is None:   # no Γ: the weights that are non-zero
    structure = f'non-zero weights {percent(row["weights_kept"])}'
  else:
    structure = (f'sparse {percent(row["sparse_test_acc"])}  support: groups {percent(row["groups_kept"])}  '
                 f'weights {percent(row["weights_kept"])}{kinds}')
  return (f'epoch {row["epoch"]:3d}/{epochs}  step {row["step"]:6d}  loss {row["train_loss"]:.4f}  '
          f'train {percent(row["train_acc"])}  test dense {percent(row["dense_test_acc"])}  '
          f'{structure}{extra}  ({row["seconds"]:.1f} s)')
