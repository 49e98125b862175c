"""Lagrange multipliers: the dual update against a NumPy transcription, GDA on a convex problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dessilbi_jax.l0 import constraints


def np_dual_step(lam, g, eta, restarts):
  """The seed paper's dual step, in its order: ascent, restart, projection."""
  lam = lam + eta * g
  if restarts:
    lam = np.where(g < 0, 0.0, lam)
  return np.maximum(lam, 0.0)


def _step(dual, multipliers, state, g):
  updates, state = dual.update(g, state, multipliers)
  return optax.apply_updates(multipliers, updates), state


@pytest.mark.parametrize('restarts', [True, False])
def test_dual_update_matches_numpy(restarts):
  rng = np.random.default_rng(0)
  shapes = {'layer': (5,), 'model': ()}
  schedule = optax.exponential_decay(0.3, transition_steps=10, decay_rate=0.5)
  dual = constraints.dual_ascent(schedule, restarts=restarts)
  multipliers = {k: jnp.zeros(s) for k, s in shapes.items()}
  state = dual.init(multipliers)
  expected = {k: np.zeros(s) for k, s in shapes.items()}
  step = jax.jit(lambda m, s, g: _step(dual, m, s, g))
  for t in range(30):
    # Mostly violated so the multipliers grow, with satisfied and exactly-zero entries mixed in.
    g = {k: np.round(rng.normal(0.3, 1.0, s), 1).astype(np.float32) for k, s in shapes.items()}
    multipliers, state = step(multipliers, state, g)
    expected = {k: np_dual_step(expected[k], g[k], float(schedule(t)), restarts) for k in shapes}
    for k in shapes:
      np.testing.assert_allclose(multipliers[k], expected[k], rtol=1e-5, atol=1e-6)
      assert multipliers[k].shape == shapes[k] and multipliers[k].dtype == jnp.float32
  assert int(state.count) == 30
  assert any(np.any(m > 0) for m in expected.values())   # the test exercised growth


def test_dual_ascent_is_fed_the_gradient_in_the_multipliers():
  """∂(Σλ·g)/∂λ = g: the gradient of the Lagrangian in λ is what dual_ascent ascends."""
  g = jnp.array([0.5, -0.2, 0.0])
  lam = jnp.array([1.0, 1.0, 1.0])
  dual = constraints.dual_ascent(2.0, restarts=False)
  grads = jax.grad(lambda lam: jnp.sum(lam * g))(lam)
  new, _ = _step(dual, lam, dual.init(lam), grads)
  np.testing.assert_allclose(new, [2.0, 0.6, 1.0])
  with pytest.raises(ValueError, match='params=multipliers'):
    dual.update(grads, dual.init(lam))


def test_restart_only_where_strictly_satisfied():
  dual = constraints.dual_ascent(1.0, restarts=True)
  lam = jnp.array([2.0, 2.0, 2.0])
  new, _ = _step(dual, lam, dual.init(lam), jnp.array([-1e-6, 0.0, 0.5]))
  np.testing.assert_array_equal(new, [0.0, 2.0, 2.5])


def test_projection_without_restarts():
  dual = constraints.dual_ascent(1.0, restarts=False)
  lam = jnp.array([2.0, 2.0, 0.0])
  new, _ = _step(dual, lam, dual.init(lam), jnp.array([-0.5, -5.0, -1.0]))
  np.testing.assert_array_equal(new, [1.5, 0.0, 0.0])


def test_non_finite_violations_stay_visible():
  """A NaN constraint value gives a NaN multiplier (the trainer's NaN check stops the run), not a silent 0."""
  dual = constraints.dual_ascent(1.0)
  lam = jnp.array([1.0, 1.0])
  new, _ = _step(dual, lam, dual.init(lam), jnp.array([jnp.nan, jnp.inf]))
  assert np.isnan(new[0]) and np.isinf(new[1])


