r"""Inequality constraints ``g(θ) ≤ 0`` with Lagrange multipliers, optax style.

For ``min_θ loss(θ)`` subject to ``g_k(θ) ≤ 0`` the Lagrangian is

  L(θ, λ) = loss(θ) + Σ_k λ_k·g_k(θ),   λ_k ≥ 0.

Simultaneous gradient descent–ascent takes one forward/backward of ``L`` per
step: its gradient in θ is the primal step (any optax optimizer), and the
constraint values ``g`` it computed on the way are the dual step (gradient
ascent in λ, since ``∂L/∂λ_k = g_k``):

  1. λ_k ← λ_k + η·g_k                   (dual SGD)
  2. λ_k ← 0 where g_k < 0               (dual restart: the constraint is strictly satisfied)
  3. λ_k ← max(λ_k, 0)                   (projection onto λ ≥ 0)

with the multipliers starting at 0. :func:`dual_ascent` keeps and updates the
multipliers (:func:`dual_sgd`: the same step as an optax optimizer, for loops
that train the multipliers beside other state); :func:`fixed_multipliers` holds them constant, which turns the same
training code into the penalized problem ``loss + λ·g`` (the penalized L0
baseline: ``g`` the expected density, ``λ`` the penalty). :func:`lagrangian`
wraps a loss and any callable constraint into the function to differentiate.

Example: a multiply-accumulate budget. ``macs(params)`` is any differentiable
estimate, here the expected MACs of a layer of 10 gated units::

  >>> import jax, jax.numpy as jnp, optax
  >>> from dessilbi_jax.l0 import constraints
  >>> budget = 4.0
  >>> def loss_fn(params):                      # wants every unit on
  ...   return jnp.sum((params['gates'] - 1.0) ** 2)
  >>> def macs_budget(params):                  # g ≤ 0 ⇔ macs ≤ budget
  ...   return {'macs': jnp.sum(jax.nn.sigmoid(params['gates'])) / budget - 1.0}
  >>> objective = constraints.lagrangian(loss_fn, macs_budget)
  >>> primal, dual = optax.sgd(0.05), constraints.dual_ascent(5.0, restarts=False)
  >>> params = {'gates': jnp.zeros(10)}
  >>> primal_state, dual_state = primal.init(params), dual.init(macs_budget(params))
  >>> @jax.jit
  ... def step(params, primal_state, dual_state):
  ...   grads, (loss, violations) = jax.grad(objective, has_aux=True)(
  ...       params, dual_state.multipliers)
  ...   updates, primal_state = primal.update(grads, primal_state)
  ...   return optax.apply_updates(params, updates), primal_state, dual.update(dual_state, violations)
  >>> for _ in range(1000):
  ...   params, primal_state, dual_state = step(params, primal_state, dual_state)
  >>> round(float(jnp.sum(jax.nn.sigmoid(params['gates']))), 2)    # on the budget
  4.0
  >>> round(float(dual_state.multipliers['macs']), 1)   # λ* = 2·(1 − x*)/(σ'(x*)/4), σ(x*) = 0.4
  46.8

See Gallego-Posada et al., *Controlled Sparsity via Constrained Optimization*,
NeurIPS 2022, https://arxiv.org/abs/2208.04425 (dual restarts: its section 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax


class DualState(NamedTuple):
  """State of the multipliers.

  Attributes:
    count: dual steps taken so far (int32).
    multipliers: ``λ``, a pytree shaped like the constraint values, every leaf ≥ 0.
  """
  count: chex.Array
  multipliers: Any


class DualTransformation(NamedTuple):
  """``init(constraint values) -> DualState`` and ``update(state, violations) -> DualState``."""
  init: Callable[[Any], DualState]
  update: Callable[[DualState, Any], DualState]


def _zeros_like(values: Any) -> Any:
  return jax.tree.map(lambda g: jnp.zeros(jnp.shape(g), jnp.result_type(g, jnp.float32)), values)


def _dual_step(multipliers: Any, violations: Any, eta, restarts: bool) -> Any:
  """``λ ← max(λ + η·g, 0)``, then ``λ ← 0`` where ``g < 0`` if ``restarts``."""
  def step(multiplier, g):
    g = jnp.asarray(g, multiplier.dtype)
    multiplier = jnp.maximum(multiplier + eta * g, 0.0)
    return jnp.where(g < 0, 0.0, multiplier) if restarts else multiplier
  return jax.tree.map(step, multipliers, violations)


def _eta(learning_rate: optax.ScalarOrSchedule, count):
  return learning_rate(count) if callable(learning_rate) else learning_rate


def dual_ascent(learning_rate: optax.ScalarOrSchedule, *, restarts: bool = True) -> DualTransformation:
  """Dual SGD on the multipliers, with dual restarts and the projection onto λ ≥ 0.

  ``update(state, g)``: ``λ ← max(λ + η·g, 0)``, then ``λ ← 0`` where ``g < 0``
  if ``restarts``. ``g`` are the constraint values ``g_k(θ)`` (``≤ 0`` is
  satisfied) at the step's primal point, the ones the primal gradient saw.

  Args:
    learning_rate: ``η``, a number or an optax schedule of the dual step count
      (7e-4 on CIFAR, 1e-4 on MNIST in the seed paper).
    restarts: reset a multiplier to 0 as soon as its constraint is strictly
      satisfied, so a constraint that stops binding stops pulling at once. On a
      constraint that binds at the optimum λ then saw-tooths around λ* instead
      of settling; turn it off to get plain projected dual SGD.
  """
  def init(constraint_values):
    return DualState(count=jnp.zeros([], jnp.int32), multipliers=_zeros_like(constraint_values))

  def update(state, violations):
    multipliers = _dual_step(state.multipliers, violations, _eta(learning_rate, state.count), restarts)
    return DualState(count=optax.safe_int32_increment(state.count), multipliers=multipliers)

  return DualTransformation(init, update)


def dual_sgd(learning_rate: optax.ScalarOrSchedule, *, restarts: bool = True) -> optax.GradientTransformation:
  """:func:`dual_ascent` as an optax optimizer of the multipliers, for training loops that own them.

  The gradient of ``Σ_k λ_k·g_k`` in ``λ`` is ``g``: give this transformation
  those gradients and the multipliers as ``params`` (required) and
  ``optax.apply_updates`` makes the same step as :func:`dual_ascent` (ascent,
  restarts, projection). Initialize the multipliers at 0.
  """
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('dual_sgd needs the multipliers: call update(grads, state, params=multipliers).')
    new = _dual_step(params, updates, _eta(learning_rate, state.count), restarts)
    return (jax.tree.map(lambda n, p: n - p, new, params),
            optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count)))

  return optax.GradientTransformation(init, update)


def fixed_multipliers(value: Any) -> DualTransformation:
  """Multipliers that never move: the penalized problem ``loss + Σ_k λ_k·g_k``.

  ``value``: one number for every constraint, or a pytree shaped like the
  constraint values. Must be ≥ 0.
  """
  leaves = jax.tree.leaves(value)
  if not leaves or any(not jnp.all(jnp.isfinite(v) & (jnp.asarray(v) >= 0)) for v in leaves):
    raise ValueError(f'A penalty must be a finite number >= 0, got {value!r}.')

  def init(constraint_values):
    if jax.tree.structure(value) == jax.tree.structure(0.0):
      multipliers = jax.tree.map(lambda z: z + value, _zeros_like(constraint_values))
    else:
      multipliers = jax.tree.map(lambda z, v: z + v, _zeros_like(constraint_values), value)
    return DualState(count=jnp.zeros([], jnp.int32), multipliers=multipliers)

  def update(state, violations):
    del violations
    return state._replace(count=optax.safe_int32_increment(state.count))

  return DualTransformation(init, update)


def lagrangian(loss_fn: Callable[..., Any], constraint_fn: Callable[[Any], Any], *,
               has_aux: bool = False) -> Callable[..., Any]:
  """``(params, multipliers, *args) -> (loss + Σ λ_k·g_k(params), aux)``, to differentiate in ``params``.

  The multipliers enter through ``stop_gradient``: their step is
  :class:`DualTransformation`'s, not the gradient's.

  Args:
    loss_fn: ``loss_fn(params, *args, **kwargs)``, a scalar (or ``(scalar, aux)``
      with ``has_aux``).
    constraint_fn: ``constraint_fn(params)``, a pytree of constraint values
      ``g_k``, ``g_k ≤ 0`` when satisfied; any callable (an expected density
      minus its target, a MACs estimate over its budget...).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    A function returning ``(lagrangian, (loss, violations))``, or
    ``(lagrangian, (loss, violations, aux))`` with ``has_aux``; use it with
    ``jax.value_and_grad(..., has_aux=True)``.
  """
  def objective(params, multipliers, *args, **kwargs):
    out = loss_fn(params, *args, **kwargs)
    loss, aux = out if has_aux else (out, None)
    violations = constraint_fn(params)
    if jax.tree.structure(violations) != jax.tree.structure(multipliers):
      raise ValueError(f'The constraint values {jax.tree.structure(violations)} and the multipliers '
                       f'{jax.tree.structure(multipliers)} differ in structure: build the dual state '
                       'with `init(constraint_fn(params))`.')
    penalty = sum(jnp.sum(jax.lax.stop_gradient(lam) * g)
                  for lam, g in zip(jax.tree.leaves(multipliers), jax.tree.leaves(violations)))
    return loss + penalty, ((loss, violations, aux) if has_aux else (loss, violations))

  return objective
