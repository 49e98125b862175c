"""The run's configuration, the datasets' presets, and the checks done before any work."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any, Optional

import jax

from dessilbi_jax import data
from dessilbi_jax import models
from dessilbi_jax.train.optimizers import OPTIMIZERS
from dessilbi_jax.train.optimizers import ConfigError
from dessilbi_jax.train.optimizers import check_bool
from dessilbi_jax.train.optimizers import check_number
from dessilbi_jax.train.optimizers import config_from_json
from dessilbi_jax.train.optimizers import fields_of
from dessilbi_jax.train.optimizers import make_optimizer
from dessilbi_jax.train.optimizers import option_fields
from dessilbi_jax.train.optimizers import owners
from dessilbi_jax.train.steps import build_model
from dessilbi_jax.train.steps import layer_widths_field

INITS = ('rewind', 'reinit')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training run.

  The defaults are the ``digits`` preset, the bare ``dessilbi train``;
  :func:`preset` gives each dataset's (see :data:`PRESETS` for the reasons
  behind the numbers).

  The optimizer's own hyperparameters are ``opt``, an instance of its
  registry entry's sub-config (:data:`dessilbi_jax.train.OPTIMIZERS`:
  ``DessiLBI`` holds κ, ν, λ and the target density, ``L0`` the gates'
  constraint, ``GMP`` the sparsity, ...). They may be given and read flat,
  as the command line gives them: ``TrainConfig(optimizer='l0',
  target_density=0.3)`` is ``TrainConfig(optimizer='l0',
  opt=L0(target_density=0.3))``, ``cfg.kappa`` is ``cfg.opt.kappa``, and
  ``dataclasses.replace(cfg, kappa=2.0)`` replaces it in ``opt``. A field the
  optimizer does not have is an error (``None`` counts as not given); another
  ``optimizer`` starts from its own sub-config's defaults.

  Attributes:
    model, dataset: names of :func:`dessilbi_jax.models.get_model` and
      :data:`dessilbi_jax.data.DATASETS`.
    optimizer: a name of :data:`~dessilbi_jax.train.OPTIMIZERS`.
    opt: its sub-config (``None``: the defaults).
    epochs: total epochs (a resumed run continues up to this many).
    batch_size: global batch (over all devices and hosts).
    lr: α; ``lr_decay_epochs`` lists the epochs after which it is multiplied
      by ``lr_decay`` (piecewise constant, so it does not depend on ``epochs``
      and a run can be extended with ``resume``).
    momentum, weight_decay: β and ω (weight decay on leaves of rank >= 2).
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
  opt: Any = None
  epochs: int = 60
  batch_size: int = 64
  lr: float = 0.1
  lr_decay_epochs: tuple[int, ...] = (40,)
  lr_decay: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 0.0
  seed: int = 0
  widths: Optional[tuple[int, ...]] = None
  layer_widths: Optional[tuple[tuple[str, Any], ...]] = None
  data_dir: Optional[str] = None
  augment: bool = True
  keep_checkpoints: int = 3

  def __getattr__(self, name: str):
    # Only for names that are not fields: the optimizer's own, read flat (cfg.kappa is cfg.opt.kappa).
    opt = self.__dict__.get('opt')
    if opt is not None and not name.startswith('__') and name in fields_of(opt):
      return getattr(opt, name)
    raise AttributeError(f'TrainConfig has no field {name!r}' + (
        f' (--optimizer {self.__dict__.get("optimizer")} has no such option; it is one of {owners(name)}\'s)'
        if owners(name) else ''))

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: Mapping[str, Any]) -> 'TrainConfig':
    """The config of ``to_json``; also a flat one, as written before the optimizer registry (every
    optimizer's fields side by side: those of other optimizers are dropped, ``null`` ones take the
    default), and one written before ``lambda_`` was renamed ``lambdas``."""
    values = dict(values)
    if 'lambda_' in values and 'lambdas' not in values:
      values['lambdas'] = values.pop('lambda_')
    known = set(_FIELDS) | set(option_fields())
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown TrainConfig field(s) {unknown}; the fields are {sorted(known)}.')
    name = values.get('optimizer', cls.optimizer)
    flat = {k: values.pop(k) for k in option_fields() if k in values}
    if name in OPTIMIZERS:
      config = OPTIMIZERS[name].config
      if isinstance(values.get('opt'), Mapping):
        values['opt'] = config_from_json(config, values['opt'])
      elif values.get('opt') is None:
        values['opt'] = config_from_json(config, {k: v for k, v in flat.items()
                                                  if k in fields_of(config) and v is not None})
    for name in ('widths', 'lr_decay_epochs'):
      if values.get(name) is not None:
        values[name] = tuple(values[name])
    values['layer_widths'] = layer_widths_field(values.get('layer_widths'))
    return cls(**values)


_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_fields_init = TrainConfig.__init__


def _init(self, **values) -> None:
  """The dataclass's ``__init__``, with the optimizer's fields also given flat (class docstring)."""
  flat = {k: values.pop(k) for k in list(values) if k not in _FIELDS}
  name = values.get('optimizer', TrainConfig.optimizer)
  entry = OPTIMIZERS.get(name) if isinstance(name, str) else None
  if entry is None:   # check_values names the optimizer; nothing to route the fields to
    unknown = sorted(k for k, v in flat.items() if v is not None)
    if unknown:
      raise ConfigError(unknown[0], f'is not a TrainConfig field of --optimizer {name!r}.')
  else:
    opt = values.get('opt')
    if isinstance(opt, Mapping):
      opt = config_from_json(entry.config, opt)
    if type(opt) is not entry.config:
      opt = entry.config()
    given = {k: v for k, v in flat.items() if v is not None or k in fields_of(opt)}
    for key in given:
      if key not in fields_of(opt):
        takers = owners(key)
        if not takers:
          raise TypeError(f'TrainConfig got an unexpected keyword argument {key!r}')
        raise ConfigError(key, f'an option of --optimizer {" or ".join(takers)}; --optimizer {name} cannot '
                               f'take it (leave it out, or use --optimizer {takers[0]}).')
    values['opt'] = dataclasses.replace(opt, **given)
  _fields_init(self, **values)


TrainConfig.__init__ = _init


# Why these numbers. Starting from Z = 0, Z_g integrates (α/ν)·W_g, so a group of norm ‖W_g‖ enters
# Γ's support after about λ·ν / (α·‖W_g‖) steps (docs/ALGORITHM.md); with normalize_groups ‖W_g‖ is the
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

  ``overrides`` may name the optimizer's fields flat (:class:`TrainConfig`).
  A dataset without a preset gets the defaults with LeNet-5 for images and
  the 1-D convnet for signals. Another ``optimizer`` starts from its registry
  entry's α unless ``lr`` is given (Adam 1e-3; the L0-gated runs half the
  preset's, :data:`~dessilbi_jax.train.OPTIMIZERS`).

  Example::

    >>> from dessilbi_jax import train
    >>> cfg = train.preset('mnist1d', seed=1)
    >>> cfg.model, cfg.seed, cfg.opt.lambdas
    ('conv1d', 1, 0.1)
  """
  known = set(_FIELDS) | set(option_fields())
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f'Unknown TrainConfig field(s) {unknown}; the fields are {sorted(known)}.')
  if dataset in PRESETS:
    cfg = PRESETS[dataset]
  else:
    signals = len(data.dataset_info(dataset).input_shape) == 2
    cfg = TrainConfig(model='conv1d' if signals else 'lenet', dataset=dataset)
  entry = OPTIMIZERS.get(overrides.get('optimizer'))
  if entry is not None and entry.lr is not None and 'lr' not in overrides:
    overrides['lr'] = entry.lr(cfg.lr)
  return dataclasses.replace(cfg, **overrides)


