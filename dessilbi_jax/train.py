"""Training over all local devices, recording DessiLBI's path; retraining tickets.

:func:`fit` trains ``cfg.model`` on ``cfg.dataset`` data-parallel with
``jax.pmap`` (the batch split over the local devices, gradients averaged with
``pmean``, params and optimizer state replicated), the same code on one device
and on eight; on several hosts each process feeds its own slice of the batch
and only process 0 writes files. With an output directory it writes::

  DIR/config.json        the TrainConfig
  DIR/init_params/       the params at step 0 (for rewinding tickets)
  DIR/metrics.jsonl      one JSON object per epoch (see below)
  DIR/path.npz           the regularization path (see below)
  DIR/plots/*.png        accuracy, support per layer, entry steps
  DIR/checkpoints/<E>/   the whole training state after epoch E (the last few)

A line of ``metrics.jsonl`` holds ``epoch``, ``step``, ``lr``, ``train_loss``,
``train_acc``, ``dense_test_acc`` (W), ``sparse_test_acc`` (W ⊙ 1[Γ≠0]),
``weights_kept`` and ``groups_kept`` (fractions of the structured leaves'
weights and groups inside Γ's support) and ``per_leaf`` (per leaf path:
``kind``, ``groups``, ``groups_in_support``, ``weights``, ``weights_kept``).
For optimizers without Γ the sparse accuracy is ``None`` and the support is
that of the non-zero weights.

``path.npz`` holds ``epoch`` and ``step`` (one entry per recorded epoch) and,
per structured leaf ``P``: ``support/P`` (bool, per group, one row per epoch),
``entry_step/P`` (int, per group, ``-1``: never entered) and ``kind/P``.

Resuming restores params, batch statistics, the optimizer state, the step
(the data position: batch k depends only on the seed and k) and the RNG, so
N epochs, then ``resume=True`` up to N + M epochs, gives the same bits as
N + M epochs straight.

Example::

  >>> from dessilbi_jax import train
  >>> cfg = train.TrainConfig(epochs=1)
  >>> result = train.fit(cfg, quiet=True)                     # doctest: +SKIP
  >>> result.history[-1]['dense_test_acc'] > 0.5               # doctest: +SKIP
  True
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from tqdm.auto import tqdm

import dessilbi_jax as dl
from dessilbi_jax import baselines
from dessilbi_jax import checkpoint
from dessilbi_jax import data
from dessilbi_jax import grouping
from dessilbi_jax import models
from dessilbi_jax import plots

OPTIMIZERS = ('dessilbi', 'sgd', 'adam') + baselines.BASELINES
INITS = ('rewind', 'reinit')

_AXIS = 'batch'      # the pmap axis name
_LOG_EVERY = 10      # steps between progress-bar updates (and NaN checks)
_EVAL_BATCH = 256


Lambdas = Union[float, tuple[tuple[str, float], ...]]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run.

  The defaults are the ``digits`` preset, the bare ``dessilbi train``;
  :func:`preset` gives each dataset's (see :data:`PRESETS` for the reasons
  behind the numbers).

  Attributes:
    model, dataset: names of :func:`dessilbi_jax.models.get_model` and
      :data:`dessilbi_jax.data.DATASETS`.
    optimizer: one of :data:`OPTIMIZERS`.
    epochs: total epochs (a resumed run continues up to this many).
    batch_size: global batch (over all devices and hosts).
    lr: α; ``lr_decay_epochs`` lists the epochs after which it is multiplied
      by ``lr_decay`` (piecewise constant, so it does not depend on ``epochs``
      and a run can be extended with ``resume``).
    momentum, weight_decay: β and ω (weight decay on leaves of rank >= 2).
    kappa, mu: κ and ν of DessiLBI.
    lambda_: λ of DessiLBI: one number for every group kind, or
      ``((kind, λ), ...)`` pairs (kinds not named get λ = 1), e.g.
      ``(('filter', 1.0), ('lasso', 0.03))``.
    normalize_groups: measure a group by ‖z_g‖ / √(group size) in the
      proximal map, so that one λ suits filters and single weights.
    sparsity: ``gmp``, ``gmp_structured``: the fraction of groups pruned at
      the end (:func:`dessilbi_jax.baselines.make_baseline`).
    penalty: ``prox_group_lasso``: λ of the penalty λ·Σ_g ‖W_g‖₂.
    seed: initialization, data order and augmentation.
    widths: the model's widths (``None``: the reference architecture).
    data_dir: where the datasets are prepared (``None``: the default).
    augment: random augmentation of training batches (datasets that have one).
    keep_checkpoints: how many epoch checkpoints to keep.
  """
  model: str = 'lenet'
  dataset: str = 'digits'
  optimizer: str = 'dessilbi'
  epochs: int = 60
  batch_size: int = 64
  lr: float = 0.1
  lr_decay_epochs: tuple[int, ...] = (40,)
  lr_decay: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 0.0
  kappa: float = 1.0
  mu: float = 20.0
  lambda_: Lambdas = 0.2
  normalize_groups: bool = True
  sparsity: float = 0.9
  penalty: float = 1e-3
  seed: int = 0
  widths: Optional[tuple[int, ...]] = None
  data_dir: Optional[str] = None
  augment: bool = True
  keep_checkpoints: int = 3

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: Mapping[str, Any]) -> 'TrainConfig':
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown TrainConfig field(s) {unknown}; the fields are {sorted(known)}.')
    values = dict(values)
    for name in ('widths', 'lr_decay_epochs'):
      if values.get(name) is not None:
        values[name] = tuple(values[name])
    if isinstance(values.get('lambda_'), (list, tuple)):
      values['lambda_'] = tuple((str(kind), float(lam)) for kind, lam in values['lambda_'])
    return cls(**values)


