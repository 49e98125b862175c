r"""L0 gates in the trainer: ``dessilbi train --optimizer l0 --target-density ε`` (and ``l0_penalty``).

Gallego-Posada et al. 2022 (docs/CONTROLLED_SPARSITY.md): one hard-concrete
gate per unit of the model's unit map (:mod:`dessilbi_jax.l0.unit_gates`: conv
output channels, through BatchNorm's scale and bias where there is one; dense
hidden neurons), trained beside the weights as an
:class:`~dessilbi_jax.train.ExtraTrainable`::

  z ~ hard-concrete(log α)     one sample per step, from the step's key
  L = cross_entropy(f(θ ⊙ z)) + Σ_k λ_k·(size_k(log α) − ε)      (constrained)
    = cross_entropy(f(θ ⊙ z)) + λ·density(log α)                 (penalized, λ = --penalty)
  θ ← SGD-momentum (the run's schedule);  log α ← clamp(log α − η_g·∂L/∂log α)  (l0.clamped)
  λ ← max(0, λ + η_λ·(size − ε)), and 0 where the constraint holds (constraints.dual_ascent)

``size`` is :func:`~dessilbi_jax.l0.unit_gates.expected_size`: the expected
fraction of the network's kernel entries (``target_density``) or of its MACs
(``target_macs``), model-wise or per layer (``cfg.constraint``). ``η_g``
(``--gates-lr``) is never decayed; the weights start rescaled by ``1/(1 − p₀)``
(``--droprate-init`` p₀). Test accuracies use the median gates; every epoch
also reports the expected density and MACs, the multipliers and the purged
network (median gates folded in, shut units removed): its accuracy, kernel
density, params and MACs.

Example::

  >>> import dataclasses
  >>> from dessilbi_jax import train
  >>> cfg = dataclasses.replace(train.preset('digits'), model='mlp', optimizer='l0', target_density=0.3, epochs=1)
  >>> ext = train.l0_extension(cfg)
  >>> ext.name, sorted(ext.trainable.init(*_example_init(cfg)))
  ('l0', ['log_alpha', 'multipliers'])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import l0
from dessilbi_jax import structure
from dessilbi_jax.l0 import constraints
from dessilbi_jax.l0 import unit_gates
from dessilbi_jax.train import steps
from dessilbi_jax.train.extensions import Extension
from dessilbi_jax.train.extensions import ExtraTrainable

NAME = 'l0'
# The defaults of train.optimizers.L0 / L0Penalty (--gates-lr, --dual-lr, --droprate-init).
GATES_LR = 10.0       # measured on digits: at 1.0 (the seed paper's on ImageNet) the gates came down too slowly
DUAL_LR = 0.1         # η_λ when --dual-lr is not given: at 0.01, mnist1d's gates saturated above a 30 % target
DROPRATE_INIT = 0.3   # p₀ of the seed paper on CIFAR (Louizos's 0.5 on MNIST came down as well, less stably)
_FROM_CFG = object()


def _unit_map(cfg):
  model, info = steps.build_model(cfg)
  variables = steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))
  return model, structure.trace(model, variables, jnp.zeros((1, *info.input_shape))), variables


def l0_extension(cfg, *, target_density=_FROM_CFG, target_macs=_FROM_CFG) -> Extension:
  """The :class:`~dessilbi_jax.train.Extension` of an ``l0`` / ``l0_penalty`` run of ``cfg``.

  Args:
    cfg: the run's config (``optimizer``, ``constraint``, ``gates_lr``,
      ``dual_lr``, ``droprate_init``, ``penalty``).
    target_density: the constrained run's target, a fraction of the network's
      conv and dense kernel entries (default: ``cfg.target_density``).
    target_macs: or a fraction of its multiply-accumulates (default:
      ``cfg.target_macs`` where the config has one); one of the two.
  """
  opt = cfg.opt   # train.optimizers.L0 or L0Penalty: the defaults are theirs
  target_density = getattr(opt, 'target_density', None) if target_density is _FROM_CFG else target_density
  target_macs = getattr(opt, 'target_macs', None) if target_macs is _FROM_CFG else target_macs
  model, unit_map, template = _unit_map(cfg)
  names = unit_gates.gated_groups(unit_map)
  droprate = opt.droprate_init
  penalized = cfg.optimizer == 'l0_penalty'
  size = lambda log_alpha: unit_gates.expected_size(unit_map, template, jax.tree.map(l0.prob_active, log_alpha))
  violation = (lambda a: size(a)['density']) if penalized else unit_gates.size_constraint(
      unit_map, template, target_density=target_density, target_macs=target_macs, scope=opt.constraint)

  def init(params, key):
    del params
    log_alpha = unit_gates.init_log_alphas(key, unit_map, names, droprate)
    fill = opt.penalty if penalized else 0.0   # the multipliers start at 0 (constrained), at λ (penalized)
    return {'log_alpha': log_alpha,
            'multipliers': jax.tree.map(lambda v: jnp.full_like(v, fill), violation(log_alpha))}

  gates_tx = l0.clamped(optax.sgd(opt.gates_lr))
  dual_tx = optax.set_to_zero() if penalized else constraints.dual_ascent(opt.dual_lr)
  tx = optax.multi_transform({'gates': gates_tx, 'dual': dual_tx},
                             {'log_alpha': 'gates', 'multipliers': 'dual'})

  def forward(params, extra, key):
    # ∂/∂λ of this term is the violation: the dual step's input.
    terms = jax.tree.map(lambda m, v: m * v, extra['multipliers'], violation(extra['log_alpha']))
    gated = unit_gates.apply_gates({'params': params}, unit_map, extra['log_alpha'], key)
    return gated['params'], sum(jax.tree.leaves(terms))

  def evaluate(params, extra):
    return unit_gates.apply_gates({'params': params}, unit_map, extra['log_alpha'])['params']

  def prepare(params):   # the paper's rescaling of the initial weights by 1/(1 − p₀)
    return jax.device_get(unit_gates.rescale({'params': params}, unit_map, names, droprate)['params'])

  def metrics(epoch) -> dict[str, Any]:
    extra = epoch.state.extra[NAME]
    log_alpha = {n: np.asarray(a) for n, a in extra['log_alpha'].items()}
    variables = steps.variables(epoch.state.params, epoch.state.batch_stats)
    sizes = unit_gates.summary(variables, unit_map, log_alpha)
    keep = structure.keep_from_gates(unit_map, {n: l0.median_gates(a) for n, a in log_alpha.items()})
    params, macs = structure.count(unit_map, variables, keep)
    small_model, small_vars = unit_gates.purge(model, variables, unit_map, log_alpha)
    multipliers = jax.tree.map(float, extra['multipliers'])
    return dict(expected_density=sizes['expected_density'], expected_macs=sizes['expected_macs'],
                layer_densities={k: float(v) for k, v in size(log_alpha)['layers'].items()},
                multipliers=multipliers, multiplier_max=max(jax.tree.leaves(multipliers)),
                purged_test_acc=epoch.evaluate(small_model, small_vars), purged_density=sizes['purged_density'],
                purged_params=params, purged_macs=macs)

  def summary(row) -> str:
    target = ('' if penalized else f', target {100 * target_density:.1f}%' if target_density is not None
              else f', MACs target {100 * target_macs:.1f}%')
    return (f'L0 density {100 * row["expected_density"]:.1f}%{target} (λ {row["multiplier_max"]:.3g}); purged '
            f'network {100 * row["purged_test_acc"]:.1f}% with {row["purged_params"]:,} params, '
            f'{row["purged_macs"]:,} MACs')

  return Extension(NAME, trainable=ExtraTrainable(init, tx, forward, evaluate, prepare), metrics=metrics,
                   summary=summary)


def _example_init(cfg):
  """``(params, key)`` for the docstring's example."""
  model, info = steps.build_model(cfg)
  return steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))['params'], jax.random.PRNGKey(1)