def check_values(cfg: TrainConfig) -> None:
  """Raises :class:`ConfigError` for a field of the wrong type or out of range (no I/O, no JAX).

  Example::

    >>> from dessilbi_jax import train
    >>> train.check_values(train.TrainConfig(kappa='1'))
    Traceback (most recent call last):
    ...
    dessilbi_jax.train.optimizers.ConfigError: kappa: must be a number, got '1' (str).
  """
  for field in ('model', 'dataset', 'optimizer'):
    if not isinstance(getattr(cfg, field), str):
      raise ConfigError(field, f'must be a name, got {getattr(cfg, field)!r}.')
  if cfg.optimizer not in OPTIMIZERS:
    raise ConfigError('optimizer', f'Unknown optimizer {cfg.optimizer!r}; choose one of {tuple(OPTIMIZERS)}.')
  cfg.opt.check()
  check_number('epochs', cfg.epochs, low=1, integer=True)
  check_number('batch_size', cfg.batch_size, low=1, integer=True)
  check_number('lr', cfg.lr, low=0, low_open=True)
  check_number('lr_decay', cfg.lr_decay, low=0, low_open=True)
  check_number('momentum', cfg.momentum, low=0, high=1, high_open=True)
  check_number('weight_decay', cfg.weight_decay, low=0)
  check_number('seed', cfg.seed, low=0, high=2 ** 63 - 1, integer=True)   # what jax.random.key takes
  check_number('keep_checkpoints', cfg.keep_checkpoints, low=1, integer=True)
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
  check_bool('augment', cfg.augment)


def check_config(cfg: TrainConfig) -> None:
  """Raises ValueError for a config that cannot run here, before any work.

  :func:`check_values`, then the names of the model and dataset, the batch
  against the devices and the training set, and the optimizer's own build.
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
