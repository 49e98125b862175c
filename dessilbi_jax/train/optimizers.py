"""The optimizers a run can train with: one registry entry each.

:data:`OPTIMIZERS` maps a name to an :class:`Optimizer`: the dataclass of its
own hyperparameters (the run's ``TrainConfig.opt``), the function that builds
its optax transformation from them, and the extensions it trains with (as
jaxpruner's ``ALGORITHM_REGISTRY`` maps an algorithm to its updater, and
big_vision's ``optax_name`` / ``optax`` pair names a transformation and its
arguments). A field lives in one sub-config, with one meaning and one default
(:func:`field` carries its ``--help`` text), so ``dessilbi train --target-density
0.3`` reaches the maths in three hops::

  --target-density 0.3  ->  DessiLBI.target_density  ->  build_dessilbi: Target(0.3)  ->  dl.dessilbi

A new optimizer is one entry: its sub-config, its build, its extensions
(factories ``cfg -> Extension | None``); its flags appear in ``dessilbi train
--help`` by themselves.

Example::

  >>> from dessilbi_jax import train
  >>> cfg = train.TrainConfig(optimizer='l0', target_density=0.3)
  >>> cfg.opt
  L0(gates_lr=10.0, droprate_init=0.3, target_density=0.3, constraint='model', dual_lr=0.1)
  >>> train.OPTIMIZERS['gmp'].config()
  GMP(sparsity=0.9)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl
from dessilbi_jax import baselines
from dessilbi_jax import models
from dessilbi_jax.core import grouping
from dessilbi_jax.core import target_density as targets
from dessilbi_jax.train import l0_gates
from dessilbi_jax.train.compact_report import compact_extension
from dessilbi_jax.train.extensions import Extension

if TYPE_CHECKING:
  from dessilbi_jax.train.config import TrainConfig

Lambdas = Union[float, tuple[tuple[str, float], ...]]


class ConfigError(ValueError):
  """A bad value of a config field; the CLI names its flag instead (``flag``)."""

  def __init__(self, field: str, problem: str):
    super().__init__(f'{field}: {problem}')
    self.field, self.problem = field, problem

  def with_flag(self) -> str:
    return f'{flag_of(self.field)}: {self.problem}'


def flag_of(name: str) -> str:
  """The command-line flag of a config field (``lambdas`` is ``--lambda``)."""
  return '--' + {'lambdas': 'lambda'}.get(name, name).replace('_', '-')


def check_number(field: str, value, *, low=None, high=None, low_open=False, high_open=False,
                 integer=False) -> None:
  """Raises :class:`ConfigError` unless ``value`` is a finite number (an integer) in the interval."""
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


def check_choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(field, f'must be one of {tuple(choices)}, got {value!r}.')


def check_bool(field: str, value) -> None:
  if not isinstance(value, bool):
    raise ConfigError(field, f'must be True or False, got {value!r}.')


def field(default, help: str):
  """A sub-config field with its ``dessilbi train --help`` text (the default is added to it)."""
  return dataclasses.field(default=default, metadata={'help': help})


def fields_of(config) -> tuple[str, ...]:
  return tuple(f.name for f in dataclasses.fields(config))


def _tuples(value):
  """JSON lists back to the tuples the config held (λ per kind: pairs)."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def config_from_json(config: type, values: Mapping[str, Any]):
  """The sub-config ``config`` of its ``dataclasses.asdict`` (read back from JSON)."""
  unknown = sorted(set(values) - set(fields_of(config)))
  if unknown:
    raise ValueError(f'Unknown {config.__name__} field(s) {unknown}; the fields are {list(fields_of(config))}.')
  return config(**{k: _tuples(v) for k, v in values.items()})


# The sub-configs: each optimizer's own hyperparameters (those every optimizer shares, α and its
# schedule, momentum and weight decay, are TrainConfig's).


