r"""Inequality constraints ``g(θ) ≤ 0`` with Lagrange multipliers, optax style.

For ``min_θ loss(θ)`` subject to ``g_k(θ) ≤ 0`` the Lagrangian is

  L(θ, λ) = loss(θ) + Σ_k λ_k·g_k(θ),   λ_k ≥ 0.

Simultaneous gradient descent–ascent takes one forward/backward of ``L`` per
step: its gradient in θ is the primal step (any optax optimizer), its
gradient in λ, ``∂L/∂λ_k = g_k``, the dual step, which :func:`dual_ascent`
makes as an optax optimizer of the multipliers:

  1. λ_k ← λ_k + η·g_k                   (dual SGD)
  2. λ_k ← 0 where g_k < 0               (dual restart: the constraint is strictly satisfied)
  3. λ_k ← max(λ_k, 0)                   (projection onto λ ≥ 0)

with the multipliers starting at 0. Multipliers that never move
(``optax.set_to_zero()``, started at the penalty) turn the same training code
into the penalized problem ``loss + λ·g`` (the penalized L0 baseline).
:func:`lagrangian` wraps a loss and any callable constraint into the function
to differentiate, the multipliers behind ``stop_gradient``, and returns the
constraint values to feed :func:`dual_ascent`.

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
  >>> params, multipliers = {'gates': jnp.zeros(10)}, {'macs': jnp.zeros(())}
  >>> primal_state, dual_state = primal.init(params), dual.init(multipliers)
  >>> @jax.jit
  ... def step(params, multipliers, primal_state, dual_state):
  ...   grads, (loss, violations) = jax.grad(objective, has_aux=True)(params, multipliers)
  ...   updates, primal_state = primal.update(grads, primal_state)
  ...   dual_updates, dual_state = dual.update(violations, dual_state, multipliers)
  ...   return (optax.apply_updates(params, updates), optax.apply_updates(multipliers, dual_updates),
  ...           primal_state, dual_state)
  >>> for _ in range(1000):
  ...   params, multipliers, primal_state, dual_state = step(params, multipliers, primal_state, dual_state)
  >>> round(float(jnp.sum(jax.nn.sigmoid(params['gates']))), 2)    # on the budget
  4.0
  >>> round(float(multipliers['macs']), 1)   # λ* = 2·(1 − x*)/(σ'(x*)/4), σ(x*) = 0.4
  46.8

See Gallego-Posada et al., *Controlled Sparsity via Constrained Optimization*,
NeurIPS 2022, https://arxiv.org/abs/2208.04425 (dual restarts: its section 4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def dual_ascent(learning_rate: optax.ScalarOrSchedule, *, restarts: bool = True) -> optax.GradientTransformation:
  """Dual SGD on the multipliers, with dual restarts and the projection onto λ ≥ 0, as an optax optimizer.

  ``update(g, state, params=λ)``: ``g`` are the constraint values ``g_k(θ)``
  (``≤ 0``: satisfied) at the step's primal point, i.e. the gradient of
  ``Σ_k λ_k·g_k`` in ``λ``; the new multipliers are ``max(λ + η·g, 0)``, and
  0 where ``g < 0`` if ``restarts``. ``optax.apply_updates(λ, updates)`` gives
  them. Start the multipliers at 0.

  Args:
    learning_rate: ``η``, a number or an optax schedule of the dual step count
      (7e-4 on CIFAR, 1e-4 on MNIST in the seed paper).
    restarts: reset a multiplier to 0 as soon as its constraint is strictly
      satisfied, so a constraint that stops binding stops pulling at once. On a
      constraint that binds at the optimum λ then saw-tooths around λ* instead
      of settling; turn it off to get plain projected dual SGD.
  """
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError('dual_ascent needs the multipliers: call update(violations, state, params=multipliers).')
    eta = learning_rate(state.count) if callable(learning_rate) else learning_rate

    def step(multiplier, g):
      g = jnp.asarray(g, multiplier.dtype)
      new = jnp.maximum(multiplier + eta * g, 0.0)
      return (jnp.where(g < 0, 0.0, new) if restarts else new) - multiplier

    return (jax.tree.map(step, params, updates),
            optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count)))

  return optax.GradientTransformation(init, update)


def lagrangian(loss_fn: Callable[..., Any], constraint_fn: Callable[[Any], Any], *,
               has_aux: bool = False) -> Callable[..., Any]:
  """``(params, multipliers, *args) -> (loss + Σ λ_k·g_k(params), aux)``, to differentiate in ``params``.

  The multipliers enter through ``stop_gradient``: their step is
  :func:`dual_ascent`'s, not the gradient's.

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
                       f'{jax.tree.structure(multipliers)} differ in structure: start the multipliers '
                       'shaped like `constraint_fn(params)`.')
    penalty = sum(jnp.sum(jax.lax.stop_gradient(lam) * g)
                  for lam, g in zip(jax.tree.leaves(multipliers), jax.tree.leaves(violations)))
    return loss + penalty, ((loss, violations, aux) if has_aux else (loss, violations))

  return objective