# Why these numbers. Starting from Z = 0, Z_g integrates (α/ν)·W_g, so a group of norm ‖W_g‖ enters
# Γ's support after about λ·ν / (α·‖W_g‖) steps (ALGORITHM.md); with normalize_groups ‖W_g‖ is the
# group's RMS, ≈ 1/√fan_in at initialization for a conv filter and for a single dense weight alike.
PRESETS = {
    # 60 epochs of 22 steps (batch 64 of 1,442 images): 880 steps at α = 0.1, then 440 at α = 0.01 during
    # which Z moves ten times slower, so the support settles while W fine-tunes. LeNet's groups differ in
    # size (25 and 150 weights per filter, single dense weights), so groups are measured by their RMS
    # (normalize_groups) and one λ = 0.2 serves all: λ·ν/α = 40 steps per unit of RMS, so the first
    # layer's filters (RMS ≈ 0.2) enter around epoch 9, dense weights (|w| ≈ 0.1) from epoch 18 and the
    # second layer's filters (RMS ≈ 0.08) from epoch 23, unless training makes them larger sooner; the
    # coupling (W − Γ)/ν pulls the weights that do not matter towards zero, so about a quarter of the
    # weights and 85 % of the filters end in the support and W ⊙ 1[Γ≠0] is as accurate as W. Chosen
    # on a held-out fifth of the training split: unnormalized λ = 0.3 keeps 20 % of the weights too, but
    # its early supports hold every filter and almost no dense weight (tickets at chance); normalized
    # λ = 0.1 keeps half the weights.
    'digits': TrainConfig(),
    # 30 epochs of 62 steps (batch 64 of 4,000 signals), α/10 after epoch 20. The 1-D convnet's groups
    # differ in size (5 to 75 weights per filter, single dense weights), so groups are measured by their
    # RMS (normalize_groups) and one λ = 0.1 serves all: λ·ν/α = 20 steps per unit of RMS, so the
    # first layer's filters (RMS ≈ 0.45) enter in epoch 1, the others (RMS ≈ 0.12) around epoch 3 and
    # the dense weights (|w| ≈ 0.09) from epoch 4 on, the strongest first; by the end nearly every group
    # is in (this small network uses them all), so its sparse structures are the early supports, the
    # tickets. Chosen on a held-out fifth of the training split (3 seeds) among four settings: this one's
    # ticket at half the filters beat GMP at the same per-layer sparsity by 2.6 points; λ = 1 for
    # filters with 0.03 for dense weights by 0.2, λ = 2 / 0.03 lost by 1.5, and unnormalized λ = 0.3
    # lets every filter in before any dense weight (early tickets near chance).
    'mnist1d': TrainConfig(model='conv1d', dataset='mnist1d', epochs=30, lr_decay_epochs=(20,), lambda_=0.1),
}