@dataclasses.dataclass(frozen=True)
class DessiLBI:
  """DessiLBI's κ, ν, λ and its target density (:func:`dessilbi_jax.dessilbi`)."""
  kappa: float = field(1.0, 'damping κ')
  mu: float = field(20.0, 'coupling ν')
  lambdas: Lambdas = field(0.2, 'threshold λ: one number, or kind=λ pairs such as filter=1 lasso=0.03 (kinds not '
                                'named keep the preset\'s; mnist1d 0.1)')
  normalize_groups: bool = field(True, 'measure groups by ‖z_g‖/√size so that one λ suits filters and single '
                                       'weights')
  store_gamma: bool = field(True, 'keep Γ in the optimizer state; --no-store-gamma: a lean state, Γ rebuilt from Z '
                                  'when read, the same numbers with 4 bytes less state per weight')
  target_density: Optional[float] = field(None, 'steer λ so that Γ\'s support ends on this fraction of the '
                                                'structured weights, e.g. 0.3')
  target_method: str = field('dual', 'with --target-density: dual (dual ascent on λ) or budget (a cap on the '
                                     'support; λ only rises)')
  constraint: str = field('model', 'with --target-density: model (one density for the network) or layer (each '
                                   'layer\'s)')
  dual_lr: float = field(targets.Target._field_defaults['rate'],
                         'with --target-density dual: how fast λ moves per step and unit of density gap')

  def check(self) -> None:
    check_number('kappa', self.kappa, low=0, low_open=True)
    check_number('mu', self.mu, low=0, low_open=True)
    pairs = self.lambdas if isinstance(self.lambdas, tuple) else (('every kind', self.lambdas),)
    for kind, lam in pairs:
      if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ConfigError('lambdas', f'must be finite numbers >= 0, got {lam!r} for {kind}.')
    unknown = sorted({kind for kind, _ in pairs} - set(grouping.KINDS) - {'every kind'})
    if unknown:
      raise ConfigError('lambdas', f'names unknown group kind(s) {unknown}; kinds are {grouping.KINDS}.')
    check_bool('normalize_groups', self.normalize_groups)
    check_bool('store_gamma', self.store_gamma)
    if self.target_density is not None:
      check_number('target_density', self.target_density, low=0, high=1, low_open=True)
    check_choice('target_method', self.target_method, targets.METHODS)
    check_choice('constraint', self.constraint, targets.SCOPES)
    check_number('dual_lr', self.dual_lr, low=0, low_open=True)


@dataclasses.dataclass(frozen=True)
class Plain:
  """No hyperparameters of its own (SGD-momentum, AdamW)."""

  def check(self) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class GMP:
  """Gradual magnitude pruning (:func:`dessilbi_jax.baselines.gmp`)."""
  sparsity: float = field(0.9, 'the fraction of groups pruned at the end')

  def check(self) -> None:
    check_number('sparsity', self.sparsity, low=0, high=1, high_open=True)


@dataclasses.dataclass(frozen=True)
class GroupLasso:
  """The proximal group lasso (:func:`dessilbi_jax.baselines.prox_group_lasso`)."""
  penalty: float = field(1e-3, 'λ of the penalty λ·Σ_g ‖W_g‖₂ (not DessiLBI\'s λ)')

  def check(self) -> None:
    check_number('penalty', self.penalty, low=0)


@dataclasses.dataclass(frozen=True)
class _Gates:
  gates_lr: float = field(l0_gates.GATES_LR, 'the gates\' own learning rate, never decayed')
  droprate_init: float = field(l0_gates.DROPRATE_INIT, 'p₀ of the gates\' initialization')

  def check(self) -> None:
    check_number('gates_lr', self.gates_lr, low=0, low_open=True)
    check_number('droprate_init', self.droprate_init, low=0, high=1, low_open=True, high_open=True)


@dataclasses.dataclass(frozen=True)
class L0(_Gates):
  """L0 gates under a density constraint, a Lagrangian (:mod:`dessilbi_jax.train.l0_gates`)."""
  target_density: Optional[float] = field(None, 'the density the gates must keep (required)')
  constraint: str = field('model', 'model (one density for the network) or layer (each layer\'s)')
  dual_lr: float = field(l0_gates.DUAL_LR, 'the Lagrange multipliers\' learning rate')

  def check(self) -> None:
    if self.target_density is None:
      raise ConfigError('target_density', '--optimizer l0 needs --target-density, the density the gates must '
                                          'keep (e.g. --target-density 0.3); for a fixed penalty use '
                                          '--optimizer l0_penalty --penalty 0.001.')
    check_number('target_density', self.target_density, low=0, high=1, low_open=True)
    check_choice('constraint', self.constraint, targets.SCOPES)
    check_number('dual_lr', self.dual_lr, low=0, low_open=True)
    super().check()


