"""The run's configuration, the datasets' presets, and the checks done before any work."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, Optional, Union

import jax

from dessilbi_jax import data
from dessilbi_jax.core import grouping
from dessilbi_jax import models
from dessilbi_jax.core import target_density
from dessilbi_jax.train.optimizers import OPTIMIZERS
from dessilbi_jax.train.optimizers import make_optimizer
from dessilbi_jax.train.steps import build_model
from dessilbi_jax.train.steps import layer_widths_field

INITS = ('rewind', 'reinit')

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
    lambdas: λ, DessiLBI's threshold in the proximal map (``dl.dessilbi(lambdas=)``):
      one number for every group kind, or ``((kind, λ), ...)`` pairs (kinds
      not named get λ = 1), e.g. ``(('filter', 1.0), ('lasso', 0.03))``.
    normalize_groups: measure a group by ‖z_g‖ / √(group size) in the
      proximal map, so that one λ suits filters and single weights.
    store_gamma: DessiLBI keeps Γ in its state (``False``: a lean state, Γ
      rebuilt from Z when read; the same numbers, 4 bytes less per weight).
    sparsity: ``gmp``, ``gmp_structured``: the fraction of groups pruned at
      the end (:func:`dessilbi_jax.baselines.make_baseline`).
    penalty: ``prox_group_lasso``: the weight of the penalty penalty·Σ_g ‖W_g‖₂
      (not DessiLBI's λ).
    target_density: DessiLBI: steer λ so that Γ's support ends on this
      fraction of the structured weights (:mod:`dessilbi_jax.core.target_density`;
      ``None``: λ as given); ``l0``: the density constraint on the gates.
    target_method: how: ``'dual'`` (dual ascent on λ, which may also lower
      it) or ``'budget'`` (a cap on the support; λ only rises).
    constraint: ``'model'`` (one density over every structured layer) or
      ``'layer'`` (each layer's).
    dual_lr: the dual learning rate (DessiLBI ``'dual'``: how fast λ moves
      per step and unit of density gap, ``None``: 0.01; ``l0``: the multipliers', ``None``: 0.1).
    gates_lr, droprate_init: ``l0``, ``l0_penalty``: the gates' own learning
      rate (never decayed; ``None``: 10) and p₀ of their initialization
      (``None``: 0.3). ``l0_penalty`` takes ``penalty`` as its fixed λ.
    seed: initialization, data order and augmentation.
    widths: the model's widths (``None``: the reference architecture).
    layer_widths: the ResNets' per-layer widths of a removed or grown network,
      ``((name, value), ...)`` pairs of :data:`dessilbi_jax.models.LAYER_WIDTHS`
      (``get_model``'s ``block_widths=...``, ...; ``None``: from ``widths``).
    data_dir: where the datasets are prepared (``None``: the default).
    augment: random augmentation of training batches (datasets that have one).
    keep_checkpoints: how many epoch checkpoints to keep (>= 1).
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
  lambdas: Lambdas = 0.2
  normalize_groups: bool = True
  store_gamma: bool = True
  sparsity: float = 0.9
  penalty: float = 1e-3
  target_density: Optional[float] = None
  target_method: str = 'dual'
  constraint: str = 'model'
  dual_lr: Optional[float] = None
  gates_lr: Optional[float] = None
  droprate_init: Optional[float] = None
  seed: int = 0
  widths: Optional[tuple[int, ...]] = None
  layer_widths: Optional[tuple[tuple[str, Any], ...]] = None
  data_dir: Optional[str] = None
  augment: bool = True
  keep_checkpoints: int = 3

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: Mapping[str, Any]) -> 'TrainConfig':
    """The config of ``to_json`` (also those written before ``lambda_`` was renamed ``lambdas``)."""
    values = dict(values)
    if 'lambda_' in values and 'lambdas' not in values:
      values['lambdas'] = values.pop('lambda_')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown TrainConfig field(s) {unknown}; the fields are {sorted(known)}.')
    for name in ('widths', 'lr_decay_epochs'):
      if values.get(name) is not None:
        values[name] = tuple(values[name])
    values['layer_widths'] = layer_widths_field(values.get('layer_widths'))
    if isinstance(values.get('lambdas'), (list, tuple)):
      values['lambdas'] = tuple((str(kind), float(lam)) for kind, lam in values['lambdas'])
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
    'mnist1d': TrainConfig(model='conv1d', dataset='mnist1d', epochs=30, lr_decay_epochs=(20,), lambdas=0.1),
}


def preset(dataset: str = 'digits', **overrides) -> TrainConfig:
  """The preset of ``dataset`` (:data:`PRESETS`) with ``overrides`` replacing its fields.

  A dataset without a preset gets the defaults with LeNet-5 for images and
  the 1-D convnet for signals. Adam starts from α = 1e-3 unless ``lr`` is
  given; L0-gated runs (``l0``, ``l0_penalty``) from half the preset's α (at
  digits' 0.1 the gated LeNet collapsed to chance, as plain SGD-momentum does
  on one seed in three; at 0.05 it trains, ``benchmarks/controlled_sparsity.py``).

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
  if overrides.get('optimizer') in ('l0', 'l0_penalty') and 'lr' not in overrides:
    overrides['lr'] = cfg.lr / 2
  return dataclasses.replace(cfg, **overrides)


