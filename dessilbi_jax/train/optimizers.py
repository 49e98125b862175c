"""The optimizers a run can train with, and their learning-rate schedule."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl
from dessilbi_jax import baselines
from dessilbi_jax import models
from dessilbi_jax.core import target_density as targets

if TYPE_CHECKING:
  from dessilbi_jax.train.config import TrainConfig

OPTIMIZERS = ('dessilbi', 'sgd', 'adam') + baselines.BASELINES + ('l0', 'l0_penalty')


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  """α, multiplied by ``cfg.lr_decay`` after each epoch in ``cfg.lr_decay_epochs``."""
  return _schedule(cfg.lr, _decay_epochs(cfg), cfg.lr_decay, steps_per_epoch)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer ``cfg.optimizer`` with the learning-rate schedule of ``cfg``.

  ``'dessilbi'``: :func:`dessilbi_jax.dessilbi` with κ, ν, λ (conv kernels by
  filter, dense kernels by weight; the transformers' attention heads and MLP
  neurons, :func:`dessilbi_jax.models.default_groups`); ``'sgd'``: SGD with heavy-ball momentum;
  ``'adam'``: AdamW; ``'l0'``, ``'l0_penalty'``: the weights' SGD-momentum
  of an L0-gated run (the gates train beside them:
  :mod:`dessilbi_jax.train.l0_gates`); the names of :data:`dessilbi_jax.baselines.BASELINES`:
  :func:`dessilbi_jax.baselines.make_baseline` over ``cfg.epochs`` with
  ``cfg.sparsity`` (GMP) or ``cfg.penalty`` (group lasso). DessiLBI with
  ``cfg.target_density`` steers λ to it (``cfg.target_method``,
  ``cfg.constraint``, ``cfg.dual_lr``). Weight decay
  applies to leaves of rank >= 2 throughout. Equal settings give the same
  object, so that :func:`dessilbi_jax.train.fit` reuses its compiled step.
  """
  if cfg.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {cfg.optimizer!r}; choose one of {OPTIMIZERS}.')
  total_steps = cfg.epochs * steps_per_epoch if cfg.optimizer in baselines.BASELINES else None
  return _optimizer(cfg.optimizer, cfg.lr, _decay_epochs(cfg), cfg.lr_decay, cfg.momentum, cfg.weight_decay,
                    cfg.kappa, cfg.mu, cfg.lambdas, cfg.normalize_groups, cfg.sparsity, cfg.penalty,
                    steps_per_epoch, total_steps, _target(cfg), cfg.store_gamma, _groups(cfg))


def _groups(cfg: TrainConfig):
  """The model's DessiLBI grouping rule (the transformers': heads and neurons), hashable: ``((pattern, kind), ...)``."""
  groups = models.default_groups(cfg.model)
  return None if groups is None else tuple(groups.items())


def _target(cfg: TrainConfig):
  """DessiLBI's :class:`~dessilbi_jax.core.target_density.Target` of ``cfg`` (``None`` without a target density)."""
  if cfg.target_density is None or cfg.optimizer != 'dessilbi':
    return None
  rate = targets.Target(cfg.target_density).rate if cfg.dual_lr is None else cfg.dual_lr
  return targets.Target(cfg.target_density, scope=cfg.constraint, method=cfg.target_method, rate=rate)


def _decay_epochs(cfg: TrainConfig) -> tuple[int, ...]:
  return tuple(sorted(int(e) for e in cfg.lr_decay_epochs))


def _schedule(lr, lr_decay_epochs, lr_decay, steps_per_epoch) -> optax.Schedule:
  return optax.piecewise_constant_schedule(lr, {e * steps_per_epoch: lr_decay for e in lr_decay_epochs})


@functools.lru_cache(maxsize=32)
def _optimizer(name, lr, lr_decay_epochs, lr_decay, momentum, weight_decay, kappa, mu, lambdas,
               normalize_groups, sparsity, penalty, steps_per_epoch, total_steps, target=None,
               store_gamma=True, groups=None) -> optax.GradientTransformation:
  schedule = _schedule(lr, lr_decay_epochs, lr_decay, steps_per_epoch)
  decayed = lambda params: jax.tree.map(lambda w: jnp.ndim(w) >= 2, params)
  if name == 'dessilbi':
    return dl.dessilbi(schedule, kappa=kappa, mu=mu, momentum=momentum, weight_decay=weight_decay,
                       lambdas=dict(lambdas) if isinstance(lambdas, tuple) else lambdas,
                       normalize_groups=normalize_groups, target_density=target, store_gamma=store_gamma,
                       groups=None if groups is None else dict(groups))
  if name in ('sgd', 'l0', 'l0_penalty'):
    return optax.chain(optax.add_decayed_weights(weight_decay, mask=decayed),
                       optax.sgd(schedule, momentum=momentum or None))
  if name == 'adam':
    return optax.adamw(schedule, weight_decay=weight_decay, mask=decayed)
  return baselines.make_baseline(name, schedule, total_steps=total_steps, momentum=momentum,
                                 weight_decay=weight_decay, sparsity=sparsity, penalty=penalty)