@dataclasses.dataclass(frozen=True)
class L0Penalty(_Gates):
  """L0 gates under a fixed penalty λ·density (:mod:`dessilbi_jax.train.l0_gates`)."""
  penalty: float = field(1e-3, 'λ of the penalty λ·density')

  def check(self) -> None:
    check_number('penalty', self.penalty, low=0)
    super().check()


# The build functions: (sub-config, shared settings) -> the optax transformation of the params.


class Settings(NamedTuple):
  """What every optimizer shares (TrainConfig's fields), hashable: equal settings build one object."""
  lr: float
  lr_decay_epochs: tuple[int, ...]
  lr_decay: float
  momentum: float
  weight_decay: float
  steps_per_epoch: int
  total_steps: Optional[int] = None   # given to the optimizers whose schedule ends with the run (GMP)
  groups: Optional[tuple] = None      # the model's DessiLBI grouping rule, ((pattern, kind), ...): transformers' heads

  @property
  def schedule(self) -> optax.Schedule:
    return optax.piecewise_constant_schedule(
        self.lr, {e * self.steps_per_epoch: self.lr_decay for e in self.lr_decay_epochs})


def _decayed(params):   # weight decay on kernels, not on biases and scales
  return jax.tree.map(lambda w: jnp.ndim(w) >= 2, params)


def build_dessilbi(opt: DessiLBI, s: Settings) -> optax.GradientTransformation:
  target = None if opt.target_density is None else targets.Target(
      opt.target_density, scope=opt.constraint, method=opt.target_method, rate=opt.dual_lr)
  return dl.dessilbi(s.schedule, kappa=opt.kappa, mu=opt.mu, momentum=s.momentum, weight_decay=s.weight_decay,
                     lambdas=dict(opt.lambdas) if isinstance(opt.lambdas, tuple) else opt.lambdas,
                     normalize_groups=opt.normalize_groups, target_density=target, store_gamma=opt.store_gamma,
                     groups=None if s.groups is None else dict(s.groups))


def build_sgd(opt, s: Settings) -> optax.GradientTransformation:
  del opt
  return optax.chain(optax.add_decayed_weights(s.weight_decay, mask=_decayed),
                     optax.sgd(s.schedule, momentum=s.momentum or None))


def build_adam(opt: Plain, s: Settings) -> optax.GradientTransformation:
  del opt
  return optax.adamw(s.schedule, weight_decay=s.weight_decay, mask=_decayed)


def _baseline(name: str):
  def build(opt, s: Settings) -> optax.GradientTransformation:
    return baselines.make_baseline(name, s.schedule, total_steps=s.total_steps, momentum=s.momentum,
                                   weight_decay=s.weight_decay, **dataclasses.asdict(opt))
  return build


class Optimizer(NamedTuple):
  """A registry entry.

  Attributes:
    config: the dataclass of the optimizer's own fields (``TrainConfig.opt``),
      with a ``check()`` that raises :class:`ConfigError`.
    build: ``(opt, settings: Settings) -> optax.GradientTransformation``.
    extensions: factories ``cfg -> Extension | None`` of the extensions a run
      trains with (``None``: not for this config); a caller's extension of the
      same name replaces one.
    lr: ``preset α -> α`` the optimizer starts from when ``lr`` is not given
      (``None``: the preset's).
    needs_total_steps: its build reads ``settings.total_steps``.
  """
  config: type
  build: Callable[[Any, Settings], optax.GradientTransformation]
  extensions: tuple[Callable[[Any], Optional[Extension]], ...] = ()
  lr: Optional[Callable[[float], float]] = None
  needs_total_steps: bool = False