def test_lagrangian_gradient_and_stopped_multipliers():
  loss_fn = lambda x: jnp.sum(x ** 2)
  constraint_fn = lambda x: {'c': jnp.sum(x) - 1.0, 'd': x[:2] - 0.5}
  objective = constraints.lagrangian(loss_fn, constraint_fn)
  x = jnp.array([1.0, 2.0, 3.0])
  multipliers = {'c': jnp.float32(0.7), 'd': jnp.array([0.2, 0.0])}
  (value, (loss, violations)), (gx, glam) = jax.value_and_grad(objective, (0, 1), has_aux=True)(x, multipliers)
  assert float(loss) == 14.0
  assert float(value) == pytest.approx(14.0 + 0.7 * 5.0 + 0.2 * 0.5 + 0.0 * 1.5)
  np.testing.assert_allclose(gx, 2 * x + 0.7 + np.array([0.2, 0.0, 0.0]), rtol=1e-6)
  assert all(np.all(g == 0) for g in jax.tree.leaves(glam))   # the dual step is not the gradient's
  np.testing.assert_allclose(violations['d'], [0.5, 1.5])


def test_lagrangian_rejects_mismatched_multipliers():
  objective = constraints.lagrangian(lambda x: jnp.sum(x), lambda x: {'c': jnp.sum(x)})
  with pytest.raises(ValueError, match='shaped like `constraint_fn\\(params\\)`'):
    objective(jnp.ones(2), {'other': jnp.float32(0.0)})


def _gda(a, constraint_fn, *, restarts, steps=2000, lr=0.1, dual_lr=0.1, x0=None):
  """Simultaneous GDA on min ½‖x − a‖² s.t. constraint_fn(x) ≤ 0, from x0 (default 0)."""
  objective = constraints.lagrangian(lambda x: 0.5 * jnp.sum((x - a) ** 2), constraint_fn)
  primal, dual = optax.sgd(lr), constraints.dual_ascent(dual_lr, restarts=restarts)
  x = jnp.zeros_like(a) if x0 is None else x0
  lam = jax.tree.map(jnp.zeros_like, constraint_fn(x))

  @jax.jit
  def step(x, lam, primal_state, dual_state):
    grads, (_, violations) = jax.grad(objective, has_aux=True)(x, lam)
    updates, primal_state = primal.update(grads, primal_state)
    lam, dual_state = _step(dual, lam, dual_state, violations)
    return optax.apply_updates(x, updates), lam, primal_state, dual_state

  primal_state, dual_state = primal.init(x), dual.init(lam)
  for _ in range(steps):
    x, lam, primal_state, dual_state = step(x, lam, primal_state, dual_state)
  return x, lam


def test_gda_lands_on_the_constrained_optimum():
  # min ½‖x − (1, 2)‖² s.t. x₁ + x₂ ≤ 1: KKT gives x* = a − λ*·1 with λ* = (Σa − 1)/2 = 1.
  a = jnp.array([1.0, 2.0])
  x, lam = _gda(a, lambda x: {'sum': jnp.sum(x) - 1.0}, restarts=False)
  np.testing.assert_allclose(x, [0.0, 1.0], atol=1e-4)
  assert float(lam['sum']) == pytest.approx(1.0, abs=1e-4)


def test_gda_per_coordinate_constraints():
  # x ≤ (0.5, 3) coordinate-wise: the first binds (λ₁* = a₁ − 0.5 = 0.5), the second does not (λ₂* = 0).
  a = jnp.array([1.0, 2.0])
  bound = jnp.array([0.5, 3.0])
  x, lam = _gda(a, lambda x: x - bound, restarts=False)
  np.testing.assert_allclose(x, [0.5, 2.0], atol=1e-4)
  np.testing.assert_allclose(lam, [0.5, 0.0], atol=1e-4)


def test_restarts_release_a_constraint_that_stops_binding():
  # From x = (5, 5) the constraint x₁ + x₂ ≤ 5 binds and λ grows; x heads for
  # a = (1, 2), where it is slack. Restarts drop λ to 0 the first step it is
  # satisfied; plain dual SGD keeps pulling x below a for a while.
  a, x0 = jnp.array([1.0, 2.0]), jnp.array([5.0, 5.0])
  budget = lambda x: {'sum': jnp.sum(x) - 5.0}
  x, lam = _gda(a, budget, restarts=True, steps=11, x0=x0)
  x_plain, lam_plain = _gda(a, budget, restarts=False, steps=11, x0=x0)
  assert float(lam['sum']) == 0.0 and float(lam_plain['sum']) > 1.0
  assert np.all(x > a) and np.all(x_plain[1] < a[1])
  x, lam = _gda(a, budget, restarts=True, steps=300, x0=x0)
  assert float(lam['sum']) == 0.0
  np.testing.assert_allclose(x, a, atol=1e-5)
