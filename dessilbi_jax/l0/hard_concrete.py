r"""Hard-concrete L0 gates (Louizos, Welling, Kingma 2018), as the seed paper uses them.

One parameter ``log_α`` per gate; a gate ``z ∈ [0, 1]`` multiplies one unit group
(an output channel of a conv, an input neuron of a dense layer) or one weight.
With the constants γ = −0.1, ζ = 1.1, β = 2/3, ε = 1e-6:

  training:  u ~ U(ε, 1 − ε), one sample per gate and step, shared by the batch
             s = sigmoid((log u − log(1 − u) + log_α) / β)
             z = clip(s·(ζ − γ) + γ, 0, 1)
  P(z ≠ 0) = sigmoid(log_α − β·log(−γ/ζ))
  test:      ẑ = clip(sigmoid(log_α / β)·(ζ − γ) + γ, 0, 1)      (the median)

``log_α`` starts at ``N(log((1 − p₀)/p₀), 0.01²)`` (``p₀ = droprate_init``) and is
clamped to ``[log 1e-4, log 100]`` after every step (:func:`clamp_log_alpha`; the seed
paper's lower end, ``log 1e-2``, leaves a shut gate ``P(z ≠ 0) ≈ 4.7 %``, a floor under
the expected density). The expected density of a
layer k is ``Σ_g P_g(z ≠ 0)·|g| / N_k`` (``|g|`` the weights gate g switches off,
``N_k`` the layer's gated weights); model-wise, the mean over the gated layers
weighted by ``N_k``.

All functions take one array of ``log_α`` or, where the name says so, a pytree
of them (one leaf per gated layer).

Example::

  >>> import jax
  >>> from dessilbi_jax import l0
  >>> log_alpha = l0.init_log_alpha(jax.random.key(0), (4,), droprate_init=0.3)
  >>> z = l0.sample_gates(jax.random.key(1), log_alpha)      # training
  >>> bool(((z >= 0) & (z <= 1)).all()), z.shape
  (True, (4,))
  >>> round(float(l0.expected_density(log_alpha, group_size=9)), 2)   # p₀ = 0.3: near 92 %
  0.92

Louizos, Welling, Kingma. *Learning Sparse Neural Networks through L0
Regularization.* ICLR 2018, https://arxiv.org/abs/1712.01312.
Gallego-Posada et al. *Controlled Sparsity via Constrained Optimization.*
NeurIPS 2022, https://arxiv.org/abs/2208.04425.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dessilbi_jax.core import grouping

GAMMA = -0.1   # the stretched interval (γ, ζ) ⊃ [0, 1] puts mass on exactly 0 and 1
ZETA = 1.1
BETA = 2.0 / 3.0   # temperature
EPS = 1e-6     # keeps log u and log(1 − u) finite
# The clamp of log α. A gate at the lower end is shut for good: P(z ≠ 0) = σ(log 1e-4 + 1.599) ≈ 5e-4, so
# the expected density of a network of shut and open gates is its open fraction (the seed paper's
# log 1e-2 leaves 4.7 % per shut gate: a 10 % target then stalled at 13.5 to 17.8 %). At the upper end
# P(z ≠ 0) = 0.998 and the median gate is 1.
LOG_ALPHA_MIN = math.log(1e-4)
LOG_ALPHA_MAX = math.log(100.0)


def init_log_alpha(key: jax.Array, shape, droprate_init: float, *, std: float = 0.01,
                   dtype=jnp.float32) -> jax.Array:
  """``log_α ~ N(log((1 − p₀)/p₀), std²)``, ``p₀ = droprate_init`` ∈ (0, 1).

  The mean makes ``sigmoid(log_α) = 1 − p₀``: 0.3 on CIFAR, 0.5 on MNIST in the
  seed paper.
  """
  if not 0.0 < droprate_init < 1.0:
    raise ValueError(f'`droprate_init` must lie in (0, 1), got {droprate_init}: it is the '
                     'initial drop probability of a gate (0.3 on CIFAR, 0.5 on MNIST in the paper).')
  mean = math.log((1.0 - droprate_init) / droprate_init)
  return mean + std * jax.random.normal(key, shape, dtype)


def init_weight_scale(droprate_init: float) -> float:
  """``1/(1 − p₀)``: the factor the paper multiplies He-initialized gated weights by.

  It keeps the expected pre-activation of a gated layer at its ungated scale
  while the gates start a fraction ``p₀`` closed.
  """
  if not 0.0 < droprate_init < 1.0:
    raise ValueError(f'`droprate_init` must lie in (0, 1), got {droprate_init}.')
  return 1.0 / (1.0 - droprate_init)


def stretched_sigmoid(s: jax.Array) -> jax.Array:
  """``clip(s·(ζ − γ) + γ, 0, 1)``: the hard-concrete gate of a concrete sample ``s``."""
  return jnp.clip(s * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def sample_gates(key: jax.Array, log_alpha: jax.Array) -> jax.Array:
  """One training sample of the gates: ``u ~ U(ε, 1 − ε)``, one per gate, from ``key``.

  One sample per step, shared by every example of the batch (the seed paper's
  choice; it keeps the gated network one network per step).
  """
  u = jax.random.uniform(key, jnp.shape(log_alpha), jnp.result_type(log_alpha), EPS, 1.0 - EPS)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / BETA)
  return stretched_sigmoid(s)


def sample_gates_tree(key: jax.Array, log_alphas: Any) -> Any:
  """:func:`sample_gates` for every leaf of a pytree of gates, one key per leaf split from ``key``."""
  leaves, treedef = jax.tree.flatten(log_alphas)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(treedef, [sample_gates(k, a) for k, a in zip(keys, leaves)])


def median_gates(log_alpha: jax.Array) -> jax.Array:
  """The test-time gate ``ẑ = clip(sigmoid(log_α/β)·(ζ − γ) + γ, 0, 1)``: z's median (u = ½)."""
  return stretched_sigmoid(jax.nn.sigmoid(log_alpha / BETA))