def preset(dataset: str = 'digits', **overrides) -> TrainConfig:
  """The preset of ``dataset`` (:data:`PRESETS`) with ``overrides`` replacing its fields.

  A dataset without a preset gets the defaults with LeNet-5 for images and
  the 1-D convnet for signals. Adam starts from α = 1e-3 unless ``lr`` is
  given.

  Example::

    >>> from dessilbi_jax import train
    >>> cfg = train.preset('mnist1d', seed=1)
    >>> cfg.model, cfg.seed
    ('conv1d', 1)
  """
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f'Unknown TrainConfig field(s) {unknown}; the fields are {sorted(known)}.')
  if dataset in PRESETS:
    cfg = PRESETS[dataset]
  else:
    signals = len(data.dataset_info(dataset).input_shape) == 2
    cfg = TrainConfig(model='conv1d' if signals else 'lenet', dataset=dataset)
  if overrides.get('optimizer') == 'adam' and 'lr' not in overrides:
    overrides['lr'] = 1e-3
  return dataclasses.replace(cfg, **overrides)


class TrainState(NamedTuple):
  """What a checkpoint holds: enough to continue bit for bit."""
  step: jax.Array         # updates done so far = position in the data
  params: Any
  batch_stats: Any        # {} for models without batch norm
  opt_state: Any
  rng: jax.Array          # raw PRNG key; step k uses fold_in(rng, k)


