r"""L0 gates in the trainer: ``dessilbi train --optimizer l0 --target-density ε`` (and ``l0_penalty``).

Gallego-Posada et al. 2022 (``docs/CONTROLLED_SPARSITY.md``): one hard-concrete gate
per unit of the model's unit map (conv output channels, through BatchNorm's
scale and bias where there is one; dense hidden neurons), trained beside the
weights as an :class:`~dessilbi_jax.train.ExtraTrainable`::

  z ~ hard-concrete(log α)     one sample per step, from the step's key
  L = cross_entropy(f(θ ⊙ z)) + Σ_k λ_k·(density_k(log α) − ε)   (constrained)
    = cross_entropy(f(θ ⊙ z)) + λ·density(log α)                 (penalized, λ = --penalty)
  θ ← SGD-momentum (the run's schedule);  log α ← clip(log α − η_g·∂L/∂log α, ±log 100)
  λ ← max(0, λ + η_λ·(density − ε)), and 0 where the constraint holds (dual restarts)

``η_g`` (``--gates-lr``) is never decayed; the weights start rescaled by
``1/(1 − p₀)`` (``--droprate-init`` p₀). Test accuracies use the median gates;
every epoch also reports the expected density, the multipliers and the purged
network (median gates folded in, shut units removed): its accuracy, params and MACs.

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

from dessilbi_jax.l0 import constraints
from dessilbi_jax import l0
from dessilbi_jax import structure
from dessilbi_jax.l0 import unit_gates
from dessilbi_jax.train import steps
from dessilbi_jax.train.extensions import Extension
from dessilbi_jax.train.extensions import ExtraTrainable

NAME = 'l0'
# The defaults of train.optimizers.L0 / L0Penalty (--gates-lr, --dual-lr, --droprate-init).
GATES_LR = 10.0       # measured on digits: at 1.0 (the seed paper's on ImageNet) the gates came down too slowly
DUAL_LR = 0.1         # η_λ when --dual-lr is not given: at 0.01, mnist1d's gates saturated above a 30 % target
DROPRATE_INIT = 0.3   # p₀ of the seed paper on CIFAR (Louizos's 0.5 on MNIST came down as well, less stably)


def clamped(tx: optax.GradientTransformation, low: float, high: float) -> optax.GradientTransformation:
  """``tx`` whose params stay in ``[low, high]``: the update becomes ``clip(p + u, low, high) − p``."""
  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return jax.tree.map(lambda u, p: jnp.clip(p + u, low, high) - p, updates, params), state
  return optax.GradientTransformation(tx.init, update)


def _unit_map(cfg):
  model, info = steps.build_model(cfg)
  variables = steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))
  return model, structure.trace(model, variables, jnp.zeros((1, *info.input_shape))), variables


def l0_extension(cfg) -> Extension:
  """The :class:`~dessilbi_jax.train.Extension` of an ``l0`` / ``l0_penalty`` run of ``cfg``."""
  model, unit_map, template = _unit_map(cfg)
  names = unit_gates.gated_groups(unit_map)
  sizes = unit_gates.group_sizes(template, unit_map, names)
  opt = cfg.opt   # train.optimizers.L0 or L0Penalty: the defaults are theirs
  droprate = opt.droprate_init
  penalized = cfg.optimizer == 'l0_penalty'
  violation = (lambda a: l0.model_density(a, sizes)) if penalized else l0.density_constraint(
      sizes, opt.target_density, scope=opt.constraint)

  def init(params, key):
    del params
    keys = jax.random.split(key, len(names))
    log_alpha = {n: l0.init_log_alpha(k, (unit_map[n].size,), droprate) for n, k in zip(names, keys)}
    values = violation(log_alpha)
    fill = opt.penalty if penalized else 0.0   # the multipliers start at 0 (constrained), at λ (penalized)
    return {'log_alpha': log_alpha, 'multipliers': jax.tree.map(lambda v: jnp.full_like(v, fill), values)}

  gates_tx = clamped(optax.sgd(opt.gates_lr), -l0.LOG_ALPHA_BOUND, l0.LOG_ALPHA_BOUND)
  dual_tx = optax.set_to_zero() if penalized else constraints.dual_sgd(opt.dual_lr)
  tx = optax.multi_transform({'gates': gates_tx, 'dual': dual_tx},
                             {'log_alpha': 'gates', 'multipliers': 'dual'})

  def gated(params, z):
    return structure.gate({'params': params}, unit_map, z)['params']

  def forward(params, extra, key):
    z = l0.sample_gates_tree(key, extra['log_alpha'])
    terms = jax.tree.map(lambda m, v: m * v, extra['multipliers'], violation(extra['log_alpha']))
    return gated(params, z), sum(jax.tree.leaves(terms))

  def evaluate(params, extra):
    return gated(params, jax.tree.map(l0.median_gates, extra['log_alpha']))

  def prepare(params):   # the paper's rescaling of the initial weights by 1/(1 − p₀)
    scale = l0.init_weight_scale(droprate)
    return jax.device_get(structure.gate({'params': params}, unit_map, {
        n: jnp.full((unit_map[n].size,), scale) for n in names})['params'])

  def metrics(epoch) -> dict[str, Any]:
    extra = epoch.state.extra[NAME]
    log_alpha = {n: np.asarray(a) for n, a in extra['log_alpha'].items()}
    variables = steps.variables(epoch.state.params, epoch.state.batch_stats)
    keep = structure.keep_from_gates(unit_map, {n: l0.median_gates(a) for n, a in log_alpha.items()})
    params, macs = structure.count(unit_map, variables, keep)
    small_model, small_vars = unit_gates.purge(model, variables, unit_map, log_alpha)
    multipliers = jax.tree.map(float, extra['multipliers'])
    return dict(expected_density=float(l0.model_density(log_alpha, sizes)),
                layer_densities={k: float(v) for k, v in l0.layer_densities(log_alpha, sizes).items()},
                multipliers=multipliers, multiplier_max=max(jax.tree.leaves(multipliers)),
                purged_test_acc=epoch.evaluate(small_model, small_vars), purged_params=params, purged_macs=macs)

  def summary(row) -> str:
    target = '' if penalized else f', target {100 * opt.target_density:.1f}%'
    return (f'L0 density {100 * row["expected_density"]:.1f}%{target} (λ {row["multiplier_max"]:.3g}); purged '
            f'network {100 * row["purged_test_acc"]:.1f}% with {row["purged_params"]:,} params, '
            f'{row["purged_macs"]:,} MACs')

  return Extension(NAME, trainable=ExtraTrainable(init, tx, forward, evaluate, prepare), metrics=metrics,
                   summary=summary)


def _example_init(cfg):
  """``(params, key)`` for the docstring's example."""
  model, info = steps.build_model(cfg)
  return steps.init_variables(model, info.input_shape, jax.random.PRNGKey(0))['params'], jax.random.PRNGKey(1)