def prob_active(log_alpha: jax.Array) -> jax.Array:
  """``P(z ≠ 0) = sigmoid(log_α − β·log(−γ/ζ))``, differentiable in ``log_α``."""
  return jax.nn.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def clamp_log_alpha(log_alpha: Any) -> Any:
  """Clamp every leaf to ``[LOG_ALPHA_MIN, LOG_ALPHA_MAX] = [log 1e-4, log 100]``; apply after every step."""
  return jax.tree.map(lambda a: jnp.clip(a, LOG_ALPHA_MIN, LOG_ALPHA_MAX), log_alpha)


def clamped(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """The gates' optimizer ``tx`` with :func:`clamp_log_alpha` after its step.

  Its update becomes ``clamp(log_α + u) − log_α``, so ``optax.apply_updates``
  leaves ``log_α`` clamped; ``update`` needs the params (``log_α``).

  Example::

    >>> import jax.numpy as jnp, optax
    >>> from dessilbi_jax import l0
    >>> tx = l0.clamped(optax.sgd(1.0))
    >>> log_alpha = jnp.array([-9.0, 0.0, 4.0])
    >>> updates, _ = tx.update(jnp.array([5.0, 1.0, -5.0]), tx.init(log_alpha), log_alpha)
    >>> [round(float(a), 2) for a in optax.apply_updates(log_alpha, updates)]
    [-9.21, -1.0, 4.61]
  """
  def update(updates, state, params=None):
    if params is None:
      raise ValueError('clamped(tx) needs log α: call update(grads, state, params=log_alpha).')
    updates, state = tx.update(updates, state, params)
    return jax.tree.map(lambda p, c: c - p, params, clamp_log_alpha(optax.apply_updates(params, updates))), state
  return optax.GradientTransformation(tx.init, update)


def expected_density(log_alpha: jax.Array, group_size: Any = 1) -> jax.Array:
  """``Σ_g P_g(z ≠ 0)·|g| / Σ_g |g|``: the expected fraction of one layer's gated weights kept.

  Args:
    log_alpha: the layer's gates.
    group_size: ``|g|``, the weights each gate switches off: one number (every
      gate of a layer usually has the same) or an array broadcastable to
      ``log_alpha``.
  """
  sizes = jnp.broadcast_to(jnp.asarray(group_size, jnp.result_type(log_alpha)), jnp.shape(log_alpha))
  return jnp.sum(prob_active(log_alpha) * sizes) / jnp.sum(sizes)


def layer_densities(log_alphas: Any, group_sizes: Any) -> Any:
  """:func:`expected_density` of every layer: a pytree of scalars shaped like ``log_alphas``.

  ``group_sizes`` has the structure of ``log_alphas`` (a number or an array per leaf).
  """
  return jax.tree.map(expected_density, log_alphas, group_sizes)


def model_density(log_alphas: Any, group_sizes: Any) -> jax.Array:
  """The model-wise expected density: every layer's weighted by its gated weights ``N_k``.

  Equals ``Σ_k Σ_g P_g·|g| / Σ_k N_k``.

  Example::

    >>> import jax.numpy as jnp
    >>> from dessilbi_jax import l0
    >>> open_, shut = 30.0, -30.0     # P(z ≠ 0) = 1 and 0 to float precision
    >>> gates = {'Conv_0': jnp.array([open_, shut]), 'Dense_0': jnp.array([open_, open_, shut])}
    >>> sizes = {'Conv_0': 27, 'Dense_0': 10}      # 3x3x3 filters; rows of 10
    >>> {k: round(float(v), 2) for k, v in l0.layer_densities(gates, sizes).items()}
    {'Conv_0': 0.5, 'Dense_0': 0.67}
    >>> round(float(l0.model_density(gates, sizes)), 2)    # (27 + 20) / (54 + 30)
    0.56
  """
  if not jax.tree.leaves(log_alphas):
    raise ValueError('`log_alphas` holds no gates: there is no density to measure.')
  sizes = jax.tree.map(lambda a, n: jnp.broadcast_to(jnp.asarray(n, jnp.result_type(a)), jnp.shape(a)),
                       log_alphas, group_sizes)
  kept = sum(jax.tree.leaves(jax.tree.map(lambda a, n: jnp.sum(prob_active(a) * n), log_alphas, sizes)))
  total = sum(jax.tree.leaves(jax.tree.map(jnp.sum, sizes)))
  return kept / total


def density_constraint(group_sizes: Any, target: Any, *, scope: str = 'layer') -> Callable[[Any], Any]:
  """The constraint ``density − ε ≤ 0`` on gates, for :mod:`dessilbi_jax.l0.constraints`.

  Args:
    group_sizes: ``|g|`` per gated layer, a pytree shaped like the gates (see
      :func:`layer_densities`).
    target: ``ε`` ∈ (0, 1]: one number, or with ``scope='layer'`` a mapping
      ``{layer path: ε}`` (paths as :func:`dessilbi_jax.core.grouping.path_str`
      writes them, e.g. ``'Dense_0'``); layers it does not name are unconstrained.
    scope: ``'layer'``: one constraint per gated layer (a pytree of scalars shaped
      like the gates); ``'model'``: one, on :func:`model_density`.

  Returns:
    ``log_alphas -> violations``.

  Example::

    >>> import jax.numpy as jnp
    >>> from dessilbi_jax import l0
    >>> gates = {'Dense_0': jnp.array([30.0, -30.0]), 'Dense_1': jnp.array([30.0, 30.0])}
    >>> per_layer = l0.density_constraint({'Dense_0': 4, 'Dense_1': 2}, 0.3)
    >>> {k: round(float(v), 2) for k, v in per_layer(gates).items()}
    {'Dense_0': 0.2, 'Dense_1': 0.7}
    >>> round(float(l0.density_constraint({'Dense_0': 4, 'Dense_1': 2}, 0.3, scope='model')(gates)), 2)
    0.37
  """
  if scope not in ('layer', 'model'):
    raise ValueError(f"`scope` must be 'layer' or 'model', got {scope!r}.")
  paths = [grouping.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(group_sizes)[0]]
  if not paths:
    raise ValueError('`group_sizes` names no gated layer: there is nothing to constrain.')
  if isinstance(target, Mapping):
    if scope == 'model':
      raise ValueError("A target per layer needs scope='layer'; scope='model' takes one number.")
    unknown = sorted(set(target) - set(paths))
    if not target or unknown:
      raise ValueError(f'The target names {unknown or "no layer"}; the gated layers are {paths}.')
    for name, value in target.items():
      _check_target(value, f'target[{name!r}]')
  else:
    _check_target(target, 'target')

  if scope == 'model':
    return lambda log_alphas: model_density(log_alphas, group_sizes) - target
  if not isinstance(target, Mapping):
    return lambda log_alphas: jax.tree.map(lambda d: d - target, layer_densities(log_alphas, group_sizes))

  def per_layer(log_alphas):
    densities = jax.tree_util.tree_flatten_with_path(layer_densities(log_alphas, group_sizes))[0]
    return {grouping.path_str(p): d - target[grouping.path_str(p)]
            for p, d in densities if grouping.path_str(p) in target}

  return per_layer


def _check_target(value: Any, name: str) -> None:
  if not 0.0 < value <= 1.0:
    raise ValueError(f'`{name}` must lie in (0, 1], the fraction of gated weights kept; got {value}.')