class TrainResult(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any
  init_params: Any
  history: list[dict[str, Any]]


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """α, multiplied by ``cfg.lr_decay`` after each epoch in ``cfg.lr_decay_epochs``."""
  return _schedule(cfg.lr, tuple(sorted(int(e) for e in cfg.lr_decay_epochs)), cfg.lr_decay, steps_per_epoch)


def _schedule(lr, lr_decay_epochs, lr_decay, steps_per_epoch) -> optax.Schedule:
  return optax.piecewise_constant_schedule(lr, {e * steps_per_epoch: lr_decay for e in lr_decay_epochs})


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer ``cfg.optimizer`` with the learning-rate schedule of ``cfg``.

  ``'dessilbi'``: :func:`dessilbi_jax.dessilbi` with κ, ν, λ (conv kernels by
  filter, dense kernels by weight); ``'sgd'``: SGD with heavy-ball momentum;
  ``'adam'``: AdamW; the names of :data:`dessilbi_jax.baselines.BASELINES`:
  :func:`dessilbi_jax.baselines.make_baseline` over ``cfg.epochs`` with
  ``cfg.sparsity`` (GMP) or ``cfg.penalty`` (group lasso). Weight decay
  applies to leaves of rank >= 2 throughout. Equal settings give the same
  object, so that :func:`fit` reuses its compiled step.
  """
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}.')
  total_steps = cfg.epochs * steps_per_epoch if cfg.optimizer in baselines.BASELINES else None
  return _optimizer(cfg.optimizer, cfg.lr, tuple(sorted(int(e) for e in cfg.lr_decay_epochs)), cfg.lr_decay, cfg.momentum,
                    cfg.weight_decay, cfg.kappa, cfg.mu, cfg.lambda_, cfg.normalize_groups,
                    cfg.sparsity, cfg.penalty, steps_per_epoch, total_steps)


@functools.lru_cache(maxsize=32)
def _optimizer(name, lr, lr_decay_epochs, lr_decay, momentum, weight_decay, kappa, mu, lambda_,
               normalize_groups, sparsity, penalty, steps_per_epoch, total_steps) -> optax.GradientTransformation:
  schedule = _schedule(lr, lr_decay_epochs, lr_decay, steps_per_epoch)
  decayed = lambda params: jax.tree.map(lambda w: jnp.ndim(w) >= 2, params)
  if name == 'dessilbi':
    return dl.dessilbi(schedule, kappa=kappa, mu=mu, momentum=momentum, weight_decay=weight_decay,
                       lambdas=dict(lambda_) if isinstance(lambda_, tuple) else lambda_,
                       normalize_groups=normalize_groups)
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decayed),
                       optax.sgd(schedule, momentum=momentum or None))
  if name == 'adam':
    return optax.adamw(schedule, weight_decay=weight_decay, mask=decayed)
  return baselines.make_baseline(name, schedule, total_steps=total_steps, momentum=momentum,
                                 weight_decay=weight_decay, sparsity=sparsity, lambda_=penalty)


def build_model(cfg: TrainConfig):
  """``(model, dataset_info)`` for ``cfg``; ValueError for unknown names."""
  info = data.dataset_info(cfg.dataset)
  model = models.get_model(cfg.model, info.num_classes, info.input_shape, widths=cfg.widths)
  return model, info


def init_variables(model, input_shape, key) -> dict[str, Any]:
  """``model.init`` under jit (one compilation instead of one per initializer op)."""
  return jax.device_get(_jitted_init(model, tuple(input_shape))(key))


@functools.lru_cache(maxsize=8)
def _jitted_init(model, input_shape):
  return jax.jit(lambda key: model.init(key, jnp.zeros((1, *input_shape)), train=False))


def check_config(cfg: TrainConfig) -> None:
  """Raises ValueError for a config that cannot run here, before any work."""
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}.')
  if cfg.epochs < 1:
    raise ValueError(f'epochs must be >= 1, got {cfg.epochs}.')
  devices = jax.local_device_count() * jax.process_count()
  if cfg.batch_size < 1 or cfg.batch_size % devices:
    raise ValueError(
        f'The batch size {cfg.batch_size} does not split over the {devices} devices: use a '
        f'multiple of {devices}, e.g. --batch-size {max(devices, cfg.batch_size // devices * devices)}.')
  if not math.isfinite(cfg.lr) or cfg.lr <= 0:
    raise ValueError(f'lr must be a positive number, got {cfg.lr}.')
  build_model(cfg)
  steps_per_epoch = data.steps_per_epoch(cfg.dataset, cfg.batch_size)
  if steps_per_epoch < 1:
    raise ValueError(f'The batch size {cfg.batch_size} is larger than the {cfg.dataset} training set.')
  make_optimizer(cfg, steps_per_epoch)  # checks λ, κ, ν, the sparsity and the penalty


def fit(cfg: TrainConfig, out_dir=None, *, resume: bool = False,
        tx: Optional[optax.GradientTransformation] = None, masks=None, init_params=None,
        quiet: bool = False) -> TrainResult:
  """Trains ``cfg`` data-parallel over all local devices; see the module docstring.

  Args:
    cfg: the run.
    out_dir: where to write metrics, path, plots and checkpoints (``None``:
      nothing is written and ``resume`` is unavailable). An existing non-empty
      directory is an error unless ``resume``.
    resume: continue the run in ``out_dir`` from its last checkpoint up to
      ``cfg.epochs``; ``cfg`` must equal the saved one except for ``epochs``.
    tx: an optimizer to use instead of :func:`make_optimizer`.
    masks: bool pytree like the params (``None`` leaves: unmasked); masked
      weights are zero from the start and stay exactly zero.
    init_params: params to start from instead of a fresh initialization.
    quiet: no progress bar, no per-epoch lines.

  Returns:
    A :class:`TrainResult` (params etc. of one replica, as numpy arrays).

  Raises:
    ValueError: bad config, directory, checkpoint or inputs (before training).
    FloatingPointError: the loss became NaN or infinite; nothing is saved
      after the last good epoch.
  """
  check_config(cfg)
  model, info = build_model(cfg)
  if 'axis_name' in getattr(type(model), '__dataclass_fields__', {}):
    model = model.clone(axis_name=_AXIS)  # batch norm statistics over the whole global batch
  run_dir = _check_dir(out_dir, resume)
  writer = run_dir is not None and jax.process_index() == 0
  steps_per_epoch = data.steps_per_epoch(cfg.dataset, cfg.batch_size)
  tx = tx if tx is not None else make_optimizer(cfg, steps_per_epoch)

  init_key, rng = jax.random.split(jax.random.PRNGKey(cfg.seed))
  variables = init_variables(model, info.input_shape, init_key)
  params = variables['params']
  if init_params is not None:
    _check_same_shapes(init_params, params, 'init_params')
    params = init_params
  if masks is not None:
    masks = _full_masks(masks, params)
    params = _apply_masks(params, masks)
  state = TrainState(step=jnp.zeros([], jnp.int32), params=params,
                     batch_stats=variables.get('batch_stats', {}), opt_state=_jit(tx.init)(params), rng=rng)

  has_gamma = bool(dl.find_states(state.opt_state))
  path = _Path()
  history: list[dict[str, Any]] = []
  if resume:
    _check_resumable(run_dir, cfg)
    state, record = checkpoint.restore(run_dir / 'checkpoints', state)
    init_params = checkpoint.load_tree(run_dir / 'init_params', params)
  else:
    init_params = jax.device_get(params)
  # Opening the data now fails fast (and before anything is written) if it is not prepared.
  batches = data.train_batches(cfg.dataset, cfg.batch_size, seed=cfg.seed, start_step=int(state.step),
                               num_devices=jax.local_device_count(), augment=cfg.augment, data_dir=cfg.data_dir)
  if resume:
    # Forget what was written after the checkpoint (a run killed between the two).
    history = [h for h in _read_history(run_dir) if h['epoch'] <= record['epoch']]
    path = _Path.load(run_dir / 'path.npz', record['epoch'])
    if writer:
      (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(h) + '\n' for h in history))
      path.save(run_dir / 'path.npz', steps_per_epoch)
      _write_config(run_dir, cfg)  # the new total of epochs
  elif run_dir is not None:
    if writer:
      run_dir.mkdir(parents=True, exist_ok=True)
      _write_config(run_dir, cfg)
    checkpoint.save_tree(run_dir / 'init_params', init_params)

  start_epoch = int(state.step) // steps_per_epoch
  say = (lambda s: None) if quiet or jax.process_index() != 0 else tqdm.write
  if resume:
    say(f'Resuming {run_dir} after epoch {start_epoch} (step {int(state.step)}) up to epoch {cfg.epochs}.')
  replicated = jax_utils.replicate(state)
  replicated_masks = None if masks is None else jax_utils.replicate(masks)
  train_step = _make_train_step(model, tx)
  manager = None if run_dir is None else checkpoint.open_manager(
      run_dir / 'checkpoints', max_to_keep=cfg.keep_checkpoints)
  schedule = learning_rate_schedule(cfg, steps_per_epoch)
  try:
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
      start = time.perf_counter()
      replicated, loss, acc = _train_epoch(train_step, replicated, replicated_masks, batches, epoch, cfg,
                                           steps_per_epoch, run_dir, quiet)
      state = jax.device_get(jax_utils.unreplicate(replicated))
      row = _epoch_metrics(model, cfg, state, has_gamma, masks)
      row.update(epoch=epoch, step=int(state.step), lr=float(schedule(int(state.step) - 1)),
                 train_loss=loss, train_acc=acc, seconds=round(time.perf_counter() - start, 3))
      history.append(row)
      path.append(epoch, int(state.step), state, has_gamma)
      if writer:
        with open(run_dir / 'metrics.jsonl', 'a') as f:
          f.write(json.dumps(row) + '\n')
        path.save(run_dir / 'path.npz', steps_per_epoch)
      if manager is not None:
        checkpoint.save(manager, epoch, state, {'epoch': epoch, 'step': int(state.step)})
      say(_summary_line(row, cfg.epochs))
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  if writer and history:
    write_plots(run_dir, history, path.entry_steps, steps_per_epoch)
  return TrainResult(state.params, state.batch_stats, state.opt_state, init_params, history)


def evaluate(model, variables, dataset: str, split: str = 'test', *, batch_size: int = _EVAL_BATCH,
             data_dir=None) -> float:
  """Accuracy of ``model`` with ``variables`` on a whole split, over all local devices."""
  num_devices = jax.local_device_count()
  per_step = num_devices * jax.process_count()
  batch_size = -(-batch_size // per_step) * per_step
  replicated = jax_utils.replicate(variables)
  counts = [_eval_step(model)(replicated, batch) for batch in
            data.eval_batches(dataset, split, batch_size, num_devices=num_devices, data_dir=data_dir)]
  correct, total = np.sum(jax.device_get(jax_utils.unreplicate(counts)), axis=0)
  return float(correct / total)


def load_config(run_dir) -> TrainConfig:
  """The TrainConfig saved in a run directory."""
  path = pathlib.Path(run_dir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{run_dir} is not a training run: it has no config.json.')
  return TrainConfig.from_json(json.loads(path.read_text()))


def load_path(run_dir) -> dict[str, np.ndarray]:
  """The arrays of ``path.npz`` in a run directory."""
  path = pathlib.Path(run_dir) / 'path.npz'
  if not path.is_file():
    raise FileNotFoundError(f'{run_dir} has no path.npz: the run recorded no epoch of a DessiLBI path.')
  with np.load(path) as arrays:
    return dict(arrays)


def ticket_masks(run_dir, epoch: int, params) -> Any:
  """Masks (bool pytree like ``params``) of Γ's support after ``epoch`` of the run.

  Leaves without structure get ``None`` (kept whole).
  """
  path = load_path(run_dir)
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
  fresh one (seed + 1). Writes ``metrics.jsonl``, ``ticket.json`` and plots
  into ``out_dir`` (default ``run_dir/ticket-epoch<E>-<init>``).

  Returns:
    A dict with ``test_acc``, ``params_kept``, ``params``, ``flops`` and
    ``dense_flops`` (multiply-accumulates of one forward pass), and more.
  """
  run_dir = pathlib.Path(run_dir)
  if init not in INITS:
    raise ValueError(f'Unknown --init {init!r}; choose one of {INITS}.')
  run_cfg = load_config(run_dir)
  cfg = dataclasses.replace(run_cfg, optimizer='sgd', epochs=epochs or run_cfg.epochs,
                            lr=lr or run_cfg.lr, seed=run_cfg.seed + (init == 'reinit'))
  check_config(cfg)
  model, info = build_model(cfg)
  template = init_variables(model, info.input_shape, jax.random.PRNGKey(0))['params']
  masks = ticket_masks(run_dir, epoch, template)
  init_params = checkpoint.load_tree(run_dir / 'init_params', template) if init == 'rewind' else None
  out_dir = pathlib.Path(out_dir) if out_dir else run_dir / f'ticket-epoch{epoch}-{init}'
  result = fit(cfg, out_dir, resume=resume, masks=masks, init_params=init_params, quiet=quiet)

  pruned = sum(int(np.size(m) - np.count_nonzero(m)) for m in jax.tree.leaves(masks))
  total = models.count_params(result.params)
  report = dict(
      run=str(run_dir), out=str(out_dir), epoch=epoch, init=init, epochs=cfg.epochs,
      test_acc=result.history[-1]['dense_test_acc'],
      run_dense_test_acc=_run_metric(run_dir, epoch, 'dense_test_acc'),
      run_sparse_test_acc=_run_metric(run_dir, epoch, 'sparse_test_acc'),
      params=total, params_kept=total - pruned,
      flops=models.count_flops(model, info.input_shape, params=result.params),
      dense_flops=models.count_flops(model, info.input_shape))
  if jax.process_index() == 0:
    (out_dir / 'ticket.json').write_text(json.dumps(report, indent=2) + '\n')
  return report


def write_plots(run_dir, history, entry_steps, steps_per_epoch: int) -> None:
  """``plots/accuracy.png``, ``plots/support.png`` and (with a path) ``plots/entry_steps.png``."""
  plot_dir = pathlib.Path(run_dir) / 'plots'
  plots.plot_accuracy(history, plot_dir / 'accuracy.png')
  plots.plot_support(history, plot_dir / 'support.png')
  if entry_steps:
    plots.plot_entry_steps(entry_steps, plot_dir / 'entry_steps.png', steps_per_epoch)


# The steps.

@functools.lru_cache(maxsize=8)
def _make_train_step(model, tx):
  """The pmapped step: (replicated state, sharded batch, replicated masks) -> (state, metrics)."""

  def loss_fn(params, state, batch, dropout_rng):
    variables = {'params': params}
    if state.batch_stats:
      variables['batch_stats'] = state.batch_stats
      logits, new_vars = model.apply(variables, batch['image'], train=True, mutable=['batch_stats'],
                                     rngs={'dropout': dropout_rng})
      batch_stats = new_vars['batch_stats']
    else:
      logits = model.apply(variables, batch['image'], train=True, rngs={'dropout': dropout_rng})
      batch_stats = state.batch_stats
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return loss, (logits, batch_stats)

  def step(state: TrainState, batch, masks):
    dropout_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(_AXIS))
    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch, dropout_rng)
    grads = jax.lax.pmean(grads, _AXIS)
    # Models whose batch norm is not synced keep per-device statistics: average them so replicas agree.
    batch_stats = jax.lax.pmean(batch_stats, _AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if masks is not None:
      params = _apply_masks(params, masks)
    metrics = {'loss': loss, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == batch['label'])}
    new_state = TrainState(state.step + 1, params, batch_stats, opt_state, state.rng)
    return new_state, jax.lax.pmean(metrics, _AXIS)

  return jax.pmap(step, axis_name=_AXIS, donate_argnums=(0,))