def _target_report(cfg) -> Optional[Extension]:
  """The target density beside the support, in each epoch's line and the run's summary."""
  if cfg.opt.target_density is None:
    return None
  return Extension('target', summary=lambda row: f'target {100 * cfg.opt.target_density:.1f}%')


# The gated LeNet collapsed to chance at digits' α = 0.1 (as plain SGD-momentum does on one seed in
# three) and trains at half of it (benchmarks/controlled_sparsity.py).
_HALF = lambda lr: lr / 2

OPTIMIZERS: dict[str, Optimizer] = {
    'dessilbi': Optimizer(DessiLBI, build_dessilbi, (compact_extension, _target_report)),
    'sgd': Optimizer(Plain, build_sgd, (compact_extension,)),
    'adam': Optimizer(Plain, build_adam, (compact_extension,), lr=lambda lr: 1e-3),
    'gmp': Optimizer(GMP, _baseline('gmp'), (compact_extension,), needs_total_steps=True),
    'gmp_structured': Optimizer(GMP, _baseline('gmp_structured'), (compact_extension,), needs_total_steps=True),
    'prox_group_lasso': Optimizer(GroupLasso, _baseline('prox_group_lasso'), (compact_extension,)),
    'l0': Optimizer(L0, build_sgd, (l0_gates.l0_extension,), lr=_HALF),
    'l0_penalty': Optimizer(L0Penalty, build_sgd, (l0_gates.l0_extension,), lr=_HALF),
}


def owners(name: str) -> tuple[str, ...]:
  """The optimizers whose sub-config has the field ``name``."""
  return tuple(o for o, entry in OPTIMIZERS.items() if name in fields_of(entry.config))


def option_fields() -> tuple[str, ...]:
  """Every sub-config field name (each once, in registry order)."""
  return tuple(dict.fromkeys(f for entry in OPTIMIZERS.values() for f in fields_of(entry.config)))


def settings(cfg: TrainConfig, steps_per_epoch: int) -> Settings:
  total = cfg.epochs * steps_per_epoch if OPTIMIZERS[cfg.optimizer].needs_total_steps else None
  groups = models.default_groups(cfg.model)
  return Settings(cfg.lr, tuple(sorted(int(e) for e in cfg.lr_decay_epochs)), cfg.lr_decay, cfg.momentum,
                  cfg.weight_decay, steps_per_epoch, total, None if groups is None else tuple(groups.items()))


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """α, multiplied by ``cfg.lr_decay`` after each epoch in ``cfg.lr_decay_epochs``."""
  return settings(cfg, steps_per_epoch).schedule


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer ``cfg.optimizer`` built from ``cfg.opt`` and the shared settings of ``cfg``.

  ``'dessilbi'``: :func:`dessilbi_jax.dessilbi` (conv kernels by filter, dense
  kernels by weight; with ``target_density`` λ is steered to it); ``'sgd'``:
  SGD with heavy-ball momentum; ``'adam'``: AdamW; ``'l0'``, ``'l0_penalty'``:
  the weights' SGD-momentum of an L0-gated run (the gates train beside them,
  an extension); the names of :data:`dessilbi_jax.baselines.BASELINES`:
  :func:`dessilbi_jax.baselines.make_baseline` over ``cfg.epochs``. Weight
  decay applies to leaves of rank >= 2 throughout. Equal settings give the
  same object, so that :func:`dessilbi_jax.train.fit` reuses its compiled step.
  """
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {cfg.optimizer!r}; choose one of {tuple(OPTIMIZERS)}.')
  return _build(cfg.optimizer, cfg.opt, settings(cfg, steps_per_epoch))


@functools.lru_cache(maxsize=32)
def _build(name: str, opt, s: Settings) -> optax.GradientTransformation:
  return OPTIMIZERS[name].build(opt, s)


def default_extensions(cfg: TrainConfig, given: Sequence[Extension] = ()) -> tuple[Extension, ...]:
  """The extensions of ``cfg.optimizer``'s entry that the caller's ``given`` do not replace (by name), then those."""
  names = {e.name for e in given}
  built = (make(cfg) for make in OPTIMIZERS[cfg.optimizer].extensions)
  return tuple(e for e in built if e is not None and e.name not in names) + tuple(given)