class ConfigError(ValueError):
  """A bad value of a :class:`TrainConfig` field; the CLI names its flag instead (``flag``)."""

  def __init__(self, field: str, problem: str):
    super().__init__(f'{field}: {problem}')
    self.field, self.problem = field, problem

  def with_flag(self) -> str:
    flag = {'lambdas': 'lambda'}.get(self.field, self.field).replace('_', '-')
    return f'--{flag}: {self.problem}'


def check_values(cfg: TrainConfig) -> None:
  """Raises :class:`ConfigError` for a field of the wrong type or out of range (no I/O, no JAX).

  Example::

    >>> from dessilbi_jax import train
    >>> train.check_values(train.TrainConfig(kappa='1'))
    Traceback (most recent call last):
    ...
    dessilbi_jax.train.config.ConfigError: kappa: must be a number, got '1' (str).
  """
  def number(field, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    value = getattr(cfg, field)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
      raise ConfigError(field, f'must be {"an integer" if integer else "a number"}, got {value!r} '
                               f'({type(value).__name__}).')
    if not math.isfinite(value):
      raise ConfigError(field, f'must be finite, got {value}.')
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
      interval = (f'{"(" if low_open else "["}{"-inf" if low is None else low}, '
                  f'{"inf" if high is None else high}{")" if high_open or high is None else "]"}')
      raise ConfigError(field, f'must be in {interval}, got {value}.')

  for field in ('model', 'dataset', 'optimizer'):
    if not isinstance(getattr(cfg, field), str):
      raise ConfigError(field, f'must be a name, got {getattr(cfg, field)!r}.')
  if cfg.optimizer not in OPTIMIZERS:
    raise ConfigError('optimizer', f'Unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}.')
  number('epochs', low=1, integer=True)
  number('batch_size', low=1, integer=True)
  number('lr', low=0, low_open=True)
  number('lr_decay', low=0, low_open=True)
  number('momentum', low=0, high=1, high_open=True)
  number('weight_decay', low=0)
  number('kappa', low=0, low_open=True)
  number('mu', low=0, low_open=True)
  number('sparsity', low=0, high=1, high_open=True)
  number('penalty', low=0)
  if cfg.target_density is not None:
    number('target_density', low=0, high=1, low_open=True)
    if cfg.optimizer not in ('dessilbi', 'l0'):
      raise ConfigError('target_density', f'--target-density steers DessiLBI\'s λ or constrains L0 gates; '
                                          f'--optimizer {cfg.optimizer} cannot take it (leave it out, or use '
                                          '--optimizer dessilbi or l0).')
  elif cfg.optimizer == 'l0':
    raise ConfigError('target_density', '--optimizer l0 needs --target-density, the density the gates must '
                                        'keep (e.g. --target-density 0.3); for a fixed penalty use '
                                        '--optimizer l0_penalty --penalty 0.001.')
  if cfg.gates_lr is not None:
    number('gates_lr', low=0, low_open=True)
  if cfg.droprate_init is not None:
    number('droprate_init', low=0, high=1, low_open=True, high_open=True)
  if cfg.target_method not in target_density.METHODS:
    raise ConfigError('target_method', f'must be one of {target_density.METHODS}, got {cfg.target_method!r}.')
  if cfg.constraint not in target_density.SCOPES:
    raise ConfigError('constraint', f'must be one of {target_density.SCOPES}, got {cfg.constraint!r}.')
  if cfg.dual_lr is not None:
    number('dual_lr', low=0, low_open=True)
  number('seed', low=0, high=2 ** 63 - 1, integer=True)   # what jax.random.key takes
  number('keep_checkpoints', low=1, integer=True)
  if not isinstance(cfg.lr_decay_epochs, tuple) or any(
      isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 1 for e in cfg.lr_decay_epochs):
    raise ConfigError('lr_decay_epochs', f'must be epochs >= 1, got {cfg.lr_decay_epochs!r}.')
  if cfg.widths is not None and (not isinstance(cfg.widths, tuple) or not cfg.widths or any(
      isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in cfg.widths)):
    raise ConfigError('widths', f'must be positive integers, got {cfg.widths!r}.')
  if cfg.layer_widths is not None and (not isinstance(cfg.layer_widths, tuple) or not cfg.layer_widths or any(
      not isinstance(p, tuple) or len(p) != 2 or p[0] not in models.LAYER_WIDTHS for p in cfg.layer_widths)):
    raise ConfigError('layer_widths', f'must be (name, value) pairs of {models.LAYER_WIDTHS}, got '
                                      f'{cfg.layer_widths!r}.')
  pairs = cfg.lambdas if isinstance(cfg.lambdas, tuple) else (('every kind', cfg.lambdas),)
  for kind, lam in pairs:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
      raise ConfigError('lambdas', f'must be finite numbers >= 0, got {lam!r} for {kind}.')
  unknown = sorted({kind for kind, _ in pairs} - set(grouping.KINDS) - {'every kind'})
  if unknown:
    raise ConfigError('lambdas', f'names unknown group kind(s) {unknown}; kinds are {grouping.KINDS}.')
  for field in ('normalize_groups', 'augment'):
    if not isinstance(getattr(cfg, field), bool):
      raise ConfigError(field, f'must be True or False, got {getattr(cfg, field)!r}.')


def check_config(cfg: TrainConfig) -> None:
  """Raises ValueError for a config that cannot run here, before any work.

  :func:`check_values`, then the names of the model and dataset, the batch
  against the devices and the training set, and the optimizer's own checks.
  """
  check_values(cfg)
  devices = jax.local_device_count() * jax.process_count()
  if cfg.batch_size % devices:
    raise ConfigError(
        'batch_size', f'The batch size {cfg.batch_size} does not split over the {devices} devices: use a '
                      f'multiple of {devices}, e.g. --batch-size {max(devices, cfg.batch_size // devices * devices)}.')
  build_model(cfg)
  if cfg.batch_size > data.dataset_info(cfg.dataset).num_train:
    raise ConfigError('batch_size', f'The batch size {cfg.batch_size} is larger than the {cfg.dataset} '
                                    f'training set ({data.dataset_info(cfg.dataset).num_train} examples).')
  make_optimizer(cfg, data.steps_per_epoch(cfg.dataset, cfg.batch_size))