@functools.lru_cache(maxsize=8)
def _eval_step(model):
  """pmapped (replicated variables, sharded batch) -> (correct, count) over all devices."""

  def counts(variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch['label']) * batch['mask'])
    return jax.lax.psum(jnp.stack([correct, jnp.sum(batch['mask'])]), _AXIS)

  return jax.pmap(counts, axis_name=_AXIS)


def _train_epoch(train_step, replicated, masks, batches, epoch, cfg, steps_per_epoch, run_dir, quiet):
  """One epoch of steps with a progress bar; stops on a non-finite loss."""
  bar = tqdm(total=steps_per_epoch, desc=f'epoch {epoch}/{cfg.epochs}', leave=False,
             disable=quiet or jax.process_index() != 0, dynamic_ncols=True)
  first_step = int(jax_utils.unreplicate(replicated.step))
  losses, accuracies, pending = [], [], []
  start = time.perf_counter()
  for i in range(steps_per_epoch):
    replicated, metrics = train_step(replicated, next(batches), masks)
    pending.append(metrics)
    if len(pending) == _LOG_EVERY or i == steps_per_epoch - 1:
      fetched = jax.device_get(jax_utils.unreplicate(pending))
      for j, m in enumerate(fetched):
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


# Metrics and the path.

def _epoch_metrics(model, cfg, state: TrainState, has_gamma: bool, masks) -> dict[str, Any]:
  variables = lambda params: {'params': params, **({'batch_stats': state.batch_stats} if state.batch_stats else {})}
  evaluate_params = lambda params: evaluate(model, variables(params), cfg.dataset, data_dir=cfg.data_dir,
                                            batch_size=max(_EVAL_BATCH, cfg.batch_size))
  row = {'dense_test_acc': evaluate_params(state.params)}
  if has_gamma:
    row['sparse_test_acc'] = evaluate_params(_sparse_params(state.params, state.opt_state))
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


class _Path:
  """The per-epoch support of every structured leaf's groups, and entry steps."""

  def __init__(self):
    self.epochs: list[int] = []
    self.steps: list[int] = []
    self.support: dict[str, list[np.ndarray]] = {}
    self.entry_steps: dict[str, np.ndarray] = {}
    self.kinds: dict[str, str] = {}

  def append(self, epoch: int, step: int, state: TrainState, has_gamma: bool) -> None:
    if not has_gamma:
      return
    self.epochs.append(epoch)
    self.steps.append(step)
    flat = lambda tree: jax.tree.structure(state.params).flatten_up_to(tree)
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    for (keypath, w), s, e in zip(leaves, flat(dl.support(state.opt_state)), flat(dl.entry_step(state.opt_state))):
      if s is None:
        continue
      name = grouping.path_str(keypath)
      kind = grouping.kind_of(np.shape(w), np.shape(e))
      per_group = np.any(np.asarray(s), axis=grouping.reduce_axes(kind, np.ndim(w)), keepdims=True)
      self.support.setdefault(name, []).append(per_group)
      self.entry_steps[name] = np.asarray(e)
      self.kinds[name] = kind

  def save(self, file: pathlib.Path, steps_per_epoch: int) -> None:
    if not self.epochs:
      return
    arrays = {'epoch': np.asarray(self.epochs), 'step': np.asarray(self.steps),
              'steps_per_epoch': np.asarray(steps_per_epoch)}
    for name, rows in self.support.items():
      arrays[f'support/{name}'] = np.stack(rows)
      arrays[f'entry_step/{name}'] = self.entry_steps[name]
      arrays[f'kind/{name}'] = np.asarray(self.kinds[name])
    tmp = file.with_name(file.name + '.tmp.npz')
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, file)  # a reader never sees half a file

  @classmethod
  def load(cls, file: pathlib.Path, last_epoch: int) -> '_Path':
    path = cls()
    if not file.is_file():
      return path
    with np.load(file) as arrays:
      keep = np.asarray(arrays['epoch']) <= last_epoch
      path.epochs = [int(e) for e in arrays['epoch'][keep]]
      path.steps = [int(s) for s in arrays['step'][keep]]
      for key in arrays.files:
        if key.startswith('support/'):
          name = key[len('support/'):]
          path.support[name] = list(arrays[key][keep])
          path.entry_steps[name] = arrays[f'entry_step/{name}']
          path.kinds[name] = str(arrays[f'kind/{name}'])
    # The entry steps saved are those of the file's last epoch; forget entries after last_epoch.
    last_step = path.steps[-1] if path.steps else -1
    path.entry_steps = {name: np.where(e <= last_step, e, -1) for name, e in path.entry_steps.items()}
    return path


# Files and checks.

def _check_dir(out_dir, resume: bool) -> Optional[pathlib.Path]:
  """The run directory, checked but not yet created."""
  if out_dir is None:
    if resume:
      raise ValueError('resume needs the directory of the run to continue (--out DIR).')
    return None
  run_dir = pathlib.Path(out_dir)
  if resume:
    if not (run_dir / 'config.json').is_file():
      raise FileNotFoundError(f'Nothing to resume in {run_dir}: it holds no run (no config.json). '
                              'Start it without --resume.')
    return run_dir
  if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
    raise FileExistsError(f'{run_dir} already exists and is not empty; pass --resume to continue '
                          'the run in it, or choose another --out. Nothing was overwritten.')
  return run_dir


_RESUMABLE_CHANGES = ('epochs', 'data_dir', 'keep_checkpoints')


def _check_resumable(run_dir: pathlib.Path, cfg: TrainConfig) -> None:
  saved = load_config(run_dir)
  changed = [f.name for f in dataclasses.fields(cfg)
             if f.name not in _RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(cfg, f.name)]
  if changed:
    diff = ', '.join(f'{n}: {getattr(saved, n)!r} -> {getattr(cfg, n)!r}' for n in changed)
    raise ValueError(f'A resumed run keeps its configuration except {_RESUMABLE_CHANGES}; changed: {diff}. '
                     'Start a new run (another --out) to change them.')


def _write_config(run_dir: pathlib.Path, cfg: TrainConfig) -> None:
  (run_dir / 'config.json').write_text(json.dumps(cfg.to_json(), indent=2) + '\n')


def _read_history(run_dir: pathlib.Path) -> list[dict[str, Any]]:
  file = run_dir / 'metrics.jsonl'
  if not file.is_file():
    return []
  return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _run_metric(run_dir: pathlib.Path, epoch: int, key: str):
  rows = [h for h in _read_history(run_dir) if h['epoch'] == epoch]
  return rows[-1].get(key) if rows else None


def _check_same_shapes(tree, reference, name: str) -> None:
  shapes = lambda t: jax.tree.map(np.shape, t)
  if jax.tree.structure(tree) != jax.tree.structure(reference) or shapes(tree) != shapes(reference):
    raise ValueError(f'{name} does not match the model: got shapes {shapes(tree)}, '
                     f'the model has {shapes(reference)}.')


def _full_masks(masks, params):
  """Bool masks of each leaf's shape; ``None`` leaves become all-True."""
  flat_masks = jax.tree.structure(params).flatten_up_to(masks)
  full = [np.ones(np.shape(w), bool) if m is None else np.broadcast_to(np.asarray(m, bool), np.shape(w))
          for m, w in zip(flat_masks, jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), full)


def _apply_masks(params, masks):
  return jax.tree.map(lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, masks)


def _fraction(part: int, whole: int) -> Optional[float]:
  return part / whole if whole else None


def _summary_line(row: Mapping[str, Any], epochs: int) -> str:
  percent = lambda v: '  –  ' if v is None else f'{100 * v:5.1f}%'
  # Filters (neurons, heads) are few and telling: count them apart from the single weights.
  per_kind = {}
  for leaf in row['per_leaf'].values():
    if leaf['kind'] not in (None, 'lasso'):
      kept, total = per_kind.get(leaf['kind'], (0, 0))
      per_kind[leaf['kind']] = (kept + leaf['groups_in_support'], total + leaf['groups'])
  kinds = ''.join(f' {kind}s {kept}/{total}' for kind, (kept, total) in per_kind.items())
  return (f'epoch {row["epoch"]:3d}/{epochs}  step {row["step"]:6d}  loss {row["train_loss"]:.4f}  '
          f'train {percent(row["train_acc"])}  test dense {percent(row["dense_test_acc"])}  '
          f'sparse {percent(row["sparse_test_acc"])}  support: groups {percent(row["groups_kept"])}  '
          f'weights {percent(row["weights_kept"])}{kinds}  ({row["seconds"]:.1f} s)')
